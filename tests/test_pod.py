"""PLOP local POD: hand-computed embedding, vectorised == loop definition, logit collapse, full loss (docs/methods.md §3.9)."""

from __future__ import annotations

import math

import pytest
import torch

from sats.losses import collapse_new_channels, local_pod_loss, pod_distance, pod_embedding


def _loop_embedding(x: torch.Tensor, scales) -> torch.Tensor:
    """The loop definition (PLOP's ``_local_pod``), with ⌊h/s⌋ rows and ⌊w/s⌋ columns per region."""
    b, _, h, w = x.shape
    x = x.pow(2)
    parts = []
    for s in scales:
        kh, kw = h // s, w // s
        for i in range(s):
            for j in range(s):
                region = x[:, :, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw]
                parts.append(region.mean(dim=3).reshape(b, -1))  # over the width: per channel and row
                parts.append(region.mean(dim=2).reshape(b, -1))  # over the height: per channel and column
    return torch.cat(parts, dim=1)


def test_embedding_hand_computed_4x4():
    x = torch.arange(16.0).view(1, 1, 4, 4)  # squared: rows [0 1 4 9], [16 25 36 49], [64 81 100 121], [144 169 196 225]
    scale1 = [3.5, 31.5, 91.5, 183.5, 56.0, 69.0, 84.0, 101.0]
    scale2 = [
        0.5, 20.5, 8.0, 13.0,  # region (0, 0): rows [0 1], [16 25]
        6.5, 42.5, 20.0, 29.0,  # region (0, 1): rows [4 9], [36 49]
        72.5, 156.5, 104.0, 125.0,  # region (1, 0): rows [64 81], [144 169]
        110.5, 210.5, 148.0, 173.0,  # region (1, 1): rows [100 121], [196 225]
    ]
    torch.testing.assert_close(pod_embedding(x, scales=(1,)), torch.tensor([scale1]))
    torch.testing.assert_close(pod_embedding(x, scales=(2,)), torch.tensor([scale2]))
    torch.testing.assert_close(pod_embedding(x, scales=(1, 2)), torch.tensor([scale1 + scale2]))
    # the sign of the input does not matter (squared)
    torch.testing.assert_close(pod_embedding(-x, scales=(1, 2)), pod_embedding(x, scales=(1, 2)))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 9, 9), (1, 2, 8, 12), (2, 1, 13, 10)])
def test_embedding_vectorised_equals_loop(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    expected = _loop_embedding(x, (1, 2, 4))
    got = pod_embedding(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)


def test_embedding_rejects_too_small_map():
    with pytest.raises(ValueError, match="scale 4"):
        pod_embedding(torch.zeros(1, 1, 3, 3))


def test_distance_is_batch_mean_of_l2_norms():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    pair_new = torch.cat([x, 2 * x])
    pair_old = torch.zeros(2, 1, 4, 4)
    norm = math.sqrt(sum(v * v for v in _loop_embedding(x, (1, 2))[0].tolist()))
    # image 0: ‖Φ(x)‖; image 1: Φ(2x) = 4Φ(x) → 4‖Φ(x)‖; mean = 2.5‖Φ(x)‖
    assert pod_distance(pair_old, pair_new, scales=(1, 2)).item() == pytest.approx(2.5 * norm, rel=1e-6)
    with pytest.raises(ValueError, match="differ"):
        pod_distance(pair_old, pair_new[:, :, :2])


def test_collapse_new_channels_hand_case():
    z = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0]).view(1, 5, 1, 1)
    torch.testing.assert_close(collapse_new_channels(z, 3), torch.tensor([31.0, 2.0, 3.0]).view(1, 3, 1, 1))
    torch.testing.assert_close(collapse_new_channels(z, 5), z)  # no new channels: unchanged
    with pytest.raises(ValueError, match="num_old=6"):
        collapse_new_channels(z, 6)


