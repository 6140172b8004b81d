"""LwF: cross-entropy plus distillation of the old model's softmax on the old channels (docs/methods.md §3.2).

``L = CE(z, y) + λ_kd · KD(z[:, :K_{t−1}], z̄)`` at steps > 0 (λ_kd = 100, temperature 1); step 0 is
plain CE and shares its checkpoint with FT, ILT, MiB, PLOP and SATS (§4.2). Default head init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from torch import Tensor

from sats.losses.kd import kd_old_channels
from sats.methods.base import Batch, CEParams, Method, StepContext, check_weight, register_method, require_old_logits


@dataclass
class LwFParams(CEParams):
    lambda_kd: float = 100.0  # weight of the distillation term (reference preset)
    temperature: float = 1.0  # KD temperature (no preset uses another value)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_weight("lambda_kd", self.lambda_kd)
        if not self.temperature > 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature!r}")


@register_method
class LwF(Method):
    """``L = CE + λ_kd · KD_old`` (terms ``ce``, ``kd``); old model at steps > 0, default head init."""

    name = "lwf"
    label = "LwF"
    Params = LwFParams
    uses_old_model = True

    def loss(self, batch: Batch, out, old_out: Optional[object], ctx: StepContext) -> Dict[str, Tensor]:
        p = self.params
        terms = self.ce_terms(batch, out)
        if ctx.step > 0:
            old_logits = require_old_logits(old_out, self.name)
            terms["kd"] = p.lambda_kd * kd_old_channels(out.logits, old_logits, temperature=p.temperature,
                                                         reduction=p.reduction)
        return terms
