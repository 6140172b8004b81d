"""``sats demo``: the whole pipeline on the embedded synthetic dataset, in minutes on a CPU.

Generates the synthetic VOC-layout dataset if missing, runs a short class-incremental task
with a tiny SegFormer for every demo method (joint training = upper bound, FT = lower bound,
then the continual methods), prints old/new/all after the last step and writes a plot of
mIoU per step. Methods whose step 0 is plain CE share one step-0 checkpoint.
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
from sats.report.runs import load_runs
from sats.report.tables import summary_markdown

log = logging.getLogger("sats")

DEMO_METHODS = ("joint", "ft", "mib", "plop", "sats")  # more with --methods (`sats list methods`)
QUICK_OVERRIDES = ["train.epochs=1", "train.epochs_incremental=1", "data.synthetic.num_train=64",
                   "data.synthetic.num_val=24", "data.root=data/synthetic-quick"]


def configs_dir() -> Path:
    """The project's ``configs/`` folder (next to the package in a source checkout)."""
    here = Path(__file__).resolve().parent.parent / "configs"
    if not here.is_dir():
        raise ConfigError(f"configs folder not found at {here}; run from a source checkout of sats")
    return here


def run_demo(output: Path = Path("runs/demo"), methods: Optional[Sequence[str]] = None, quick: bool = False,
             overrides: Sequence[str] = ()) -> Dict[str, List[dict]]:
    from sats.engine.runner import Runner

    methods = list(methods or DEMO_METHODS)
    extra = (QUICK_OVERRIDES if quick else []) + list(overrides)
    all_rows: Dict[str, List[dict]] = {}
    timings: Dict[str, float] = {}
    for name in methods:
        path = configs_dir() / "demo" / f"{name}.yaml"
        if not path.exists():
            raise ConfigError(f"no demo config for method {name!r} ({path})")
        cfg = load_experiment(path, [f"run_dir={output / name}", *extra])
        tic = time.perf_counter()
        rows = Runner(cfg).run()
        timings[name] = time.perf_counter() - tic
        all_rows[name] = rows
        log.info("demo: %s done in %.0f s", name, timings[name])
    runs = load_runs([output / name for name in methods])
    table = summary_markdown(runs, {run.label: timings[name] for run, name in zip(runs, methods)})
    print("\n" + table)
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / "summary.md", table)
    write_json_atomic(output / "summary.json", {"methods": all_rows, "seconds": timings})
    plot_path = plot_step_curves(runs, output / "miou_per_step.png")
    print(f"results: {output}/summary.md, plot: {plot_path}")
    return all_rows
