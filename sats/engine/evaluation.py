"""``sats test``: re-evaluate the saved step checkpoints of a run and compare with what it recorded.

The run directory is only read (a read-only copy, an archive mount or a colleague's folder works):
no lock, no log, no config record. Every requested step's checkpoint is checked to exist before
anything is evaluated, so a missing one is a clear error naming the step, not a half-printed table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from sats.config import ExperimentConfig
from sats.experiment import load_experiment
from sats.engine import results as results_io
from sats.engine.data import ExperimentData
from sats.engine.distributed import DistInfo
from sats.engine.evaluator import evaluate_loader
from sats.engine.optim import amp_dtype, autocast_factory
from sats.engine.rundir import RunDir, RunError, load_step_model
from sats.methods.addon import build_method

log = logging.getLogger("sats")


def retest_run(run_dir: Path, step: Optional[int] = None, tolerance: float = 1e-9,
               device: Optional[str] = None) -> bool:
    """Evaluate step checkpoints again; True when every per-class IoU equals the recorded one."""
    rundir = RunDir(run_dir)
    if not rundir.config_path.is_file():
        raise RunError(f"{run_dir}: not a run directory (no config.yaml)")
    recorded = results_io.load_rows(run_dir)
    if not recorded:
        raise RunError(f"{run_dir}: no finished step is recorded in results.json; nothing to test")
    steps = sorted(recorded) if step is None else [step]
    unknown = [t for t in steps if t not in recorded]
    if unknown:
        raise RunError(f"{run_dir}: no recorded results for step {unknown[0]} (recorded: {sorted(recorded)})")
    missing = [t for t in steps if not rundir.step_checkpoint(t).is_file()]
    if missing:
        raise RunError(f"{run_dir}: step {missing[0]} is recorded in results.json but its checkpoint "
                       f"{rundir.step_checkpoint(missing[0])} is missing" +
                       (f" (also steps {missing[1:]})" if len(missing) > 1 else "") +
                       "; `sats test RUN_DIR --step N` tests the steps that have one")
    overrides = [f"run_dir={run_dir}"]
    cfg = load_experiment(rundir.config_path, overrides)
    if cfg.data.on_error == "raise":  # the run checked every file; a bad one now fails when it is read
        cfg = load_experiment(rundir.config_path, overrides + ["data.check=false"])
    evaluator = CheckpointEvaluator(cfg, device)
    rundir.warn_if_data_changed(evaluator.data.fingerprint(), "a MISMATCH below may come from the data, not the "
                                "checkpoints")
    ok = True
    print("| step | recorded mIoU | re-evaluated mIoU | max per-class difference |\n|---:|---:|---:|---:|")
    for t in steps:
        row = evaluator.row(rundir.step_checkpoint(t), t)
        worst, same = compare_rows(row, recorded[t])
        ok &= same and worst <= tolerance
        print(f"| {t} | {recorded[t]['miou'] * 100:.4f} | {row['miou'] * 100:.4f} | {worst:.2e} |")
    print("reproduced" if ok else "MISMATCH: the checkpoints do not reproduce the recorded numbers")
    return ok


class CheckpointEvaluator:
    """Evaluates step checkpoint files of an experiment on its test images (single process; reads only)."""

    def __init__(self, cfg: ExperimentConfig, device: Optional[str] = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"))
        self.dist = DistInfo(rank=0, world_size=1, local_rank=0, device=self.device, is_main=True, backend=None)
        self.data = ExperimentData.build(cfg, self.dist)
        self.method = build_method(cfg.method)
        self.task = self.data.step_task(self.method.joint)
        self.autocast = autocast_factory(self.device, amp_dtype(cfg.train, self.device))

    def row(self, path: Path, t: int) -> Dict[str, Any]:
        """The results row of the step-``t`` checkpoint ``path``, computed as the run computes it."""
        model, _ = load_step_model(path, t, self.cfg.model, self.method.model_head_sizes(self.task, t), self.task,
                                   self.device)
        loader = self.data.eval_loader(t, self.method.joint, "test", self.dist)
        metrics = evaluate_loader(model, loader, self.task.num_outputs(t), self.method.predict, self.device,
                                  self.autocast, progress=self.cfg.log.progress, desc=f"step {t} test")
        groups = self.data.task.groups(self.data.task.num_steps - 1) if self.method.joint else self.task.groups(t)
        return results_io.make_row(t, metrics, groups, self.task, self.data.train_files.class_names)

    def header(self) -> Dict[str, Any]:
        c = self.cfg
        return {"name": c.name, "method": self.method.name, "dataset": c.data.dataset, "task": self.task.name,
                "overlap": c.data.overlap, "backbone": c.model.backbone}


def compare_rows(row: Dict[str, Any], recorded: Dict[str, Any]) -> tuple[float, bool]:
    """(largest per-class IoU difference, same classes present and same channel count)."""
    pairs = list(zip(row["iou"], recorded["iou"]))
    same = len(row["iou"]) == len(recorded["iou"]) and all((a is None) == (b is None) for a, b in pairs)
    worst = max((abs((a or 0.0) - (b or 0.0)) for a, b in pairs if (a is None) == (b is None)), default=0.0)
    return worst, same
