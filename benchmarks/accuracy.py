"""Continual accuracy of every method on the embedded synthetic data: old / new / all mIoU.

Usage (from the repository root; ``sats bench accuracy ...`` is the same)::

    python -m benchmarks accuracy                                  # 15-5, seed 42, every registered method
    python -m benchmarks accuracy --tasks 15-5 15-1 --seeds 42 43 44
    python -m benchmarks accuracy --methods joint,ft,mib,plop,sats train.epochs=4   # dotted overrides
    python -m benchmarks accuracy --quick                          # the demo's smoke-test schedule

Every method runs its demo configuration (``configs/demo/<method>.yaml``: a tiny SegFormer from
scratch on the synthetic VOC-layout data, overlapped protocol; a method without a demo config gets
``configs/demo/_base.yaml`` + ``configs/_base_/methods/<method>.yaml``) through the normal
:class:`~sats.engine.runner.Runner`, with ``data.task`` and ``train.seed`` set per run. Methods
whose step 0 is plain CE share one step-0 checkpoint per (task, seed) through ``data.cache_dir``
(default ``.cache/sats``, shared with ``sats demo``). Joint training is the upper bound, FT the
lower bound. A method that needs inputs the configuration cannot provide (e.g. saliency maps
without ``data.saliency_root``) is skipped and listed with the reason.

Run directories go to ``--work-dir`` (default ``runs/bench-accuracy/<task>/seed<seed>/<method>``);
a finished run is reused when the command is repeated (``--fresh`` deletes it first). Results:

* ``benchmarks/results/accuracy-synthetic.json``: every (task, seed, method) row (per-step old /
  new / all) and the per-task summary over seeds (mean, sample std);
* ``accuracy-synthetic.md``: per task, old / new / all after the last step and averaged over steps;
* ``accuracy-synthetic-<task>.png``: mIoU after each step (first seed), and
  ``accuracy-synthetic.png``: final old / new / all per method and task (mean ± std over seeds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sats.config import ExperimentConfig  # noqa: E402
from sats.experiment import load_experiment  # noqa: E402
from sats.data.tasks import get_task  # noqa: E402
from sats.io import write_json_atomic, write_text_atomic  # noqa: E402
from sats.report.runs import RunResult, load_run  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
DEMO_CONFIGS = ROOT / "configs" / "demo"
METHOD_CONFIGS = ROOT / "configs" / "_base_" / "methods"
GROUPS = ("old", "new", "all")
BOUNDS = {"joint": "upper bound", "ft": "lower bound"}
QUICK_OVERRIDES = ["train.epochs=1", "train.epochs_incremental=1", "data.synthetic.num_train=64",
                   "data.synthetic.num_val=24", "data.root=data/synthetic-quick"]


def method_config_path(method: str, work_dir: Path) -> Path:
    """The demo config of ``method``, or one composed from the demo base and the method's base config."""
    demo = DEMO_CONFIGS / f"{method}.yaml"
    if demo.is_file():
        return demo
    composed = work_dir / "configs" / f"{method}.yaml"
    composed.parent.mkdir(parents=True, exist_ok=True)
    bases = [str(DEMO_CONFIGS / "_base.yaml")]
    method_yaml = METHOD_CONFIGS / f"{method}.yaml"
    if method_yaml.is_file():
        bases.append(str(method_yaml))
    text = f"# composed by benchmarks/accuracy.py: no configs/demo/{method}.yaml\n_base_: [{', '.join(bases)}]\n" \
           f"name: demo-{method}\nmethod:\n  name: {method}\n"
    write_text_atomic(composed, text)
    return composed


def ordered_methods(names: Sequence[str]) -> list[str]:
    """Upper bound, lower bound, then the others alphabetically."""
    return [m for m in BOUNDS if m in names] + sorted(m for m in names if m not in BOUNDS)


