"""Confusion matrix, metrics, sharded sampler and the evaluation loop."""

from __future__ import annotations

import contextlib
import functools
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from sats.engine.evaluator import ConfusionMatrix, Metrics, ShardedEvalSampler, evaluate_loader

# 3x4 example, K = 4, two ignored pixels. (target, pred) pairs on valid pixels:
# row 0 (GT 0): pred 0,1,0,0        -> [3, 1, 0, 0]
# row 1 (GT 1): pred 1,1,1          -> [0, 3, 0, 0]
# row 2 (GT 2): pred 2,0,3          -> [1, 0, 1, 1]
# row 3 (GT 3): none                -> [0, 0, 0, 0]   (class 3 predicted once, never in GT)
TARGET = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 255], [255, 1, 0, 2]]])
PRED = torch.tensor([[[0, 1, 1, 1], [0, 2, 0, 3], [1, 1, 0, 3]]])
EXPECTED_CONF = np.array([[3, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0]])


def test_hand_computed_confusion_and_metrics() -> None:
    cm = ConfusionMatrix(4, "cpu")
    cm.update(PRED, TARGET)
    np.testing.assert_array_equal(cm.matrix.numpy(), EXPECTED_CONF)
    assert cm.skipped_pixels == 2
    m = cm.compute()
    # IoU = TP / (GT + Pred - TP); column sums are [4, 4, 1, 1]
    assert m.class_iou[0] == pytest.approx(3 / 5)
    assert m.class_iou[1] == pytest.approx(3 / 4)
    assert m.class_iou[2] == pytest.approx(1 / 3)
    assert math.isnan(m.class_iou[3])  # no GT pixel -> undefined, excluded from the mean
    assert m.miou == pytest.approx((3 / 5 + 3 / 4 + 1 / 3) / 3)
    assert m.pixel_acc == pytest.approx(7 / 10)
    assert m.class_acc[:3] == pytest.approx([3 / 4, 1.0, 1 / 3])
    assert m.mean_class_acc == pytest.approx((3 / 4 + 1 + 1 / 3) / 3)
    assert m.fw_iou == pytest.approx(0.4 * 3 / 5 + 0.3 * 3 / 4 + 0.3 * 1 / 3)
    assert m.num_pixels == 10
    groups = m.group_miou({"old": [0, 1], "new": [2, 3], "absent": [3], "empty": []})
    assert groups["old"] == pytest.approx((3 / 5 + 3 / 4) / 2)
    assert groups["new"] == pytest.approx(1 / 3)
    assert groups["absent"] is None and groups["empty"] is None
    with pytest.raises(ValueError, match="channel 7"):
        m.group_miou({"bad": [7]})


def test_accumulates_over_batches_and_resets() -> None:
    cm = ConfusionMatrix(4, "cpu")
    cm.update(PRED, TARGET)
    cm.update(PRED, TARGET)
    np.testing.assert_array_equal(cm.matrix.numpy(), 2 * EXPECTED_CONF)
    cm.reset()
    assert int(cm.matrix.sum()) == 0 and cm.skipped_pixels == 0


def _naive_confusion(preds: list[np.ndarray], targets: list[np.ndarray], k: int) -> np.ndarray:
    conf = np.zeros((k, k), dtype=np.int64)
    for p, t in zip(preds, targets):
        valid = t < k
        np.add.at(conf, (t[valid], p[valid]), 1)
    return conf


@pytest.mark.parametrize("k", [3, 21, 151])
def test_bincount_matches_naive_numpy(k: int) -> None:
    rng = np.random.default_rng(k)
    cm = ConfusionMatrix(k, "cpu")
    preds, targets = [], []
    for b, h, w in [(2, 7, 9), (1, 16, 5), (3, 4, 4)]:  # varying sizes between batches
        t = rng.integers(0, k, size=(b, h, w))
        t[rng.random((b, h, w)) < 0.2] = 255
        p = rng.integers(0, k, size=(b, h, w))
        preds.append(p)
        targets.append(t)
        cm.update(torch.from_numpy(p), torch.from_numpy(t))
    np.testing.assert_array_equal(cm.matrix.numpy(), _naive_confusion(preds, targets, k))


def test_uint8_target_and_out_of_range_labels() -> None:
    k = 151
    cm = ConfusionMatrix(k, "cpu")
    target = torch.tensor([[[150, 2, 255, 200]]], dtype=torch.uint8)  # 200 >= K: skipped like 255
    pred = torch.tensor([[[150, 2, 5, 0]]])
    cm.update(pred, target)  # t * K must not overflow uint8
    conf = cm.matrix.numpy()
    assert conf[150, 150] == 1 and conf[2, 2] == 1 and conf.sum() == 2
    assert cm.skipped_pixels == 2
    neg = ConfusionMatrix(3, "cpu")
    neg.update(torch.tensor([[[0, 1]]]), torch.tensor([[[-1, 1]]]))
    assert neg.matrix.sum() == 1 and neg.skipped_pixels == 1


