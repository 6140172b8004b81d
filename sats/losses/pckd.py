"""RCIL's pooled-cube knowledge distillation (PCKD, docs/methods.md §3.16).

A PLOP-like feature distillation: the old and the new model's maps are squared element-wise and
compared after average pooling, over several spatial windows (spatial term) and over a window of
neighbouring channels (channel term). Both terms read the same ``L`` maps per model, in order:
the 4 encoder stages, the decoder feature (DeepLab: the ASPP output) and ``logits_small`` (the
channel term leaves the logits out).

* **spatial**, per map: ``ℓ^s_l = (1/|windows|) Σ_k mean_b ‖pool_k(a_l²)_b − pool_k(b_l²)_b‖₂``,
  ``pool_k`` = ``avg_pool2d`` with a ``k × k`` window, stride 1, zero padding ``k // 2`` counted in
  the mean (``count_include_pad=True``: a map of ``h × w`` gives ``(h + 1) × (w + 1)`` for even
  ``k``); the norm is over every ``C × H' × W'`` value of image ``b``, not squared. The new logits
  are first collapsed onto the old channels (new channels summed into the background,
  :func:`sats.losses.pod.collapse_new_channels`).
* **channel**, per map except the logits: ``ℓ^c_l = mean_b ‖P(a_l²)_b − P(b_l²)_b‖₂`` with ``P`` an
  average pool along the channels (window 3, stride 1, one zero channel of padding at each end,
  counted: ``P(A)_c = (A_{c−1} + A_c + A_{c+1}) / 3``).
* ``L_spatial = (1/L) Σ_l f^s_l · sqrt(K_t/|C^t|) · ℓ^s_l``,
  ``L_channel = (1/(L−1)) Σ_{l<L} f^c_l · sqrt(K_t/|C^t|) · ℓ^c_l``.

Factors (:func:`pckd_factors`): the feature factor on every map and the last factor on the
logits (spatial); in the channel term the reference gives the last factor to the **decoder** map
(it cuts the logits from its list before testing for the last index): ``reference_channel_factors``.

Pooling is linear, so ``pool(a²) − pool(b²) = pool(a² − b²)``: one pool per window of the difference.
Everything is computed in float32 (squared fp16 activations overflow). ``old`` maps are targets:
detached, gradients reach only the new maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sats.losses.pod import collapse_new_channels

__all__ = ["PCKD_WINDOWS", "pckd_channel_distance", "pckd_factors", "pckd_loss", "pckd_spatial_distance"]

PCKD_WINDOWS = (4, 8, 12, 16, 20, 24)


def _squared_difference(old: Tensor, new: Tensor, name: str) -> Tensor:
    """``old² − new²`` in float32, ``old`` detached; both ``(B, C, H, W)`` of equal shape."""
    if old.dim() != 4 or old.shape != new.shape:
        raise ValueError(f"{name}: expected two (B, C, H, W) maps of equal shape, got {tuple(old.shape)} and "
                         f"{tuple(new.shape)}")
    return old.detach().float().square() - new.float().square()


def _image_norms_mean(x: Tensor) -> Tensor:
    """``mean_b ‖x_b‖₂`` over every value of image ``b`` of ``(B, ...)``. Scalar."""
    return torch.linalg.vector_norm(x.flatten(1), ord=2, dim=1).mean()


def pckd_spatial_distance(old: Tensor, new: Tensor, windows: Sequence[int] = PCKD_WINDOWS) -> Tensor:
    """``ℓ^s = (1/|windows|) Σ_k mean_b ‖pool_k(old²)_b − pool_k(new²)_b‖₂`` of two ``(B, C, H, W)`` maps. Scalar
    float32; ``pool_k``: ``avg_pool2d(k, stride 1, padding k // 2, count_include_pad=True)``."""
    if not windows or any(int(k) < 1 for k in windows):
        raise ValueError(f"pckd_spatial_distance: windows must be positive ints, got {list(windows)}")
    difference = _squared_difference(old, new, "pckd_spatial_distance")
    distances = [_image_norms_mean(pooled) for pooled in box_averages(difference, [int(k) for k in windows])]
    return torch.stack(distances).mean()


def _summed_area_table(x: Tensor, before: int, after: int) -> Tensor:
    """float64 ``T`` of ``x`` ``(B, C, H, W)`` zero-padded by ``before`` / ``after`` on both spatial axes, with a
    leading zero row and column: ``T[a, b]`` = sum of the padded map's rows ``< a`` and columns ``< b``."""
    padded = F.pad(x.double(), (before + 1, after, before + 1, after))
    return padded.cumsum(-2).cumsum(-1)


def _boxes(table: Tensor, offset: int, k: int, rows: int, cols: int) -> Tensor:
    """The ``k × k`` box sums starting at ``offset`` (in the table's padded frame): ``(B, C, rows, cols)``."""
    a, b = offset, offset + k
    return (table[..., b:b + rows, b:b + cols] - table[..., a:a + rows, b:b + cols]
            - table[..., b:b + rows, a:a + cols] + table[..., a:a + rows, a:a + cols])


class _BoxAverages(torch.autograd.Function):
    """``avg_pool2d(x, k, 1, k // 2, count_include_pad=True)`` for several ``k`` from summed-area tables, forward
    and backward (the adjoint of a zero-padded box sum is a box sum of the gradient padded by ``k − 1 − k // 2``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, windows: tuple[int, ...]) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.windows, ctx.dtype = windows, x.dtype
        pad = max(k // 2 for k in windows)
        height, width = x.shape[-2:]
        table = _summed_area_table(x, pad, pad)
        out = []
        for k in windows:
            rows, cols = height + 2 * (k // 2) - k + 1, width + 2 * (k // 2) - k + 1
            out.append((_boxes(table, pad - k // 2, k, rows, cols) / (k * k)).to(x.dtype))
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: Optional[Tensor]) -> tuple[Optional[Tensor], None]:  # type: ignore[override]
        total: Optional[Tensor] = None
        for k, grad in zip(ctx.windows, grads):
            if grad is None:
                continue
            pad = k - 1 - k // 2
            height, width = grad.shape[-2] + 2 * pad - k + 1, grad.shape[-1] + 2 * pad - k + 1
            part = _boxes(_summed_area_table(grad, pad, pad), 0, k, height, width) / (k * k)
            total = part if total is None else total + part
        return (None if total is None else total.to(ctx.dtype)), None


def box_averages(x: Tensor, windows: Sequence[int]) -> list[Tensor]:
    """``avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=True)`` of ``(B, C, H, W)`` for every ``k`` of
    ``windows``: each box sum is 4 reads of one summed-area table whatever ``k`` (PyTorch's pooling adds ``k²``
    values per output, and its backward as many), forward and backward. The tables are float64, so differences of
    large prefix sums lose nothing at float32; results in ``x``'s dtype."""
    return list(_BoxAverages.apply(x, tuple(int(k) for k in windows)))


