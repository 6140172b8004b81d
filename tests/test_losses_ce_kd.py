"""CE / UNCE / multi-label BCE / KD / UNKD / BCE-KD / MSE against hand-written formulas (docs/methods.md §3.1-3.4, §3.8)."""

from __future__ import annotations

import math

import pytest
import torch

from sats.losses import (
    bce_kd,
    cross_entropy,
    feature_mse,
    kd_old_channels,
    multilabel_bce,
    unbiased_cross_entropy,
    unbiased_kd,
)

IGN = 255


def _pixels(labels):
    b, h, w = labels.shape
    return [(i, y, x) for i in range(b) for y in range(h) for x in range(w)]


def _lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


@pytest.fixture
def case():
    """2 images, 2x3 pixels, 4 channels, 3 ignored pixels."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 2, 3, generator=gen) * 2
    labels = torch.tensor([[[0, 1, IGN], [3, 2, 0]], [[IGN, 3, 3], [0, IGN, 1]]])
    return logits, labels


# ------------------------------------------------------------------------------------------------ CE


def test_ce_uniform_logits_hand_value():
    logits = torch.zeros(2, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [IGN, 2]], [[IGN, IGN], [1, 0]]])
    # every valid pixel costs log 3; 5 valid pixels out of 8
    assert cross_entropy(logits, labels).item() == pytest.approx(5 * math.log(3) / 8, rel=1e-6)
    assert cross_entropy(logits, labels, reduction="valid_pixels").item() == pytest.approx(math.log(3), rel=1e-6)


def test_ce_reductions_match_loop(case):
    logits, labels = case
    total, valid = 0.0, 0
    expected_map = torch.zeros(labels.shape)
    for i, y, x in _pixels(labels):
        c = int(labels[i, y, x])
        if c == IGN:
            continue
        z = [float(v) for v in logits[i, :, y, x]]
        loss = _lse(z) - z[c]
        expected_map[i, y, x] = loss
        total += loss
        valid += 1
    assert cross_entropy(logits, labels).item() == pytest.approx(total / labels.numel(), rel=1e-5)
    assert cross_entropy(logits, labels, reduction="valid_pixels").item() == pytest.approx(total / valid, rel=1e-5)
    torch.testing.assert_close(cross_entropy(logits, labels, reduction="none"), expected_map, rtol=1e-5, atol=1e-6)


def test_ce_pixel_weight_per_image(case):
    logits, labels = case
    per_pixel = cross_entropy(logits, labels, reduction="none")
    weight = torch.tensor([0.25, 2.0])[:, None, None]
    expected = (0.25 * per_pixel[0].sum() + 2.0 * per_pixel[1].sum()) / labels.numel()
    assert cross_entropy(logits, labels, pixel_weight=weight).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ce_rejects_unknown_reduction_and_bad_shapes(case):
    logits, labels = case
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, labels, reduction="mean")
    with pytest.raises(ValueError, match="disagree"):
        cross_entropy(logits, labels[:, :1])


# ---------------------------------------------------------------------------------------------- UNCE


def test_unce_background_absorbs_old_classes():
    # K_t = 4, old channels 0..2, new channel 3. Old classes dominate the pixel.
    logits = torch.tensor([0.0, 10.0, 10.0, -10.0]).view(1, 4, 1, 1).repeat(1, 1, 1, 3)
    labels = torch.tensor([[[0, 1, 3]]])  # background, old-class GT (treated as 0), new class
    loss = unbiased_cross_entropy(logits, labels, num_old=3, reduction="none")[0, 0]
    assert loss[0].item() < 1e-8  # p̂(0) = p(0)+p(1)+p(2) ≈ 1
    assert loss[1].item() == pytest.approx(loss[0].item(), abs=1e-12)  # label 1 < num_old → background
    assert loss[2].item() == pytest.approx(_lse([0.0, 10.0, 10.0, -10.0]) + 10.0, rel=1e-6)
    # plain CE would punish the background pixel heavily
    assert cross_entropy(logits, labels, reduction="none")[0, 0, 0].item() > 10.0


def test_unce_matches_loop(case):
    logits, labels = case
    num_old = 2
    total, valid = 0.0, 0
    for i, y, x in _pixels(labels):
        c = int(labels[i, y, x])
        if c == IGN:
            continue
        z = [float(v) for v in logits[i, :, y, x]]
        log_p = (_lse(z[:num_old]) if c < num_old else z[c]) - _lse(z)
        total -= log_p
        valid += 1
    assert unbiased_cross_entropy(logits, labels, num_old).item() == pytest.approx(total / labels.numel(), rel=1e-5)
    assert unbiased_cross_entropy(logits, labels, num_old, reduction="valid_pixels").item() == pytest.approx(total / valid, rel=1e-5)


def test_unce_rejects_bad_num_old(case):
    logits, labels = case
    with pytest.raises(ValueError, match="num_old=0"):
        unbiased_cross_entropy(logits, labels, 0)
    with pytest.raises(ValueError, match="num_old=5"):
        unbiased_cross_entropy(logits, labels, 5)


# -------------------------------------------------------------------------------------- multilabel BCE


def test_multilabel_bce_zero_logits_hand_value():
    logits = torch.zeros(2, 3, 1, 2)
    labels = torch.tensor([[[0, IGN]], [[2, 1]]])
    # each channel costs log 2 at a valid pixel; 3 valid of 4 pixels
    assert multilabel_bce(logits, labels).item() == pytest.approx(3 * 3 * math.log(2) / 4, rel=1e-6)
    assert multilabel_bce(logits, labels, reduction="valid_pixels").item() == pytest.approx(3 * math.log(2), rel=1e-6)


def test_multilabel_bce_matches_loop(case):
    logits, labels = case
    total = 0.0
    for i, y, x in _pixels(labels):
        c = int(labels[i, y, x])
        if c == IGN:
            continue
        for k in range(logits.shape[1]):
            s = _sigmoid(float(logits[i, k, y, x]))
            total -= math.log(s) if k == c else math.log(1 - s)
    assert multilabel_bce(logits, labels).item() == pytest.approx(total / labels.numel(), rel=1e-5)
    assert multilabel_bce(logits, labels, reduction="none")[0, 0, 2].item() == 0.0


# ------------------------------------------------------------------------------------------------- KD


def test_kd_old_channels_restricted_normalisation_hand_value():
    # new logits: old channels equal, a huge new channel. Restricted softmax → 1/3 each, whatever q is.
    new = torch.tensor([0.0, 0.0, 0.0, 10.0]).view(1, 4, 1, 1)
    old = torch.tensor([3.0, -1.0, 0.5]).view(1, 3, 1, 1)
    assert kd_old_channels(new, old).item() == pytest.approx(math.log(3) / 3, rel=1e-6)


def test_kd_old_channels_matches_loop(case):
    logits, _ = case
    old = torch.randn(2, 3, 2, 3, generator=torch.Generator().manual_seed(1))
    total = 0.0
    for i, y, x in _pixels(old[:, 0]):
        z = [float(v) for v in logits[i, :3, y, x]]
        zb = [float(v) for v in old[i, :, y, x]]
        q = [math.exp(v - _lse(zb)) for v in zb]
        total -= sum(q[c] * (z[c] - _lse(z)) for c in range(3)) / 3
    assert kd_old_channels(logits, old).item() == pytest.approx(total / 12, rel=1e-5)
    mask = torch.zeros(2, 2, 3, dtype=torch.bool)
    mask[0, 0, 0] = True
    per_pixel = kd_old_channels(logits, old, reduction="none")
    assert kd_old_channels(logits, old, mask=mask).item() == pytest.approx(per_pixel[0, 0, 0].item() / 12, rel=1e-6)
    assert kd_old_channels(logits, old, mask=mask, reduction="valid_pixels").item() == pytest.approx(per_pixel[0, 0, 0].item(), rel=1e-6)


def test_kd_temperature_divides_both_logits(case):
    logits, _ = case
    old = torch.randn(2, 3, 2, 3, generator=torch.Generator().manual_seed(2))
    assert kd_old_channels(logits, old, temperature=2.0).item() == pytest.approx(kd_old_channels(logits / 2, old / 2).item(), rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        kd_old_channels(logits, old, temperature=0.0)


def test_unkd_background_absorbs_new_classes():
    # the new model puts its mass on the new channel 3; the old model says background.
    new = torch.tensor([0.0, -10.0, -10.0, 10.0]).view(1, 4, 1, 1)
    old = torch.tensor([10.0, -10.0, -10.0]).view(1, 3, 1, 1)
    assert unbiased_kd(new, old).item() < 1e-4  # p̃(0) = p(0) + p(3) ≈ 1 and q ≈ (1, 0, 0)
    uniform_new = torch.zeros(1, 4, 1, 1)
    # hand: log p̃(0) = log(2/4), log p̃(c) = log(1/4); q uniform → −(1/3)(1/3)(log .5 + 2 log .25)
    expected = -(math.log(0.5) + 2 * math.log(0.25)) / 9
    assert unbiased_kd(uniform_new, torch.zeros(1, 3, 1, 1)).item() == pytest.approx(expected, rel=1e-6)


def test_unkd_matches_loop(case):
    logits, _ = case
    old = torch.randn(2, 2, 2, 3, generator=torch.Generator().manual_seed(3))
    num_old = 2
    total = 0.0
    for i, y, x in _pixels(old[:, 0]):
        z = [float(v) for v in logits[i, :, y, x]]
        zb = [float(v) for v in old[i, :, y, x]]
        q = [math.exp(v - _lse(zb)) for v in zb]
        log_p = [_lse([z[0]] + z[num_old:]) - _lse(z)] + [z[c] - _lse(z) for c in range(1, num_old)]
        total -= sum(q[c] * log_p[c] for c in range(num_old)) / num_old
    assert unbiased_kd(logits, old).item() == pytest.approx(total / 12, rel=1e-5)


def test_unkd_without_new_channels_is_plain_kd(case):
    logits, _ = case
    old = torch.randn(2, 4, 2, 3, generator=torch.Generator().manual_seed(4))
    assert unbiased_kd(logits, old).item() == pytest.approx(kd_old_channels(logits, old).item(), rel=1e-6)


def test_kd_rejects_more_old_channels(case):
    logits, _ = case
    with pytest.raises(ValueError, match="old model cannot have more channels"):
        unbiased_kd(logits[:, :2], logits)


# -------------------------------------------------------------------------------------- BCE-KD / MSE


def test_bce_kd_hand_value_and_loop(case):
    # zero new logits: BCE(σ(0) = ½, t) = log 2 for every target → K_old · log 2
    old = torch.randn(2, 3, 2, 3, generator=torch.Generator().manual_seed(5))
    assert bce_kd(torch.zeros(2, 4, 2, 3), old).item() == pytest.approx(3 * math.log(2), rel=1e-6)
    logits, _ = case
    total, count = 0.0, 0
    for i, y, x in _pixels(old[:, 0]):
        for c in range(3):
            s, t = _sigmoid(float(logits[i, c, y, x])), _sigmoid(float(old[i, c, y, x]))
            total -= t * math.log(s) + (1 - t) * math.log(1 - s)
            count += 1
    assert bce_kd(logits, old).item() == pytest.approx(3 * total / count, rel=1e-5)


def test_feature_mse():
    new = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    old = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert feature_mse(new, old).item() == pytest.approx((4 + 9) / 4)
    with pytest.raises(ValueError, match="shapes differ"):
        feature_mse(new, old[:1])


# --------------------------------------------------------------------------------- gradients / dtype

LOSSES = {
    "ce": lambda z, zo, y: cross_entropy(z, y),
    "unce": lambda z, zo, y: unbiased_cross_entropy(z, y, 3),
    "bce": lambda z, zo, y: multilabel_bce(z, y),
    "kd": lambda z, zo, y: kd_old_channels(z, zo),
    "unkd": lambda z, zo, y: unbiased_kd(z, zo),
    "bce_kd": lambda z, zo, y: bce_kd(z, zo),
    "mse": lambda z, zo, y: feature_mse(z[:, :3], zo),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_reach_new_logits_only(name, case):
    logits, labels = case
    new = logits.clone().requires_grad_(True)
    old = torch.randn(2, 3, 2, 3, generator=torch.Generator().manual_seed(6)).requires_grad_(True)
    loss = LOSSES[name](new, old, labels)
    loss.backward()
    assert new.grad is not None and torch.isfinite(new.grad).all() and new.grad.abs().sum() > 0
    assert old.grad is None


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_float32_under_bf16_autocast(name, case):
    logits, labels = case
    old = torch.randn(2, 3, 2, 3, generator=torch.Generator().manual_seed(7))
    reference = LOSSES[name](logits, old, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LOSSES[name](logits.bfloat16() * 20, old.bfloat16() * 20, labels)  # large logits stress exp/log
        low = LOSSES[name](logits.bfloat16(), old.bfloat16(), labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert low.item() == pytest.approx(reference.item(), rel=3e-2, abs=1e-3)


def test_analytic_unbiased_gradients_equal_autograd_of_the_formulas():
    """UNCE / UNKD use hand-written backward passes: they must equal autograd through the plain formulas."""
    torch.manual_seed(0)
    num_old, k = 3, 5
    logits = torch.randn(2, k, 4, 4, dtype=torch.float64)
    old_logits = torch.randn(2, num_old, 4, 4, dtype=torch.float64)
    labels = torch.randint(0, k, (2, 4, 4))
    labels[0, 0] = 255

    def unce_reference(z):
        log_norm = torch.logsumexp(z, 1)
        log_old = torch.logsumexp(z[:, :num_old], 1)
        valid = labels != 255
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        z_label = z.gather(1, safe.unsqueeze(1)).squeeze(1)
        log_p = torch.where(labels < num_old, log_old, z_label) - log_norm
        return torch.where(valid, -log_p, torch.zeros_like(log_p)).sum() / labels.numel()

    def unkd_reference(z):
        log_norm = torch.logsumexp(z, 1, keepdim=True)
        log_bg = torch.logsumexp(torch.cat([z[:, :1], z[:, num_old:]], 1), 1, keepdim=True) - log_norm
        log_p = torch.cat([log_bg, z[:, 1:num_old] - log_norm], 1)
        q = torch.softmax(old_logits, 1)
        return -(q * log_p).sum(1).mean() / num_old

    for loss_fn, reference in ((lambda z: unbiased_cross_entropy(z, labels, num_old), unce_reference),
                               (lambda z: unbiased_kd(z, old_logits), unkd_reference)):
        z1 = logits.clone().requires_grad_(True)
        z2 = logits.clone().requires_grad_(True)
        value, expected = loss_fn(z1), reference(z2)
        value.backward()
        expected.backward()
        assert torch.allclose(value.double(), expected, atol=1e-6)
        assert torch.allclose(z1.grad.double(), z2.grad, atol=1e-6)


def test_the_package_exports_every_public_loss_block_and_reaches_no_process_group():
    """``sats.losses`` re-exports each module's ``__all__``; loss blocks are pure (never import torch.distributed)."""
    import ast
    import importlib
    import pkgutil
    from pathlib import Path

    import sats.losses

    public = {}
    for info in pkgutil.iter_modules(sats.losses.__path__):
        module = importlib.import_module(f"sats.losses.{info.name}")
        public.update({name: getattr(module, name) for name in module.__all__})
        tree = ast.parse(Path(module.__file__).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     for alias in node.names}
        assert not {m for m in imported if m.startswith("torch.distributed")}, module.__name__
    assert sorted(sats.losses.__all__) == sorted(public)
    assert all(getattr(sats.losses, name) is value for name, value in public.items())
