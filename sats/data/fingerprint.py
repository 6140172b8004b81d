"""Content fingerprints of dataset files: what every data cache is keyed by.

A cache that depends on a dataset (class presence, step-0 checkpoints, pseudo-label
thresholds, saliency maps derived from masks) must never hand one dataset's result to
another. File names are not enough: two synthetic datasets generated with different seeds
have the same names, and a mask edited in place keeps its name. So every file of a list
gets a fingerprint of its **bytes** (BLAKE2b-128 of the whole file), and caches are keyed
by those.

Hashing every byte on every start would cost seconds on VOC, so a stat memo remembers, per
absolute path, ``(device, inode, size, mtime_ns, ctime_ns) → hash``: a file whose stat is
unchanged is not read again (``ctime`` cannot be set by user tools, so a replaced or edited
file always changes it). A changed stat means a full re-hash of that file only. The memo
lives in ``<cache_dir>/fingerprints/`` (one file per list of paths); without a cache dir
every file is hashed.

The digest of a list does not depend on where the dataset lives: a copy of the same files
under another root has the same fingerprints (caches may be reused), one replaced file
changes the digest (they are not).
"""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

log = logging.getLogger("sats")

FINGERPRINT_VERSION = "blake2b-128-v1"
_CHUNK = 1 << 20


def hash_file(path: Path) -> str:
    """BLAKE2b-128 hex digest of the bytes of ``path`` (OSError if it cannot be read)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(path: Path) -> tuple[int, int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _memo_path(cache_dir: Path, paths: Sequence[Path]) -> Path:
    h = hashlib.sha1(FINGERPRINT_VERSION.encode())
    for p in paths:
        h.update(os.fsencode(p))
        h.update(b"\0")
    return cache_dir / "fingerprints" / f"{h.hexdigest()[:20]}.npz"


def _load_memo(path: Path, count: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(stats (N, 5) int64, hashes (N,) str) of a memo written for ``count`` paths, or None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stats, hashes, version = data["stats"], data["hashes"], str(data["version"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
        log.warning("fingerprint memo %s is unreadable (%s: %s); hashing the files again", path, type(e).__name__, e)
        return None
    if version != FINGERPRINT_VERSION or stats.shape != (count, 5) or hashes.shape != (count,):
        return None
    return stats, hashes


def _save_memo(path: Path, stats: np.ndarray, hashes: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, stats=stats, hashes=hashes, version=np.asarray(FINGERPRINT_VERSION))
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache costs a re-hash next time, never a wrong result
        tmp.unlink(missing_ok=True)
        log.warning("cannot write the fingerprint memo %s (%s); files will be hashed again next time", path,
                    e.strerror or e)


def file_fingerprints(paths: Sequence[Path], cache_dir: str | os.PathLike[str] | None = None,
                      workers: int = 2) -> list[str | None]:
    """Content hash of every file of ``paths`` (None for a file that is missing or unreadable).

    Files whose stat matches the memo in ``cache_dir`` are not read; the others are hashed
    (``workers`` threads) and the memo is updated.
    """
    abs_paths = [Path(os.path.abspath(p)) for p in paths]
    stats = np.array([_stat_key(p) or (-1, -1, -1, -1, -1) for p in abs_paths], dtype=np.int64).reshape(-1, 5)
    memo_file = _memo_path(Path(cache_dir), abs_paths) if cache_dir is not None else None
    memo = _load_memo(memo_file, len(abs_paths)) if memo_file is not None else None
    hashes = np.full(len(abs_paths), "", dtype="<U32")
    todo = np.flatnonzero(stats[:, 0] >= 0)
    if memo is not None:
        same = (memo[0] == stats).all(axis=1) & (stats[:, 0] >= 0)
        hashes[same] = memo[1][same]
        todo = np.flatnonzero(~same & (stats[:, 0] >= 0))

    def one(i: int) -> str:
        try:
            return hash_file(abs_paths[i])
        except OSError:
            return ""

    if len(todo):
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, h in zip(todo, pool.map(one, todo.tolist())):
                hashes[i] = h
        if memo_file is not None:
            _save_memo(memo_file, stats, hashes)
    return [h or None for h in hashes.tolist()]


def combine(parts: Sequence[str | None], *extra: str) -> str:
    """One SHA-1 hex digest over ``extra`` strings and an ordered list of fingerprints (None = missing file)."""
    h = hashlib.sha1()
    for e in extra:
        h.update(e.encode())
        h.update(b"\n")
    for p in parts:
        h.update((p or "-").encode())
        h.update(b"\n")
    return h.hexdigest()
