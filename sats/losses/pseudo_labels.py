"""PLOP's entropy pseudo-labels: uncertainty, per-class median thresholds, relabelling (docs/methods.md §3.9).

Two uncertainty scalings exist (§6 item 11):

* :func:`reference_uncertainty` — the reference's exact value, a *mean* over classes divided by
  ``log K_{t−1}`` and again by ``log K_t``; PLOP's floor 0.001 assumes this scaling;
* :func:`normalized_entropy` — the real normalised entropy in ``[0, 1]``.

:class:`ThresholdAccumulator` builds per-class histograms of the uncertainty over the
step's training set and turns them into thresholds, either with a true median
(``mode="correct"``) or with the reference's buggy running sum (``mode="reference"``).
:func:`entropy_pseudo_labels` then relabels background pixels.
"""

from __future__ import annotations

import math
from typing import Tuple, Union

import torch
from torch import Tensor

from sats.losses.ce import IGNORE_INDEX

__all__ = [
    "INFINITE_THRESHOLD_VALUE",
    "ThresholdAccumulator",
    "entropy_pseudo_labels",
    "normalized_entropy",
    "reference_uncertainty",
]

#: the reference replaces infinite thresholds by this value
INFINITE_THRESHOLD_VALUE = 0.005
_LOG_EPS = 1e-8  # the reference's epsilon inside log(q + eps) and log(K + eps)


def _check_logits(old_logits: Tensor, name: str) -> int:
    if old_logits.dim() != 4:
        raise ValueError(f"{name}: expected old logits (B, K_old, H, W), got {tuple(old_logits.shape)}")
    num_old = old_logits.shape[1]
    if num_old < 2:
        raise ValueError(f"{name}: entropy needs at least 2 old channels, got {num_old}")
    return num_old


def reference_uncertainty(old_logits: Tensor, num_classes_now: int) -> Tensor:
    """The reference's pixel uncertainty ``u = E(q) / log K_t`` → ``(B, H, W)`` float32.

    ``E(q) = −(1/log(K_{t−1} + 1e-8)) · (1/K_{t−1}) Σ_c q_c log(q_c + 1e-8)`` with
    ``q = softmax(z̄)``: a mean over classes (not a sum), then two log normalisations, so
    ``u ≤ 1/(K_{t−1} log K_t)`` (≈ 0.022 for VOC 15-1). Reproduced exactly.

    Args:
        old_logits: ``(B, K_{t−1}, H, W)``.
        num_classes_now: ``K_t`` (the reference's ``max_value = log K_t``).
    """
    num_old = _check_logits(old_logits, "reference_uncertainty")
    if num_classes_now < num_old:
        raise ValueError(f"reference_uncertainty: num_classes_now={num_classes_now} < K_old={num_old}")
    q = torch.softmax(old_logits.detach().float(), dim=1)
    mean_term = (q * torch.log(q + _LOG_EPS)).mean(dim=1)
    entropy = -mean_term / math.log(num_old + _LOG_EPS)
    return entropy / math.log(num_classes_now)


def normalized_entropy(old_logits: Tensor) -> Tensor:
    """Normalised Shannon entropy ``−Σ_c q_c log q_c / log K_{t−1}`` ∈ [0, 1] → ``(B, H, W)`` float32."""
    num_old = _check_logits(old_logits, "normalized_entropy")
    q = torch.softmax(old_logits.detach().float(), dim=1)
    # entr(q) = −q log q with entr(0) = 0: one pass instead of log-softmax, exp, product and select
    return torch.special.entr(q).sum(dim=1) / math.log(num_old)


