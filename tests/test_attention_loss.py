"""SATS attention-transfer loss (docs/methods.md §3.13): hand-computed cases and the loop form."""

from __future__ import annotations

import math

import pytest
import torch

from sats.losses.attention import (
    class_region_weights,
    downsample_labels,
    plop_attention_loss,
    sats_attention_loss,
    sats_feature_loss,
)

S6 = math.sqrt(1 / 6)  # recurring distance in the hand-computed cases
THIRD = 1.0 / 3.0


def _hand_attention() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image, 2 heads, 2×2 grid (N = 4), M = 3; labels [[1, 1], [2, 0]]; old rows uniform."""
    head0 = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [THIRD, THIRD, THIRD]]
    head1 = [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0.5, 0.5], [1, 0, 0]]
    new = torch.tensor([[head0, head1]], dtype=torch.float64)  # (1, 2, 4, 3)
    old = torch.full_like(new, THIRD)
    labels = torch.tensor([[[1, 1], [2, 0]]])
    return new, old, labels


# --------------------------------------------------------------------------- hand-computed


def test_hand_computed_class_pooling() -> None:
    new, old, labels = _hand_attention()
    # class 1 (pixels 0, 1): head 0 mean [.5, .5, 0], head 1 mean [.5, .5, 0]: both √(1/6) from 1/3
    # class 2 (pixel 2): head 0 [0, 0, 1] → √(2/3) = 2√(1/6); head 1 [0, .5, .5] → √(1/6)
    expected = 0.5 * ((S6 + S6) / 2 + (2 * S6 + S6) / 2)  # = 1.25 √(1/6)
    loss = sats_attention_loss([new], [old], labels)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert loss.item() == pytest.approx(0.5103103630798288, rel=1e-12)


def test_images_without_valid_class_count_in_batch_and_stages_are_averaged() -> None:
    new, old, labels = _hand_attention()
    # second image: only background and ignore, with a very different attention
    new2 = torch.cat([new, torch.rand_like(new)])
    old2 = torch.cat([old, torch.rand_like(old)])
    labels2 = torch.cat([labels, torch.tensor([[[0, 255], [255, 0]]])])
    one_stage = sats_attention_loss([new2], [old2], labels2)
    assert one_stage.item() == pytest.approx(1.25 * S6 / 2, rel=1e-12)
    # a second stage with identical maps contributes 0, and the mean over S = 2 halves the loss
    same = torch.rand(2, 1, 1, 3, dtype=torch.float64)
    two_stages = sats_attention_loss([new2, same], [old2, same.clone()], labels2)
    assert two_stages.item() == pytest.approx(1.25 * S6 / 4, rel=1e-12)


def test_hand_computed_reference_layout() -> None:
    new, old, labels = _hand_attention()
    # rows of the head-major (8, 3) matrix: "pixel n, head h" = row 2n + h
    # class 1, head 0: rows 0, 2 = [1,0,0], [0,0,1] → mean [.5, 0, .5] → √(1/6)
    # class 1, head 1: rows 1, 3 = [0,1,0], [⅓,⅓,⅓] → mean [1/6, 2/3, 1/6] → √(1/6)
    # class 2, head 0: row 4 = [.5, .5, 0] → √(1/6);  head 1: row 5 = [.5, .5, 0] → √(1/6)
    loss = sats_attention_loss([new], [old], labels, reference_layout=True)
    assert loss.item() == pytest.approx(S6, rel=1e-12)


def test_hand_computed_global_pooling() -> None:
    new, old, labels = _hand_attention()
    # head 0 mean over 4 pixels = [⅓, ⅓, ⅓] → 0; head 1 mean [.5, .375, .125] → √42 / 24
    loss = sats_attention_loss([new], [old], None, pooling="global")
    assert loss.item() == pytest.approx(math.sqrt(42) / 48, rel=1e-12)
    # layout bug: "head 0" = rows 0,2,4,6 → mean [3/8, 1/4, 3/8] → √6/24;
    #             "head 1" = rows 1,3,5,7 → mean [11/24, 11/24, 1/12] → √54/24
    loss_ref = sats_attention_loss([new], [old], labels, pooling="global", reference_layout=True)
    assert loss_ref.item() == pytest.approx((math.sqrt(6) + math.sqrt(54)) / 48, rel=1e-12)


def test_hand_computed_no_pooling() -> None:
    new, old, labels = _hand_attention()
    # head 0: three one-hot rows at √6/3 each, the uniform row 0
    # head 1: three rows at √6/6, the one-hot row at √6/3 → mean over 8 = 11√6/48
    loss = sats_attention_loss([new], [old], None, pooling="none")
    assert loss.item() == pytest.approx(11 * math.sqrt(6) / 48, rel=1e-12)
    # NP averages over every (pixel, head) row, so the layout bug cannot change it
    loss_ref = sats_attention_loss([new], [old], None, pooling="none", reference_layout=True)
    assert loss_ref.item() == pytest.approx(loss.item(), rel=1e-12)


def test_hand_computed_plop_selfattn() -> None:
    new, old, _ = _hand_attention()
    no_pooling = 11 * math.sqrt(6) / 48  # test_hand_computed_no_pooling
    # K_t = 16, |C^t| = 1 (VOC 15-1, step 1): 100 · sqrt(16) = 400
    loss = plop_attention_loss([new], [old], num_classes_seen=16, num_new=1)
    assert loss.item() == pytest.approx(400 * no_pooling, rel=1e-12)
    # stages are averaged: an identical second stage halves it; K_t = 18, |C^t| = 2 → 100 · 3
    same = torch.rand(1, 3, 4, 5, dtype=torch.float64)
    two = plop_attention_loss([new, same], [old, same.clone()], num_classes_seen=18, num_new=2)
    assert two.item() == pytest.approx(300 * no_pooling / 2, rel=1e-12)
    assert plop_attention_loss([new], [old], 16, 1, factor=1.0).item() == pytest.approx(4 * no_pooling, rel=1e-12)
    # gradient into the new maps only: d/dA of 400 · mean_rows ‖A_r − Ā_r‖ = 400/8 · (A_r − Ā_r)/‖A_r − Ā_r‖
    a, b = new.clone().requires_grad_(True), old.clone().requires_grad_(True)
    plop_attention_loss([a], [b], 16, 1).backward()
    diff = (new - old)[0].reshape(8, 3)
    norms = torch.linalg.vector_norm(diff, dim=1, keepdim=True)
    expected = torch.where(norms > 0, 50 * diff / norms.clamp_min(1e-300), torch.zeros_like(diff))
    torch.testing.assert_close(a.grad[0].reshape(8, 3), expected)
    assert b.grad is None
    with pytest.raises(ValueError, match="inconsistent"):
        plop_attention_loss([new], [old], num_classes_seen=16, num_new=0)


# --------------------------------------------------------------------------- loop form


def _loop_downsample(labels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """PIL NEAREST: output (i, j) reads input (floor((i + .5)·H/h), floor((j + .5)·W/w))."""
    big_h, big_w = labels.shape[-2:]
    out = torch.empty(labels.shape[0], h, w, dtype=torch.long)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = labels[:, math.floor((i + 0.5) * big_h / h), math.floor((j + 0.5) * big_w / w)]
    return out


def _loop_loss(new_attn, old_attn, labels, reference_layout: bool) -> float:
    """The §3.13 formula with explicit loops over stages, images, classes and heads."""
    total = 0.0
    for new, old in zip(new_attn, old_attn):
        batch, heads, num_queries, num_keys = new.shape
        side = math.isqrt(num_queries)
        small = _loop_downsample(labels, side, side).reshape(batch, num_queries)
        stage_sum = 0.0
        for b in range(batch):
            classes = [c for c in torch.unique(small[b]).tolist() if c not in (0, 255)]
            image_sum = 0.0
            for c in classes:
                pixels = [n for n in range(num_queries) if small[b, n] == c]
                head_sum = 0.0
                for h in range(heads):
                    if reference_layout:
                        flat_new = new[b].reshape(heads * num_queries, num_keys)
                        flat_old = old[b].reshape(heads * num_queries, num_keys)
                        rows = [n * heads + h for n in pixels]
                        v_new, v_old = flat_new[rows].mean(0), flat_old[rows].mean(0)
                    else:
                        v_new, v_old = new[b, h, pixels].mean(0), old[b, h, pixels].mean(0)
                    head_sum += math.sqrt(float(((v_new - v_old) ** 2).sum()))
                image_sum += head_sum / heads
            stage_sum += image_sum / len(classes) if classes else 0.0
        total += stage_sum / batch
    return total / len(new_attn)


def _random_case(seed: int, heads=(1, 2, 3), sides=(4, 4, 2), keys=(5, 4, 4)):
    gen = torch.Generator().manual_seed(seed)
    batch = 3
    new, old = [], []
    for h, side, m in zip(heads, sides, keys):
        new.append(torch.softmax(torch.randn(batch, h, side * side, m, generator=gen, dtype=torch.float64), -1))
        old.append(torch.softmax(torch.randn(batch, h, side * side, m, generator=gen, dtype=torch.float64), -1))
    values = torch.tensor([0, 1, 2, 3, 255])
    labels = values[torch.randint(0, 5, (batch, 8, 8), generator=gen)]
    labels[2] = torch.where(labels[2] == 255, 255, 0)  # an image with no valid class
    return new, old, labels


@pytest.mark.parametrize("reference_layout", [False, True])
def test_matches_loop_form_on_random_tensors(reference_layout: bool) -> None:
    for seed in range(3):
        new, old, labels = _random_case(seed)
        expected = _loop_loss(new, old, labels, reference_layout)
        loss = sats_attention_loss(new, old, labels, reference_layout=reference_layout)
        assert loss.item() == pytest.approx(expected, rel=1e-10)
        assert expected > 0


@pytest.mark.parametrize("reference_layout", [False, True])
def test_per_channel_rows_equal_compact_rows_with_their_gradient(reference_layout: bool) -> None:
    """compact=False (one row per channel, the sync-free GPU path) = compact=True (present classes only)."""
    for seed in range(3):
        new, old, labels = _random_case(seed)
        new_a = [n.detach().clone().requires_grad_(True) for n in new]
        new_b = [n.detach().clone().requires_grad_(True) for n in new]
        full = sats_attention_loss(new_a, old, labels, reference_layout=reference_layout, num_channels=6,
                                   compact=False)
        compact = sats_attention_loss(new_b, old, labels, reference_layout=reference_layout, num_channels=6,
                                      compact=True)
        assert full.item() == pytest.approx(compact.item(), rel=1e-12) and compact.item() > 0
        full.backward()
        compact.backward()
        for a, b in zip(new_a, new_b):
            torch.testing.assert_close(a.grad, b.grad)
    with pytest.raises(ValueError, match="needs num_channels"):
        sats_attention_loss(new, old, labels, compact=False)


def test_layout_switch_matters_only_with_several_heads() -> None:
    new, old, labels = _random_case(0, heads=(1,), sides=(4,), keys=(5,))
    assert sats_attention_loss(new, old, labels).item() == pytest.approx(
        sats_attention_loss(new, old, labels, reference_layout=True).item(), rel=1e-12
    )
    new, old, labels = _random_case(0, heads=(2,), sides=(4,), keys=(5,))
    correct = sats_attention_loss(new, old, labels).item()
    buggy = sats_attention_loss(new, old, labels, reference_layout=True).item()
    assert abs(correct - buggy) > 1e-3 * correct


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("pooling", ["class", "global", "none"])
def test_zero_loss_and_finite_zero_gradient_when_maps_match(pooling: str) -> None:
    new, _, labels = _random_case(1)
    new = [a.clone().requires_grad_(True) for a in new]
    old = [a.detach().clone() for a in new]
    loss = sats_attention_loss(new, old, labels, pooling=pooling)
    loss.backward()
    assert loss.item() == 0.0
    for a in new:
        assert a.grad is not None
        assert torch.isfinite(a.grad).all()
        assert a.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("reference_layout", [False, True])
def test_gradient_reaches_new_attention_only(reference_layout: bool) -> None:
    new, old, labels = _random_case(2)
    new = [a.clone().requires_grad_(True) for a in new]
    old = [a.clone().requires_grad_(True) for a in old]
    loss = sats_attention_loss(new, old, labels, reference_layout=reference_layout)
    assert loss.requires_grad
    loss.backward()
    for a_new, a_old in zip(new, old):
        assert a_new.grad is not None and torch.isfinite(a_new.grad).all()
        assert a_new.grad.abs().sum() > 0
        assert a_old.grad is None


def test_gradient_matches_finite_differences() -> None:
    new, old, labels = _random_case(4, heads=(2,), sides=(2,), keys=(3,))
    new = [new[0].clone().requires_grad_(True)]
    assert torch.autograd.gradcheck(
        lambda a: sats_attention_loss([a], old, labels, reference_layout=True), (new[0],)
    )


def _precision_case(near: bool, seed: int):
    """Float32 softmax rows (B = 2, H = 2, 32×32 queries, M = 16) and labels with 2 classes, bg and 255.

    ``near``: the old maps are the new ones plus 1e-4 noise, as late in training."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 2, 32 * 32, 16)
    new = torch.softmax(3 * torch.randn(shape, generator=gen, dtype=torch.float64), -1)
    other = torch.softmax(3 * torch.randn(shape, generator=gen, dtype=torch.float64), -1)
    old = new + 1e-4 * torch.randn(shape, generator=gen, dtype=torch.float64) if near else other
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[:, :16, :16] = 1
    labels[:, 16:, 8:] = 2
    labels[1, :4] = 255
    return new.float(), old.float(), labels


