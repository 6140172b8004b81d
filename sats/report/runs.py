"""A finished (or partly finished) run as the reports see it: its ``results.json`` header and rows."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sats.engine.results import RESULTS_JSON

GROUPS = ("old", "new", "all")


@dataclass
class RunResult:
    """The results of one run directory.

    ``header`` is the top level of ``results.json`` (name, method, method_params, dataset,
    task, overlap, backbone, num_steps, joint, channel_classes, class_names); ``rows`` are its
    per-step rows sorted by step (see :mod:`sats.engine.results`). Group values are fractions.
    """

    label: str
    header: Dict[str, Any]
    rows: List[Dict[str, Any]]
    run_dir: Optional[Path] = None

    @property
    def method(self) -> str:
        return str(self.header.get("method", "?"))

    @property
    def dataset(self) -> str:
        return str(self.header.get("dataset", "?"))

    @property
    def task(self) -> str:
        return str(self.header.get("task", "?"))

    @property
    def backbone(self) -> str:
        return str(self.header.get("backbone", "?"))

    @property
    def overlap(self) -> bool:
        return bool(self.header.get("overlap", True))

    @property
    def joint(self) -> bool:
        return bool(self.header.get("joint", False))

    @property
    def num_steps(self) -> int:
        return int(self.header.get("num_steps", len(self.rows)))

    @property
    def steps_done(self) -> int:
        return len(self.rows)

    @property
    def finished(self) -> bool:
        """True when the last step of the task has a row."""
        return bool(self.rows) and int(self.rows[-1]["step"]) == self.num_steps - 1

    @property
    def setting(self) -> str:
        """``"voc 15-1 overlapped, mit_b2"``."""
        return f"{self.dataset} {self.task} {'overlapped' if self.overlap else 'disjoint'}, {self.backbone}"

    def final(self, group: str) -> Optional[float]:
        """``group`` ("old", "new", "all") after the last recorded step (None: no ground truth)."""
        return self.rows[-1].get(group) if self.rows else None

    def average(self, group: str = "all") -> Optional[float]:
        """Mean of ``group`` over the recorded steps that have a value."""
        values = [r[group] for r in self.rows if r.get(group) is not None]
        return sum(values) / len(values) if values else None

    def series(self, group: str) -> tuple[List[int], List[float]]:
        """(steps, values) of ``group`` over the recorded steps, steps without a value left out."""
        pairs = [(int(r["step"]), float(r[group])) for r in self.rows if r.get(group) is not None]
        return [s for s, _ in pairs], [v for _, v in pairs]

    @property
    def seconds(self) -> float:
        """Training plus end-of-step evaluation time recorded in the rows (a shared step 0 counts
        the time of the run that trained it)."""
        return float(sum(r.get("train_time_s", 0.0) + r.get("eval_time_s", 0.0) for r in self.rows))

    def group_classes(self, group: str) -> List[int]:
        """Raw class ids of ``group`` after the last step (empty when the group is)."""
        if not self.rows:
            return []
        last = self.rows[-1]
        return [int(last["class_ids"][c]) for c in last.get("groups", {}).get(group, [])]


def load_run(run_dir: str | Path, label: Optional[str] = None) -> RunResult:
    """Read ``run_dir/results.json``; errors name the file and what is wrong with it."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results file (is {run_dir} a run directory with a finished step?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list):
        raise ValueError(f"{path}: expected an object with a 'steps' list (a sats results.json)")
    rows = sorted(data.pop("steps"), key=lambda r: int(r["step"]))
    if not rows:
        raise ValueError(f"{path}: no finished step recorded yet")
    for r in rows:
        missing = [k for k in ("step", "iou", "class_ids", *GROUPS) if k not in r]
        if missing:
            raise ValueError(f"{path}: step {r.get('step', '?')} lacks {missing}")
    return RunResult(label=label or str(data.get("name") or run_dir.name), header=data, rows=rows, run_dir=run_dir)


def load_runs(run_dirs: Sequence[str | Path]) -> List[RunResult]:
    """Load several runs; labels are the run names, made unique with the directory name if needed."""
    runs = [load_run(d) for d in run_dirs]
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1 and r.run_dir is not None:
            r.label = f"{r.label} ({r.run_dir.name})"
    labels = [r.label for r in runs]
    for i, r in enumerate(runs):  # still equal (same name, same folder name): number them
        if labels.count(r.label) > 1:
            r.label = f"{r.label} #{i + 1}"
    return runs


def class_span(ids: Sequence[int]) -> str:
    """``[0, 1, ..., 15]`` → ``"0-15"``; non-contiguous lists are comma-separated."""
    ids = [int(i) for i in ids]
    if not ids:
        return "–"
    if len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(map(str, ids))


def safe_filename(text: str) -> str:
    """A file-name-safe version of a run label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "run"
