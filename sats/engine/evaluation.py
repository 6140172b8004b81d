"""``sats test``: re-evaluate the saved step checkpoints of a run and compare with what it recorded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from sats.config import load_config
from sats.engine import results as results_io

log = logging.getLogger("sats")


def retest_run(run_dir: Path, step: Optional[int] = None, tolerance: float = 1e-9) -> bool:
    """Evaluate step checkpoints again; True when every per-class IoU equals the recorded one."""
    from sats.engine.runner import Runner

    cfg = load_config(run_dir / "config.yaml", [f"run_dir={run_dir}"])
    runner = Runner(cfg)
    recorded = results_io.load_rows(run_dir)
    steps = sorted(recorded) if step is None else [step]
    ok = True
    print(f"| step | recorded mIoU | re-evaluated mIoU | max per-class difference |\n|---:|---:|---:|---:|")
    for t in steps:
        if t not in recorded:
            raise ValueError(f"{run_dir}: no recorded results for step {t} (recorded: {sorted(recorded)})")
        row = runner.evaluate_checkpoint(t)
        diffs = [abs((a or 0.0) - (b or 0.0)) for a, b in zip(row["iou"], recorded[t]["iou"])
                 if (a is None) == (b is None)]
        same_presence = all((a is None) == (b is None) for a, b in zip(row["iou"], recorded[t]["iou"]))
        worst = max(diffs, default=0.0)
        ok &= same_presence and worst <= tolerance and len(row["iou"]) == len(recorded[t]["iou"])
        print(f"| {t} | {recorded[t]['miou'] * 100:.4f} | {row['miou'] * 100:.4f} | {worst:.2e} |")
    print("reproduced" if ok else "MISMATCH: the checkpoints do not reproduce the recorded numbers")
    return ok