def _float32_gradient_error(loss_fn, new: torch.Tensor, old: torch.Tensor) -> float:
    """max |g32 − g64| / max |g64| for the gradient wrt ``new``; float64 from the same (float32) inputs."""
    grads = []
    for dtype in (torch.float32, torch.float64):
        leaf = new.to(dtype).clone().requires_grad_(True)
        loss_fn(leaf, old.to(dtype)).backward()
        grads.append(leaf.grad.double())
    g32, g64 = grads
    return ((g32 - g64).abs().max() / g64.abs().max()).item()


@pytest.mark.parametrize("near", [False, True], ids=["far", "near"])
@pytest.mark.parametrize("pooling,reference_layout,compact", [
    ("class", False, True), ("class", False, False), ("class", True, True), ("class", True, False),
    ("global", False, None), ("global", True, None)])
def test_float32_gradient_is_close_to_float64(pooling: str, reference_layout: bool, compact, near: bool) -> None:
    """The difference is pooled (W·(A − Ā)), not the two maps: no cancellation of two nearly equal means.

    Measured worst case over seeds 0–4, pooling the two maps separately → pooling the difference:
    class 2.1e-6 → 4.5e-7 (far), 5.1e-3 → 4.3e-7 (near); global 1.3e-6 → 2.6e-7, 2.5e-3 → 1.6e-7."""
    bound = 1e-5 if near else 1e-6
    for seed in range(3):
        new, old, labels = _precision_case(near, seed)
        error = _float32_gradient_error(
            lambda a, o: sats_attention_loss([a], [o], labels, pooling=pooling, reference_layout=reference_layout,
                                             num_channels=3, compact=compact), new, old)
        assert error < bound, f"seed {seed}: float32 gradient error {error:.2e}"


