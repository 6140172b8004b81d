"""sats.losses: pure, vectorised loss blocks that the methods compose.

Per-pixel losses default to the reference reduction ``"all_pixels"``: sum over pixels divided
by all pixels of the batch, ignored (255) pixels included (docs/methods.md §3 notation).

Modules: ``ce`` (CE, unbiased CE, multi-label BCE), ``kd`` (KD, unbiased KD, BCE KD, feature
MSE), ``pod`` (PLOP's local POD), ``pckd`` (RCIL's pooled-cube distillation), ``pseudo_labels`` (entropy pseudo-labels and their
thresholds), ``sigmoid`` (heads without a background classifier: prediction, mBCE, decomposed logits),
``prototypes`` (STAR's class statistics, replay counts, OCFM, SAD), ``attention`` (SATS's attention / feature transfer), ``importance`` (the EWC / RW /
PI quadratic penalty and its normalisation; the stateful trackers are in
``sats.methods._importance_trackers``). Everything public in them is exported here.
"""

from sats.losses.attention import (
    class_region_weights,
    downsample_labels,
    plop_attention_loss,
    sats_attention_loss,
    sats_feature_loss,
)
from sats.losses.ce import (
    IGNORE_INDEX,
    REDUCTIONS,
    Reduction,
    cross_entropy,
    multilabel_bce,
    reduce_pixel_loss,
    unbiased_cross_entropy,
)
from sats.losses.importance import minmax_normalize, quadratic_penalty
from sats.losses.sigmoid import (
    decomposed_logits,
    foreground_prediction,
    implicit_background_prediction,
    mbce,
    negative_bce,
)
from sats.losses.kd import bce_kd, feature_mse, kd_old_channels, unbiased_kd
from sats.losses.pckd import PCKD_WINDOWS, pckd_channel_distance, pckd_factors, pckd_loss, pckd_spatial_distance
from sats.losses.pod import collapse_new_channels, local_pod_loss, pod_distance, pod_embedding
from sats.losses.prototypes import (
    ReplayPlan,
    class_feature_sums,
    feature_statistics,
    grid_sample_positions,
    masked_feature_mse,
    prototype_separation,
    replay_plan,
    synthetic_features,
)
from sats.losses.pseudo_labels import (
    INFINITE_THRESHOLD_VALUE,
    ThresholdAccumulator,
    entropy_pseudo_labels,
    normalized_entropy,
    reference_uncertainty,
)

__all__ = [
    "IGNORE_INDEX",
    "INFINITE_THRESHOLD_VALUE",
    "REDUCTIONS",
    "ReplayPlan",
    "Reduction",
    "ThresholdAccumulator",
    "bce_kd",
    "class_feature_sums",
    "class_region_weights",
    "collapse_new_channels",
    "cross_entropy",
    "decomposed_logits",
    "downsample_labels",
    "entropy_pseudo_labels",
    "feature_mse",
    "feature_statistics",
    "foreground_prediction",
    "grid_sample_positions",
    "implicit_background_prediction",
    "kd_old_channels",
    "local_pod_loss",
    "masked_feature_mse",
    "mbce",
    "minmax_normalize",
    "multilabel_bce",
    "negative_bce",
    "normalized_entropy",
    "PCKD_WINDOWS",
    "pckd_channel_distance",
    "pckd_factors",
    "pckd_loss",
    "pckd_spatial_distance",
    "plop_attention_loss",
    "pod_distance",
    "pod_embedding",
    "prototype_separation",
    "quadratic_penalty",
    "reduce_pixel_loss",
    "reference_uncertainty",
    "replay_plan",
    "sats_attention_loss",
    "sats_feature_loss",
    "synthetic_features",
    "unbiased_cross_entropy",
    "unbiased_kd",
]
