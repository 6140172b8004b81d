"""Which images each step uses (METHODS.md §1.4), computed from a cached class-presence scan.

Rules (raw class ids; 0 and 255 never count as "present"):

* train, overlapped: the mask holds at least one class of C_s;
* train, disjoint: additionally every class in the mask lies in C_old ∪ C_s ∪ {0};
* val (per-epoch validation): overlapped rule with C_s on the val split;
* test (end of step s): overlapped rule with C^{0:s} on the val split.

Both caches (presence matrix per file list, split positions per task) are
keyed by the file list's digest, store the image ids, and are verified on load:
a mismatch is logged and recomputed, never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sats.data.datasets import DataError, DataProblem, SegmentationFiles, format_problems
from sats.data.tasks import Task

log = logging.getLogger(__name__)

SPLIT_RULE_VERSION = "sats-splits-v1"
_REFERENCE_FILE = re.compile(r"^(train|val|test_on_val)-(\d+)\.npy$")


@dataclass
class StepSplit:
    """Image positions of one step.

    Attributes:
        train: (N_train,) int64 positions into the train file list.
        val: (N_val,) int64 positions into the val file list (per-epoch validation, C^t rule).
        test: (N_test,) int64 positions into the val file list (end-of-step test, C^{0:t} rule).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


# ------------------------------------------------------------------------------ cache files