def test_float32_feature_gradient_is_close_to_float64() -> None:
    # features ~ N(1, 1), old = new + 1e-4 noise; measured 2.4e-2 → 1.9e-7 (pooling the difference)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        new = torch.randn(2, 8, 32, 32, generator=gen, dtype=torch.float64) + 1
        old = (new + 1e-4 * torch.randn(new.shape, generator=gen, dtype=torch.float64)).float()
        labels = torch.zeros(2, 32, 32, dtype=torch.long)
        labels[:, :16, :16] = 1
        labels[:, 16:, 8:] = 2
        error = _float32_gradient_error(lambda a, o: sats_feature_loss([a], [o], labels), new.float(), old)
        assert error < 1e-5, f"seed {seed}: float32 gradient error {error:.2e}"


# --------------------------------------------------------------------------- labels


def test_background_and_ignore_pixels_are_excluded() -> None:
    gen = torch.Generator().manual_seed(0)
    new = torch.softmax(torch.randn(1, 2, 4, 3, generator=gen, dtype=torch.float64), -1)
    labels = torch.tensor([[[0, 255], [4, 4]]])  # pixels 0 (bg), 1 (ignore), 2-3 (class 4)
    old = new.clone()
    old[:, :, :2] = torch.rand(1, 2, 2, 3, generator=gen, dtype=torch.float64)  # change only bg/ignore rows
    assert sats_attention_loss([new], [old], labels).item() == 0.0
    old[:, :, 3] += 0.1  # change a class-4 row
    assert sats_attention_loss([new], [old], labels).item() > 0.0


