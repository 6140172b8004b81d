"""``sats demo``: the whole pipeline on the embedded synthetic dataset, in minutes on a CPU.

Generates the synthetic VOC-layout dataset if missing and runs the VOC 15-5 and 15-1 tasks with a
tiny SegFormer whose encoder starts from ``builtin:mit-tiny-synthetic`` (pretrained on the
generator's pretraining world, which shares no class with the demo: `sats.pretrain`), for every
demo method: joint training (upper bound, one run for both tasks), FT (lower bound), the
continual methods, and SATS without its attention-transfer term, so the table shows what that
term buys. ``from_scratch`` trains the encoder from random init instead. Prints old/new/all after
the last step of each task and writes a plot of mIoU per step per task. Methods whose step 0 is
plain CE share one step-0 checkpoint (both tasks have the same step 0).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from sats.config import ConfigError
from sats.experiment import load_experiment
from sats.io import write_json_atomic, write_text_atomic
from sats.report.plots import plot_step_curves
from sats.report.runs import RunResult, load_runs
from sats.report.tables import format_seconds, summary_markdown

log = logging.getLogger("sats")

DEMO_METHODS = ("joint", "ft", "mib", "plop", "sats", "sats-noattn")  # more with --methods (`sats list methods`)
DEMO_TASKS = ("15-5", "15-1")
TITLES = {"joint": "joint (upper bound)", "ft": "FT (lower bound)", "mib": "MiB", "plop": "PLOP", "sats": "SATS",
          "sats-noattn": "SATS without attention transfer"}
PLOT_LABELS = {**TITLES, "joint": "every class at once"}  # the plot adds "(joint: upper bound)"
SINGLE_RUN = ("joint",)
"""Methods that train every class in one step: the same run for every task (scored with its groups)."""
PRETRAINED_ENCODER = "builtin:mit-tiny-synthetic"
PRETRAINED_OVERRIDES = [f"model.pretrained={PRETRAINED_ENCODER}", "train.lr_incremental=0.003"]
"""The pretrained demo: the shipped encoder, and the incremental steps at step 0's learning rate (at the
schedule's 1e-3 the pretrained encoder hardly moves in 15-1's short steps, so there is little for any
term to preserve; docs/demo.md gives both measurements)."""
PRETRAINED_METHOD_OVERRIDES = {"joint": ["train.epochs=5"]}
"""Joint training from the pretrained encoder: 5 epochs (87.0 all on 15-5; 10 epochs: 89.0) keep the demo in time."""
QUICK_OVERRIDES = ["train.epochs=1", "train.epochs_incremental=1", "data.synthetic.num_train=64",
                   "data.synthetic.num_val=24", "data.batch_size=4", "data.root=data/synthetic-quick"]


def configs_dir() -> Path:
    """The project's configs: ``sats/_configs`` (in a source checkout a link to ``configs/``; in an installed
    wheel a copy of it, so ``sats demo`` runs from a wheel too)."""
    here = Path(__file__).parent / "_configs"
    if not (here / "demo").is_dir():
        raise ConfigError(f"configs folder not found at {here}: the installation is incomplete (reinstall sats)")
    return here


def _label(name: str) -> str:
    """The display label of a demo entry that TITLES does not name: its method's (``mib+ewf`` → MiB+EWF), or
    the entry itself (a config name such as ``dkd-m``)."""
    from sats.methods import build_method

    try:
        return build_method({"name": name}).label
    except ValueError:  # ConfigError included: not a method name
        return name


def default_output(from_scratch: bool, quick: bool = False) -> Path:
    """``runs/demo`` (pretrained encoder), ``runs/demo-scratch``, and ``-quick`` for ``--quick``: different
    settings never meet in one run directory."""
    return Path("runs/demo" + ("-scratch" if from_scratch else "") + ("-quick" if quick else ""))


def run_demo(output: Optional[Path] = None, methods: Optional[Sequence[str]] = None, quick: bool = False,
             overrides: Sequence[str] = (), tasks: Optional[Sequence[str]] = None,
             from_scratch: bool = False) -> Dict[str, Dict[str, List[dict]]]:
    """Run every method on every task; returns ``{task: {method: results rows}}``."""
    from sats.engine.runner import Runner

    output = Path(output) if output is not None else default_output(from_scratch, quick)
    methods, tasks = list(methods or DEMO_METHODS), list(tasks or DEMO_TASKS)
    paths = {name: configs_dir() / "demo" / f"{name.replace('+', '_')}.yaml" for name in methods}  # mib+ewf
    for name, path in paths.items():
        if not path.exists():
            raise ConfigError(f"no demo config for method {name!r} ({path})")
    encoder_overrides = [] if from_scratch else PRETRAINED_OVERRIDES
    later = (QUICK_OVERRIDES if quick else []) + list(overrides)
    run_dirs: Dict[str, Dict[str, Path]] = {task: {} for task in tasks}
    timings: Dict[Path, float] = {}
    for task in tasks:
        for name in methods:
            run_dir = output / name if name in SINGLE_RUN else output / task / name
            run_dirs[task][name] = run_dir
            if run_dir in timings:
                continue
            own = [] if from_scratch else PRETRAINED_METHOD_OVERRIDES.get(name, [])
            cfg = load_experiment(paths[name], [f"run_dir={run_dir}", f"data.task={task}", *encoder_overrides, *own,
                                                *later])
            tic = time.perf_counter()
            Runner(cfg).run()
            timings[run_dir] = time.perf_counter() - tic
            log.info("demo: %s %s done in %.0f s", task, name, timings[run_dir])
    runs = {task: dict(zip(methods, load_runs([run_dirs[task][name] for name in methods]))) for task in tasks}
    encoder = "trained from scratch" if from_scratch else f"pretrained ({PRETRAINED_ENCODER})"
    table = demo_table(runs, {name: sum(timings[run_dirs[task][name]] for task in tasks
                                        if name not in SINGLE_RUN or task == tasks[0]) for name in methods}, encoder)
    print("\n" + table)
    output.mkdir(parents=True, exist_ok=True)
    details = "\n".join(summary_markdown(list(by_method.values()),
                                         {run.label: timings[run_dirs[task][name]] for name, run in by_method.items()})
                        for task, by_method in runs.items())
    write_text_atomic(output / "summary.md", table + "\n## Per task\n\n" + details)
    write_json_atomic(output / "summary.json", {
        "encoder": "scratch" if from_scratch else PRETRAINED_ENCODER,
        "tasks": {task: {name: run.rows for name, run in by_method.items()} for task, by_method in runs.items()},
        "seconds": {str(path): seconds for path, seconds in timings.items()},
    })
    plots = []
    for task, by_method in runs.items():
        for name, run in by_method.items():
            run.label = PLOT_LABELS.get(name) or _label(name)
        plots.append(plot_step_curves(list(by_method.values()), output / f"miou_per_step_{task}.png"))
    print(f"results: {output}/summary.md, plots: {', '.join(str(p) for p in plots)}")
    return {task: {name: run.rows for name, run in by_method.items()} for task, by_method in runs.items()}


def demo_table(runs: Dict[str, Dict[str, RunResult]], seconds: Dict[str, float], encoder: str) -> str:
    """One row per method, old / new / all (%) after the last step of each task, and the method's time."""
    tasks = list(runs)
    methods = list(next(iter(runs.values())))
    head = ["method"] + [f"{task} {group}" for task in tasks for group in ("old", "new", "all")] + ["time"]
    lines = [f"Synthetic VOC, overlapped, tiny MiT with its encoder {encoder}. mIoU (%) after the last step; "
             "old = step-0 classes 0-15 (background included), new = 16-20.", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in methods:
        cells = [TITLES.get(name) or _label(name)]
        for task in tasks:
            run = runs[task][name]
            cells += ["–" if run.final(g) is None else f"{100 * run.final(g):.1f}" for g in ("old", "new", "all")]
        lines.append("| " + " | ".join(cells + [format_seconds(seconds[name])]) + " |")
    single = [TITLES.get(name) or _label(name) for name in methods if name in SINGLE_RUN]
    if single and len(tasks) > 1:
        lines += ["", f"({', '.join(single)}: one run, every class in one step, scored with each task's groups.)"]
    return "\n".join(lines) + "\n"
