"""PLOP's local POD (pooled outputs distillation, docs/methods.md §3.9).

The math follows PLOP's ``features_distillation(..., collapse_channels="local")`` with PLOP's
preset (``pod_options = {"switch": {"after": {"extra_channels": "sum", "factor": ..., "type": "local"}}}``),
which is what both arthurdouillard/CVPR2021_PLOP and the SATS reference run:

* pre-processing ``"pow"``: each map is squared element-wise (after the logit collapse);
* **no normalisation**: the function forces ``normalize = False`` and the preset sets no
  ``"norm"`` key, so neither the per-region vectors nor the embedding are L2-normalised,
  and ``normalize_per_scale`` is off (no division by the number of regions);
* per scale ``s``, the map is cut into an ``s × s`` grid of regions; per region, the mean
  over the width (one value per channel and row) and over the height (one per channel and
  column), flattened channel-major, region by region, scale by scale;
* distance: L2 norm of the embedding difference per image, then the batch mean;
* total: ``(1/L) Σ_l λ_l · sqrt(K_t / |C^t|) · ℓ_l`` (``pod_factor`` times the POD schedule,
  divided by the number of maps).

Region side: the reference uses ``k = ⌊w/s⌋`` for both axes (it only runs on square maps);
here rows use ``⌊h/s⌋`` and columns ``⌊w/s⌋``, which is the same for square maps and stays
defined otherwise. Trailing rows/columns beyond ``s·k`` are dropped, as in the reference.

Differences from the reference: non-finite layer losses are not dropped (§6 item 24) — they
propagate so the trainer sees them; ``torch.linalg.vector_norm`` replaces the deprecated
``torch.frobenius_norm`` (§6 item 25).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["collapse_new_channels", "local_pod_loss", "pod_distance", "pod_embedding"]

DEFAULT_SCALES = (1, 2, 4)


def pod_embedding(x: Tensor, scales: Sequence[int] = DEFAULT_SCALES) -> Tensor:
    """Local POD embedding ``Φ(x)`` of a map ``(B, C, H, W)`` → ``(B, D)`` (float32).

    ``D = Σ_s s² · C · (⌊H/s⌋ + ⌊W/s⌋)``. Layout, as the reference's loops produce it: for each
    scale, for each region row ``i`` then region column ``j``: ``[width-means (C, ⌊H/s⌋) flattened,
    height-means (C, ⌊W/s⌋) flattened]``. ``x`` is squared element-wise first.

    When the finest scale ``f`` divides ``H`` and ``W`` and every scale divides ``f`` (the usual
    {1, 2, 4} on maps of even size), the full map is reduced only twice — row means within ``f``
    column bands ``(B, C, H, f)`` and column means within ``f`` row bands ``(B, C, f, W)`` — and
    every coarser scale averages neighbouring bands of those (equal-size regions: the same means,
    up to float rounding). That is 2 instead of ``2 × len(scales)`` full-size reductions, and as
    many full-size gradients in the backward pass.
    """
    _check_map(x, scales, "pod_embedding")
    return torch.cat([torch.cat([_flat_regions(w, "width"), _flat_regions(h, "height")], dim=3).flatten(1)
                      for w, h in _region_means(x.float().pow(2), scales)], dim=1)


def _check_map(x: Tensor, scales: Sequence[int], name: str) -> None:
    """Raise unless ``x`` is ``(B, C, H, W)`` and every scale leaves non-empty regions."""
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a (B, C, H, W) map, got {tuple(x.shape)}")
    height, width = x.shape[-2:]
    for scale in scales:
        if scale < 1 or height // scale == 0 or width // scale == 0:
            raise ValueError(f"{name}: scale {scale} does not fit a {height}x{width} map")


def _region_means(squared: Tensor, scales: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
    """Per scale ``s``: (width means ``(B, C, s_i, kh, s_j)``, height means ``(B, C, s_i, s_j, kw)``) of a map.

    Linear in ``squared``. When the finest scale ``f`` divides ``H`` and ``W`` and every scale divides
    ``f`` (the usual {1, 2, 4} on maps of even size), the full map is reduced only twice — row means
    within ``f`` column bands ``(B, C, H, f)`` and column means within ``f`` row bands ``(B, C, f, W)``
    — and every coarser scale averages neighbouring bands of those (equal-size regions: the same
    means, up to float rounding): 2 instead of ``2 × len(scales)`` full-size reductions, and as many
    full-size gradients in the backward pass.
    """
    batch, channels, height, width = squared.shape
    finest = max(scales)
    nested = height % finest == 0 and width % finest == 0 and all(finest % s == 0 for s in scales)
    if nested:
        row_bands = squared.reshape(batch, channels, height, finest, width // finest).mean(dim=4)  # (B, C, H, f)
        col_bands = squared.reshape(batch, channels, finest, height // finest, width).mean(dim=3)  # (B, C, f, W)
    means = []
    for scale in scales:  # a loop over the (3) scales only; regions are pooled in one reshape
        region_h, region_w = height // scale, width // scale
        if nested:
            group = finest // scale
            # (B, C, H, s) → (B, C, s_i, kh, s_j);  (B, C, s, W) → (B, C, s_i, s_j, kw)
            width_means = row_bands if group == 1 else row_bands.reshape(batch, channels, height, scale, group).mean(4)
            height_means = col_bands if group == 1 else col_bands.reshape(batch, channels, scale, group, width).mean(3)
            width_means = width_means.reshape(batch, channels, scale, region_h, scale)
            height_means = height_means.reshape(batch, channels, scale, scale, region_w)
        else:
            grid = squared[:, :, : scale * region_h, : scale * region_w]
            grid = grid.reshape(batch, channels, scale, region_h, scale, region_w)
            width_means = grid.mean(dim=5)  # (B, C, s_i, kh, s_j)
            height_means = grid.mean(dim=3)  # (B, C, s_i, s_j, kw)
        means.append((width_means, height_means))
    return means


def _flat_regions(means: Tensor, kind: str) -> Tensor:
    """The reference layout: ``(B, C, s_i, kh, s_j)`` → ``(B, s_i, s_j, C·kh)`` (width) or
    ``(B, C, s_i, s_j, kw)`` → ``(B, s_i, s_j, C·kw)`` (height)."""
    order = (0, 2, 4, 1, 3) if kind == "width" else (0, 2, 3, 1, 4)
    moved = means.permute(*order)
    return moved.reshape(*moved.shape[:3], -1)


def pod_distance(old: Tensor, new: Tensor, scales: Sequence[int] = DEFAULT_SCALES) -> Tensor:
    """``mean_b ‖Φ(old_b) − Φ(new_b)‖₂`` for two maps of equal shape ``(B, C, H, W)``. Scalar.

    ``old`` is detached (a target); gradients flow into ``new`` only. Computed without building
    either embedding: the region means are linear, so ``Φ(old) − Φ(new)`` is the means of
    ``old² − new²``, and the L2 norm does not depend on the embedding's layout, so it is summed
    over the per-scale means directly (a third of the kernels of two embeddings, which matters
    where the step is launch-bound; same value up to float rounding).
    """
    if old.shape != new.shape:
        raise ValueError(f"pod_distance: old map {tuple(old.shape)} and new map {tuple(new.shape)} differ")
    _check_map(new, scales, "pod_distance")
    difference = old.detach().float().square() - new.float().square()
    per_part = [torch.linalg.vector_norm(m, ord=2, dim=(1, 2, 3, 4))
                for pair in _region_means(difference, scales) for m in pair]  # each (B,)
    return torch.linalg.vector_norm(torch.stack(per_part, dim=1), ord=2, dim=1).mean()


def collapse_new_channels(new_logits: Tensor, num_old: int) -> Tensor:
    """Sum the new-class channels into the background channel ("extra_channels = sum").

    ``(B, K_t, H, W)`` → ``(B, num_old, H, W)``: channel 0 becomes ``z_0 + Σ_{c ≥ num_old} z_c``;
    channels ``1 … num_old−1`` are unchanged. Used on the new logits before POD so that they
    match the old logits' channels.
    """
    if new_logits.dim() != 4 or not 1 <= num_old <= new_logits.shape[1]:
        raise ValueError(f"collapse_new_channels: num_old={num_old} does not fit logits {tuple(new_logits.shape)}")
    background = new_logits[:, :1] + new_logits[:, num_old:].sum(dim=1, keepdim=True)
    return torch.cat([background, new_logits[:, 1:num_old]], dim=1)


def local_pod_loss(
    old_maps: Sequence[Tensor],
    new_maps: Sequence[Tensor],
    layer_weights: Union[float, Sequence[float]],
    num_classes_seen: int,
    num_new: int,
    scales: Sequence[int] = DEFAULT_SCALES,
    *,
    skip_unfit_scales: bool = False,
) -> Tensor:
    """PLOP's local POD loss ``(1/L) Σ_l λ_l · sqrt(K_t / |C^t|) · ℓ_l`` (docs/methods.md §3.9). Scalar float32.

    Args:
        old_maps / new_maps: ``L`` maps each, ``(B, C_l, H_l, W_l)`` pairwise; DeepLab: 4 stage
            pre-activations, ASPP output, ``logits_small``. If the **last** pair differs in
            channels (the logits: new ``K_t`` vs old ``K_{t−1}``), the new one is collapsed with
            :func:`collapse_new_channels`; any other mismatch is an error.
        layer_weights: ``λ_l`` per map, or one value for all (VOC: 0.01 for features, 0.0005 for
            the logits). Layers with weight 0 are skipped but still count in ``L``.
        num_classes_seen: ``K_t``; num_new: ``|C^t|`` (the POD schedule ``sqrt(K_t/|C^t|)``).
        skip_unfit_scales: for each map, drop the scales ``s`` whose regions would be empty
            (``⌊min(H_l, W_l)/s⌋ = 0``, e.g. scale 4 on a 2×2 stage-4 map of a small crop) instead of
            raising. On square maps this is what the reference does: its region side
            ``k = ⌊W/s⌋`` is 0, every region slice is empty, and the scale adds nothing (the loss
            is the same as here). The reference gets NaN only on maps **wider than tall** whose
            bottom row band falls off the map, ``(s−1)·⌊W/s⌋ ≥ H`` with ``⌊W/s⌋ ≥ 1`` (e.g. 2×4 or
            6×8 at scale 4): a region with columns but no rows averages over nothing. It then
            drops the whole layer (its loss counts as 0, the layer still counts in ``L``;
            §6 item 24). Here such maps get a finite loss (rows use ``⌊H/s⌋``, see the module
            docstring). At the paper's 512 crops every map is square and ≥ 16 px: nothing differs.
    """
    if len(old_maps) != len(new_maps) or not old_maps:
        raise ValueError(f"local_pod_loss: got {len(old_maps)} old and {len(new_maps)} new maps (need the same number > 0)")
    num_layers = len(old_maps)
    weights = [float(layer_weights)] * num_layers if isinstance(layer_weights, (int, float)) else [float(w) for w in layer_weights]
    if len(weights) != num_layers:
        raise ValueError(f"local_pod_loss: {len(weights)} layer weights for {num_layers} maps")
    if num_new < 1 or num_classes_seen < num_new:
        raise ValueError(f"local_pod_loss: num_classes_seen={num_classes_seen}, num_new={num_new} are inconsistent")
    schedule = math.sqrt(num_classes_seen / num_new)
    total = old_maps[0].new_zeros((), dtype=torch.float32)
    for index, (old, new, weight) in enumerate(zip(old_maps, new_maps, weights)):
        if weight == 0.0:
            continue
        if old.shape[1] != new.shape[1]:
            if index != num_layers - 1 or new.shape[1] < old.shape[1]:
                raise ValueError(
                    f"local_pod_loss: map {index}: old {tuple(old.shape)} vs new {tuple(new.shape)}; only the last map "
                    "(the logits) may have extra new channels"
                )
            new = collapse_new_channels(new, old.shape[1])
        map_scales = scales
        if skip_unfit_scales:
            map_scales = [s for s in scales if min(new.shape[-2:]) // s >= 1]
        total = total + weight * schedule * pod_distance(old, new, map_scales)
    return total / num_layers