@pytest.mark.parametrize("fill", [0, 255])
def test_batch_without_any_valid_class_gives_zero(fill: int) -> None:
    new, old, _ = _random_case(5)
    new = [a.clone().requires_grad_(True) for a in new]
    labels = torch.full((3, 8, 8), fill)
    loss = sats_attention_loss(new, old, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert all(a.grad is not None and a.grad.abs().max().item() == 0.0 for a in new)
    features = [torch.randn(3, 2, 4, 4)]
    assert sats_feature_loss(features, [f + 1 for f in features], labels).item() == 0.0


def test_labels_outside_channels_raise() -> None:
    new, old, labels = _hand_attention()
    with pytest.raises(ValueError, match="outside the channels"):
        sats_attention_loss([new], [old], torch.tensor([[[1, 7], [2, 0]]]), num_channels=3)


def test_shape_errors_name_the_stage() -> None:
    new, old, labels = _hand_attention()
    with pytest.raises(ValueError, match="stage 1"):
        sats_attention_loss([new, new], [old, old[:, :1]], labels)
    with pytest.raises(ValueError, match="not a square grid"):
        sats_attention_loss([new[:, :, :3]], [old[:, :, :3]], labels)


def test_downsample_picks_pixel_centres() -> None:
    labels = torch.arange(16).reshape(1, 4, 4)
    assert downsample_labels(labels, (2, 2)).tolist() == [[[5, 7], [13, 15]]]
    assert downsample_labels(labels, (4, 4)).tolist() == labels.tolist()


def test_loss_uses_nearest_exact_downsampling() -> None:
    # 4×4 labels on a 2×2 grid: centres (1,1),(1,3),(3,1),(3,3) are class 1, the rest class 2
    labels = torch.full((1, 4, 4), 2)
    labels[:, 1::2, 1::2] = 1
    gen = torch.Generator().manual_seed(3)
    new = torch.softmax(torch.randn(1, 1, 4, 3, generator=gen, dtype=torch.float64), -1)
    old = torch.softmax(torch.randn(1, 1, 4, 3, generator=gen, dtype=torch.float64), -1)
    # only class 1 is present after nearest-exact: pooled over all 4 pixels
    expected = torch.linalg.vector_norm(new[0, 0].mean(0) - old[0, 0].mean(0)).item()
    assert sats_attention_loss([new], [old], labels).item() == pytest.approx(expected, rel=1e-12)


def test_class_region_weights() -> None:
    labels_small = torch.tensor([[1, 1, 2, 0, 255, 1], [0, 0, 255, 0, 0, 0]])
    weights, present = class_region_weights(labels_small, num_channels=4)
    assert weights.shape == (2, 4, 6)
    assert present.tolist() == [[False, True, True, False], [False, False, False, False]]
    third = 1 / 3
    expected = torch.tensor([[0] * 6, [third, third, 0, 0, 0, third], [0, 0, 1, 0, 0, 0], [0] * 6])
    torch.testing.assert_close(weights[0], expected)
    assert weights[1].abs().sum().item() == 0.0
    with pytest.raises(ValueError, match="outside the channels"):
        class_region_weights(torch.tensor([[4]]), num_channels=4)


# --------------------------------------------------------------------------- CNN features


def _feature_case():
    # 1 image, C = 2, 2×2 map, labels [[1, 1], [2, 255]]
    new = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]], [[0.0, 2.0], [4.0, 9.0]]]], dtype=torch.float64)
    old = torch.zeros_like(new)
    labels = torch.tensor([[[1, 1], [2, 255]]])
    return new, old, labels


