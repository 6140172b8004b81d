"""DKD: decomposed knowledge distillation on sigmoid heads without a background classifier (docs/methods.md §3.14).

Baek et al., NeurIPS 2022. **Channels.** Channel 0 is DKD's *auxiliary* classifier, computed on detached
decoder features and never predicted; channel ``k ≥ 1`` is class ``k`` (the sats layout, background slot =
auxiliary). A pixel is background when no class has σ > 0.5 (``prediction = "sigmoid"``).

**Loss** (every term a per-class mean over all pixels, summed over classes; 255 pixels are negatives):

* step 0: ``L = λ_mbce · mBCE_w(z_{1:K_0}) + λ_ac · AC``, ``w = pos_weight``;
* steps t > 0: ``L = λ_mbce · mBCE_w(z_{C^t}) + λ_kd · KD + λ_pos · DKD⁺ + λ_neg · DKD⁻ + λ_ac · AC`` with
  ``w = pos_weight_incremental``, ``KD = Σ_{c ∈ C^{1:t−1}} mean ℓ(z_c, σ(z̄_c))`` at full resolution and the
  decomposed distillation ``DKD^± = Σ_c mean ℓ(z^±_c, σ(z̄^±_c))`` of the positive / negative parts of every old
  class logit (classifier weights × decoder features, bias excluded) at the classifier's resolution;
  ``AC = mean softplus(a)``, ``a`` the auxiliary logit on detached features (target 0 everywhere).

**Model handling.** New heads copy the auxiliary channel's weight and bias (``head_init = "copy"`` of channel
0). At t > 0 every BatchNorm is frozen (statistics and affine) and dropout is off (``frozen_at``). Optimiser
groups (``part_groups``): encoder at the base lr, decoder, old heads and new head at ``lr_mult_decoder`` /
``lr_mult_classifier`` / ``lr_mult_new_head`` (10× each); at t > 0 only the new head keeps
``train.weight_decay``, the rest has ``incremental_weight_decay`` (0, the reference). Step 0 is DKD's own (key
``dkd-mbce:…``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sats.losses.kd import bce_kd
from sats.losses.sigmoid import decomposed_logits, mbce, negative_bce
from sats.methods._sigmoid import SigmoidHeadsMethod, SigmoidParams
from sats.methods.base import Batch, ParamGroup, StepContext, check_weight, part_groups, register_method, require_old_logits
from sats.models.segmenter import ModelOutput


@dataclass
class DKDParams(SigmoidParams):
    pos_weight: float = 2.0  # mBCE positive weight at step 0 (VOC 2, ADE 35)
    pos_weight_incremental: float = 1.0  # at steps > 0 (VOC 1, ADE 35)
    lambda_kd: float = 5.0
    lambda_dkd_pos: float = 5.0
    lambda_dkd_neg: float = 5.0
    lambda_ac: float = 1.0
    #: weight decay of encoder, decoder, auxiliary and old heads at t > 0 (the reference: 0; None: train.weight_decay)
    incremental_weight_decay: Optional[float] = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("lambda_kd", "lambda_dkd_pos", "lambda_dkd_neg", "lambda_ac", "incremental_weight_decay"):
            if getattr(self, key) is not None:
                check_weight(key, getattr(self, key))
        if not self.pos_weight_incremental > 0:
            raise ValueError(f"pos_weight_incremental: must be > 0, got {self.pos_weight_incremental!r}")


def stacked_weight(model: torch.nn.Module, channels: slice) -> Tensor:
    """``(C, D, 1, 1)``: the classifier rows of output ``channels`` (every head concatenated)."""
    return torch.cat([head.weight for head in model.classifier.heads])[channels]  # type: ignore[union-attr]


def auxiliary_logits(model: torch.nn.Module, decoder: Tensor, size: torch.Size) -> Tensor:
    """``(B, 1, H, W)``: channel 0 on **detached** decoder features ``(B, D, h, w)``, upsampled to ``size``."""
    head = model.classifier.heads[0]  # type: ignore[union-attr]
    small = F.conv2d(decoder.detach(), head.weight[:1], head.bias[:1])
    return F.interpolate(small, size=size, mode="bilinear", align_corners=False)


@register_method
class DKD(SigmoidHeadsMethod):
    """mBCE + BCE-KD + decomposed KD + auxiliary loss (``mbce``, ``kd``, ``dkd_pos``, ``dkd_neg``, ``ac``); sigmoid heads.

    ``mbce`` and ``ac`` at step 0; new heads copy the auxiliary channel."""

    name = "dkd"
    label = "DKD"
    Params = DKDParams
    head_init = "copy"
    head_init_source = 0  # the auxiliary channel
    step0 = "dkd-mbce"

    def needs_at(self, step: int) -> frozenset:
        return self.needs  # the auxiliary loss reads the decoder at step 0 too

    def step0_details(self) -> str:
        return f":ac={self.params.lambda_ac}"

    def param_groups(self, model: torch.nn.Module, step: int) -> List[ParamGroup]:
        p = self.params
        decay = {part: p.incremental_weight_decay for part in ("encoder", "decoder", "old_heads")} if step > 0 else {}
        return part_groups(model, self.lr_multipliers(step), decay)

    def loss(self, batch: Batch, out: ModelOutput, old_out: Optional[ModelOutput], ctx: StepContext) -> Dict[str, Tensor]:
        p, labels = self.params, batch.labels
        aux = auxiliary_logits(ctx.model, out.decoder, out.logits.shape[-2:])
        if ctx.step == 0:
            return {"mbce": self.step0_mbce(batch, out), "ac": p.lambda_ac * negative_bce(aux)}
        k = ctx.num_old
        old_logits = require_old_logits(old_out, self.name)
        positive, negative = decomposed_logits(out.decoder, stacked_weight(ctx.model, slice(1, k)))
        old_positive, old_negative = decomposed_logits(old_out.decoder, stacked_weight(ctx.old_model, slice(1, k)))
        return {
            "mbce": p.lambda_mbce * mbce(out.logits[:, k:], labels, k, p.pos_weight_incremental),
            "kd": p.lambda_kd * bce_kd(out.logits[:, 1:k], old_logits[:, 1:]),
            "dkd_pos": p.lambda_dkd_pos * bce_kd(positive, old_positive),
            "dkd_neg": p.lambda_dkd_neg * bce_kd(negative, old_negative),
            "ac": p.lambda_ac * negative_bce(aux),
        }
