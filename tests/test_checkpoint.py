"""Atomic, hash-verified checkpoints and atomic JSON/text writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

import sats.io as io_module
from sats.engine.checkpoint import MAGIC, CheckpointError, file_digest, load_checkpoint, save_checkpoint
from sats.io import FileError, write_json_atomic, write_text_atomic


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "epoch": 3,
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.arange(3, dtype=torch.int64)},
        "optimizer": {"state": {0: {"momentum": torch.randn(4, 3, generator=g)}}, "param_groups": [{"lr": 0.01}]},
        "names": ["a", "b"],
        "best": None,
    }


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _leftover_temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def test_round_trip_and_digest(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "step0.pth"  # parent folder is created
    digest = save_checkpoint(_state(), path)
    _assert_same(load_checkpoint(path), _state())
    assert file_digest(path) == digest
    raw = path.read_bytes()
    assert raw.startswith(MAGIC)
    (header_len,) = struct.unpack("<I", raw[len(MAGIC) : len(MAGIC) + 4])
    header = json.loads(raw[len(MAGIC) + 4 : len(MAGIC) + 4 + header_len])
    payload = raw[len(MAGIC) + 4 + header_len :]
    assert header == {"format_version": 1, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    save_checkpoint(_state(seed=1), path)  # overwrite: new content, new digest
    assert file_digest(path) != digest
    _assert_same(load_checkpoint(path), _state(seed=1))
    assert _leftover_temps(path.parent) == []


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.5, 0.999])
def test_truncated_file_is_refused(tmp_path: Path, fraction: float) -> None:
    path = tmp_path / "c.pth"
    save_checkpoint(_state(), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * fraction)])
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_every_single_byte_flip_is_detected(tmp_path: Path) -> None:
    good = tmp_path / "good.pth"
    save_checkpoint({"x": torch.ones(2)}, good)
    raw = bytearray(good.read_bytes())
    bad = tmp_path / "bad.pth"
    (header_len,) = struct.unpack("<I", raw[len(MAGIC) : len(MAGIC) + 4])
    payload_start = len(MAGIC) + 4 + header_len
    # every byte of magic, length and header; a spread of payload bytes incl. the last one
    positions = [*range(payload_start), *range(payload_start, len(raw), 13), len(raw) - 1]
    for pos in positions:
        for mask in (0x01, 0x20, 0xFF):
            flipped = bytearray(raw)
            flipped[pos] ^= mask
            bad.write_bytes(flipped)
            with pytest.raises(CheckpointError, match="bad.pth"):
                load_checkpoint(bad)
    appended = bytes(raw) + b"\0"
    bad.write_bytes(appended)
    with pytest.raises(CheckpointError, match="trailing data"):
        load_checkpoint(bad)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=r"nope\.pth does not exist"):
        load_checkpoint(missing)
    with pytest.raises(CheckpointError, match=r"nope\.pth"):
        file_digest(missing)
    plain = tmp_path / "plain.pth"
    torch.save({"x": torch.ones(1)}, plain)  # a regular torch file, not ours
    with pytest.raises(CheckpointError, match=r"plain\.pth is not a sats checkpoint"):
        load_checkpoint(plain)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt is not a sats checkpoint"):
        file_digest(text)


class _Custom:
    def __init__(self, value: int) -> None:
        self.value = value


def test_weights_only_by_default(tmp_path: Path) -> None:
    path = tmp_path / "custom.pth"
    save_checkpoint({"obj": _Custom(7)}, path)
    with pytest.raises(CheckpointError, match="weights_only=False"):
        load_checkpoint(path)
    assert load_checkpoint(path, weights_only=False)["obj"].value == 7
    with pytest.raises(TypeError, match="expected a dict"):
        save_checkpoint([1, 2], tmp_path / "list.pth")  # type: ignore[arg-type]


def test_failed_replace_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pth"
    save_checkpoint(_state(), path)
    before = path.read_bytes()

    def failing_replace(src: Any, dst: Any) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(io_module.os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match=rf"cannot write checkpoint {path}.*errno {errno.EIO}"):
        save_checkpoint(_state(seed=5), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    _assert_same(load_checkpoint(path), _state())
    assert _leftover_temps(tmp_path) == []


class _FullDisk:
    """File stand-in that writes half of the first chunk, then fails with ENOSPC."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __enter__(self) -> "_FullDisk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.real.close()

    def write(self, data: bytes) -> int:
        self.real.write(bytes(data)[: len(data) // 2])
        self.real.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_enospc_names_path_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.pth"
    save_checkpoint(_state(), path)
    before = path.read_bytes()
    real_open = open
    monkeypatch.setattr(io_module, "open", lambda p, mode: _FullDisk(real_open(p, mode)), raising=False)
    with pytest.raises(CheckpointError, match=rf"{path}: No space left on device"):
        save_checkpoint(_state(seed=2), path)
    with pytest.raises(FileError, match=r"results\.json: No space left") as info:
        write_json_atomic(tmp_path / "results.json", {"a": 1})
    assert not isinstance(info.value, CheckpointError)  # a results file is not a checkpoint
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert not (tmp_path / "results.json").exists()
    assert _leftover_temps(tmp_path) == []


def test_write_json_and_text_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out" / "results.json"
    write_json_atomic(path, {"miou": 0.5, "class_iou": [None, 1.0], "name": "15-1"})
    assert json.loads(path.read_text()) == {"miou": 0.5, "class_iou": [None, 1.0], "name": "15-1"}
    write_json_atomic(path, {"miou": 0.7})  # replaces
    assert json.loads(path.read_text()) == {"miou": 0.7}
    with pytest.raises(ValueError, match=r"results\.json"):
        write_json_atomic(path, {"miou": float("nan")})  # strict JSON: NaN must be None
    assert json.loads(path.read_text()) == {"miou": 0.7}
    md = tmp_path / "results.md"
    write_text_atomic(md, "| step | mIoU |\n| 0 | 70.1 |\n")
    assert md.read_text() == "| step | mIoU |\n| 0 | 70.1 |\n"
    assert _leftover_temps(path.parent) == [] and _leftover_temps(tmp_path) == []
