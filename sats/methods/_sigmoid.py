"""The frame DKD and STAR share (docs/methods.md §3.14, §3.15): per-class sigmoid heads without a background
classifier (``prediction = "sigmoid"``; channel 0 is no class), a pos-weighted mBCE, the decoder features of
both models, BatchNorm frozen and dropout off at steps > 0, and optimiser groups with lr multipliers for the
decoder, the classifier heads and the new head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Optional

from torch import Tensor

from sats.losses.sigmoid import mbce
from sats.methods.base import Batch, Method, check_weight
from sats.models.segmenter import ModelOutput


@dataclass
class SigmoidParams:
    pos_weight: float = 4.0  # positive weight of the mBCE (at step 0; STAR: at every step)
    lambda_mbce: float = 1.0
    lr_mult_decoder: float = 10.0  # decoder lr × the base lr
    lr_mult_classifier: float = 10.0  # every classifier head at step 0, the old ones later
    lr_mult_new_head: float = 10.0  # the new head at steps > 0

    def __post_init__(self) -> None:
        check_weight("lambda_mbce", self.lambda_mbce)
        for key in ("pos_weight", "lr_mult_decoder", "lr_mult_classifier", "lr_mult_new_head"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key}: must be > 0, got {getattr(self, key)!r}")


class SigmoidHeadsMethod(Method):
    """DKD's and STAR's common declarations and step-0 term (no method of its own: never registered)."""

    needs = frozenset({"decoder"})
    old_needs = frozenset({"decoder"})
    uses_old_model = True
    prediction = "sigmoid"

    def step0_key(self) -> Optional[str]:
        p = self.params
        return (f"{self.step0}:pos_weight={p.pos_weight}:mbce={p.lambda_mbce}:lr={p.lr_mult_decoder}/"
                f"{p.lr_mult_classifier}{self.step0_details()}")

    def step0_details(self) -> str:
        """What else of the method shapes its step 0 (appended to the step-0 key)."""
        return ""

    def frozen_at(self, step: int) -> FrozenSet[str]:
        return frozenset({"norm", "dropout"}) if step > 0 else frozenset()

    def lr_multipliers(self, step: int) -> Dict[str, float]:
        """Per model part (``part_groups``): decoder, old heads, and the new head (head 0 at step 0)."""
        p = self.params
        new = p.lr_mult_classifier if step == 0 else p.lr_mult_new_head
        return {"decoder": p.lr_mult_decoder, "old_heads": p.lr_mult_classifier, "new_head": new}

    def step0_mbce(self, batch: Batch, out: ModelOutput) -> Tensor:
        """``λ_mbce · mBCE_w`` over every foreground channel of step 0 (``w = pos_weight``)."""
        p = self.params
        return p.lambda_mbce * mbce(out.logits[:, 1:], batch.labels, 1, p.pos_weight)
