"""Lookup tables raw value → channel (docs/methods.md §1.5) and their application."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sats.data.labels import apply_lut, memory_lut, test_lut, train_lut, val_lut
from sats.data.tasks import get_task

# one pixel of each VOC value, plus ignore
RAW = np.array([0, 1, 15, 16, 17, 18, 20, 255], dtype=np.uint8)


def mapped(lut: np.ndarray) -> list[int]:
    return apply_lut(lut, RAW).tolist()


def test_tables_natural_order_15_1() -> None:
    task = get_task("voc", "15-1")
    # step 0: C^0 = 0..15 kept, future 16..20 → 0
    assert mapped(train_lut(task, 0)) == [0, 1, 15, 0, 0, 0, 0, 255]
    assert mapped(test_lut(task, 0)) == [0, 1, 15, 0, 0, 0, 0, 255]
    # step 2: C^2 = {17}; old (1, 15, 16) → 0, future (18, 20) → 0
    assert mapped(train_lut(task, 2)) == [0, 0, 0, 0, 17, 0, 0, 255]
    assert mapped(val_lut(task, 2)) == mapped(train_lut(task, 2))
    # test after step 2: C^{0:2} kept, future → 0
    assert mapped(test_lut(task, 2)) == [0, 1, 15, 16, 17, 0, 0, 255]
    assert mapped(memory_lut(task, 2)) == [0, 1, 15, 16, 17, 0, 0, 255]
    # last step: everything kept at test time
    assert mapped(test_lut(task, 5)) == RAW.tolist()


def test_tables_permuted_order() -> None:
    task = get_task("voc", "perm", order=[[0, 20, 3], [7, 1], [15]])
    # channels: 0→0, 20→1, 3→2, 7→3, 1→4, 15→5
    values = np.array([0, 1, 3, 7, 15, 20, 2, 255], dtype=np.uint8)
    assert apply_lut(train_lut(task, 0), values).tolist() == [0, 0, 2, 0, 0, 1, 0, 255]
    assert apply_lut(train_lut(task, 1), values).tolist() == [0, 4, 0, 3, 0, 0, 0, 255]
    assert apply_lut(test_lut(task, 1), values).tolist() == [0, 4, 2, 3, 0, 1, 0, 255]
    assert apply_lut(test_lut(task, 2), values).tolist() == [0, 4, 2, 3, 5, 1, 0, 255]


def test_table_shape_and_invalid_values() -> None:
    task = get_task("voc", "19-1")
    lut = train_lut(task, 1)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    assert (lut[21:255] == 255).all()
    assert lut[20] == 20 and (lut[:20] == 0).all() and lut[255] == 255


def test_apply_lut_numpy_and_torch_agree() -> None:
    task = get_task("ade", "100-10")
    lut = test_lut(task, 2)
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 151, size=(5, 7)).astype(np.uint8)
    mask[0, 0] = 255
    out_np = apply_lut(lut, mask)
    assert isinstance(out_np, np.ndarray) and out_np.shape == (5, 7)
    expected = np.where(mask <= 120, mask, 0)  # seen = 0..120 at step 2
    expected[0, 0] = 255
    np.testing.assert_array_equal(out_np, expected)
    for dtype in (torch.uint8, torch.int64):
        out_t = apply_lut(lut, torch.from_numpy(mask).to(dtype))
        assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.uint8
        np.testing.assert_array_equal(out_t.numpy(), expected)
    out_tt = apply_lut(torch.from_numpy(lut), torch.from_numpy(mask))
    np.testing.assert_array_equal(out_tt.numpy(), expected)


def test_apply_lut_rejects_float_masks() -> None:
    with pytest.raises(TypeError, match="integers"):
        apply_lut(train_lut(get_task("voc", "15-5"), 0), np.zeros((2, 2), dtype=np.float32))
