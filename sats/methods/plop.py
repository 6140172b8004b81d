"""PLOP: CE on entropy pseudo-labels + local POD distillation, background-based head init (docs/methods.md §3.9).

``L = CE(z, ỹ) [· ν] + L_pod`` at steps > 0; step 0 is plain CE (shared, §4.2).

* **Pseudo-labels** ``ỹ``: background pixels (label 0: background, old and future classes) take the old
  model's arg-max class where its uncertainty is below that class's threshold, else 255. The
  per-class thresholds are computed once per step before training and cached
  (:mod:`sats.methods._pseudo`; ``threshold_mode`` / ``threshold_pixels`` choose the reference or
  the corrected variants, §6 item 11 and the §3.9 note).
* **Adaptive factor** ``ν`` (per image: accepted / background pixels) multiplies the CE map when
  ``adaptive_factor`` is True, as PLOP's original code does (the default). The SATS reference
  computes ν but never applies it (§6 item 10): set ``method.adaptive_factor=false`` to
  reproduce the SATS paper's PLOP rows.
* **Local POD** over ``L = 6`` maps of the old and new model, ``(1/L) Σ_l λ_l sqrt(K_t/|C^t|) ℓ_l``:
  the 4 encoder ``stages`` (SegFormer: the MiT stage outputs after their LayerNorm; DeepLab: the
  pre-activation output of each ResNet stage's last block), the ``decoder`` feature (SegFormer:
  the 256-d fused decoder map; DeepLab: the ASPP output) with λ = ``pod_factor``, and
  ``logits_small`` with λ = ``pod_logits_factor`` (new channels summed into the background).
  The SegFormer mapping is ours: the reference's SegFormer exposes no such features (§2.4, §6 item 8).
  Scales {1, 2, 4} are used on every map; on maps smaller than 4 px (small demo crops only) the
  scales that do not fit are skipped for that map (the reference would get NaN and drop the layer).

VOC values: ``pod_factor`` 0.01, ``pod_logits_factor`` 0.0005; ADE with DeepLab 0.001 / 0.00001
(``configs/_base_/methods/plop_ade_deeplab.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from torch import Tensor

from sats.losses.pod import local_pod_loss
from sats.methods._pseudo import PseudoLabelMethod, ThresholdParams
from sats.methods.base import StepContext, check_weight, register_method


@dataclass
class PLOPParams(ThresholdParams):
    pod_factor: float = 0.01  # λ of the 4 stages and the decoder feature (VOC)
    pod_logits_factor: float = 0.0005  # λ of logits_small (VOC)
    adaptive_factor: bool = True  # multiply the CE by ν (PLOP's original); the SATS reference never does

    def __post_init__(self) -> None:
        super().__post_init__()
        check_weight("pod_factor", self.pod_factor)
        check_weight("pod_logits_factor", self.pod_logits_factor)


def pod_maps(out: Any) -> list:
    """The maps PLOP distils, in order: 4 stages, the decoder feature, ``logits_small``."""
    return [*out.stages, out.decoder, out.logits_small]


@register_method
class PLOP(PseudoLabelMethod):
    """``L = CE(z, ỹ)[·ν] + POD`` (terms ``ce``, ``pod``); plain CE at step 0; background head init."""

    name = "plop"
    label = "PLOP"
    Params = PLOPParams
    needs = frozenset({"stages", "decoder", "logits_small"})
    old_needs = frozenset({"stages", "decoder", "logits_small"})

    def distillation_terms(self, out, old_out, pseudo_labels: Tensor, ctx: StepContext) -> Dict[str, Tensor]:
        p = self.params
        old_maps, new_maps = pod_maps(old_out), pod_maps(out)
        weights = [p.pod_factor] * (len(new_maps) - 1) + [p.pod_logits_factor]
        num_new = ctx.num_outputs - ctx.num_old
        pod = local_pod_loss(old_maps, new_maps, weights, num_classes_seen=ctx.num_outputs, num_new=num_new,
                             skip_unfit_scales=True)
        return {"pod": pod}