def test_sats_feature_loss_hand_computed_and_reference_divisor() -> None:
    new, old, labels = _feature_case()
    # class 1: ‖(2, 1)‖ = √5; class 2: ‖(5, 4)‖ = √41; mean over classes, then over B = 2 (2nd image bg only)
    new2 = torch.cat([new, torch.randn_like(new)])
    old2 = torch.cat([old, torch.randn_like(old)])
    labels2 = torch.cat([labels, torch.zeros_like(labels)])
    per_map = (math.sqrt(5) + math.sqrt(41)) / 2 / 2
    same = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    maps_new, maps_old = [new2, new2, same], [old2, old2, same.clone()]
    loss = sats_feature_loss(maps_new, maps_old, labels2)
    assert loss.item() == pytest.approx(2 * per_map / 3, rel=1e-12)
    loss_ref = sats_feature_loss(maps_new, maps_old, labels2, reference_divisor=2)
    assert loss_ref.item() == pytest.approx(2 * per_map / 2, rel=1e-12)


def test_sats_feature_loss_gradient_only_to_new() -> None:
    new, old, labels = _feature_case()
    new.requires_grad_(True)
    old.requires_grad_(True)
    sats_feature_loss([new], [old], labels).backward()
    assert new.grad is not None and new.grad[0, :, 1, 1].abs().sum() == 0  # ignore pixel
    assert new.grad[0, :, 0, 0].abs().sum() > 0
    assert old.grad is None
