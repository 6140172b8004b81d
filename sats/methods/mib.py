"""MiB: unbiased cross-entropy + unbiased distillation, background-based head init (docs/methods.md §3.8).

``L = UNCE(z, y) + λ_kd · UNKD(z, z̄)`` at steps > 0. UNCE lets the background absorb every old
channel; UNKD lets the new model's background absorb the new channels. New heads copy the
background classifier (bias ``b_0 − log(|C^t| + 1)``, §2.3).

λ_kd defaults to **40**, the value the reference's MiB preset forces regardless of ``--loss_kd``
(§6 item 18); MiB's own default is 10 (``method.lambda_kd=10``). Step 0 is plain CE (shared).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from torch import Tensor

from sats.losses.ce import unbiased_cross_entropy
from sats.losses.kd import unbiased_kd
from sats.methods.base import Batch, CEParams, Method, StepContext, check_weight, register_method, require_old_logits


@dataclass
class MiBParams(CEParams):
    lambda_kd: float = 40.0  # UNKD weight (reference preset; MiB's paper default: 10)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_weight("lambda_kd", self.lambda_kd)


@register_method
class MiB(Method):
    """``L = UNCE + λ_kd · UNKD`` (terms ``unce``, ``unkd``); plain CE (``ce``) at step 0."""

    name = "mib"
    label = "MiB"
    Params = MiBParams
    uses_old_model = True
    head_init = "background"

    def loss(self, batch: Batch, out, old_out: Optional[object], ctx: StepContext) -> Dict[str, Tensor]:
        p = self.params
        if ctx.step == 0:
            return self.ce_terms(batch, out)
        old_logits = require_old_logits(old_out, self.name)
        return {
            "unce": unbiased_cross_entropy(out.logits, batch.labels, ctx.num_old, reduction=p.reduction),
            "unkd": p.lambda_kd * unbiased_kd(out.logits, old_logits, reduction=p.reduction),
        }