def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """Arrays of a cache file, or None (logged) if it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        log.warning("cache file %s is unreadable (%s: %s); recomputing", path, type(e).__name__, e)
        return None


def _ids_array(ids: Sequence[str]) -> np.ndarray:
    return np.asarray(list(ids), dtype=np.str_)


# ------------------------------------------------------------------------------- presence

def _presence_path(files: SegmentationFiles, cache_dir: Path) -> Path:
    return cache_dir / f"presence_{files.name}_{files.split}_{files.list_digest[:16]}.npz"


def _valid_presence_cache(data: dict[str, np.ndarray], files: SegmentationFiles) -> str | None:
    """Reason why a loaded presence cache does not match ``files``, or None if it does."""
    if {"presence", "ids", "digest"} - data.keys():
        return f"keys {sorted(data)} lack presence/ids/digest"
    if str(data["digest"]) != files.list_digest:
        return f"list digest {str(data['digest'])[:12]} != {files.list_digest[:12]}"
    if data["presence"].shape != (len(files), files.num_classes):
        return f"shape {data['presence'].shape} != {(len(files), files.num_classes)}"
    if data["ids"].shape != (len(files),) or not np.array_equal(data["ids"], _ids_array(files.ids)):
        return "stored image ids differ from the file list"
    return None


def class_presence(files: SegmentationFiles, cache_dir: str | os.PathLike[str] | None = None,
                   workers: int = 2, progress: bool = True) -> np.ndarray:
    """Which classes each mask contains, from one scan of every mask.

    Args:
        files: the split's file list.
        cache_dir: folder of the ``presence_<name>_<split>_<digest>.npz`` cache; None = no cache.
        workers: scanning threads.

    Returns:
        (N, num_classes) bool; ``[i, c]`` is True iff class c occurs in mask i
        (255 never counted). Raises DataError listing every bad mask.
    """
    path = _presence_path(files, Path(cache_dir)) if cache_dir is not None else None
    if path is not None and path.is_file():
        data = _load_npz(path)
        if data is not None:
            reason = _valid_presence_cache(data, files)
            if reason is None:
                return data["presence"].astype(bool)
            log.warning("presence cache %s does not match %r (%s); recomputing", path, files, reason)

    def scan(i: int) -> np.ndarray | DataProblem:
        try:
            return files.mask_classes(i)
        except DataError as e:
            return DataProblem.from_error(e, i)

    presence = np.zeros((len(files), files.num_classes), dtype=bool)
    problems: list[DataProblem] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(scan, range(len(files)))
        for i, row in enumerate(tqdm(results, total=len(files), disable=not progress, leave=False,
                                     desc=f"scan masks {files.name}/{files.split}")):
            if isinstance(row, DataProblem):
                problems.append(row)
            else:
                presence[i] = row
    if problems:
        raise DataError(files.root, f"cannot scan the masks of {files!r}:\n{format_problems(problems)}")
    if path is not None:
        _save_npz(path, {"presence": presence, "ids": _ids_array(files.ids),
                         "digest": np.asarray(files.list_digest)})
    return presence


# --------------------------------------------------------------------------------- splits

def _class_columns(classes: Sequence[int], num_classes: int) -> np.ndarray:
    """(num_classes,) bool selecting the foreground ids of ``classes``."""
    cols = np.zeros(num_classes, dtype=bool)
    cols[[c for c in classes if c != 0]] = True
    return cols


def select_positions(presence: np.ndarray, classes: Sequence[int],
                     allowed: Sequence[int] | None = None) -> np.ndarray:
    """Positions of images holding any foreground class of ``classes``.

    Args:
        presence: (N, K) bool from `class_presence`.
        classes: raw ids; 0 is ignored.
        allowed: if given, also require every present class to lie in ``allowed`` ∪ {0}.

    Returns:
        (M,) int64 sorted positions.
    """
    num_classes = presence.shape[1]
    keep = presence[:, _class_columns(classes, num_classes)].any(axis=1)
    if allowed is not None:
        forbidden = ~_class_columns(allowed, num_classes)
        forbidden[0] = False
        keep &= ~presence[:, forbidden].any(axis=1)
    return np.flatnonzero(keep).astype(np.int64)


def splits_from_presence(train_presence: np.ndarray, val_presence: np.ndarray, task: Task,
                         overlap: bool) -> list[StepSplit]:
    """Apply the §1.4 rules to presence matrices (N, K) for every step of ``task``."""
    splits = []
    for s in range(task.num_steps):
        new, seen = task.new_classes(s), task.seen_classes(s)
        splits.append(StepSplit(
            train=select_positions(train_presence, new, allowed=None if overlap else seen),
            val=select_positions(val_presence, new),
            test=select_positions(val_presence, seen),
        ))
    return splits


def _splits_key(train_files: SegmentationFiles, val_files: SegmentationFiles, task: Task,
                overlap: bool) -> str:
    spec = {"rule": SPLIT_RULE_VERSION, "train": train_files.list_digest,
            "val": val_files.list_digest, "dataset": task.dataset, "num_classes": task.num_classes,
            "steps": [list(step) for step in task.steps], "overlap": overlap}
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _load_cached_splits(path: Path, key: str, task: Task, train_files: SegmentationFiles,
                        val_files: SegmentationFiles) -> list[StepSplit] | None:
    data = _load_npz(path)
    if data is None:
        return None
    if "key" not in data or str(data["key"]) != key:
        log.warning("split cache %s has a different key; recomputing", path)
        return None
    splits = []
    for s in range(task.num_steps):
        arrays = {}
        for kind, files in (("train", train_files), ("val", val_files), ("test", val_files)):
            pos, ids = data.get(f"{kind}_{s}"), data.get(f"{kind}_ids_{s}")
            if pos is None or ids is None:
                log.warning("split cache %s lacks %s of step %d; recomputing", path, kind, s)
                return None
            if pos.size and (pos.min() < 0 or pos.max() >= len(files)) or not np.array_equal(
                    ids, _ids_array([files.ids[i] for i in pos])):
                log.warning("split cache %s: %s positions of step %d do not match the image ids of "
                            "%r; recomputing", path, kind, s, files)
                return None
            arrays[kind] = pos.astype(np.int64)
        splits.append(StepSplit(**arrays))
    return splits


def _check_class_counts(task: Task, *file_lists: SegmentationFiles) -> None:
    for files in file_lists:
        if files.num_classes != task.num_classes:
            raise ValueError(f"{files!r} has {files.num_classes} classes but task "
                             f"{task.dataset}/{task.name} expects {task.num_classes}")


def compute_splits(train_files: SegmentationFiles, val_files: SegmentationFiles, task: Task,
                   overlap: bool, cache_dir: str | os.PathLike[str] | None = None,
                   workers: int = 2, progress: bool = True) -> list[StepSplit]:
    """Per-step image positions of ``task`` (one `StepSplit` per step).

    Cached under ``cache_dir`` as ``splits_<dataset>_<task>_<ov|disjoint>_<key>.npz``,
    keyed by both list digests, the task's steps and the rule; the file stores
    the positions and the image ids, verified on load.
    """
    _check_class_counts(task, train_files, val_files)
    key = _splits_key(train_files, val_files, task, overlap)
    path = None
    if cache_dir is not None:
        protocol = "ov" if overlap else "disjoint"
        path = Path(cache_dir) / f"splits_{task.dataset}_{task.name}_{protocol}_{key[:16]}.npz"
        if path.is_file():
            cached = _load_cached_splits(path, key, task, train_files, val_files)
            if cached is not None:
                return cached
    splits = splits_from_presence(class_presence(train_files, cache_dir, workers, progress),
                                  class_presence(val_files, cache_dir, workers, progress),
                                  task, overlap)
    if path is not None:
        arrays: dict[str, np.ndarray] = {"key": np.asarray(key)}
        for s, split in enumerate(splits):
            for kind, files in (("train", train_files), ("val", val_files), ("test", val_files)):
                pos = getattr(split, kind)
                arrays[f"{kind}_{s}"] = pos
                arrays[f"{kind}_ids_{s}"] = _ids_array([files.ids[i] for i in pos])
        _save_npz(path, arrays)
    return splits


# ------------------------------------------------------------------------ reference lists

def _load_index_file(path: Path, files: SegmentationFiles) -> np.ndarray:
    try:
        index = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(path, f"unreadable index file ({type(e).__name__}: {e})") from e
    if index.ndim != 1 or index.dtype.kind not in "ui":
        raise DataError(path, f"expected a 1-D integer array, got shape {index.shape} "
                              f"dtype {index.dtype}")
    if index.size and (index.min() < 0 or index.max() >= len(files)):
        raise DataError(path, f"index out of range: min {index.min()}, max {index.max()}, but the "
                              f"{files.split!r} list has {len(files)} images (valid 0..{len(files) - 1}) "
                              f"[{files!r}]")
    return index.astype(np.int64)


def import_reference_splits(folder: str | os.PathLike[str], train_files: SegmentationFiles,
                            val_files: SegmentationFiles, task: Task) -> list[StepSplit]:
    """Read reference index lists ``<folder>/{train,val,test_on_val}-<s>.npy``.

    ``train-*`` index ``train_files``; ``val-*`` and ``test_on_val-*`` index
    ``val_files`` (positions in the list order; spec/splits/README.md). Every
    file of steps 0..T must exist and every index must be in range; files for
    steps beyond the task are an error (wrong folder for this task).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "reference split folder not found")
    _check_class_counts(task, train_files, val_files)
    kinds = (("train", "train", train_files), ("val", "val", val_files),
             ("test", "test_on_val", val_files))
    missing = [f"{prefix}-{s}.npy" for s in range(task.num_steps) for _, prefix, _ in kinds
               if not (folder / f"{prefix}-{s}.npy").is_file()]
    if missing:
        raise DataError(folder, f"missing index files for task {task.dataset}/{task.name} "
                                f"({task.num_steps} steps): {', '.join(missing)}")
    extra = sorted(n for n in os.listdir(folder)
                   if (m := _REFERENCE_FILE.match(n)) and int(m.group(2)) >= task.num_steps)
    if extra:
        raise DataError(folder, f"holds files for steps beyond task {task.dataset}/{task.name} "
                                f"({task.num_steps} steps): {', '.join(extra)}")
    return [StepSplit(**{kind: _load_index_file(folder / f"{prefix}-{s}.npy", files)
                         for kind, prefix, files in kinds})
            for s in range(task.num_steps)]