def pckd_channel_distance(old: Tensor, new: Tensor, window: int = 3) -> Tensor:
    """``ℓ^c = mean_b ‖P(old²)_b − P(new²)_b‖₂`` of two ``(B, C, H, W)`` maps. Scalar float32; ``P``: average pool
    along the channels with ``window`` channels, stride 1, ``window // 2`` zero channels of padding at each end,
    counted in the mean (the reference pools ``(B, H, C, W)`` with a ``(window, 1)`` window)."""
    if int(window) < 1:
        raise ValueError(f"pckd_channel_distance: window must be a positive int, got {window!r}")
    difference = _squared_difference(old, new, "pckd_channel_distance").transpose(1, 2)  # (B, H, C, W)
    pooled = F.avg_pool2d(difference, (int(window), 1), stride=1, padding=(int(window) // 2, 0),
                          count_include_pad=True)
    return _image_norms_mean(pooled)


def pckd_factors(num_maps: int, feature_factor: float, last_factor: float,
                 reference_channel_factors: bool = True) -> tuple[list[float], list[float]]:
    """Per-map factors ``(spatial, channel)`` for ``num_maps`` maps whose last is the logits (docs/methods.md §3.16).

    Spatial: ``feature_factor`` on maps ``1 … L−1``, ``last_factor`` on the logits (``L`` factors). Channel
    (``L − 1`` factors, no logits): ``feature_factor`` on maps ``1 … L−2`` and, with ``reference_channel_factors``
    (the reference, which produced the published numbers), ``last_factor`` on the decoder map ``L − 1``;
    otherwise ``feature_factor`` there too.
    """
    if num_maps < 2:
        raise ValueError(f"pckd_factors: need at least 2 maps (features and logits), got {num_maps}")
    spatial = [float(feature_factor)] * (num_maps - 1) + [float(last_factor)]
    channel = [float(feature_factor)] * (num_maps - 1)
    if reference_channel_factors:
        channel[-1] = float(last_factor)
    return spatial, channel


def pckd_loss(
    old_maps: Sequence[Tensor],
    new_maps: Sequence[Tensor],
    spatial_factors: Sequence[float],
    channel_factors: Sequence[float],
    num_classes_seen: int,
    num_new: int,
    windows: Sequence[int] = PCKD_WINDOWS,
    channel_window: int = 3,
) -> tuple[Tensor, Tensor]:
    """``(L_spatial, L_channel)`` of RCIL's PCKD (docs/methods.md §3.16); two float32 scalars.

    Args:
        old_maps / new_maps: ``L`` maps each, ``(B, C_l, H_l, W_l)`` pairwise, the **last** the logits: old
            ``(B, K_{t−1}, h, w)``, new ``(B, K_t, h, w)`` (collapsed onto the old channels for the spatial
            term). Any other channel mismatch is an error.
        spatial_factors: ``f^s_l``, ``L`` values; channel_factors: ``f^c_l``, ``L − 1`` values (the logits have
            no channel term); :func:`pckd_factors` builds both. Maps with factor 0 are skipped but still count
            in ``L`` (``L − 1``).
        num_classes_seen: ``K_t``; num_new: ``|C^t|`` (the schedule ``sqrt(K_t / |C^t|)``).
        windows: spatial windows ``k``; channel_window: the channel window.
    """
    num_maps = len(old_maps)
    if num_maps != len(new_maps) or num_maps < 2:
        raise ValueError(f"pckd_loss: got {len(old_maps)} old and {len(new_maps)} new maps (need the same number ≥ 2)")
    if len(spatial_factors) != num_maps or len(channel_factors) != num_maps - 1:
        raise ValueError(f"pckd_loss: {len(spatial_factors)} spatial and {len(channel_factors)} channel factors for "
                         f"{num_maps} maps (need {num_maps} and {num_maps - 1})")
    if num_new < 1 or num_classes_seen < num_new:
        raise ValueError(f"pckd_loss: num_classes_seen={num_classes_seen}, num_new={num_new} are inconsistent")
    *old_features, old_logits = old_maps
    *new_features, new_logits = new_maps
    for index, (old, new) in enumerate(zip(old_features, new_features)):
        if old.shape != new.shape:
            raise ValueError(f"pckd_loss: map {index}: old {tuple(old.shape)} vs new {tuple(new.shape)}; only the "
                             "last map (the logits) may have extra new channels")
    if new_logits.shape[1] != old_logits.shape[1]:
        new_logits = collapse_new_channels(new_logits, old_logits.shape[1])
    schedule = math.sqrt(num_classes_seen / num_new)
    spatial = old_logits.new_zeros((), dtype=torch.float32)
    channel = old_logits.new_zeros((), dtype=torch.float32)
    pairs = list(zip([*old_features, old_logits], [*new_features, new_logits]))
    for (old, new), factor in zip(pairs, spatial_factors):  # a loop over the (6) maps
        if factor != 0.0:
            spatial = spatial + factor * schedule * pckd_spatial_distance(old, new, windows)
    for (old, new), factor in zip(pairs[:-1], channel_factors):
        if factor != 0.0:
            channel = channel + factor * schedule * pckd_channel_distance(old, new, channel_window)
    return spatial / num_maps, channel / (num_maps - 1)
