"""SATS: self-attention transfer with class-specific region pooling (docs/methods.md §3.13).

At steps > 0 SATS is the composition

    L = CE(z, ỹ)  +  λ_kd · UNKD(z, z̄)  +  λ_sat · L_SATS(A, Ā, ỹ)

* ``ỹ``: PLOP's entropy pseudo-labels (§3.9; :mod:`sats.methods._pseudo`): background pixels
  take the old model's confident prediction, uncertain ones become 255; current labels stay.
* ``CE``: plain cross-entropy on ``ỹ`` (not MiB's unbiased CE). PLOP's adaptive factor ν is
  computed by the reference but never applied, so ``adaptive_factor`` defaults to False here.
* ``UNKD``: MiB's unbiased distillation of the old logits (§3.8), λ_kd = 20.
* ``L_SATS``: for each MiT stage, the last block's post-softmax attention of the new and old
  model, pooled over the pixels of every class present in the (pseudo-)label map at that
  stage's resolution (background and 255 excluded), compared with a plain L2 distance and
  averaged over heads, classes, images and stages (:func:`sats.losses.attention.sats_attention_loss`).
  λ_sat = 20 (VOC and most ADE tasks; 30 for ADE 25-25 and 50-10).
* New heads: MiB's background-based initialisation (§2.3). Step 0: plain CE (shared).

Switches:

* ``reference_attention_layout``: the reference reshapes the ``(B, heads, N, M)`` attention to
  ``(B, h, w, heads, M)`` without moving the head axis, which scrambles the class pooling in
  stages 2–4 (§6 item 9). The published numbers were obtained with it; default False (correct).
* ``pooling``: ``class`` (SATS), ``global`` (the GP ablation), ``none`` (the NP ablation),
  ``plop`` (the paper's ``plop-selfattn`` ablation, "PLOP on the attention maps": in the reference
  the mean per-row L2 distance of the full attention maps × 100 × sqrt(K_t/|C^t|), no POD pooling;
  :func:`sats.losses.attention.plop_attention_loss`; source=attention only).
  ``reference_ablation_weight``: the released code multiplies only the class-pooled *attention*
  variant (``sats-selfattn``) by λ_sat, so GP, NP, plop-selfattn and the CNN-feature variant
  silently use weight 1 there (docs/methods.md §3.13, §6 item 23).
* ``source``: ``attention`` (SegFormer) or ``features`` (the CNN-feature variant for DeepLab,
  ``sats-feature-CNN``: the same class pooling on the 4 stage maps and the decoder/ASPP feature;
  the reference divides the sum over its 5 maps by 4: ``reference_feature_divisor``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from torch import Tensor

from sats.losses.attention import plop_attention_loss, sats_attention_loss, sats_feature_loss
from sats.losses.kd import unbiased_kd
from sats.methods._pseudo import PseudoLabelMethod, ThresholdParams
from sats.methods.base import StepContext, check_weight, register_method

POOLINGS = ("class", "global", "none", "plop")
SOURCES = ("attention", "features")


@dataclass
class SATSParams(ThresholdParams):
    lambda_kd: float = 20.0  # weight of MiB's unbiased KD
    lambda_sat: float = 20.0  # weight of the attention-transfer loss (ADE 25-25 / 50-10: 30)
    pooling: str = "class"  # class (SATS) | global (GP) | none (NP) | plop (plop-selfattn ablation)
    source: str = "attention"  # attention (SegFormer) | features (CNN-feature variant, DeepLab)
    reference_attention_layout: bool = False  # reproduce the reference's head/space reshape (§6 item 9)
    reference_ablation_weight: bool = False  # λ_sat only for attention+class, else 1, as released (§6 item 23)
    reference_feature_divisor: bool = False  # features: divide the 5-map sum by 4 as the reference
    adaptive_factor: bool = False  # multiply the CE by PLOP's ν (the reference computes it, never applies it)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_weight("lambda_kd", self.lambda_kd)
        check_weight("lambda_sat", self.lambda_sat)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling: {self.pooling!r} is not one of {POOLINGS}")
        if self.source not in SOURCES:
            raise ValueError(f"source: {self.source!r} is not one of {SOURCES}")
        if self.source == "features" and self.pooling != "class":
            raise ValueError("source=features supports pooling=class only")


@register_method
class SATS(PseudoLabelMethod):
    """``L = CE(z, ỹ) + λ_kd·UNKD + λ_sat·L_SATS`` (terms ``ce``, ``unkd``, ``sat``); plain CE at step 0."""

    name = "sats"
    label = "SATS"
    Params = SATSParams
    state_key = "thresholds"

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        # the model is asked only for what the transfer reads: attention maps, or CNN features
        maps = frozenset({"attentions"}) if self.params.source == "attention" else frozenset({"stages", "decoder"})
        self.needs = self.old_needs = maps

    def distillation_terms(self, out, old_out, pseudo_labels: Tensor, ctx: StepContext) -> Dict[str, Tensor]:
        p = self.params
        return {
            "unkd": p.lambda_kd * unbiased_kd(out.logits, old_out.logits, reduction=p.reduction),
            "sat": self._transfer_weight() * self._transfer(out, old_out, pseudo_labels, ctx.num_outputs,
                                                            ctx.num_old),
        }

    def _transfer_weight(self) -> float:
        """λ_sat; with ``reference_ablation_weight`` only ``sats-selfattn`` (attention, class pooling)
        gets it and every other variant weight 1, as in the released code (docs/methods.md §6 item 23)."""
        p = self.params
        if p.reference_ablation_weight and not (p.source == "attention" and p.pooling == "class"):
            return 1.0
        return p.lambda_sat

    def _transfer(self, out, old_out, pseudo: Tensor, pseudo_channels: int, num_old: int) -> Tensor:
        p = self.params
        if p.pooling == "plop":  # plop-selfattn: ×100·sqrt(K_t/|C^t|) is part of its formula
            return plop_attention_loss(out.attentions, old_out.attentions, num_classes_seen=pseudo_channels,
                                       num_new=pseudo_channels - num_old)
        if p.source == "attention":
            return sats_attention_loss(out.attentions, old_out.attentions, pseudo, pooling=p.pooling,
                                       reference_layout=p.reference_attention_layout,
                                       num_channels=pseudo_channels)
        new_maps, old_maps = [*out.stages, out.decoder], [*old_out.stages, old_out.decoder]
        return sats_feature_loss(new_maps, old_maps, pseudo, reference_divisor=4 if p.reference_feature_divisor else None)
