"""RCIL's pooled-cube distillation (sats/losses/pckd.py, docs/methods.md §3.16) on hand-computed maps."""

from __future__ import annotations

import math

import pytest
import torch

from sats.losses.pckd import (
    pckd_channel_distance,
    pckd_factors,
    pckd_loss,
    pckd_spatial_distance,
)

WINDOWS = (4, 8, 12, 16, 20, 24)
SQRT17 = math.sqrt(17.0)  # VOC 15-1, step 1: K_t = 17, |C^t| = 1


def _pair(shape):
    """Old zeros, new ones."""
    return torch.zeros(shape), torch.ones(shape)


@pytest.mark.parametrize("k, expected", [(4, 0.75), (8, 0.1875), (12, 1 / 12), (16, 0.046875), (20, 0.03),
                                         (24, 1 / 48)])
def test_spatial_window_on_a_2x2_map(k, expected):
    """1×2×2 map, old 0, new 1: the padded, padding-counted pool is a 3×3 map of 4/k², its norm 3·4/k² = 12/k²
    (count_include_pad=False would give 1 everywhere and 3)."""
    old, new = _pair((1, 1, 2, 2))
    assert pckd_spatial_distance(old, new, [k]).item() == pytest.approx(expected, rel=1e-6)


def test_spatial_layer_loss_and_its_share_of_the_term():
    """ℓ^s = mean of the six d_k = 0.186424; with f = 0.01, sqrt(17) and L = 6 maps it adds 0.0012811."""
    old, new = _pair((1, 1, 2, 2))
    assert pckd_spatial_distance(old, new, WINDOWS).item() == pytest.approx(0.18642361, rel=1e-6)
    same = torch.full((1, 3, 2, 2), 0.5)
    logits = torch.randn(1, 16, 2, 2)
    new_logits = torch.cat([logits, torch.zeros(1, 1, 2, 2)], dim=1)  # the new channel adds 0 to the background
    old_maps = [old, same, same, same, same, logits]
    new_maps = [new, same, same, same, same, new_logits]
    spatial, channel = pckd_loss(old_maps, new_maps, [0.01] * 5 + [0.0005], [0.01] * 5, num_classes_seen=17,
                                 num_new=1)
    assert spatial.item() == pytest.approx(0.0012811, rel=1e-4)
    assert spatial.item() == pytest.approx(0.01 * SQRT17 * 0.18642361 / 6, rel=1e-6)
    # channel term of the 1×2×2 map: P = (0 − 1 + 0)/3 per pixel, norm over 4 pixels 2/3; 5 maps
    assert channel.item() == pytest.approx(0.01 * SQRT17 * (2 / 3) / 5, rel=1e-6)


def test_channel_term_on_a_2x1x1_map():
    """Old 0, new 1 on 2 channels: pooled (2/3, 2/3) (one zero channel of padding at each end, counted),
    ℓ^c = (2/3)·√2 = 0.942809."""
    old, new = _pair((1, 2, 1, 1))
    assert pckd_channel_distance(old, new, 3).item() == pytest.approx(0.942809, rel=1e-6)
    # window 1 is no pooling: the norm of the difference, √2
    assert pckd_channel_distance(old, new, 1).item() == pytest.approx(math.sqrt(2), rel=1e-6)


def test_batch_mean_of_per_image_norms():
    """Norms per image (not over the batch), then the mean: images 0 and 2× give (0.942809 + 4·0.942809)/2."""
    old = torch.zeros(2, 2, 1, 1)
    new = torch.stack([torch.ones(2, 1, 1), torch.full((2, 1, 1), 2.0)])
    assert pckd_channel_distance(old, new).item() == pytest.approx(2.5 * 0.942809, rel=1e-6)


def test_new_logits_are_collapsed_onto_the_old_channels():
    """New logits (1, 2, 3, 4) with K_{t−1} = 2 → (1 + 3 + 4, 2) = (8, 2), squared (64, 4). On a 1×1 map the window-4
    pool (padding 2) is 2×2 of value/16: d = 2·sqrt(64² + 4²)/16; schedule sqrt(4/2), L = 2 maps."""
    feature = torch.ones(1, 1, 1, 1)
    new_logits = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1, 1)
    spatial, channel = pckd_loss([feature, torch.zeros(1, 2, 1, 1)], [feature, new_logits], [0.0, 1.0], [1.0],
                                 num_classes_seen=4, num_new=2, windows=[4])
    assert spatial.item() == pytest.approx(math.sqrt(2) * 2 * math.sqrt(64**2 + 4**2) / 16 / 2, rel=1e-6)
    assert channel.item() == 0.0  # the logits have no channel term; the feature maps are equal


