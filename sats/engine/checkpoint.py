"""Atomic, self-verifying checkpoint files (the atomic write itself is :func:`sats.io.write_bytes_atomic`).

File layout (``format_version`` 1)::

    MAGIC (8 bytes, b"SATSCKP\\n")
    header length (4 bytes, little-endian uint32)
    header (UTF-8 JSON: {"format_version": 1, "sha256": <hex of payload>, "size": <payload bytes>})
    payload (the bytes of ``torch.save(obj)``)

``load_checkpoint`` checks the magic, the exact payload size and the SHA-256, so a truncated,
extended or corrupted file is always refused. Every write goes to ``<path>.tmp-<pid>`` in the
same folder, is flushed and fsynced, then ``os.replace``d onto the final name and the folder
fsynced: the final name holds either the previous complete file or the new complete file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import torch

from sats.io import FileError, write_bytes_atomic

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "MAGIC",
    "file_digest",
    "load_checkpoint",
    "load_state_strict",
    "save_checkpoint",
    "state_digest",
    "verify_checkpoint",
]

MAGIC = b"SATSCKP\n"
FORMAT_VERSION = 1
_LEN = struct.Struct("<I")
_MAX_HEADER = 4096


class CheckpointError(FileError):
    """A checkpoint could not be written or read (missing, truncated, corrupted, foreign); names the path."""


def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike[str]) -> str:
    """Serialise ``obj`` with ``torch.save`` and write it atomically to ``path``.

    Returns the payload's SHA-256 hex digest (the value ``file_digest`` reads back).
    Raises ``CheckpointError`` naming ``path`` on any OS error (e.g. ENOSPC); the temp file is
    removed and the previous file at ``path``, if any, is left untouched.
    """
    path = Path(path)
    if not isinstance(obj, dict):
        raise TypeError(f"save_checkpoint({path}): expected a dict, got {type(obj).__name__}")
    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot serialise checkpoint {path}: {e}") from e
    payload = buffer.getbuffer()
    digest = hashlib.sha256(payload).hexdigest()
    # compact JSON (no whitespace): any changed header byte alters a value or breaks parsing
    header = json.dumps(
        {"format_version": FORMAT_VERSION, "sha256": digest, "size": payload.nbytes}, separators=(",", ":")
    ).encode()
    try:
        write_bytes_atomic(path, [MAGIC, _LEN.pack(len(header)), header, payload], "checkpoint")
    except FileError as e:
        raise CheckpointError(str(e)) from e.__cause__
    return digest


def _read_header(f: io.BufferedReader, path: Path) -> tuple[dict[str, Any], int]:
    """Parse magic + header from an open file; returns (header, payload offset)."""
    magic = f.read(len(MAGIC))
    if magic != MAGIC:
        raise CheckpointError(f"{path} is not a sats checkpoint (bad magic {magic[:8]!r}); was it written by save_checkpoint?")
    raw_len = f.read(_LEN.size)
    if len(raw_len) != _LEN.size:
        raise CheckpointError(f"checkpoint {path} is truncated (header length missing)")
    (header_len,) = _LEN.unpack(raw_len)
    if header_len > _MAX_HEADER:
        raise CheckpointError(f"checkpoint {path} is corrupted (header length {header_len} > {_MAX_HEADER})")
    raw = f.read(header_len)
    if len(raw) != header_len:
        raise CheckpointError(f"checkpoint {path} is truncated (header has {len(raw)} of {header_len} bytes)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupted (unreadable header: {e})") from e
    if not isinstance(header, dict) or not {"format_version", "sha256", "size"} <= header.keys():
        raise CheckpointError(f"checkpoint {path} is corrupted (header {header!r} lacks format_version/sha256/size)")
    if header["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format_version {header['format_version']!r}; this code reads {FORMAT_VERSION}")
    if not isinstance(header["size"], int) or not isinstance(header["sha256"], str):
        raise CheckpointError(f"checkpoint {path} is corrupted (bad header values {header!r})")
    return header, len(MAGIC) + _LEN.size + header_len


def _open(path: Path) -> io.BufferedReader:
    try:
        return open(path, "rb")
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} does not exist") from e
    except OSError as e:
        raise CheckpointError(f"cannot open checkpoint {path}: {e.strerror or e}") from e


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the payload as recorded in the header (reads the header only; no verification)."""
    path = Path(path)
    with _open(path) as f:
        header, _ = _read_header(f, path)
    return str(header["sha256"])


def _read_verified_payload(path: Path) -> bytes:
    """The payload of a checkpoint file after checking magic, header, exact size and SHA-256."""
    with _open(path) as f:
        header, offset = _read_header(f, path)
        try:
            payload = f.read()
        except OSError as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    size = header["size"]
    if len(payload) != size:
        state = "truncated" if len(payload) < size else "corrupted (trailing data)"
        raise CheckpointError(f"checkpoint {path} is {state}: payload has {len(payload)} bytes, header says {size} (offset {offset})")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != header["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupted: SHA-256 {digest} != recorded {header['sha256']}")
    return payload


def verify_checkpoint(path: str | os.PathLike[str]) -> str:
    """Check a checkpoint file's integrity (magic, size, SHA-256) without unpickling; returns the digest."""
    payload = _read_verified_payload(Path(path))
    return hashlib.sha256(payload).hexdigest()


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device | None = "cpu",
    *,
    weights_only: bool = True,
) -> dict[str, Any]:
    """Read, verify (magic, size, SHA-256) and deserialise a checkpoint written by ``save_checkpoint``.

    ``weights_only=True`` restricts unpickling to tensors, containers, numbers and strings;
    pass ``False`` only for trusted files holding other objects. Raises ``CheckpointError``
    naming ``path`` for a missing, truncated, corrupted or foreign file.
    """
    path = Path(path)
    payload = _read_verified_payload(path)
    try:
        obj = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as e:
        hint = " (it holds objects other than tensors/containers; pass weights_only=False if the file is trusted)" if weights_only else ""
        raise CheckpointError(f"cannot deserialise checkpoint {path}{hint}: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict")
    return obj


def state_digest(obj: Any) -> str:
    """SHA-256 of what a checkpoint *holds* (tensors by dtype, shape and bytes; other values by their text),
    independent of when or how fast it was written: a cache key for "the same weights"."""
    h = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too (BN counters)
        elif isinstance(value, dict):
            h.update(b"{")
            for k in sorted(value, key=str):
                h.update(repr(k).encode())
                feed(value[k])
            h.update(b"}")
        elif isinstance(value, (list, tuple)):
            h.update(b"[")
            for v in value:
                feed(v)
            h.update(b"]")
        else:
            h.update(repr(value).encode())

    feed(obj)
    return h.hexdigest()


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Load every tensor of ``state`` into ``model`` or none: names and shapes are compared before anything
    is copied, and a mismatch is a CheckpointError listing the missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        def few(keys: list[str]) -> str:
            return f"{keys[:8]}{'…' if len(keys) > 8 else ''}"

        raise CheckpointError(f"{path}: weights do not fit the model (nothing was loaded): missing {few(missing)}, "
                              f"unexpected {few(unexpected)}, shape mismatches (checkpoint vs model) {few(shapes)}")
    model.load_state_dict(state, strict=True)


