"""Atomic file writes and stable digests: the bottom layer every other module may use.

Every write goes to ``<path>.tmp-<pid>`` in the same folder, is flushed and fsynced, then
``os.replace``d onto the final name and the folder fsynced: the final name holds either the
previous complete file or the new complete file, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["FileError", "digest", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


class FileError(RuntimeError):
    """A file sats writes or reads (checkpoint, results, cache) could not be; the message names the path."""


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike[str], chunks: list[bytes | memoryview], what: str = "file") -> None:
    """Write ``chunks`` to ``path`` via a fsynced temp file and ``os.replace``; FileError naming ``path`` and
    the cause on any OS error (the temp file is removed, a previous file at ``path`` is untouched)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        cause = f"{e.strerror} (errno {e.errno})" if e.strerror else repr(e)
        try:
            tmp.unlink(missing_ok=True)
        except OSError as cleanup_error:
            cause += f"; temp file {tmp} could not be removed: {cleanup_error}"
        raise FileError(f"cannot write {what} {path}: {cause}") from e


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    write_bytes_atomic(path, [text.encode("utf-8")])


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write ``obj`` as strict JSON (NaN/Inf refused: convert them to ``None`` first) atomically."""
    path = Path(path)
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot encode JSON for {path}: {e}") from e
    write_text_atomic(path, text + "\n")


def digest(obj: Any) -> str:
    """Stable short hash of a JSON-able object (cache keys)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
