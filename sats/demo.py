"""``sats demo``: the whole pipeline on the embedded synthetic dataset, in minutes on a CPU.

Generates the synthetic VOC-layout dataset if missing, runs a short class-incremental task
with a tiny SegFormer for every demo method (joint training = upper bound, FT = lower bound,
then the continual methods), prints old/new/all after the last step and writes a plot of
mIoU per step. Methods whose step 0 is plain CE share one step-0 checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from sats.config import ConfigError, load_config
from sats.engine.checkpoint import write_json_atomic, write_text_atomic

log = logging.getLogger("sats")

DEMO_METHODS = ("joint", "ft")
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
        cfg = load_config(path, [f"run_dir={output / name}", *extra])
        tic = time.perf_counter()
        rows = Runner(cfg).run()
        timings[name] = time.perf_counter() - tic
        all_rows[name] = rows
        log.info("demo: %s done in %.0f s", name, timings[name])
    table = summary_table(all_rows, timings)
    print("\n" + table)
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output / "summary.md", table)
    write_json_atomic(output / "summary.json", {"methods": all_rows, "seconds": timings})
    plot_path = plot_steps(all_rows, output / "miou_per_step.png")
    print(f"results: {output}/summary.md, plot: {plot_path}")
    return all_rows


def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{v * 100:.1f}"


def summary_table(all_rows: Dict[str, List[dict]], seconds: Optional[Dict[str, float]] = None) -> str:
    """Markdown: old / new / all after the last step and all averaged over steps, per method."""
    lines = ["| method | old | new | all | avg all over steps | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for name, rows in all_rows.items():
        last = rows[-1]
        avg = sum(r["all"] for r in rows if r.get("all") is not None) / max(1, len(rows))
        sec = f"{seconds[name]:.0f}" if seconds and name in seconds else "–"
        lines.append(f"| {name} | {_pct(last.get('old'))} | {_pct(last.get('new'))} | {_pct(last.get('all'))} | "
                     f"{_pct(avg)} | {sec} |")
    return "\n".join(lines) + "\n"


def plot_steps(all_rows: Dict[str, List[dict]], path: Path) -> Path:
    """mIoU (all classes seen) after each step, one line per method (joint drawn as a level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    num_steps = max(len(r) for r in all_rows.values())
    for name, rows in all_rows.items():
        if len(rows) == 1 and num_steps > 1:
            ax.axhline(rows[0]["all"] * 100, ls="--", color="gray", label=f"{name} (upper bound)")
            continue
        ax.plot([r["step"] for r in rows], [r["all"] * 100 for r in rows], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("mIoU over seen classes (%)")
    ax.set_xticks(range(num_steps))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