def run_one(method: str, task: str, seed: int, work_dir: Path, cache_dir: Optional[Path], overrides: Sequence[str],
            fresh: bool) -> dict[str, Any]:
    """Train and test one method on one task and seed; the entry stored in the JSON."""
    from sats.engine.data import task_dataset_name
    from sats.engine.runner import Runner
    from sats.methods import build_method

    run_dir = work_dir / task / f"seed{seed}" / method
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    values = [f"data.task={task}", f"train.seed={seed}", f"run_dir={run_dir}", "log.progress=false",
              "log.tensorboard=false", "log.overlay_images=0"]
    if cache_dir is not None:
        values.append(f"data.cache_dir={cache_dir}")
    cfg: ExperimentConfig = load_experiment(method_config_path(method, work_dir), [*values, *overrides])
    method = build_method(cfg.method)
    steps = 1 if method.joint else get_task(task_dataset_name(cfg.data), cfg.data.task, cfg.data.order).num_steps
    if not cfg.data.saliency_root and any(method.needs_saliency_at(t) for t in range(steps)):
        return {"skipped": "needs saliency maps and the config sets no data.saliency_root"}
    tic = time.perf_counter()
    Runner(cfg).run()
    run = load_run(run_dir, label=method)
    return {"run_dir": str(run_dir), "wall_s": round(time.perf_counter() - tic, 1), **summarize_run(run)}


def summarize_run(run: RunResult) -> dict[str, Any]:
    """Final and step-averaged old / new / all (fractions), per-step values, recorded seconds."""
    out: dict[str, Any] = {"method": run.method, "num_steps": run.num_steps, "finished": run.finished,
                           "seconds": round(run.seconds, 1),
                           "shared_step0": run.rows[0].get("shared_step0") if run.rows else None}
    for group in GROUPS:
        out[group] = run.final(group)
        out[f"avg_{group}"] = run.average(group)
        out[f"steps_{group}"] = run.series(group)[1]
    return out