def test_local_pod_loss_matches_formula():
    gen = torch.Generator().manual_seed(11)
    old_feat = [torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 6, 4, 4, generator=gen)]
    new_feat = [torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 6, 4, 4, generator=gen)]
    old_logits = torch.randn(2, 3, 4, 4, generator=gen)
    new_logits = torch.randn(2, 5, 4, 4, generator=gen)
    weights = [0.01, 0.01, 0.0005]
    k_seen, k_new = 5, 2

    def loop_distance(a, b):
        diff = _loop_embedding(a, (1, 2, 4)) - _loop_embedding(b, (1, 2, 4))
        return diff.pow(2).sum(dim=1).sqrt().mean().item()

    collapsed = new_logits[:, :3].clone()
    collapsed[:, 0] += new_logits[:, 3:].sum(dim=1)
    distances = [loop_distance(old_feat[0], new_feat[0]), loop_distance(old_feat[1], new_feat[1]), loop_distance(old_logits, collapsed)]
    expected = sum(w * math.sqrt(k_seen / k_new) * d for w, d in zip(weights, distances)) / 3
    got = local_pod_loss(old_feat + [old_logits], new_feat + [new_logits], weights, k_seen, k_new)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # a zero weight drops a layer but it still counts in 1/L
    zero_last = local_pod_loss(old_feat + [old_logits], new_feat + [new_logits], [0.01, 0.01, 0.0], k_seen, k_new)
    assert zero_last.item() == pytest.approx(sum(0.01 * math.sqrt(2.5) * d for d in distances[:2]) / 3, rel=1e-5)
    # one weight for every layer
    same = local_pod_loss(old_feat, new_feat, 0.01, k_seen, k_new)
    assert same.item() == pytest.approx(0.01 * math.sqrt(2.5) * sum(distances[:2]) / 2, rel=1e-5)


def test_local_pod_loss_errors():
    a = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4)]
    b = [torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)]
    with pytest.raises(ValueError, match="map 0"):
        local_pod_loss(a, b, 1.0, 4, 1)
    with pytest.raises(ValueError, match="2 layer weights for 1 maps"):
        local_pod_loss(a[:1], a[:1], [1.0, 1.0], 4, 1)
    with pytest.raises(ValueError, match="same number"):
        local_pod_loss(a, a[:1], 1.0, 4, 1)


def test_square_map_smaller_than_a_scale_drops_only_that_scale():
    """A square map smaller than a scale: the reference's regions there are empty (side ⌊w/s⌋ = 0) and
    add nothing, no NaN; ``skip_unfit_scales`` gives the same loss. Without it the scale is an error."""
    old = torch.zeros(1, 1, 2, 2)
    new = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)  # squared [[1, 4], [9, 16]]
    # scale 1: width means [2.5, 12.5], height means [5, 10]; scale 2: every 1×1 region twice (width, height)
    expected = math.sqrt(2.5**2 + 12.5**2 + 5**2 + 10**2 + 2 * (1 + 16 + 81 + 256))
    loss = local_pod_loss([old], [new], 1.0, 4, 4, scales=(1, 2, 4), skip_unfit_scales=True)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="scale 4 does not fit a 2x2 map"):
        local_pod_loss([old], [new], 1.0, 4, 4, scales=(1, 2, 4))


def test_gradients_flow_to_new_maps_only():
    gen = torch.Generator().manual_seed(12)
    old = [torch.randn(2, 3, 8, 8, generator=gen).requires_grad_(True), torch.randn(2, 3, 4, 4, generator=gen).requires_grad_(True)]
    new = [torch.randn(2, 3, 8, 8, generator=gen).requires_grad_(True), torch.randn(2, 4, 4, 4, generator=gen).requires_grad_(True)]
    local_pod_loss(old, new, [0.01, 0.0005], 4, 1).backward()
    assert all(t.grad is None for t in old)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in new)


def test_finite_float32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(13)
    old = [torch.randn(2, 3, 8, 8, generator=gen) * 30]
    new = [torch.randn(2, 3, 8, 8, generator=gen) * 30]
    reference = local_pod_loss([old[0] / 30], [new[0] / 30], 0.01, 4, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = local_pod_loss([old[0].bfloat16()], [new[0].bfloat16()], 0.01, 4, 1)
        low = local_pod_loss([(old[0] / 30).bfloat16()], [(new[0] / 30).bfloat16()], 0.01, 4, 1)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert low.item() == pytest.approx(reference.item(), rel=3e-2)


@pytest.mark.parametrize("shape, scales", [((2, 3, 8, 12), (1, 2, 4)), ((2, 3, 10, 7), (1, 2, 4)), ((1, 2, 9, 9), (1, 3))])
def test_distance_equals_the_norm_of_the_embedding_difference_with_its_gradient(shape, scales):
    """pod_distance's shortcut (means of old² − new², norm summed per scale) = ‖Φ(old) − Φ(new)‖ mean,
    on nested and non-nested grids, value and gradient (both compute in float32)."""
    gen = torch.Generator().manual_seed(7)
    old = torch.randn(shape, generator=gen, dtype=torch.float64)
    new_a = torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True)
    new_b = new_a.detach().clone().requires_grad_(True)
    fast = pod_distance(old, new_a, scales)
    slow = torch.linalg.vector_norm(pod_embedding(old, scales) - pod_embedding(new_b, scales), dim=1).mean()
    assert fast.item() == pytest.approx(slow.item(), rel=1e-6)
    fast.backward()
    slow.backward()
    torch.testing.assert_close(new_a.grad, new_b.grad, rtol=1e-4, atol=1e-6)
