"""LwF-MC: iCaRL-style multi-label sigmoid BCE with soft-target distillation (docs/methods.md §3.3).

``L = BCE(z, onehot(y)) + λ_kd · K_{t−1} · mean BCE(σ(z[:, :K_{t−1}]), σ(z̄))`` with λ_kd = 10. The
classification loss is BCE **at step 0 too**, so its step 0 is keyed ``"bce"`` and is never shared
with the plain-CE methods (§4.2). Predictions are the arg-max over channels (= over sigmoids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from torch import Tensor

from sats.losses.ce import multilabel_bce
from sats.losses.kd import bce_kd
from sats.methods.base import Batch, CEParams, Method, StepContext, check_weight, register_method, require_old_logits


@dataclass
class LwFMCParams(CEParams):
    lambda_kd: float = 10.0  # weight of the BCE distillation (reference preset)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_weight("lambda_kd", self.lambda_kd)


@register_method
class LwFMC(Method):
    """``L = BCE + λ_kd · BCE-KD`` (terms ``bce``, ``bce_kd``); its own BCE step 0, default head init."""

    name = "lwf_mc"
    label = "LwF-MC"
    Params = LwFMCParams
    uses_old_model = True
    step0 = "bce"

    def loss(self, batch: Batch, out, old_out: Optional[object], ctx: StepContext) -> Dict[str, Tensor]:
        terms = {"bce": multilabel_bce(out.logits, batch.labels, reduction=self.params.reduction)}
        if ctx.step > 0:
            terms["bce_kd"] = self.params.lambda_kd * bce_kd(out.logits, require_old_logits(old_out, self.name))
        return terms
