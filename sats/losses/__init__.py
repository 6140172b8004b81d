"""sats.losses: pure, vectorised loss blocks that the methods compose.

Per-pixel losses default to the reference reduction ``"all_pixels"``: sum over pixels divided
by all pixels of the batch, ignored (255) pixels included (docs/methods.md §3 notation).
"""

from sats.losses.ce import (
    IGNORE_INDEX,
    REDUCTIONS,
    Reduction,
    cross_entropy,
    multilabel_bce,
    reduce_pixel_loss,
    unbiased_cross_entropy,
)
from sats.losses.kd import bce_kd, feature_mse, kd_old_channels, unbiased_kd
from sats.losses.pod import collapse_new_channels, local_pod_loss, pod_distance, pod_embedding
from sats.losses.pseudo_labels import (
    INFINITE_THRESHOLD_VALUE,
    ThresholdAccumulator,
    entropy_pseudo_labels,
    normalized_entropy,
    reference_uncertainty,
)

# -- attention.py (SATS) and importance.py (EWC / RW / PI) re-exports go here (owned by another engineer) --

__all__ = [
    "IGNORE_INDEX",
    "INFINITE_THRESHOLD_VALUE",
    "REDUCTIONS",
    "Reduction",
    "ThresholdAccumulator",
    "bce_kd",
    "collapse_new_channels",
    "cross_entropy",
    "entropy_pseudo_labels",
    "feature_mse",
    "kd_old_channels",
    "local_pod_loss",
    "multilabel_bce",
    "normalized_entropy",
    "pod_distance",
    "pod_embedding",
    "reduce_pixel_loss",
    "reference_uncertainty",
    "unbiased_cross_entropy",
    "unbiased_kd",
]