class ThresholdAccumulator:
    """Per-class histograms of pixel uncertainty → per-class median thresholds ``τ_c``.

    ``histogram`` is an int64 tensor ``(K_old, bins)`` of counts over ``[0, 1]`` (bin width
    ``1/bins``; values ``≥ 1`` go to the last bin, as in the reference). With several
    processes, sum it over the ranks before :meth:`thresholds` (the pseudo-label frame
    :mod:`sats.methods._pseudo` does, with ``ctx.all_reduce_sum_(acc.histogram)``).

    Counts are exact int64. (The reference accumulates in a float32 tensor, where a bin stops
    growing at 2^24 ≈ 16.8 M counts; that saturation is not reproduced, even in
    ``mode="reference"``.)

    Args:
        num_old_channels: ``K_{t−1}``; predicted classes lie in ``[0, K_{t−1})``.
        bins: number of bins (PLOP: 100 in entropy mode).
        mode: ``"correct"`` — the true median, interpolated linearly inside the bin where the
            cumulative count reaches half the total; ``"reference"`` — the reference's loop, whose
            running sum adds the *bin index* instead of the bin count (thresholds collapse to
            ≈ 0.005; docs/methods.md §3.9, §6 item 11).
        device: where the histogram lives.
    """

    MODES = ("correct", "reference")

    def __init__(self, num_old_channels: int, bins: int = 100, mode: str = "correct", device: Union[str, torch.device, None] = None) -> None:
        if num_old_channels < 1 or bins < 1:
            raise ValueError(f"ThresholdAccumulator: num_old_channels={num_old_channels} and bins={bins} must be >= 1")
        if mode not in self.MODES:
            raise ValueError(f"ThresholdAccumulator: mode={mode!r} is not one of {self.MODES}")
        self.num_old_channels = num_old_channels
        self.bins = bins
        self.mode = mode
        self.histogram = torch.zeros(num_old_channels, bins, dtype=torch.int64, device=device)

    def update(self, uncertainty: Tensor, predicted_class: Tensor, mask: Tensor) -> None:
        """Count the pixels where ``mask`` is True (one ``bincount`` on ``class · bins + bin``).

        Args:
            uncertainty: ``(B, H, W)`` float, expected in ``[0, 1]`` (clamped into the bins).
            predicted_class: ``(B, H, W)`` int64 in ``[0, K_old)`` — the old model's arg-max.
            mask: ``(B, H, W)`` bool — which pixels to count (the reference: raw label 0).
        """
        if not (uncertainty.shape == predicted_class.shape == mask.shape):
            raise ValueError(
                f"ThresholdAccumulator.update: shapes differ: uncertainty {tuple(uncertainty.shape)}, "
                f"predicted_class {tuple(predicted_class.shape)}, mask {tuple(mask.shape)}"
            )
        uncertainty = uncertainty.detach().float()
        predicted_class = predicted_class.long()
        bad = mask & ~(torch.isfinite(uncertainty) & (predicted_class >= 0) & (predicted_class < self.num_old_channels))
        if bool(bad.any()):
            raise ValueError(
                f"ThresholdAccumulator.update: {int(bad.sum())} counted pixels have a non-finite uncertainty or a "
                f"predicted class outside [0, {self.num_old_channels})"
            )
        bin_index = (uncertainty * self.bins).long().clamp(0, self.bins - 1)
        overflow = self.num_old_channels * self.bins  # masked-out pixels land here and are dropped
        flat_index = torch.where(mask, predicted_class * self.bins + bin_index, torch.full_like(bin_index, overflow))
        counts = torch.bincount(flat_index.reshape(-1), minlength=overflow + 1)
        self.histogram += counts[:overflow].view(self.num_old_channels, self.bins).to(self.histogram.device)

    def thresholds(self, floor: float = 0.001) -> Tensor:
        """Per-class thresholds ``τ_c = max(median_c, floor)`` → ``(K_old,)`` float32.

        Classes never counted get ``floor``; infinite values become 0.005 (the reference's rule;
        only ``mode="reference"`` can produce them, when its walk runs past the last bin).
        """
        counts = self.histogram.double()
        total = counts.sum(dim=1)
        half = total / 2
        bin_ids = torch.arange(self.bins, dtype=torch.float64, device=counts.device)
        if self.mode == "correct":
            cumulative = counts.cumsum(dim=1)
            median_bin = (cumulative >= half[:, None]).int().argmax(dim=1)  # first bin reaching half
            count_before = (cumulative - counts).gather(1, median_bin[:, None]).squeeze(1)
        else:
            # Reference: before bin i the running sum is Σ_{j<i} j = i(i−1)/2, whatever the counts.
            running = bin_ids * (bin_ids - 1) / 2
            stops = (half[:, None] >= running) & (half[:, None] <= running + counts)
            found = stops.any(dim=1)
            last = self.bins - 1
            median_bin = torch.where(found, stops.int().argmax(dim=1), torch.full_like(total, last, dtype=torch.long))
            # without a break the loop also adds the last index: running = bins(bins−1)/2
            count_before = torch.where(found, running.gather(0, median_bin), torch.full_like(total, self.bins * last / 2))
        count_in_bin = counts.gather(1, median_bin[:, None]).squeeze(1)
        median = (median_bin.double() + (half - count_before) / count_in_bin) / self.bins
        thresholds = torch.where(total > 0, torch.clamp(median, min=floor), torch.full_like(median, floor))
        # clamp keeps NaN (as the reference's Python max(nan, floor) does); +inf → 0.005
        thresholds = torch.where(torch.isinf(thresholds), torch.full_like(thresholds, INFINITE_THRESHOLD_VALUE), thresholds)
        return thresholds.float()


