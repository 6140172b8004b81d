"""Which images each step uses (docs/methods.md §1.4), computed from a cached class-presence scan.

Rules (raw class ids; 0 and 255 never count as "present"):

* train, overlapped: the mask holds at least one class of C_s;
* train, disjoint: additionally every class in the mask lies in C_old ∪ C_s ∪ {0};
* val (per-epoch validation): overlapped rule with C_s on the val split;
* test (end of step s): overlapped rule with C^{0:s} on the val split.

The class-presence scan is cached by the content of every mask (see
:func:`class_presence`); the splits are recomputed from it on every start.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sats.data.datasets import DataError, DataProblem, SegmentationFiles, format_problems
from sats.data.tasks import Task
from sats.progress import progress_bar

log = logging.getLogger(__name__)

PRESENCE_VERSION = "sats-presence-v2"
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
    """Write ``arrays`` to ``path`` atomically (temp file + rename); a cache that cannot be written (read-only
    folder, full disk) is logged and skipped: it costs a rescan next time, never a wrong result."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning("cannot write the cache file %s (%s); it will be computed again next time", path,
                    e.strerror or e)


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    """Arrays of a cache file, or None (logged) if it cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        log.warning("cache file %s is unreadable (%s: %s); recomputing", path, type(e).__name__, e)
        return None


# ------------------------------------------------------------------------------- presence

def _presence_store(cache_dir: Path, num_classes: int) -> Path:
    return cache_dir / f"presence_k{num_classes}.npz"


def _load_store(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask hashes (N,), presence (N, K) bool) of a presence store; empty if absent or unusable."""
    empty = (np.zeros(0, dtype="<U32"), np.zeros((0, num_classes), dtype=bool))
    if not path.is_file():
        return empty
    data = _load_npz(path)
    if data is None:
        return empty
    if ({"hashes", "presence", "version"} - data.keys() or str(data["version"]) != PRESENCE_VERSION
            or data["presence"].shape != (len(data["hashes"]), num_classes)):
        log.warning("presence cache %s has another format; scanning again", path)
        return empty
    return data["hashes"], data["presence"].astype(bool)


def class_presence(files: SegmentationFiles, cache_dir: str | os.PathLike[str] | None = None,
                   workers: int = 2, progress: bool = True) -> np.ndarray:
    """Which classes each mask contains, from one scan of every mask.

    The cache is content-addressed: ``<cache_dir>/presence_k<K>.npz`` maps the content hash of a
    mask (:mod:`sats.data.fingerprint`) to its presence row. A list is served from it when every
    mask's bytes are known; a changed, new or foreign mask is scanned (only those), with one log
    line saying how many and which. Lists, subsets and copies of a dataset share the entries.

    Args:
        files: the split's file list.
        cache_dir: folder of the cache; None = no cache (every mask is scanned).
        workers: scanning threads.

    Returns:
        (N, num_classes) bool; ``[i, c]`` is True iff class c occurs in mask i
        (255 never counted). Raises DataError listing every bad mask.
    """
    presence = np.zeros((len(files), files.num_classes), dtype=bool)
    todo = np.arange(len(files))
    path = hashes = stored_hashes = stored = None
    if cache_dir is not None:
        files.fingerprint(cache_dir, workers)
        hashes = np.asarray([h or "" for h in files.mask_hashes or []], dtype="<U32")
        path = _presence_store(Path(cache_dir), files.num_classes)
        stored_hashes, stored = _load_store(path, files.num_classes)
        index = {h: i for i, h in enumerate(stored_hashes.tolist())}
        rows = np.asarray([index.get(h, -1) if h else -1 for h in hashes.tolist()], dtype=np.int64)
        known = rows >= 0
        presence[known] = stored[rows[known]]
        todo = np.flatnonzero(~known)
        if len(todo) and len(stored_hashes):
            log.info("class presence of %s/%s: %d of %d masks are not in the cache %s (changed, new or another "
                     "dataset's; first: %s); scanning them", files.name, files.split, len(todo), len(files), path,
                     files.mask_paths[int(todo[0])])
    if not len(todo):
        return presence

    def scan(i: int) -> np.ndarray | DataProblem:
        try:
            return files.mask_classes(i)
        except DataError as e:
            return DataProblem.from_error(e, i)

    problems: list[DataProblem] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(scan, todo.tolist())
        for i, row in zip(todo.tolist(), progress_bar(results, progress, f"scan masks {files.name}/{files.split}",
                                                       total=len(todo))):
            if isinstance(row, DataProblem):
                problems.append(row)
            else:
                presence[i] = row
    if problems:
        raise DataError(files.root, f"cannot scan the masks of {files!r}:\n{format_problems(problems)}")
    if path is not None and hashes is not None and stored_hashes is not None and stored is not None:
        new = np.unique(todo[hashes[todo] != ""])
        new_hashes, first = np.unique(hashes[new], return_index=True)
        _save_npz(path, {"hashes": np.concatenate([stored_hashes, new_hashes]),
                         "presence": np.concatenate([stored, presence[new[first]]]),
                         "version": np.asarray(PRESENCE_VERSION)})
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


def _check_class_counts(task: Task, *file_lists: SegmentationFiles) -> None:
    for files in file_lists:
        if files.num_classes != task.num_classes:
            raise ValueError(f"{files!r} has {files.num_classes} classes but task "
                             f"{task.dataset}/{task.name} expects {task.num_classes}")


def compute_splits(train_files: SegmentationFiles, val_files: SegmentationFiles, task: Task,
                   overlap: bool, cache_dir: str | os.PathLike[str] | None = None,
                   workers: int = 2, progress: bool = True) -> list[StepSplit]:
    """Per-step image positions of ``task`` (one `StepSplit` per step).

    Derived from the class presence of both lists (:func:`class_presence`, cached by mask
    content under ``cache_dir``); applying the rules is a few vectorised comparisons, so the
    splits themselves are not cached and can never be stale.
    """
    _check_class_counts(task, train_files, val_files)
    return splits_from_presence(class_presence(train_files, cache_dir, workers, progress),
                                class_presence(val_files, cache_dir, workers, progress), task, overlap)


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
    ``val_files`` (positions in the list order, as the reference's index files hold them). Every
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