def summarize_seeds(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample std (0 for one seed) of every final / averaged group over seeds."""
    out: dict[str, Any] = {"seeds": len(entries)}
    for key in [*GROUPS, *(f"avg_{g}" for g in GROUPS)]:
        values = [e[key] for e in entries if e.get(key) is not None]
        out[key] = statistics.fmean(values) if values else None
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)
    out["seconds"] = statistics.fmean(e["seconds"] for e in entries)
    return out


def _cell(mean: Optional[float], std: Optional[float], seeds: int) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if seeds > 1 and std is not None else "")


def accuracy_markdown(payload: dict[str, Any]) -> str:
    """Per task: old / new / all after the last step and averaged over steps (percent, mean ± std)."""
    lines = ["# Continual accuracy on the synthetic data", "",
             "Demo configurations (tiny SegFormer from scratch, `configs/demo/`), overlapped protocol. mIoU (%): "
             "old = step-0 classes (background included), new = classes added later, all = every class; "
             "\"avg\" = mean over the steps. Joint = upper bound, FT = lower bound. Time: training + test "
             "seconds recorded in the runs (a shared step 0 counts for the run that trained it).", "",
             "Runs merged into these tables:", ""]
    lines += [f"- {env.get('device_name', '?')}, torch {env.get('torch', '?')}, {env.get('date', '?')}"
              f"{' (quick schedule)' if env.get('quick') else ''}: `{env.get('command', '')}`"
              for env in payload.get("runs", [])]
    lines.append("")
    for task, block in payload["tasks"].items():
        summary = block["summary"]
        seeds = sorted(block["per_seed"], key=int)
        lines += [f"## VOC-layout synthetic {task} (seeds {', '.join(seeds)})", "",
                  "| method | role | seeds | old | new | all | avg old | avg new | avg all | train+test time |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for method in ordered_methods(list(summary)):
            s = summary[method]
            cells = [_cell(s[k], s[f"{k}_std"], s["seeds"]) for k in (*GROUPS, *(f"avg_{g}" for g in GROUPS))]
            lines.append(f"| {method} | {BOUNDS.get(method, '')} | {s['seeds']} | " + " | ".join(cells)
                         + f" | {s['seconds']:.0f} s |")
        skipped = block.get("skipped", {})
        if skipped:
            lines += ["", "Skipped: " + "; ".join(f"{m}: {reason}" for m, reason in sorted(skipped.items()))]
        lines += ["", f"Plot: [accuracy-synthetic-{task}.png](accuracy-synthetic-{task}.png)", ""]
    return "\n".join(lines)


def plot_final_bars(payload: dict[str, Any], path: Path) -> Path:
    """Grouped bars: final old / new / all per method, one panel per task, error bars = std over seeds."""
    from sats.report.plots import pyplot

    plt = pyplot()
    tasks = list(payload["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(len(tasks) * (2.0 + 0.7 * max(len(b["summary"]) for b in payload["tasks"].values())), 3.8), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        summary = payload["tasks"][task]["summary"]
        methods = ordered_methods(list(summary))
        width = 0.27
        for j, group in enumerate(GROUPS):
            means = [100 * (summary[m][group] or 0.0) for m in methods]
            stds = [100 * (summary[m][f"{group}_std"] or 0.0) for m in methods]
            ax.bar([i + (j - 1) * width for i in range(len(methods))], means, width, yerr=stds, capsize=2, label=group)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right")
        ax.set_ylabel("mIoU (%) after the last step")
        ax.set_title(f"synthetic {task}, overlapped")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(frameon=False, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks accuracy", description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["15-5"], help="VOC task names (15-5, 15-1, ...)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42], help="train.seed values (42: the demo's)")
    parser.add_argument("--methods", nargs="+", default=None, help="comma/space separated (default: every registered)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-accuracy")
    parser.add_argument("--cache-dir", type=Path, default=None, help="data.cache_dir (default: the config's)")
    parser.add_argument("--quick", action="store_true", help="the demo's smoke-test schedule (1 epoch, 64 images)")
    parser.add_argument("--fresh", action="store_true", help="delete existing run directories of the selected runs")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (markdown and PNGs go next to it)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        parser.error(f"unrecognised arguments {bad} (options above, or dotted config overrides key=value)")
    from benchmarks.methods import environment, resolve_methods

    import torch

    methods = resolve_methods(args.methods)
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(overrides)
    out = args.out or RESULTS_DIR / "accuracy-synthetic.json"
    previous = json.loads(out.read_text()) if out.is_file() else {"tasks": {}}
    tasks: dict[str, Any] = previous.get("tasks", {})
    for task in args.tasks:
        block = tasks.setdefault(task, {"per_seed": {}, "summary": {}, "skipped": {}})
        for seed in args.seeds:
            per_method = block["per_seed"].setdefault(str(seed), {})
            for method in ordered_methods(methods):
                print(f"== accuracy: {task}, seed {seed}, {method}", flush=True)
                entry = run_one(method, task, seed, args.work_dir, args.cache_dir, overrides, args.fresh)
                if "skipped" in entry:
                    print(f"   skipped: {entry['skipped']}", flush=True)
                    block["skipped"][method] = entry["skipped"]
                    per_method.pop(method, None)
                    continue
                block["skipped"].pop(method, None)
                per_method[method] = entry
                print(f"   old {_cell(entry['old'], None, 1)}  new {_cell(entry['new'], None, 1)}  "
                      f"all {_cell(entry['all'], None, 1)}  ({entry['wall_s']:.0f} s)", flush=True)
        names = {m for entries in block["per_seed"].values() for m in entries}
        block["summary"] = {m: summarize_seeds([e[m] for e in block["per_seed"].values() if m in e])
                            for m in ordered_methods(list(names))}
    env = environment(torch.device("cpu"), torch.get_num_threads())
    env["command"] = "accuracy " + " ".join(argv if argv is not None else sys.argv[1:])
    env["quick"] = args.quick
    env["overrides"] = overrides
    runs = previous.get("runs") or ([previous["env"]] if "env" in previous else [])
    payload = {"runs": runs + [env], "tasks": tasks}
    write_json_atomic(out, payload)
    write_text_atomic(out.with_suffix(".md"), accuracy_markdown(payload))
    figures = [plot_final_bars(payload, out.with_suffix(".png"))]
    for task, block in tasks.items():
        first_seed = sorted(block["per_seed"], key=int)[0] if block["per_seed"] else None
        runs = [load_run(e["run_dir"], label=m) for m, e in (block["per_seed"].get(first_seed) or {}).items()
                if Path(e["run_dir"]).is_dir()]
        if runs:
            from sats.report.plots import plot_step_curves

            figures.append(plot_step_curves([runs[i] for i in _order_index(runs)],
                                            out.parent / f"{out.stem}-{task}.png"))
    print(accuracy_markdown(payload))
    print("wrote " + ", ".join(str(p) for p in [out, out.with_suffix(".md"), *figures]))
    return payload


def _order_index(runs: Sequence[RunResult]) -> list[int]:
    order = ordered_methods([r.label for r in runs])
    return [next(i for i, r in enumerate(runs) if r.label == name) for name in order]


if __name__ == "__main__":
    main()
