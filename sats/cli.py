"""The ``sats`` command: train, test, demo, list, data.

    sats train CONFIG [key=value ...] [--steps 2:5] [reference flags: --task 15-1 --lr 0.001 ...]
    sats test RUN_DIR [--step N]
    sats demo [--quick] [--methods joint,ft,...]
    sats list methods|tasks|backbones [--dataset voc]
    sats data check (CONFIG | --dataset voc --root PATH)
    sats data synthetic --root PATH [--num-train N --num-val N --seed S]
    sats report RUN_DIR [RUN_DIR ...] [-o OUT]
    sats visualize RUN_DIR [--images N] [--step S] [--start K | --ids A,B] [-o OUT.png]
    sats visualize RUN_DIR --tsne [--step S] [--per-class M] [--max-images N] [-o OUT.png]
    sats bench cost|scaling|accuracy|confusion|models|attention|all [options]   (source checkout)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence

log = logging.getLogger("sats")


def _setup_logging(verbose: bool = False) -> None:
    logger = logging.getLogger("sats")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def parse_steps(text: Optional[str], num_steps: int) -> Optional[List[int]]:
    """``"2"`` → [2]; ``"2:5"`` → [2, 3, 4, 5] (inclusive); ``"2:"`` → 2..last; None → all."""
    if text is None:
        return None
    if ":" in text:
        lo, hi = text.split(":", 1)
        first = int(lo) if lo else 0
        last = int(hi) if hi else num_steps - 1
        return list(range(first, last + 1))
    return [int(text)]


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from sats.config import load_config, parse_overrides
    from sats.engine.runner import Runner

    overrides = parse_overrides(list(extra))
    step_flag = [o for o in overrides if o.startswith("step=")]
    if step_flag:  # reference habit: --step N (handled as --steps N)
        raise SystemExit("use --steps N (or --steps A:B); `sats train` runs every step by default")
    cfg = load_config(args.config, overrides)
    runner = Runner(cfg)
    rows = runner.run(parse_steps(args.steps, runner.num_steps))
    if runner.dist.is_main:
        from sats.engine.results import markdown_table

        print(markdown_table(runner._header(), rows))
    return 0


def cmd_test(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from sats.engine.evaluation import retest_run

    ok = retest_run(Path(args.run_dir), step=args.step)
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from sats.demo import run_demo

    methods = args.methods.split(",") if args.methods else None
    run_demo(output=Path(args.output), methods=methods, quick=args.quick, overrides=list(extra))
    return 0


def cmd_list(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if args.what == "methods":
        from sats.methods import iter_methods

        for cls in iter_methods():
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"{cls.name:10s} {doc}")
    elif args.what == "tasks":
        from sats.data.tasks import get_task, list_tasks

        for name in list_tasks(args.dataset):
            task = get_task(args.dataset, name)
            print(f"{name:14s} {task.num_steps:2d} steps  " + " | ".join(_span(s) for s in task.steps))
    else:
        from sats.models.config import BACKBONES

        for name in BACKBONES:
            print(name)
    return 0


def _span(classes: Sequence[int]) -> str:
    classes = list(classes)
    if len(classes) > 2 and classes == list(range(classes[0], classes[-1] + 1)):
        return f"{classes[0]}-{classes[-1]}"
    return ",".join(map(str, classes))


def cmd_data(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if args.action == "synthetic":
        from sats.data.synthetic import dataset_statistics, ensure_synthetic

        root = ensure_synthetic(args.root, num_train=args.num_train, num_val=args.num_val,
                                size=(args.min_size, args.max_size), seed=args.seed)
        print(json.dumps(dataset_statistics(root), indent=1))
        return 0
    from sats.data.datasets import build_files, check_dataset, format_problems

    if args.config:
        from sats.config import load_config, parse_overrides
        from sats.engine.data import resolve_files

        cfg = load_config(args.config, parse_overrides(list(extra)))
        files = [resolve_files(cfg.data, s) for s in ("train", "val")]
    else:
        if not (args.dataset and args.root):
            raise SystemExit("sats data check needs CONFIG or --dataset and --root")
        files = [build_files(args.dataset, args.root, s) for s in ("train", "val")]
    bad = 0
    for f in files:
        problems = check_dataset(f, workers=args.workers)
        print(f"{f.split}: {len(f)} images, {len(problems)} bad")
        if problems:
            print(format_problems(problems))
        bad += len(problems)
    return 1 if bad else 0


def _user_error(exc: Exception) -> int:
    """Print a report/visualize error (bad path, missing file or optional dependency) without a traceback."""
    print(f"sats: error: {exc}", file=sys.stderr)
    return 2


def cmd_report(args: argparse.Namespace, extra: Sequence[str]) -> int:
    try:
        return _report(args)
    except (FileNotFoundError, ValueError) as exc:
        return _user_error(exc)


def _report(args: argparse.Namespace) -> int:
    from sats.report.summary import write_report

    files = write_report(args.run_dirs, Path(args.output))
    print(Path(files.summary_md).read_text())
    written = [files.summary_md, files.summary_csv, files.curves_png, *files.heatmaps.values()]
    if files.paper_csv is not None:
        written.append(files.paper_csv)
    print("written:\n" + "\n".join(f"  {p}" for p in written))
    return 0


def cmd_bench(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Forward to ``python -m benchmarks`` of the source checkout this package lives in."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        print(f"sats: error: `sats bench` runs the benchmarks/ folder of a source checkout, and there is none at "
              f"{root / 'benchmarks'}; clone the sats repository and run it from there", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.__main__ import main as bench_main

    return bench_main([*args.bench_args, *extra])


def cmd_visualize(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from sats.engine.checkpoint import CheckpointError

    try:
        return _visualize(args)
    except (FileNotFoundError, ValueError, ImportError, CheckpointError) as exc:
        return _user_error(exc)


def _visualize(args: argparse.Namespace) -> int:
    if args.tsne:
        from sats.report.tsne import write_tsne

        if args.step is not None and not args.step.isdigit():
            raise ValueError(f"--tsne takes one step number, got --step {args.step!r}")
        step = None if args.step is None else int(args.step)
        path = write_tsne(args.run_dir, args.output, step=step, per_class=args.per_class, max_images=args.max_images,
                          device=args.device, seed=args.seed)
    else:
        from sats.report.visualize import open_run, plot_prediction_grid, predict_grid

        ctx = open_run(args.run_dir, args.device)
        steps = parse_steps(args.step, ctx.num_steps)
        ids = [i for i in args.ids.split(",") if i] if args.ids else None
        grid = predict_grid(ctx, args.images, steps, args.start, ids)
        path = plot_prediction_grid(grid, ctx, Path(args.output) if args.output else
                                    ctx.run_dir / "figures" / "predictions.png")
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sats", description="Continual semantic segmentation: SATS and its baselines.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run every step of an experiment (resumes a run directory)")
    t.add_argument("config", help="YAML config (may use _base_)")
    t.add_argument("--steps", help="steps to run: N, A:B (inclusive) or A:")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("test", help="re-evaluate the checkpoints of a run and compare with its results")
    e.add_argument("run_dir")
    e.add_argument("--step", type=int, default=None)
    e.set_defaults(func=cmd_test)

    d = sub.add_parser("demo", help="the embedded-dataset demo: joint, FT and the continual methods")
    d.add_argument("--output", default="runs/demo")
    d.add_argument("--methods", default=None, help="comma-separated subset of the demo's methods")
    d.add_argument("--quick", action="store_true", help="a much shorter schedule (smoke test)")
    d.set_defaults(func=cmd_demo)

    ls = sub.add_parser("list", help="list methods, tasks or backbones")
    ls.add_argument("what", choices=["methods", "tasks", "backbones"])
    ls.add_argument("--dataset", default="voc")
    ls.set_defaults(func=cmd_list)

    da = sub.add_parser("data", help="dataset tools")
    da.add_argument("action", choices=["check", "synthetic"])
    da.add_argument("config", nargs="?", default=None)
    da.add_argument("--dataset", default=None)
    da.add_argument("--root", default=None)
    da.add_argument("--workers", type=int, default=2)
    da.add_argument("--num-train", type=int, default=800)
    da.add_argument("--num-val", type=int, default=120)
    da.add_argument("--min-size", type=int, default=64)
    da.add_argument("--max-size", type=int, default=112)
    da.add_argument("--seed", type=int, default=0)
    da.set_defaults(func=cmd_data)

    r = sub.add_parser("report", help="tables (markdown, CSV) and figures across run directories")
    r.add_argument("run_dirs", nargs="+", help="run directories (each with a results.json)")
    r.add_argument("-o", "--output", default="runs/report", help="output folder (default runs/report)")
    r.set_defaults(func=cmd_report)

    v = sub.add_parser("visualize", help="prediction grid after each step, or a t-SNE of decoder features")
    v.add_argument("run_dir")
    v.add_argument("--images", type=int, default=4, help="test images (rows of the grid)")
    v.add_argument("--step", default=None, help="grid: steps to show (N, A:B, A:; default all); "
                                                 "--tsne: the step (default the last)")
    v.add_argument("--start", type=int, default=0, help="first test image of the grid")
    v.add_argument("--ids", default=None, help="comma-separated image ids instead of --images/--start")
    v.add_argument("--tsne", action="store_true", help="t-SNE of the decoder features (needs openTSNE)")
    v.add_argument("--per-class", type=int, default=200, help="t-SNE: pixels per class")
    v.add_argument("--max-images", type=int, default=100, help="t-SNE: test images visited")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    v.add_argument("-o", "--output", default=None, help="PNG path (default RUN_DIR/figures/...)")
    v.set_defaults(func=cmd_visualize)

    bn = sub.add_parser("bench", help="benchmarks: method cost, scaling, accuracy (source checkout; "
                                      "`sats bench --help` lists them)", add_help=False)
    bn.add_argument("bench_args", nargs=argparse.REMAINDER, help="COMMAND [options] of python -m benchmarks")
    bn.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sats.config import ConfigError
    from sats.engine.signals import RunInterrupted

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _setup_logging(args.verbose)
    if extra and args.command not in ("train", "demo", "data", "bench"):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except ConfigError as exc:
        print(f"sats: config error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:  # SIGINT/SIGTERM: the state is saved; the message says how to resume
        print(f"sats: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
