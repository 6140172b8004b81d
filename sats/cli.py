"""The ``sats`` command: train, test, demo, list, data.

    sats train CONFIG [key=value ...] [--steps 2:5] [reference flags: --task 15-1 --step 1 --lr 0.001 ...]
    sats train CONFIG [...] --test [--step N] [--ckpt PATH]      (the reference's test mode)
    sats config CONFIG [key=value ...] [reference flags]          (print the resolved config as YAML)
    sats test RUN_DIR [--step N]
    sats demo [--quick] [--methods joint,ft,...] [--tasks 15-5,15-1] [--from-scratch]
    sats list methods|tasks|backbones [--dataset voc]
    sats data check (CONFIG | --dataset voc --root PATH)
    sats data synthetic --root PATH [--num-train N --num-val N --seed S]
    sats data prepare voc|ade DIR [--download] [--archives ADIR] [--sbd auto|aug|benchmark] [--url FILE=URL]
    sats weights list | get NAME [--source S] | convert NAME FILE [-o OUT] | check (NAME [FILE] | CONFIG)
    sats report RUN_DIR [RUN_DIR ...] [-o OUT]
    sats visualize RUN_DIR [--images N] [--step S] [--start K | --ids A,B] [-o OUT.png]
    sats visualize RUN_DIR --tsne [--step S] [--per-class M] [--max-images N] [-o OUT.png]
    sats bench cost|scaling|accuracy|confusion|models|attention|all [options]   (source checkout)

Errors are one message on stderr ("sats: error: ...", `-v` adds the traceback), also written to the
run's train.log when one is open, and an exit code per kind (EXIT_CODES): 1 a check failed (`sats test`
mismatch, `sats data check` found bad files), 2 usage or config error, 3 data error, 4 run directory
or checkpoint error, 5 non-finite loss or gradient, 6 operating-system error (missing file,
permissions, disk full), 7 download error (no network, wrong size or hash), 128 + N stopped by
signal N (the state is saved; run again to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

from sats.allocator import tune_host_allocator

log = logging.getLogger("sats")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (not the stream it was created with)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool = False) -> None:
    logger = logging.getLogger("sats")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


def parse_steps(text: Optional[str], num_steps: int) -> Optional[List[int]]:
    """``"2"`` → [2]; ``"2:5"`` → [2, 3, 4, 5] (inclusive), ``"2:"`` → 2..last; ``"1,3"``; None: all."""
    if text is None:
        return None
    steps: List[int] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if ":" in item:
            lo, hi = item.split(":", 1)
            first = int(lo) if lo else 0
            last = int(hi) if hi else num_steps - 1
            steps += range(first, last + 1)
        else:
            steps.append(int(item))
    return sorted(set(steps))


def _steps_arg(text: Optional[str], num_steps: int) -> Optional[List[int]]:
    try:
        return parse_steps(text, num_steps)
    except ValueError:
        from sats.config import ConfigError

        raise ConfigError(f"steps {text!r}: expected N, A:B (inclusive), A: or a comma-separated list") from None


def _load_command_config(args: argparse.Namespace, extra: Sequence[str]):
    """The resolved config of `sats train/config CONFIG [overrides and reference flags]`, and the parsed line."""
    from sats.experiment import load_run_experiment
    from sats.reference_flags import parse_command_line, reference_notes

    if not str(args.config).endswith((".yaml", ".yml")) and any(str(e).endswith((".yaml", ".yml")) for e in extra):
        from sats.config import ConfigError

        raise ConfigError(f"{args.config!r} was read as the config file: put the config first "
                          f"(`sats {args.command} CONFIG [key=value ...] [--flags ...]`)")
    line = parse_command_line(list(extra))
    if line.verbose:  # the reference's --debug
        _setup_logging(True)
    cfg = load_run_experiment(args.config, line.overrides, exclude_from_name=line.name_exclude, per_step=line.per_step)
    for note in reference_notes(line, cfg):
        log.info("%s", note)
    return cfg, line


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from sats.config import ConfigError

    cfg, line = _load_command_config(args, extra)
    if line.steps is not None and args.steps is not None:
        raise ConfigError(f"give --steps {args.steps} or --step {line.steps}, not both")
    steps_text = args.steps if args.steps is not None else line.steps
    if line.test:
        return _test_resolved_run(cfg, steps_text, line.ckpt)
    if line.ckpt is not None:
        raise ConfigError(f"--ckpt {line.ckpt} without --test: sats resumes a run from its own directory "
                          f"({cfg.resolved_run_dir()}/checkpoints, written every epoch), so run the same command "
                          "again to resume; to evaluate a checkpoint file add --test (`--test --ckpt PATH --step N`)")
    from sats.engine.runner import Runner

    runner = Runner(cfg)
    if args.redo_step is not None:
        runner.redo_from(args.redo_step)
    rows = runner.run(_steps_arg(steps_text, runner.num_steps))
    if runner.dist.is_main:
        from sats.engine.results import markdown_table

        print(markdown_table(runner.header(), rows))
    return 0


def _test_resolved_run(cfg, steps_text: Optional[str], ckpt: Optional[str]) -> int:
    """`sats train CONFIG ... --test`: `sats test` on the config's run directory, or evaluate ``ckpt``."""
    run_dir = cfg.resolved_run_dir()
    if ckpt is not None:
        return _test_checkpoint_file(cfg, steps_text, Path(ckpt))
    from sats.engine.evaluation import retest_run
    from sats.engine.results import load_rows
    from sats.engine.rundir import RunError

    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"--test: no run in {run_dir} (no config.yaml): train it first with the same command "
                       "without --test, or give the run's name=/run_dir=")
    if steps_text is None:
        return 0 if retest_run(run_dir) else 1
    recorded = sorted(load_rows(run_dir))
    steps = _steps_arg(steps_text, (recorded[-1] + 1) if recorded else 1) or []
    ok = True
    for step in steps:
        ok &= retest_run(run_dir, step=step)
    return 0 if ok else 1