def test_ignore_index_inside_class_range_is_skipped() -> None:
    cm = ConfusionMatrix(3, "cpu", ignore_index=0)
    cm.update(torch.tensor([[[0, 1, 2]]]), torch.tensor([[[0, 1, 1]]]))
    np.testing.assert_array_equal(cm.matrix.numpy(), [[0, 0, 0], [0, 1, 1], [0, 0, 0]])
    assert cm.skipped_pixels == 1


def test_prediction_outside_classes_is_an_error() -> None:
    cm = ConfusionMatrix(3, "cpu")
    cm.update(torch.tensor([[[0, 3]]]), torch.tensor([[[0, 1]]]))
    with pytest.raises(ValueError, match=r"1 valid pixels had a prediction outside \[0, 3\)"):
        cm.compute()
    ok = ConfusionMatrix(3, "cpu")  # a bad prediction on an ignored pixel does not count
    ok.update(torch.tensor([[[0, 3]]]), torch.tensor([[[0, 255]]]))
    assert ok.compute().pixel_acc == 1.0


def test_update_rejects_bad_inputs() -> None:
    cm = ConfusionMatrix(3, "cpu")
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        cm.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_all_reduce_single_process_is_identity() -> None:
    cm = ConfusionMatrix(4, "cpu")
    cm.update(PRED, TARGET)
    cm.all_reduce_()
    np.testing.assert_array_equal(cm.matrix.numpy(), EXPECTED_CONF)


def test_metrics_to_dict_is_json_and_nan_becomes_none() -> None:
    m = Metrics.from_confusion(EXPECTED_CONF)
    d = json.loads(json.dumps(m.to_dict(include_confusion=True), allow_nan=False))
    assert d["class_iou"][3] is None and d["class_acc"][3] is None
    assert d["class_iou"][0] == pytest.approx(0.6)
    assert d["miou"] == pytest.approx(m.miou)
    assert d["confusion"] == EXPECTED_CONF.tolist()
    assert "confusion" not in m.to_dict()
    empty = Metrics.from_confusion(np.zeros((2, 2), dtype=np.int64)).to_dict()
    assert empty["miou"] is None and empty["pixel_acc"] is None and empty["fw_iou"] is None


@pytest.mark.parametrize("n,world", [(10, 3), (2, 4), (7, 1), (0, 2)])
def test_sharded_sampler_covers_each_index_once(n: int, world: int) -> None:
    shards = [list(ShardedEvalSampler(n, rank=r, world_size=world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert [len(ShardedEvalSampler(list(range(n)), rank=r, world_size=world)) for r in range(world)] == [len(s) for s in shards]
    with pytest.raises(ValueError, match="rank"):
        ShardedEvalSampler(n, rank=world, world_size=world)


class _ChannelZeroIsPrediction(nn.Module):
    """Predicts the class written in image channel 0."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        logits = nn.functional.one_hot(x[:, 0].long(), self.k).permute(0, 3, 1, 2).to(x.dtype) * self.scale
        return SimpleNamespace(logits=logits)


def _image_for(pred: torch.Tensor) -> torch.Tensor:
    return pred.float().unsqueeze(1).repeat(1, 3, 1, 1)  # (B, 3, H, W)


def test_evaluation_loop_over_full_images_of_different_sizes() -> None:
    """The engine's one evaluation loop (``evaluate_loader``, also ``sats test``) equals a naive count."""
    rng = torch.Generator().manual_seed(0)
    k = 5
    batches, preds, targets = [], [], []
    for h, w in [(6, 8), (9, 5), (4, 4)]:  # batch 1, full images of different sizes
        p = torch.randint(0, k, (1, h, w), generator=rng)
        t = torch.randint(0, k + 1, (1, h, w), generator=rng)
        t[t == k] = 255
        batches.append((_image_for(p), t))
        preds.append(p.numpy())
        targets.append(t.numpy())
    model = _ChannelZeroIsPrediction(k).train()
    argmax = lambda logits: logits.max(dim=1).indices  # noqa: E731
    m = evaluate_loader(model, batches, k, argmax, torch.device("cpu"), contextlib.nullcontext)
    np.testing.assert_array_equal(m.confusion, _naive_confusion(preds, targets, k))
    assert not model.training
    bf16 = functools.partial(torch.autocast, device_type="cpu", dtype=torch.bfloat16)
    m_bf16 = evaluate_loader(model, batches, k, argmax, torch.device("cpu"), bf16, progress=True)
    np.testing.assert_array_equal(m_bf16.confusion, m.confusion)