def entropy_pseudo_labels(
    labels: Tensor,
    old_logits: Tensor,
    thresholds: Tensor,
    uncertainty: Tensor,
    num_old: int,
    *,
    keep_old_labels: bool = False,
) -> Tuple[Tensor, Tensor]:
    """PLOP's entropy pseudo-labelling → ``(pseudo_labels (B, H, W) int64, adaptive_factor (B, 1, 1) float32)``.

    Background pixels are those with a label ``< num_old``: the label 0 (old and future classes
    after remapping) and, on memory images, old-class ground truth — the reference
    (``labels < old_classes``) overwrites it too (docs/methods.md §3.12); ``keep_old_labels=True``
    keeps old ground truth and treats only label 0 as background. For a background pixel,
    ``ĉ = argmax_c z̄_c``; the pixel becomes ``ĉ`` if ``u < τ_ĉ`` (ĉ may be 0), else 255.
    Current-class labels and 255 are kept.

    The adaptive factor (PLOP's ``classif_adaptive_factor``), per image:
    ``ν = #(background pixels accepted) / (#(background pixels) + 1e-6)`` (PLOP's epsilon; the SATS
    reference has none). The reference computes it but never applies it (§6 item 10): a method
    decides whether to pass it as ``pixel_weight`` to :func:`sats.losses.ce.cross_entropy`.

    Args:
        labels: ``(B, H, W)`` int64 channels, 255 = ignore (not modified).
        old_logits: ``(B, K_{t−1}, H, W)``.
        thresholds: ``(K_{t−1},)`` from :meth:`ThresholdAccumulator.thresholds`.
        uncertainty: ``(B, H, W)`` on the same scale as the thresholds.
        num_old: ``K_{t−1}``.
    """
    if old_logits.dim() != 4 or old_logits.shape[1] != num_old:
        raise ValueError(f"entropy_pseudo_labels: old logits {tuple(old_logits.shape)} do not have num_old={num_old} channels")
    if labels.shape != uncertainty.shape or labels.shape != (old_logits.shape[0],) + tuple(old_logits.shape[2:]):
        raise ValueError(
            f"entropy_pseudo_labels: labels {tuple(labels.shape)}, uncertainty {tuple(uncertainty.shape)} and old logits "
            f"{tuple(old_logits.shape)} disagree on (B, H, W)"
        )
    if thresholds.dim() != 1 or thresholds.shape[0] != num_old:
        raise ValueError(f"entropy_pseudo_labels: thresholds {tuple(thresholds.shape)} must be ({num_old},)")
    # (B, H, W); max(dim=1).indices == argmax(dim=1) (first maximum, NaN wins) and is 2-4x faster on CPU
    old_prediction = old_logits.detach().max(dim=1).indices
    background = labels == 0 if keep_old_labels else labels < num_old
    accepted = uncertainty.detach() < thresholds.to(uncertainty.device)[old_prediction]
    relabelled = torch.where(accepted, old_prediction, torch.full_like(old_prediction, IGNORE_INDEX))
    pseudo_labels = torch.where(background, relabelled, labels)
    accepted_background = (background & accepted).sum(dim=(1, 2)).float()
    adaptive_factor = accepted_background / (background.sum(dim=(1, 2)).float() + 1e-6)
    return pseudo_labels, adaptive_factor[:, None, None]
