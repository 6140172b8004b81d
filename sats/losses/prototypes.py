"""STAR's prototype replay: class feature statistics, replay counts, synthetic features, OCFM and SAD
(docs/methods.md §3.15).

Statistics are taken on a grid of positions ``stride`` input pixels apart, at the centre of each cell (the
reference's ``[:, 8::16, 8::16]`` at output stride 16; :func:`grid_sample_positions`). Features ``f`` are the
``(B, D, h, w)`` classifier input. Pure functions on tensors; the method keeps the state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ReplayPlan", "class_feature_sums", "feature_statistics", "grid_sample_positions", "masked_feature_mse",
           "prototype_separation", "replay_plan", "synthetic_features"]


def grid_sample_positions(labels: Tensor, stride: int, features: Optional[Tensor] = None
                          ) -> Tuple[Tensor, Optional[Tensor]]:
    """The grid of positions ``stride`` pixels apart, offset ``stride // 2``: labels ``(B, H, W)`` →
    ``(B, gh, gw)`` and, when given, the features ``(B, D, h, w)`` at the same pixels → ``(B, D, gh, gw)``.

    The feature map's stride ``s = H / h`` must divide ``stride`` (cell ``stride // 2 // s`` of every
    ``stride // s``). ``F.interpolate(mode="nearest")`` is not this rule: it picks pixel 0 of each cell.
    """
    offset = stride // 2
    grid = labels[:, offset::stride, offset::stride]
    if features is None:
        return grid, None
    scale = labels.shape[-1] // features.shape[-1]
    if scale < 1 or labels.shape[-1] != scale * features.shape[-1] or stride % scale:
        raise ValueError(f"grid_sample_positions: a {tuple(features.shape[-2:])} feature map of a "
                         f"{tuple(labels.shape[-2:])} input has no cell every {stride} pixels")
    step = stride // scale
    sampled = features[:, :, offset // scale::step, offset // scale::step]
    gh, gw = min(grid.shape[1], sampled.shape[2]), min(grid.shape[2], sampled.shape[3])
    return grid[:, :gh, :gw], sampled[:, :, :gh, :gw]


def class_feature_sums(features: Tensor, labels: Tensor, channels: Tensor) -> Dict[str, Tensor]:
    """Float64 sums over the positions of each class, for :func:`feature_statistics` (add them over batches).

    Args:
        features: ``(B, D, gh, gw)`` grid features; labels ``(B, gh, gw)`` grid labels; ``channels`` ``(C,)``.
    Returns ``count (C,)``, ``norm (C,)`` / ``norm_sq (C,)`` (Σ‖f‖, Σ‖f‖²), ``unit (C, D)`` / ``unit_sq (C, D)``
    (Σ f/‖f‖ and its element-wise square).
    """
    f = features.detach().double().permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # (P, D)
    onehot = (labels.reshape(-1, 1) == channels.view(1, -1)).double()  # (P, C)
    norm = f.norm(dim=1, keepdim=True)
    unit = f / norm.clamp_min(1e-12)
    return {"count": onehot.sum(0), "norm": onehot.t() @ norm[:, 0], "norm_sq": onehot.t() @ norm[:, 0] ** 2,
            "unit": onehot.t() @ unit, "unit_sq": onehot.t() @ unit ** 2}


def feature_statistics(sums: Dict[str, Tensor], around: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Per class, from :func:`class_feature_sums`: ``prototype`` = normalise(Σ f/‖f‖) ``(C, D)``, ``spread``
    = the per-dimension RMS distance of f/‖f‖ to the prototype (or to the rows of ``around`` ``(C, D)``),
    ``norm_mean`` and the unbiased ``norm_std`` of ‖f‖ ``(C,)`` (float32). A class with no position gets
    zeros, one position a zero std: the caller checks ``sums["count"]``."""
    n = sums["count"].clamp_min(1).unsqueeze(1)
    prototype = F.normalize(sums["unit"], dim=1)
    centre = prototype if around is None else around.double().to(prototype.device)
    mean = sums["unit"] / n
    spread = (sums["unit_sq"] / n - 2 * centre * mean + centre ** 2).clamp_min(0).sqrt()
    spread = torch.where(sums["count"].unsqueeze(1) > 0, spread, torch.zeros_like(spread))
    count = sums["count"]
    norm_mean = sums["norm"] / count.clamp_min(1)
    variance = (sums["norm_sq"] - count * norm_mean ** 2) / (count - 1).clamp_min(1)
    norm_std = torch.where(count > 1, variance.clamp_min(0).sqrt(), torch.zeros_like(variance))
    return {"prototype": prototype.float(), "spread": spread.float(), "norm_mean": norm_mean.float(),
            "norm_std": norm_std.float()}


@dataclass(frozen=True)
class ReplayPlan:
    """What a step t > 0 replays per iteration, fixed for the step (docs/methods.md §3.15)."""

    per_class: Tensor  # (F_old,) int64: q_c, replayed features of old class c (row c − 1) per iteration
    background_ratio: float  # ρ: extra repetitions of the background grid positions
    numbers: Tensor  # (1 + F_old,) float64: the counts carried to the next step (before the new classes)