@pytest.mark.parametrize("feature, last", [(0.01, 0.0005), (5e-6, 5e-7)])
def test_factor_layout_gives_the_decoder_map_the_last_factor_in_the_channel_term_only(feature, last):
    """VOC 0.01 / 0.0005, ADE 5e-6 / 5e-7; maps identical except the decoder map (the 1×2×2 map of above)."""
    spatial_f, channel_f = pckd_factors(6, feature, last)
    assert spatial_f == [feature] * 5 + [last] and channel_f == [feature] * 4 + [last]
    assert pckd_factors(6, feature, last, reference_channel_factors=False)[1] == [feature] * 5
    same, logits = torch.full((1, 2, 2, 2), 0.5), torch.randn(1, 3, 2, 2)
    old, new = _pair((1, 1, 2, 2))
    old_maps, new_maps = [same] * 4 + [old, logits], [same] * 4 + [new, logits]
    spatial, channel = pckd_loss(old_maps, new_maps, spatial_f, channel_f, num_classes_seen=17, num_new=1)
    assert spatial.item() == pytest.approx(feature * SQRT17 * 0.18642361 / 6, rel=1e-6)
    assert channel.item() == pytest.approx(last * SQRT17 * (2 / 3) / 5, rel=1e-6)
    clean = pckd_factors(6, feature, last, reference_channel_factors=False)[1]
    _, channel = pckd_loss(old_maps, new_maps, spatial_f, clean, num_classes_seen=17, num_new=1)
    assert channel.item() == pytest.approx(feature * SQRT17 * (2 / 3) / 5, rel=1e-6)


def test_gradients_reach_only_the_new_maps():
    old = [torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 3, 3, 3, requires_grad=True)]
    new = [torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 5, 3, 3, requires_grad=True)]
    spatial, channel = pckd_loss(old, new, [1.0, 1.0], [1.0], num_classes_seen=5, num_new=2)
    (spatial + channel).backward()
    assert all(o.grad is None for o in old)
    assert all(n.grad is not None and n.grad.abs().sum() > 0 for n in new)
    assert new[1].grad[:, 3:].abs().sum() > 0  # the new channels, through the collapse into the background


def test_fp16_maps_give_float32_losses_without_overflow():
    """300² = 90000 overflows fp16 (max 65504): the loss squares in float32, as the spec asks."""
    old = [torch.zeros(1, 2, 1, 1, dtype=torch.float16), torch.zeros(1, 2, 1, 1, dtype=torch.float16)]
    new = [torch.full((1, 2, 1, 1), 300.0, dtype=torch.float16), torch.zeros(1, 2, 1, 1, dtype=torch.float16)]
    spatial, channel = pckd_loss(old, new, [1.0, 1.0], [1.0], num_classes_seen=2, num_new=1, windows=[4])
    assert spatial.dtype == channel.dtype == torch.float32
    # channel: 90000·(2/3)·√2 ·sqrt(2); spatial: 4 pooled values of 90000/16 per channel, 2 channels, / L = 2
    assert channel.item() == pytest.approx(90000 * 0.942809 * math.sqrt(2), rel=1e-5)
    assert spatial.item() == pytest.approx(math.sqrt(2) * math.sqrt(8) * 90000 / 16 / 2, rel=1e-5)


def test_shape_and_factor_errors_name_the_problem():
    a, b = torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="map 0"):
        pckd_loss([a, a], [b, a], [1.0, 1.0], [1.0], num_classes_seen=2, num_new=1)
    with pytest.raises(ValueError, match="channel factors"):
        pckd_loss([a, a], [a, a], [1.0, 1.0], [1.0, 1.0], num_classes_seen=2, num_new=1)
    with pytest.raises(ValueError, match="inconsistent"):
        pckd_loss([a, a], [a, a], [1.0, 1.0], [1.0], num_classes_seen=2, num_new=0)


def test_box_averages_equal_pytorch_pooling_values_and_gradients():
    """The summed-area-table pooling is avg_pool2d(k, 1, k // 2, count_include_pad=True), forward and backward."""
    import torch.nn.functional as F

    from sats.losses.pckd import box_averages

    torch.manual_seed(0)
    x = (torch.randn(2, 3, 17, 22) * 10).requires_grad_()
    windows = [1, 3, 4, 8, 12, 24]  # odd, even, and wider than the map
    mine = box_averages(x, windows)
    reference = [F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=True) for k in windows]
    weights = [torch.randn_like(r) for r in reference]
    for a, b in zip(mine, reference):
        assert a.shape == b.shape and a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    g_mine = torch.autograd.grad(sum((a * w).sum() for a, w in zip(mine, weights)), x)[0]
    g_ref = torch.autograd.grad(sum((b * w).sum() for b, w in zip(reference, weights)), x)[0]
    torch.testing.assert_close(g_mine, g_ref, rtol=0, atol=1e-5)
    double = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: tuple(box_averages(t, [3, 4])), (double,))
