"""Lookup tables from raw mask values to output channels (docs/methods.md §1.5).

Every table is a numpy uint8 array of length 256 indexed by the raw mask value.
A kept class maps to its channel (its position in ``task.channel_classes``),
a dropped class to 0 (background channel), 255 to 255 (ignore), and values
outside the dataset's classes to 255 (datasets reject such values before any
table is applied).

| table   | kept classes | other valid classes |
|---------|--------------|---------------------|
| train   | 0 ∪ C^t      | → 0 (old and future)|
| val     | 0 ∪ C^t      | → 0                 |
| test    | C^{0:t}      | → 0 (future)        |
| memory  | C^{0:t}      | → 0 (future)        |
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch

from sats.data.classes import IGNORE_INDEX
from sats.data.tasks import Task

LUT_SIZE = 256

MaskT = TypeVar("MaskT", np.ndarray, torch.Tensor)


def _lut(task: Task, kept: Sequence[int]) -> np.ndarray:
    """Table mapping ``kept`` raw ids to their channels and every other valid id to 0."""
    lut = np.full(LUT_SIZE, IGNORE_INDEX, dtype=np.uint8)
    lut[: task.num_classes] = 0
    channel_of = {c: k for k, c in enumerate(task.channel_classes)}
    kept_ids = np.asarray(kept, dtype=np.int64)
    lut[kept_ids] = np.asarray([channel_of[c] for c in kept], dtype=np.uint8)
    lut[0] = 0
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def train_lut(task: Task, t: int) -> np.ndarray:
    """(256,) uint8: C^t → its channel; old and future classes → 0; 255 → 255."""
    return _lut(task, task.new_classes(t))


def val_lut(task: Task, t: int) -> np.ndarray:
    """(256,) uint8: per-epoch validation, same rule as training."""
    return train_lut(task, t)


def test_lut(task: Task, t: int) -> np.ndarray:
    """(256,) uint8: C^{0:t} → its channel; future classes → 0; 255 → 255."""
    return _lut(task, task.seen_classes(t))


test_lut.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported by name


def memory_lut(task: Task, t: int) -> np.ndarray:
    """(256,) uint8: exemplar-memory images keep every seen class; future → 0."""
    return _lut(task, task.seen_classes(t))


def apply_lut(lut: np.ndarray | torch.Tensor, mask: MaskT) -> MaskT:
    """Map every mask value through ``lut`` with one gather.

    Args:
        lut: (256,) table (numpy or torch).
        mask: integer array/tensor of any shape with values in 0..255.

    Returns:
        Same type and shape as ``mask`` with the table's dtype (uint8 for our
        tables); a tensor result lives on the mask's device.
    """
    if isinstance(mask, torch.Tensor):
        table = torch.as_tensor(lut, device=mask.device)
        return table[mask.long()]
    table_np = lut.cpu().numpy() if isinstance(lut, torch.Tensor) else np.asarray(lut)
    mask_np = np.asarray(mask)
    if mask_np.dtype.kind not in "ui":
        raise TypeError(f"mask must hold integers, got dtype {mask_np.dtype}")
    return table_np[mask_np]