def _test_checkpoint_file(cfg, steps_text: Optional[str], path: Path) -> int:
    """`--test --ckpt PATH [--step N]`: evaluate one checkpoint file on the run's test images (reads only)."""
    from sats.config import ConfigError
    from sats.engine.checkpoint import load_checkpoint
    from sats.engine.evaluation import CheckpointEvaluator
    from sats.engine.results import markdown_table

    if steps_text is not None and ("," in steps_text or ":" in steps_text):
        raise ConfigError(f"--test --ckpt {path}: give one step (--step N), not {steps_text!r}")
    if steps_text is not None:
        step = int(steps_text)
    else:  # the step the checkpoint records
        step = load_checkpoint(path).get("step")
        if not isinstance(step, int):
            raise ConfigError(f"{path} records no step: give --step N")
    evaluator = CheckpointEvaluator(cfg)
    print(markdown_table(evaluator.header(), [evaluator.row(path, step)]))
    return 0


def cmd_config(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Print the resolved, validated config as YAML (what `sats train` with the same arguments would run)."""
    from omegaconf import OmegaConf

    from sats.config import config_to_dict

    cfg, _ = _load_command_config(args, extra)
    print(OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg))), end="")
    return 0


def cmd_test(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from sats.engine.evaluation import retest_run

    ok = retest_run(Path(args.run_dir), step=args.step)
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from sats.demo import run_demo

    methods = args.methods.split(",") if args.methods else None
    tasks = args.tasks.split(",") if args.tasks else None
    run_demo(output=Path(args.output) if args.output else None, methods=methods, quick=args.quick,
             overrides=list(extra), tasks=tasks, from_scratch=args.from_scratch)
    return 0


def _task_table(dataset: str) -> str:
    """The dataset whose task table ``dataset`` uses (synthetic: VOC's), as the engine maps it."""
    from sats.config import DataConfig
    from sats.engine.data import task_dataset_name

    return task_dataset_name(DataConfig(dataset=dataset))


def cmd_list(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if args.what == "methods":
        from sats.methods import get_addon_class, iter_methods, list_addons

        for cls in iter_methods():
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"{cls.name:10s} {cls.label:15s} {doc}")
        print("\nadd-ons, for any method (--method MiB+EWF, or method.addons: [ewf]):")
        for addon in map(get_addon_class, list_addons()):
            doc = (addon.__doc__ or "").strip().splitlines()[0] if addon.__doc__ else ""
            print(f"{addon.name:10s} {addon.label:15s} {doc}")
    elif args.what == "tasks":
        from sats.config import ConfigError
        from sats.data.tasks import get_task, list_tasks

        table = _task_table(args.dataset)
        try:
            names = list_tasks(table)
        except ValueError as exc:
            raise ConfigError(f"--dataset {args.dataset}: {exc}") from None
        if table != args.dataset:
            print(f"# {args.dataset} uses the {table} task table")
        for name in names:
            task = get_task(table, name)
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


def _data_prepare(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """`sats data prepare voc|ade DIR`: the dataset folder from the official archives (sats.data.prepare)."""
    from sats.config import ConfigError
    from sats.data.prepare import ARCHIVES, SPECS, STAMP, prepare

    if extra or args.config not in SPECS or not args.target:
        raise ConfigError("usage: sats data prepare voc|ade DIR [--download] [--archives ADIR] "
                          "[--sbd auto|aug|benchmark] [--url FILE=URL] [--mirror BASE]"
                          f"{'; unrecognised: ' + ' '.join(extra) if extra else ''}")
    urls = {}
    for item in args.url or []:
        name, _, url = item.partition("=")
        if name not in ARCHIVES or not url:
            raise ConfigError(f"--url {item!r}: expected FILE=URL with FILE one of {', '.join(ARCHIVES)}")
        urls[name] = url
    done_before = (Path(args.target) / STAMP).is_file()
    stamp = prepare(args.config, args.target, args.archives, download_missing=args.download, sbd=args.sbd,
                    urls=urls, mirrors=args.mirror or [], workers=args.workers)
    for name, record in stamp["archives"].items():
        checked = ", ".join(record["verified"])
        print(f"{name}: sha256 {record['sha256']} ({checked + ' verified' if checked else 'no published hash'})")
    counts = ", ".join(f"{split} {count:,}" for split, count in stamp["counts"].items())
    how = "prepared before; lists and files verified" if done_before else "every mask checked"
    print(f"{args.target}: {args.config} ready ({counts}; {how})")
    return 0


def cmd_data(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if args.action == "prepare":
        return _data_prepare(args, extra)
    if args.target is not None:  # `sats data check CONFIG key=value ...`: the second positional is an override
        extra = [args.target, *extra]
    if args.action == "synthetic":
        from sats.data.synthetic import dataset_statistics, ensure_synthetic

        root = ensure_synthetic(args.root, num_train=args.num_train, num_val=args.num_val,
                                size=(args.min_size, args.max_size), seed=args.seed)
        print(json.dumps(dataset_statistics(root), indent=1))
        return 0
    from sats.config import ConfigError
    from sats.data.datasets import build_files, check_dataset, format_problems

    if args.config:
        from sats.experiment import load_experiment
        from sats.reference_flags import parse_overrides
        from sats.engine.data import resolve_files

        cfg = load_experiment(args.config, parse_overrides(list(extra)))
        files = [resolve_files(cfg.data, s) for s in ("train", "val")]
    else:
        if not (args.dataset and args.root):
            raise ConfigError("sats data check needs CONFIG, or --dataset and --root")
        _task_table(args.dataset)  # validates the dataset name
        # the synthetic dataset is written in VOC layout (sats.engine.data.resolve_files reads it so); a check
        # reads the folder as it is and never (re)generates it
        layout = "voc" if args.dataset == "synthetic" else args.dataset
        files = [build_files(layout, args.root, s) for s in ("train", "val")]
    bad = 0
    for f in files:
        problems = check_dataset(f, workers=args.workers)
        print(f"{f.split}: {len(f)} images, {len(problems)} bad")
        if problems:
            print(format_problems(problems))
        bad += len(problems)
    return 1 if bad else 0


def cmd_weights(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from sats.config import ConfigError
    from sats.models import zoo

    if args.action == "list":
        print(zoo.describe_weights())
        return 0
    if not args.name:
        raise ConfigError(f"sats weights {args.action} needs NAME ({', '.join(zoo.WEIGHTS)})")
    if args.action == "check" and args.name.endswith((".yaml", ".yml")):
        from sats.experiment import load_experiment
        from sats.reference_flags import parse_overrides

        cfg = load_experiment(args.name, parse_overrides([*([args.file] if args.file else []), *extra]))
        result = zoo.check_weights(cfg.model.backbone, None, cfg.model.pretrained_format, model=cfg.model)
    elif extra:
        raise ConfigError(f"sats weights {args.action}: unrecognised arguments: {' '.join(extra)}")
    elif args.action == "get":
        result = zoo.get_weights(args.name, args.source, url=args.url, mirrors=args.mirror or [], root=args.dir,
                                 force=args.force)
    elif args.action == "convert":
        if not args.file:
            raise ConfigError(f"sats weights convert {args.name} FILE: give the checkpoint to convert")
        result = zoo.convert_weights(args.name, args.file, args.output, args.format, args.force)
    else:
        result = zoo.check_weights(args.name, args.file, args.format)
    print(result.summary())
    return 0 if result.clean else 1


def cmd_hub(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from sats import hub

    if extra:
        print(f"sats: error: sats hub {args.action}: unrecognised arguments: {' '.join(extra)}", file=sys.stderr)
        return 2
    try:
        if args.action == "export":
            steps = hub.export_run(Path(args.source), Path(args.target))
            print(f"exported steps {steps} of {args.source} to {args.target} (upload it with sats hub push)")
        elif args.action == "push":
            url = hub.push(Path(args.source), args.target, private=args.private, token=args.token)
            print(f"published {args.source} at {url}")
        else:
            steps = hub.pull(args.source, Path(args.target), revision=args.revision, token=args.token)
            print(f"rebuilt {args.target} (steps {steps}); re-test it with: sats test {args.target}")
            if args.test:
                from sats.engine.evaluation import retest_run

                return 0 if retest_run(Path(args.target)) else 1
    except hub.HubError as exc:
        return _user_error(exc)
    return 0


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
    written = [files.summary_md, files.summary_csv, files.curves_png, *files.heatmaps.values(),
               *files.statistics.values()]
    if files.paper_csv is not None:
        written.append(files.paper_csv)
    print("written:\n" + "\n".join(f"  {p}" for p in written))
    return 0


def cmd_bench(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Run ``python -m benchmarks`` of the source checkout this package lives in (a separate process:
    the package never imports the benchmarks)."""
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "__main__.py").is_file():
        print(f"sats: error: `sats bench` runs the benchmarks/ folder of a source checkout, and there is none at "
              f"{root / 'benchmarks'}; clone the sats repository and run it from there", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "benchmarks", *args.bench_args, *extra], env=env).returncode


def cmd_predict(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from sats.report.predict import predict_images

    summary = predict_images(args.run_dir, args.images, args.output, step=args.step, mode=args.mode,
                             batch_size=args.batch_size, overlay=not args.no_overlay, device=args.device)
    print(f"step {summary['step']} of {args.run_dir}: {len(summary['images'])} image(s) → {args.output} "
          "(<stem>.png class-id masks, <stem>_overlay.jpg, <stem>.json class areas, predictions.json)")
    return 0


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


_TRAIN_EPILOG = """\
overrides: any config key as key.sub=value after CONFIG, e.g.
  data.task=15-1 train.lr=0.002 method.name=mib method.lambda_kd=10 model.embed_dims=[8,16,16,32]
  (every key and its default: sats/config.py, model keys sats/models/config.py, method keys each
  method's Params; `sats config CONFIG [overrides]` prints the resolved config)

run directory: output_dir/name, or run_dir=PATH. Unless name= or run_dir= is given, the name is
the config's name plus what the overrides changed, e.g. demo-ft_task=15-1_lr=0.002 (keys that do
not change results, such as log.* and data.workers, are left out; with --step, so are the per-step
--lr/--epochs, so that the commands of one experiment share its run directory).

"""


def _add_verbose(sub: argparse.ArgumentParser) -> None:
    """-v after the command too (`sats train CONFIG -v`); SUPPRESS keeps a `sats -v train` from being reset."""
    sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="debug logging; errors with their traceback")


def build_parser() -> argparse.ArgumentParser:
    from sats.reference_flags import reference_flag_help

    p = argparse.ArgumentParser(prog="sats", description="Continual semantic segmentation: SATS and its baselines.",
                                allow_abbrev=False)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging; errors with their traceback")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run every step of an experiment (resumes a run directory)",
                       usage="sats train CONFIG [key.sub=value ...] [--steps S] [reference flags ...]",
                       description="Run the steps of an experiment in its run directory (a second call resumes it).",
                       epilog=_TRAIN_EPILOG + reference_flag_help(), allow_abbrev=False,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", help="YAML config (may use _base_)")
    t.add_argument("--steps", help="steps to run: N, A:B (inclusive), A: or N,M (the reference's --step works too)")
    t.add_argument("--redo-step", type=int, default=None, metavar="T",
                   help="train step T and every later step again: their checkpoints and results are moved to "
                        "RUN_DIR/checkpoints/discarded-<time>/ first (e.g. after a damaged checkpoint)")
    _add_verbose(t)
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("config", help="print the resolved, validated config as YAML and exit",
                       usage="sats config CONFIG [key.sub=value ...] [reference flags ...]",
                       description="Print the config `sats train` would run with the same arguments (YAML).",
                       epilog="overrides and reference flags as for `sats train` (`sats train --help`)",
                       allow_abbrev=False)
    c.add_argument("config", help="YAML config (may use _base_)")
    _add_verbose(c)
    c.set_defaults(func=cmd_config)

    e = sub.add_parser("test", help="re-evaluate the checkpoints of a run and compare with its results")
    e.add_argument("run_dir")
    e.add_argument("--step", type=int, default=None)
    _add_verbose(e)
    e.set_defaults(func=cmd_test)

    d = sub.add_parser("demo", help="the embedded-dataset demo: joint, FT and the continual methods")
    d.add_argument("--output", default=None, help="runs/demo (default), runs/demo-scratch with --from-scratch, -quick added with --quick")
    d.add_argument("--methods", default=None, help="comma-separated subset of the demo's methods")
    d.add_argument("--tasks", default=None, help="comma-separated VOC tasks (default 15-5,15-1)")
    d.add_argument("--from-scratch", action="store_true",
                   help="random-init encoder instead of the shipped pretrained one (builtin:mit-tiny-synthetic)")
    d.add_argument("--quick", action="store_true", help="a much shorter schedule (smoke test)")
    _add_verbose(d)
    d.set_defaults(func=cmd_demo)

    ls = sub.add_parser("list", help="list methods, tasks or backbones")
    ls.add_argument("what", choices=["methods", "tasks", "backbones"])
    ls.add_argument("--dataset", default="voc", help="tasks of voc | ade | synthetic (VOC's tasks)")
    _add_verbose(ls)
    ls.set_defaults(func=cmd_list)

    da = sub.add_parser("data", help="dataset tools")
    da.add_argument("action", choices=["check", "synthetic", "prepare"])
    da.add_argument("config", nargs="?", default=None, help="check: CONFIG; prepare: voc | ade")
    da.add_argument("target", nargs="?", default=None, help="prepare: the dataset folder to write (e.g. data/voc)")
    da.add_argument("--dataset", default=None, help="voc | ade | folder | synthetic (read in VOC layout)")
    da.add_argument("--root", default=None)
    da.add_argument("--workers", type=int, default=2)
    da.add_argument("--num-train", type=int, default=800)
    da.add_argument("--num-val", type=int, default=120)
    da.add_argument("--min-size", type=int, default=64)
    da.add_argument("--max-size", type=int, default=112)
    da.add_argument("--seed", type=int, default=0)
    da.add_argument("--archives", default=None, help="prepare: folder of the archives (default DIR/../archives)")
    da.add_argument("--download", action="store_true", help="prepare: download missing archives (resumed, hashed)")
    da.add_argument("--sbd", default="auto", choices=["auto", "aug", "benchmark"],
                    help="prepare voc: SBD masks from SegmentationClassAug.zip (aug) or benchmark.tgz")
    da.add_argument("--url", action="append", metavar="FILE=URL", help="prepare: another URL for an archive")
    da.add_argument("--mirror", action="append", metavar="BASE", help="prepare: try BASE/<archive> first")
    _add_verbose(da)
    da.set_defaults(func=cmd_data)

    w = sub.add_parser("weights", help="pretrained encoders: list, get (download), convert, check",
                       description="Pretrained encoders (sats.models.zoo): `get` writes the file the configs "
                                   "expect under pretrained/; every file is loaded into its encoder.")
    w.add_argument("action", choices=["list", "get", "convert", "check"])
    w.add_argument("name", nargs="?", default=None, help="mit_b0 … mit_b5 | resnet101 (check: or a CONFIG)")
    w.add_argument("file", nargs="?", default=None, help="convert: the checkpoint to convert; check: the file "
                                                          "(default: the one the configs expect)")
    w.add_argument("--source", default=None, help="get: hf | official (mit_bX), iabn | torchvision (resnet101)")
    w.add_argument("--url", default=None, help="get: download from this URL instead")
    w.add_argument("--mirror", action="append", metavar="BASE", help="get: try BASE/<file> first")
    w.add_argument("--dir", default=None, help="get: write into this folder instead of pretrained/")
    w.add_argument("-o", "--output", default=None, help="convert: output file (default: pretrained/<name>.pth)")
    w.add_argument("--format", default="auto", help="convert/check: auto | mit | hf | torchvision | iabn")
    w.add_argument("--force", action="store_true", help="get: download again; convert: replace the output")
    _add_verbose(w)
    w.set_defaults(func=cmd_weights)

    hb = sub.add_parser("hub", help="publish a run's checkpoints on the Hugging Face Hub, or get one back",
                        description="push RUN_DIR USER/REPO | pull USER/REPO DIR [--test] | export RUN_DIR FOLDER "
                                    "(the folder push uploads: safetensors, JSON, config, results, model card)")
    hb.add_argument("action", choices=["push", "pull", "export"])
    hb.add_argument("source", help="push/export: the run directory; pull: the Hub repository (USER/REPO)")
    hb.add_argument("target", help="push: the Hub repository; pull: the new run directory; export: a folder")
    hb.add_argument("--private", action="store_true", help="push: create the repository as private")
    hb.add_argument("--revision", default=None, help="pull: a branch, tag or commit of the repository")
    hb.add_argument("--token", default=None, help="Hub token (default: the logged-in one, HF_TOKEN)")
    hb.add_argument("--test", action="store_true", help="pull: re-test the rebuilt run at once (sats test)")
    _add_verbose(hb)
    hb.set_defaults(func=cmd_hub)

    r = sub.add_parser("report", help="tables (markdown, CSV) and figures across run directories")
    r.add_argument("run_dirs", nargs="+", help="run directories (each with a results.json)")
    r.add_argument("-o", "--output", default="runs/report", help="output folder (default runs/report)")
    _add_verbose(r)
    r.set_defaults(func=cmd_report)

    pr = sub.add_parser("predict", help="segment images with a run's checkpoint (masks, overlays, class areas)")
    pr.add_argument("run_dir")
    pr.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    pr.add_argument("-o", "--output", required=True, help="output folder")
    pr.add_argument("--step", type=int, default=None, help="the step's checkpoint (default: the last finished)")
    pr.add_argument("--mode", default="full", choices=["full", "resize", "sliding"],
                    help="full image (default), shorter side to data.eval_size, or data.crop_size windows")
    pr.add_argument("--batch-size", type=int, default=4)
    pr.add_argument("--no-overlay", action="store_true")
    pr.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    pr.set_defaults(func=cmd_predict)

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
    _add_verbose(v)
    v.set_defaults(func=cmd_visualize)

    bn = sub.add_parser("bench", help="benchmarks: method cost, scaling, accuracy (source checkout; "
                                      "`sats bench --help` lists them)", add_help=False)
    bn.add_argument("bench_args", nargs=argparse.REMAINDER, help="COMMAND [options] of python -m benchmarks")
    bn.set_defaults(func=cmd_bench)
    return p


#: exit codes of the expected errors (module, class, code, hint); the first matching class wins, so a
#: subclass (NonFiniteGradientError of NonFiniteLossError) comes before its base where they differ
EXIT_CODES = (
    ("sats.config", "ConfigError", 2, None),
    ("sats.data.datasets", "DataError", 3,
     "`sats data check CONFIG` lists every bad file at once; data.on_error=skip trains without them"),
    ("sats.engine.runner", "NonFiniteLossError", 5,  # NonFiniteGradientError is one
     "lower train.lr (train.lr_incremental at steps > 0) or set train.grad_clip"),
    ("sats.engine.rundir", "RunError", 4, None),
    ("sats.engine.checkpoint", "CheckpointError", 4,
     "a damaged step or epoch checkpoint can be deleted: the run then redoes that part"),
    ("sats.io", "FileError", 4, None),  # results, caches: the message names the file and the cause
    ("sats.models.weights", "WeightsError", 4, "check model.pretrained and model.pretrained_format"),
    ("sats.methods._importance", "MissingImportanceError", 4, None),
    ("sats.download", "DownloadError", 7, None),  # the message names every URL tried and why it failed
    ("builtins", "OSError", 6, None),
)
EXIT_INTERRUPTED = 130  # Ctrl-C outside a run (a run's SIGINT/SIGTERM: RunInterrupted.exit_code)


def _error_kind(exc: BaseException) -> Optional[tuple]:
    import importlib

    for module, name, code, hint in EXIT_CODES:
        if isinstance(exc, getattr(importlib.import_module(module), name)):
            return code, hint
    return None


def _log_to_files(level: int, message: str, exc: Optional[BaseException]) -> None:
    """Write ``message`` (and the traceback) to the "sats" logger's file handlers only (a run's train.log):
    stderr gets the one-line message from :func:`_report_error`, not a second copy from the stream handler."""
    logger = logging.getLogger("sats")
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    record = logger.makeRecord(logger.name, level, __file__, 0, message, (), exc_info)
    for handler in files:
        if record.levelno >= handler.level:
            handler.handle(record)


def _report_error(exc: BaseException, code: int, hint: Optional[str], verbose: bool) -> int:
    message = str(exc).strip() or type(exc).__name__
    _log_to_files(logging.ERROR, f"error: {message}", exc)
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"sats: error: {message}", file=sys.stderr)
    if hint and not verbose:
        print(f"sats: hint: {hint} (sats -v shows the traceback)", file=sys.stderr)
    elif hint:
        print(f"sats: hint: {hint}", file=sys.stderr)
    return code


def main(argv: Optional[Sequence[str]] = None) -> int:
    from sats.engine.signals import RunInterrupted

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    verbose = bool(getattr(args, "verbose", False)) or (args.command in ("train", "config") and "--debug" in extra)
    _setup_logging(verbose)
    if extra and args.command not in ("train", "config", "demo", "data", "bench", "weights"):
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    try:
        logging.getLogger("sats").debug(tune_host_allocator())  # before the first large tensor (sats/allocator.py)
        return args.func(args, extra)
    except RunInterrupted as exc:  # SIGINT/SIGTERM: the state is saved; the message says how to resume
        _log_to_files(logging.WARNING, str(exc), None)
        print(f"sats: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("sats: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - only the expected kinds become messages; others re-raise
        kind = _error_kind(exc)
        if kind is None:
            raise
        code, hint = kind
        if args.command == "data" or (hint and "data.on_error" in str(exc)):  # the message says it already
            hint = None
        return _report_error(exc, code, hint, verbose)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
