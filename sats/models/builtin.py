"""Encoder weights shipped with the package, named ``builtin:<name>`` in ``model.pretrained``.

Each builtin is a pair of files in ``sats/weights/``: ``<name>.pt`` (a ``torch.save`` state dict of
the encoder, in our names, float16) and ``<name>.json``, its record: the file's SHA-256, the
command that regenerates it bit-for-bit, and the generator / model / training settings
(``docs/demo.md``). `resolve_weights` maps a ``model.pretrained`` value to the file to read and
checks a builtin file against its record's hash before anything reads it; the normal loader
(`sats.models.weights.load_encoder_weights`) does the rest, key report included.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sats.models.errors import WeightsError

PREFIX = "builtin:"
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
"""``sats/weights/``: the package data folder of the builtin weights."""


def builtin_names() -> list[str]:
    """Names of the shipped weights (every ``sats/weights/<name>.json`` record)."""
    return sorted(path.stem for path in WEIGHTS_DIR.glob("*.json"))


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def builtin_record(name: str) -> dict[str, Any]:
    """The record of builtin ``name`` (with or without the ``builtin:`` prefix); WeightsError naming the
    builtin names when there is none."""
    name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    path = WEIGHTS_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(PREFIX + known for known in builtin_names()) or "none"
        raise WeightsError(f"no builtin weights named {PREFIX}{name}; builtin weights: {known}")
    return json.loads(path.read_text())


def builtin_file(name: str) -> Path:
    """The weights file of builtin ``name``, checked against its record (size and SHA-256)."""
    record = builtin_record(name)
    path = WEIGHTS_DIR / record["file"]
    if not path.is_file():
        raise WeightsError(f"{PREFIX}{record['name']}: its weights file {path} is missing (a broken install?)")
    actual = file_sha256(path)
    if actual != record["sha256"]:
        raise WeightsError(f"{PREFIX}{record['name']}: {path} has SHA-256 {actual}, its record says "
                           f"{record['sha256']}; the file is damaged or was replaced (regenerate it with: "
                           f"{record['command']})")
    return path


def resolve_weights(spec: str | Path) -> tuple[Path, str]:
    """``(file to read, name for messages)`` of a ``model.pretrained`` value: ``builtin:<name>`` or a path."""
    text = str(spec)
    if text.startswith(PREFIX):
        path = builtin_file(text)
        return path, f"{text} ({path})"
    return Path(spec), text


def pretrained_file(spec: str | Path) -> Path:
    """The file a ``model.pretrained`` value reads (the shipped file for ``builtin:<name>``)."""
    return resolve_weights(spec)[0]
