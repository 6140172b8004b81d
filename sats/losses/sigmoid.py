"""Per-class sigmoid heads without a background classifier: prediction, mBCE, decomposed logits
(DKD and STAR, docs/methods.md §3.14, §3.15).

Channel 0 of these models is not a background classifier (DKD: the auxiliary channel; STAR: an unused
channel), so a pixel is background when no foreground channel ``k ≥ 1`` is confident. Shapes: logits
``(B, K, H, W)``, labels ``(B, H, W)`` int64 channels with 255 = ignore. Every term is a per-class mean over
**all** pixels of the batch, summed over classes (the reference's ``.mean(dim=[0, 2, 3]).sum()``); pixels
labelled 255 are negatives of every class, not ignored. Computed in float32.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["decomposed_logits", "foreground_prediction", "implicit_background_prediction", "mbce",
           "negative_bce"]


def foreground_prediction(logits: Tensor, threshold: float = 0.0) -> Tensor:
    """``(B, K, H, W)`` → ``(B, H, W)``: ``1 + argmax_{k ≥ 1} z_k`` (first maximum), and 0 where no foreground
    logit exceeds ``threshold`` (0: no σ above 0.5; STAR's old-model rule thresholds the raw logit at 0.5)."""
    if logits.dim() != 4 or logits.shape[1] < 2:
        raise ValueError(f"foreground_prediction: expected (B, K >= 2, H, W) logits, got {tuple(logits.shape)}")
    best, index = logits[:, 1:].max(dim=1)
    return torch.where(best > threshold, index + 1, torch.zeros_like(index))


def implicit_background_prediction(logits: Tensor) -> Tensor:
    """Sigmoid prediction with an implicit background: :func:`foreground_prediction` at σ > 0.5."""
    return foreground_prediction(logits, 0.0)


def mbce(logits: Tensor, labels: Tensor, first_channel: int, pos_weight: float = 1.0) -> Tensor:
    """DKD's mBCE: ``Σ_j (1/|P|) Σ_i ℓ_w(z_ij, 1[y_i = first_channel + j])`` over the ``C`` given channels.

    Args:
        logits: ``(B, C, H, W)``, the logits of channels ``first_channel … first_channel + C − 1``.
        labels: ``(B, H, W)`` channels; 255 and every other channel are negatives.
        pos_weight: ``w`` of ``ℓ_w(x, t) = −[w t log σ(x) + (1 − t) log(1 − σ(x))]``.
    """
    if logits.dim() != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"mbce: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    channels = torch.arange(first_channel, first_channel + logits.shape[1], device=labels.device)
    target = (labels.unsqueeze(1) == channels.view(1, -1, 1, 1)).float()
    weight = torch.tensor(float(pos_weight), device=logits.device)
    loss = F.binary_cross_entropy_with_logits(logits.float(), target, pos_weight=weight, reduction="sum")
    return loss / (logits.shape[0] * logits.shape[2] * logits.shape[3])


def negative_bce(logits: Tensor) -> Tensor:
    """``Σ_c mean_i softplus(z_ic)``: BCE against target 0 everywhere (DKD's auxiliary loss, STAR's replayed
    negatives). ``logits`` ``(N, C, …)`` with the channel dimension second; 0 when there is no element."""
    z = logits.float()
    per_channel = z.shape[1] if z.dim() > 1 else 1
    if z.numel() == 0:
        return z.sum()
    return F.softplus(z).sum() * per_channel / z.numel()


def decomposed_logits(features: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """DKD's positive and negative reasoning: ``z⁺_c = Σ_d max(w_cd, 0) f_d`` and ``z⁻_c = Σ_d min(w_cd, 0) f_d``.

    ``features`` ``(B, D, h, w)``, ``weight`` ``(C, D)`` or ``(C, D, 1, 1)`` (bias excluded) →
    ``(z⁺, z⁻)``, each ``(B, C, h, w)``; ``z⁺ + z⁻ + b`` is the logit. Gradients reach only the entries of
    the matching sign (a zero entry gets none).
    """
    w = weight.reshape(weight.shape[0], -1, 1, 1)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    positive = F.conv2d(features, torch.where(w > 0, w, zero))
    negative = F.conv2d(features, torch.where(w < 0, w, zero))
    return positive, negative
