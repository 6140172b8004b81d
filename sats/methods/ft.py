"""FT: plain fine-tuning with cross-entropy (docs/methods.md §3.1), the lower bound."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from torch import Tensor

from sats.losses.ce import cross_entropy
from sats.methods.base import Batch, Method, StepContext, register_method


@dataclass
class CEParams:
    reduction: str = "all_pixels"  # all_pixels (reference: / all pixels, ignored included) | valid_pixels

    def __post_init__(self) -> None:
        if self.reduction not in ("all_pixels", "valid_pixels"):
            raise ValueError(f"reduction: {self.reduction!r} is not 'all_pixels' or 'valid_pixels'")


@register_method
class FineTuning(Method):
    """``L = CE(z, y)``; no old model, default head init."""

    name = "ft"
    Params = CEParams

    def loss(self, batch: Batch, out, old_out: Optional[object], ctx: StepContext) -> Dict[str, Tensor]:
        return {"ce": cross_entropy(out.logits, batch.labels, reduction=self.params.reduction)}


@register_method
class JointTraining(FineTuning):
    """Joint (offline) training on every class of the task in one step: the upper bound.

    Reports keep the incremental task's old/new groups so the row compares with the others.
    """

    name = "joint"
    joint = True