def replay_plan(previous: Tensor, predicted: Tensor, iterations: int, num_new: int, overlap: bool = True,
                background_share: float = 0.01, overlap_share: float = 0.5) -> ReplayPlan:
    """STAR's replay counts from the previous step's grid counts and the old model's counts on this step.

    Args:
        previous: ``n^prev`` ``(1 + F_old,)``: index 0 background, ``c`` old class ``c``.
        predicted: ``n^pred`` ``(1 + F_old,)``: positions labelled 0 that the old model calls background (0) or
            old class ``c``.
        iterations: iterations per epoch ``I_e`` (of all processes together when the counts are global).
        num_new: ``|C^t|``.
        overlap: overlapped setting: ``q_c = max(0, trunc((n^prev_c − n^pred_c) / I_e))``,
            ``b = n^prev_0 (1 − background_share · |C^t|)``, ``ρ = max(0, b / n^pred_0 − overlap_share)``; disjoint:
            ``q_c = trunc(n^prev_c / I_e)``, ``b = n^prev_0``, ``ρ = b / n^pred_0``. ``ρ = 0`` when ``n^pred_0 = 0``.
    """
    previous, predicted = previous.double(), predicted.double()
    if previous.shape != predicted.shape:
        raise ValueError(f"replay_plan: counts of {tuple(previous.shape)} and {tuple(predicted.shape)} classes")
    iterations = max(1, int(iterations))
    old = previous[1:] - predicted[1:] if overlap else previous[1:]
    per_class = torch.trunc(old / iterations).clamp_min(0).long()
    background = previous[0] * (1 - background_share * num_new) if overlap else previous[0]
    ratio = 0.0
    if predicted[0] > 0:
        ratio = max(0.0, float(background / predicted[0]) - (overlap_share if overlap else 0.0))
    numbers = previous.clone()
    if overlap:
        numbers[0] = overlap_share * predicted[0] + background
    else:
        numbers[0] = predicted[0] + background
        numbers[1:] = previous[1:] + predicted[1:]
    return ReplayPlan(per_class, ratio, numbers)


def synthetic_features(prototypes: Tensor, spread: Tensor, norm_mean: Tensor, norm_std: Tensor, index: Tensor,
                       per_element_norm: bool = False) -> Tensor:
    """``(Q, D)`` replayed features ``(p_c + s_c ⊙ ε) · r`` for the classes (rows) listed in ``index`` ``(Q,)``,
    ``ε ~ N(0, I)`` and ``r ~ N(μ_c, σ_c²)``: one norm per feature, or (``per_element_norm``, the reference's
    code) a fresh draw for every entry. Draws from the global torch generator."""
    base = prototypes[index]
    noisy = base + spread[index] * torch.randn_like(base)
    shape = base.shape if per_element_norm else (base.shape[0], 1)
    r = norm_mean[index].unsqueeze(1) + norm_std[index].unsqueeze(1) * torch.randn(shape, device=base.device,
                                                                                  dtype=base.dtype)
    return noisy * r


def masked_feature_mse(features: Tensor, old_features: Tensor, mask: Tensor) -> Tensor:
    """OCFM: ``Σ m (f − f̄)² / (D · Σ m)``, ``mask`` ``(B, 1, H, W)`` bilinearly resized to the features'
    ``(B, D, h, w)``; 0 (with a gradient path) when the mask is empty (the reference divides 0 by 0)."""
    m = F.interpolate(mask.float(), size=features.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    per_position = (features.float() - old_features.detach().float()).square().sum(dim=1)  # (B, h, w)
    return (per_position * m).sum() / (features.shape[1] * m.sum().clamp_min(1e-12))


def prototype_separation(features: Tensor, labels: Tensor, first_channel: int, num_new: int,
                         prototypes: Tensor, min_distance: float = 1e-6) -> Tensor:
    """SAD: ``(1/|C^t|) Σ_c 1 / min_o ‖u_c − p_o‖`` with ``u_c`` = normalise(Σ ω_c f/‖f‖) the centre of new
    class ``c`` (``ω_c`` = its mask bilinearly resized to the features) and ``p_o`` the old prototypes ``(F_old, D)``.
    An absent class has ``u_c = 0``: distance 1 to every unit prototype. ``min_distance`` bounds the
    divisor away from 0."""
    if prototypes.shape[0] == 0:
        raise ValueError("prototype_separation: no old prototype")
    channels = torch.arange(first_channel, first_channel + num_new, device=labels.device)
    target = (labels.unsqueeze(1) == channels.view(1, -1, 1, 1)).float()  # (B, C, H, W)
    weights = F.interpolate(target, size=features.shape[-2:], mode="bilinear", align_corners=False)
    f = features.float()
    inverse_norm = f.square().sum(dim=1, keepdim=True).clamp_min(1e-24).rsqrt()  # 1 / ‖f‖, (B, 1, h, w)
    # Σ_j ω_cj f_j / ‖f_j‖ as one product in the features' own layout (no normalised copy of f, whose backward
    # and transposed gradients cost 2-3× more)
    centres = torch.bmm(f.flatten(2), (weights * inverse_norm).flatten(2).transpose(1, 2)).sum(0).t()
    centres = F.normalize(centres, dim=1)  # (C, D)
    distance = (centres.unsqueeze(1) - prototypes.float().to(centres.device).unsqueeze(0)).norm(dim=2)  # (C, F_old)
    return (1.0 / distance.min(dim=1).values.clamp_min(min_distance)).mean()
