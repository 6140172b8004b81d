"""FT: plain fine-tuning with cross-entropy (docs/methods.md §3.1), the lower bound."""

from __future__ import annotations

from typing import Dict, Optional

from torch import Tensor

from sats.methods.base import Batch, CEParams, Method, StepContext, register_method


@register_method
class FineTuning(Method):
    """``L = CE(z, y)``; no old model, default head init."""

    name = "ft"
    label = "FT"
    Params = CEParams

    def loss(self, batch: Batch, out, old_out: Optional[object], ctx: StepContext) -> Dict[str, Tensor]:
        return self.ce_terms(batch, out)


@register_method
class JointTraining(FineTuning):
    """Joint (offline) training on every class of the task in one step: the upper bound.

    Reports keep the incremental task's old/new groups so the row compares with the others.
    """

    name = "joint"
    label = "Joint training"
    joint = True
