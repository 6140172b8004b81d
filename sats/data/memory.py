"""Exemplar memory of the "-M" variants: class-balanced selection, storage by image id (docs/methods.md §3.12).

The memory of step ``t > 0`` holds, for every old foreground class ``c ∈ C^{0:t−1} \\ {0}``, a list
of at most ``k`` training images containing ``c``:

* ``k = ⌈N / number of old foreground classes⌉`` (``memory.size`` = N; VOC 100, ADE 300), or a
  fixed ``memory.per_class`` (the released code loads the first 7 entries per class on VOC);
* the lists of step ``t − 1``'s memory are truncated to the new ``k``;
* then step ``t − 1``'s training list is walked **in order** and each image is appended to every
  old class it contains whose list is not full (and does not hold it yet). An image may serve
  several classes. Nothing is random: the same lists and data give the same memory.

The memory's images are the union of the lists (sorted by position in the training file list).
They are labelled with :func:`sats.data.labels.memory_lut` (every seen class kept, future → 0).

``memory.selection=round_robin`` is DKD's rule instead (docs/methods.md §3.14; :func:`round_robin_memory`):
a total budget of ``N`` images, candidates = step ``t − 1``'s training images (their classes of ``C^{t−1}``,
plus the old classes the step-``t − 1`` model finds in them with ``memory.pseudo_threshold``) and the entries
of step ``t − 1``'s memory (with the classes recorded for them); candidates and old classes are shuffled with
a seeded generator and the classes take, in turn, the first remaining candidate that contains them. Every
image then serves one class; the candidates' classes are stored too, for the next step's selection.

Storage: ``<run_dir>/memory/step{t}.json`` (written atomically) holds the lists as **image ids**
(and positions, for information); on load every id is looked up in the training list, so a
reordered list is harmless and a missing image is an error naming it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from sats.data.datasets import DataError, SegmentationFiles
from sats.data.tasks import Task
from sats.io import write_json_atomic

__all__ = ["MEMORY_VERSION", "StepMemory", "build_step_memory", "load_memory", "memory_classes", "memory_path",
           "per_class_quota", "round_robin_memory", "round_robin_take", "save_memory", "select_memory"]

MEMORY_VERSION = 1


def memory_classes(task: Task, t: int) -> tuple[int, ...]:
    """Old foreground classes of step ``t`` (raw ids): ``C^{0:t−1} \\ {0}``."""
    return tuple(c for c in task.old_classes(t) if c != 0)


def per_class_quota(num_classes: int, size: int, per_class: Optional[int] = None) -> int:
    """``k``: ``per_class`` if given, else ``⌈size / num_classes⌉``."""
    if num_classes < 1:
        raise ValueError(f"memory: no old foreground class to keep (num_classes={num_classes})")
    if per_class is not None:
        return int(per_class)
    return math.ceil(size / num_classes)


def select_memory(positions: np.ndarray, presence: np.ndarray, classes: Sequence[int], k: int,
                  previous: Optional[Mapping[int, Sequence[int]]] = None) -> Dict[int, List[int]]:
    """Class-balanced lists ``{class: [positions]}`` (module docstring).

    Args:
        positions: ``(n,)`` positions of the walked training list, in walking order.
        presence: ``(n, num_classes)`` bool, row ``i`` = classes present in image ``positions[i]``.
        classes: the old foreground classes (raw ids) to fill.
        k: entries per class.
        previous: the lists of the previous memory (truncated to ``k`` first).
    """
    positions = np.asarray(positions, dtype=np.int64).reshape(-1)
    if presence.shape[0] != positions.shape[0]:
        raise ValueError(f"select_memory: {positions.shape[0]} positions but {presence.shape[0]} presence rows")
    previous = previous or {}
    lists: Dict[int, List[int]] = {}
    for c in classes:
        kept = [int(p) for p in previous.get(c, [])][:k]
        if len(kept) < k:
            have = set(kept)
            fresh = [int(p) for p in positions[presence[:, c]] if int(p) not in have]
            kept += fresh[:k - len(kept)]
        lists[int(c)] = kept
    return lists


def round_robin_memory(candidates: Mapping[int, Sequence[int]], classes: Sequence[int], budget: int,
                       seed: int) -> Dict[int, List[int]]:
    """DKD's selection: ``{class: [positions]}`` with at most ``budget`` images in total.

    ``candidates`` maps a training-list position to the classes it holds. The candidates (in position order)
    and ``classes`` are shuffled with ``numpy.random.default_rng(seed)``; then, round after round over the
    shuffled classes, each class takes the first remaining candidate that holds it. It stops at the budget, or
    after a round in which no class found a candidate (the reference loops forever there).
    """
    rng = np.random.default_rng(seed)
    order = [int(p) for p in sorted(candidates)]
    order = [order[i] for i in rng.permutation(len(order))]
    class_order = [int(classes[i]) for i in rng.permutation(len(classes))]
    return round_robin_take([(p, candidates[p]) for p in order], class_order, budget)


def round_robin_take(candidates: Sequence[Tuple[int, Sequence[int]]], class_order: Sequence[int],
                     budget: int) -> Dict[int, List[int]]:
    """The rounds of :func:`round_robin_memory` over already ordered ``(position, classes)`` candidates."""
    remaining = [(int(p), set(int(c) for c in held)) for p, held in candidates]
    lists: Dict[int, List[int]] = {int(c): [] for c in sorted(map(int, class_order))}
    taken = 0
    while taken < budget:
        before = taken
        for c in map(int, class_order):
            hit = next((i for i, (_, held) in enumerate(remaining) if c in held), None)
            if hit is not None:
                lists[c].append(remaining.pop(hit)[0])
                taken += 1
                if taken >= budget:
                    break
        if taken == before:
            break
    return lists


@dataclass
class StepMemory:
    """The memory of one step: per-class lists of positions into the training file list."""

    step: int
    per_class: int  # k (0 for the round-robin selection, which has a total budget)
    lists: Dict[int, List[int]]  # raw class id -> positions (walk order)
    #: round_robin: the classes recorded for every memory image (candidates of the next step's selection)
    classes_of: Optional[Dict[int, List[int]]] = None

    @property
    def positions(self) -> np.ndarray:
        """``(M,)`` int64 sorted unique positions of the memory's images."""
        merged = [p for entries in self.lists.values() for p in entries]
        return np.unique(np.asarray(merged, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.positions.size)

    def to_json(self, files: SegmentationFiles) -> Dict[str, Any]:
        return {
            "version": MEMORY_VERSION, "step": self.step, "per_class": self.per_class,
            "train_list_digest": files.list_digest,
            "classes": {str(c): [files.ids[p] for p in entries] for c, entries in self.lists.items()},
            "images": [files.ids[p] for p in self.positions],
            "positions": {str(c): list(entries) for c, entries in self.lists.items()},
            **({} if self.classes_of is None else
               {"image_classes": {files.ids[p]: list(c) for p, c in sorted(self.classes_of.items())}}),
        }


def build_step_memory(task: Task, t: int, positions: np.ndarray, presence: np.ndarray, size: int,
                      per_class: Optional[int] = None, previous: Optional[StepMemory] = None) -> StepMemory:
    """The memory of step ``t`` from step ``t − 1``'s training list and the memory of step ``t − 1``."""
    if t < 1:
        raise ValueError(f"memory: step {t} has no old classes")
    if previous is not None and previous.step != t - 1:
        raise ValueError(f"memory of step {t} must extend the memory of step {t - 1}, got step {previous.step}")
    classes = memory_classes(task, t)
    k = per_class_quota(len(classes), size, per_class)
    lists = select_memory(positions, presence, classes, k, previous.lists if previous is not None else None)
    empty = [c for c, entries in lists.items() if not entries]
    if len(empty) == len(lists):
        raise DataError(f"memory of step {t}: no training image of step {t - 1} contains an old class "
                        f"{list(classes)}")
    return StepMemory(step=t, per_class=k, lists=lists)


def memory_path(run_dir: str | os.PathLike[str], t: int) -> Path:
    return Path(run_dir) / "memory" / f"step{t}.json"


def save_memory(memory: StepMemory, files: SegmentationFiles, path: str | os.PathLike[str]) -> None:
    write_json_atomic(path, memory.to_json(files))


def load_memory(path: str | os.PathLike[str], files: SegmentationFiles, task: Task, t: int,
                per_class: int) -> StepMemory:
    """Read a stored memory and resolve its image ids in ``files``; DataError naming the file on any mismatch."""
    import json

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(path, f"cannot read the stored memory ({type(e).__name__}: {e})") from e
    if data.get("version") != MEMORY_VERSION or data.get("step") != t:
        raise DataError(path, f"memory file of version {data.get('version')} / step {data.get('step')}; expected "
                              f"version {MEMORY_VERSION} / step {t}")
    expected = sorted(memory_classes(task, t))
    stored = sorted(int(c) for c in data.get("classes", {}))
    if stored != expected or data.get("per_class") != per_class:
        raise DataError(path, f"memory holds classes {stored} with {data.get('per_class')} per class; this run "
                              f"expects classes {expected} with {per_class} per class")
    index = {image_id: i for i, image_id in enumerate(files.ids)}
    missing = sorted({i for ids in data["classes"].values() for i in ids if i not in index})
    if missing:
        raise DataError(path, f"{len(missing)} memory image id(s) are not in the training list {files.root} "
                              f"({files.split}): {missing[:10]}")
    lists = {int(c): [index[i] for i in ids] for c, ids in data["classes"].items()}
    recorded = data.get("image_classes")
    classes_of = None if recorded is None else {index[i]: [int(c) for c in cs] for i, cs in recorded.items()
                                                if i in index}
    return StepMemory(step=t, per_class=per_class, lists=lists, classes_of=classes_of)
