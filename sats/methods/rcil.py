"""RCIL: representation compensation (twin branches, merged and frozen) + pooled-cube distillation
(docs/methods.md §3.16).

``L = UNCE(z, y) + λ_kd · UNKD(z, z̄) + L_pckd,spatial + L_pckd,channel`` at steps > 0; step 0 is plain CE.

* **Model**: ``model.rc_branches: true`` gives every twinned convolution a parallel branch (DeepLab: each
  bottleneck's 3×3 ``conv2`` and the ASPP map convolutions; MiT, our proposal: the Mix-FFN depth-wise convs and
  the decoder's fuse conv), mixed per channel in training and averaged in eval (:mod:`sats.models.reparam`).
  At the start of every step ``t ≥ 1`` (:meth:`RCIL.prepare_model`, before the optimiser is built) each pair
  is re-parameterised into branch A, which is then frozen (the old knowledge); branch B keeps training.
  ``trainable_branch_init``: ``keep`` (the reference: branch B keeps its step ``t−1`` weights, so the step-``t``
  network starts at ``¼A + ¾B``, not at the step ``t−1`` network) or ``merged`` (branch B starts from the
  merged weights: the function is preserved). The old model is the step ``t−1`` network, not merged.
* **UNCE / UNKD**: MiB's (§3.8), λ_kd = 100 (VOC and ADE).
* **PCKD** (:mod:`sats.losses.pckd`) on 6 maps of each model: the 4 activated encoder stages (``features``;
  MiT: the stage outputs), the ``decoder`` feature (DeepLab: the ASPP output) and ``logits_small``.
  Factors ``pckd_feature_factor`` / ``pckd_last_factor``: VOC 0.01 / 0.0005, ADE 5e-6 / 5e-7; with
  ``reference_channel_factors`` (default, the reference's layout that produced the published numbers) the
  channel term weights the decoder map with the last factor (20× less than in the spatial term).
* **New heads**: ``reference_head_init`` (default) copies the background weight into every new row and leaves
  the biases as initialised (``background_weight``, the reference's code); false: MiB's ``background``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sats.losses.ce import unbiased_cross_entropy
from sats.losses.kd import unbiased_kd
from sats.losses.pckd import PCKD_WINDOWS, pckd_factors, pckd_loss
from sats.methods.base import (
    Batch,
    CEParams,
    Method,
    StepContext,
    check_weight,
    register_method,
    require_old_logits,
)
from sats.models.reparam import BRANCH_INITS, freeze_merged_branches, merge_rc_branches


@dataclass
class RCILParams(CEParams):
    lambda_kd: float = 100.0  # UNKD weight (VOC and ADE)
    pckd_feature_factor: float = 0.01  # PCKD factor of the 4 stages and the decoder map (VOC; ADE 5e-6)
    pckd_last_factor: float = 0.0005  # PCKD factor of the logits (VOC; ADE 5e-7)
    pckd_windows: list[int] = field(default_factory=lambda: list(PCKD_WINDOWS))  # spatial windows k
    pckd_channel_window: int = 3  # channels averaged by the channel term
    reference_channel_factors: bool = True  # channel term: the decoder map gets pckd_last_factor (the reference)
    trainable_branch_init: str = "keep"  # keep (the reference) | merged: branch B at step t starts from the merge
    reference_head_init: bool = True  # new rows copy w_0, biases untouched (the reference); false: MiB's init

    def __post_init__(self) -> None:
        super().__post_init__()
        check_weight("lambda_kd", self.lambda_kd)
        check_weight("pckd_feature_factor", self.pckd_feature_factor)
        check_weight("pckd_last_factor", self.pckd_last_factor)
        if not self.pckd_windows or any(int(k) < 1 for k in self.pckd_windows):
            raise ValueError(f"pckd_windows: must be a non-empty list of positive ints, got {list(self.pckd_windows)}")
        if self.pckd_channel_window < 1:
            raise ValueError(f"pckd_channel_window: must be >= 1, got {self.pckd_channel_window}")
        if self.trainable_branch_init not in BRANCH_INITS:
            raise ValueError(f"trainable_branch_init: {self.trainable_branch_init!r} is not one of {BRANCH_INITS}")


def pckd_maps(out: Any) -> list[Tensor]:
    """The maps PCKD distils, in order: 4 activated stages, the decoder feature, ``logits_small``."""
    return [*out.features, out.decoder, out.logits_small]


@register_method
class RCIL(Method):
    """``L = UNCE + λ_kd · UNKD + PCKD`` (terms ``unce``, ``unkd``, ``pckd_spatial``, ``pckd_channel``); plain CE
    (``ce``) at step 0; twin branches merged and frozen at every step > 0."""

    name = "rcil"
    label = "RCIL"
    Params = RCILParams
    uses_old_model = True
    needs = frozenset({"features", "decoder", "logits_small"})
    old_needs = frozenset({"features", "decoder", "logits_small"})
    head_init = "background_weight"  # the reference's; "background" (MiB) with reference_head_init=false

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.head_init = "background_weight" if self.params.reference_head_init else "background"

    def check_experiment(self, cfg: Any) -> None:
        if not cfg.model.rc_branches:
            raise ValueError("needs model.rc_branches=true: the twin branches it merges and freezes at every step "
                             "> 0 (docs/methods.md §3.16)")

    def prepare_model(self, model: torch.nn.Module, step: int) -> None:
        """At ``step ≥ 1``: merge every twin pair into branch A (``trainable_branch_init``) and freeze branch A."""
        if step == 0:
            return
        if merge_rc_branches(model, trainable_branch_init=self.params.trainable_branch_init) == 0:
            raise RuntimeError(f"method {self.name!r}: the model has no twin branches to merge at step {step} "
                               "(model.rc_branches)")
        freeze_merged_branches(model)

    def loss(self, batch: Batch, out, old_out: object | None, ctx: StepContext) -> dict[str, Tensor]:
        p = self.params
        if ctx.step == 0:
            return self.ce_terms(batch, out)
        old_logits = require_old_logits(old_out, self.name)
        old_maps, new_maps = pckd_maps(old_out), pckd_maps(out)
        spatial_factors, channel_factors = pckd_factors(len(new_maps), p.pckd_feature_factor, p.pckd_last_factor,
                                                        p.reference_channel_factors)
        spatial, channel = pckd_loss(old_maps, new_maps, spatial_factors, channel_factors,
                                     num_classes_seen=ctx.num_outputs, num_new=ctx.num_outputs - ctx.num_old,
                                     windows=p.pckd_windows, channel_window=p.pckd_channel_window)
        return {
            "unce": unbiased_cross_entropy(out.logits, batch.labels, ctx.num_old, reduction=p.reduction),
            "unkd": p.lambda_kd * unbiased_kd(out.logits, old_logits, reduction=p.reduction),
            "pckd_spatial": spatial,
            "pckd_channel": channel,
        }
