"""Distillation losses on logits and features: LwF/ILT KD, MiB's unbiased KD, LwF-MC's BCE-KD, ILT's MSE.

Shapes: new logits ``z`` ``(B, K_t, H, W)``, old logits ``z̄`` ``(B, K_{t−1}, H, W)`` with
``K_{t−1} ≤ K_t`` and the old channels first. Everything is computed in float32. The old
model's outputs are targets: they are detached here, so gradients reach only the new model.

Per-pixel KD terms accept an optional ``mask`` ``(B, H, W)`` bool (pixels where it is False
contribute 0) and the reductions of :mod:`sats.losses.ce`: ``"all_pixels"`` (default, sum /
``B·H·W``, the reference's ``.mean()``), ``"valid_pixels"`` (sum / number of masked-in
pixels; the plain mean without a mask) or ``"none"`` (the ``(B, H, W)`` map).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from sats.losses.ce import Reduction, reduce_pixel_loss

__all__ = ["bce_kd", "feature_mse", "kd_old_channels", "unbiased_kd"]


def _check_pair(new_logits: Tensor, old_logits: Tensor, name: str) -> int:
    if new_logits.dim() != 4 or old_logits.dim() != 4:
        raise ValueError(f"{name}: expected (B, K, H, W) logits, got {tuple(new_logits.shape)} and {tuple(old_logits.shape)}")
    num_old = old_logits.shape[1]
    if new_logits.shape[0] != old_logits.shape[0] or new_logits.shape[2:] != old_logits.shape[2:] or num_old > new_logits.shape[1]:
        raise ValueError(
            f"{name}: new logits {tuple(new_logits.shape)} and old logits {tuple(old_logits.shape)} must share (B, H, W) "
            "and the old model cannot have more channels"
        )
    return num_old


def _apply_mask(loss_map: Tensor, mask: Optional[Tensor]) -> Tensor:
    if mask is None:
        return loss_map
    return torch.where(mask, loss_map, torch.zeros_like(loss_map))


def kd_old_channels(
    new_logits: Tensor,
    old_logits: Tensor,
    *,
    temperature: float = 1.0,
    mask: Optional[Tensor] = None,
    reduction: Reduction = "all_pixels",
) -> Tensor:
    """LwF / ILT knowledge distillation restricted to the old channels (docs/methods.md §3.2, §3.4).

    Per pixel ``−(1/K_{t−1}) Σ_{c<K_{t−1}} q_c log p'_c`` with ``q = softmax(z̄ / T)`` and ``p'`` the
    softmax of the new logits **restricted to the old channels**, ``softmax(z[:, :K_{t−1}] / T)``
    (new channels are left out of the normalisation).

    ``temperature`` divides both logits (standard KD); no preset uses anything but 1. (The
    reference's ``alpha`` instead multiplies the old logits only; identical at 1.)
    """
    num_old = _check_pair(new_logits, old_logits, "kd_old_channels")
    if temperature <= 0:
        raise ValueError(f"kd_old_channels: temperature={temperature} must be > 0")
    log_p_old_channels = torch.log_softmax(new_logits[:, :num_old].float() / temperature, dim=1)
    q = torch.softmax(old_logits.detach().float() / temperature, dim=1)
    loss_map = -(q * log_p_old_channels).sum(dim=1) / num_old
    return reduce_pixel_loss(_apply_mask(loss_map, mask), mask, reduction)


class _UnbiasedKDMap(torch.autograd.Function):
    """The per-pixel UNKD map ``(B, H, W)`` with its analytic gradient.

    With ``p = softmax(z)``, ``q = softmax(z̄)`` (``Σ_c q_c = 1``) and the target distribution
    ``t_c = q_c`` on the old channels ``0 < c < K_{t−1}``, ``t_j = q_0 · p_j / p̃(0)`` on the background
    and new channels, ``∂ℓ/∂z_j = (p_j − t_j) / K_{t−1}``. One log-softmax pass and no autograd
    through channel slices and concatenations (which zero-fill and accumulate full-size buffers):
    about half the cost of the autograd version, same values and gradients up to float rounding.
    """

    @staticmethod
    def forward(ctx: Any, new_logits: Tensor, old_logits: Tensor, num_old: int) -> Tensor:
        log_p = torch.log_softmax(new_logits.float(), dim=1)  # (B, K_t, H, W)
        # log p̃(0) = log Σ_{k ∈ {0} ∪ C^t} p_k, (B, 1, H, W)
        log_background = torch.logsumexp(torch.cat([log_p[:, :1], log_p[:, num_old:]], dim=1), dim=1, keepdim=True)
        q = torch.softmax(old_logits.float(), dim=1)  # (B, K_{t−1}, H, W)
        loss_map = -(q[:, 0] * log_background[:, 0] + (q[:, 1:] * log_p[:, 1:num_old]).sum(dim=1)) / num_old
        ctx.save_for_backward(log_p, log_background, q)
        ctx.num_old, ctx.input_dtype = num_old, new_logits.dtype
        return loss_map

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_map: Tensor) -> Tuple[Tensor, None, None]:
        log_p, log_background, q = ctx.saved_tensors
        k = ctx.num_old
        grad = log_p.exp()  # p, then p − t in place
        grad[:, 1:k] -= q[:, 1:]
        background_weight = q[:, :1]  # q_0, (B, 1, H, W)
        grad[:, :1] -= background_weight * (log_p[:, :1] - log_background).exp()
        grad[:, k:] -= background_weight * (log_p[:, k:] - log_background).exp()
        grad *= (grad_map.float() / k).unsqueeze(1)
        return grad.to(ctx.input_dtype), None, None


def unbiased_kd(
    new_logits: Tensor,
    old_logits: Tensor,
    *,
    mask: Optional[Tensor] = None,
    reduction: Reduction = "all_pixels",
) -> Tensor:
    """MiB's unbiased knowledge distillation (UNKD, docs/methods.md §3.8).

    The new model's background absorbs the new channels:
    ``log p̃(0) = logsumexp_{k ∈ {0} ∪ C^t} z_k − logsumexp_k z_k``; an old class ``0 < c < K_{t−1}``
    keeps ``log p̃(c) = z_c − logsumexp_k z_k``. Per pixel
    ``−(1/K_{t−1}) Σ_{c<K_{t−1}} q_c log p̃(c)`` with ``q = softmax(z̄)``. The gradient is analytic
    (:class:`_UnbiasedKDMap`); no second-order gradient.
    """
    num_old = _check_pair(new_logits, old_logits, "unbiased_kd")
    loss_map = _UnbiasedKDMap.apply(new_logits, old_logits.detach(), num_old)
    return reduce_pixel_loss(_apply_mask(loss_map, mask), mask, reduction)


def bce_kd(new_logits: Tensor, old_logits: Tensor) -> Tensor:
    """LwF-MC's soft-target sigmoid distillation (docs/methods.md §3.3), without the method weight λ = 10.

    Returns ``K_{t−1} · mean_{b, c<K_{t−1}, h, w} BCEWithLogits(z_c, σ(z̄_c))``: the mean over every
    element of the old channels, multiplied by the number of old channels (the reference's
    ``n_cl_old · BCEWithLogitsLoss(reduction="mean")``, i.e. a per-pixel sum over classes
    divided by all pixels). Scalar.
    """
    num_old = _check_pair(new_logits, old_logits, "bce_kd")
    target = torch.sigmoid(old_logits.detach().float())
    return num_old * F.binary_cross_entropy_with_logits(new_logits[:, :num_old].float(), target, reduction="mean")


def feature_mse(new: Tensor, old: Tensor) -> Tensor:
    """ILT's feature distillation: mean over every element of ``(new − old)²`` (any equal shapes). Scalar."""
    if new.shape != old.shape:
        raise ValueError(f"feature_mse: shapes differ: new {tuple(new.shape)} vs old {tuple(old.shape)}")
    return F.mse_loss(new.float(), old.detach().float(), reduction="mean")
