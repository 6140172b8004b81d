"""LwF: cross-entropy plus distillation of the old model's softmax on the old channels (docs/methods.md §3.2).

``L = CE(z, y) + λ_kd · KD(z[:, :K_{t−1}], z̄)`` at steps > 0 (λ_kd = 100, temperature 1); step 0 is
plain CE and shares its checkpoint with FT, ILT, MiB, PLOP and SATS (§4.2). Default head init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from torch import Tensor

from sats.losses.ce import cross_entropy
from sats.losses.kd import kd_old_channels
from sats.methods.base import Batch, Method, StepContext, register_method
from sats.methods.ft import CEParams


def check_weight(name: str, value: float) -> None:
    """Raise if a loss weight is negative or NaN (names the Params key)."""
    if not value >= 0:
        raise ValueError(f"{name}: must be >= 0, got {value!r}")


def require_old_logits(old_out: Optional[object], method: str) -> Tensor:
    """The old model's logits ``(B, K_{t−1}, H, W)``; a clear error if the engine passed none."""
    if old_out is None:
        raise RuntimeError(f"method {method!r}: no old-model output at a step > 0 (uses_old_model is set)")
    return old_out.logits  # type: ignore[attr-defined]


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
    Params = LwFParams
    uses_old_model = True

    def loss(self, batch: Batch, out, old_out: Optional[object], ctx: StepContext) -> Dict[str, Tensor]:
        p = self.params
        terms = {"ce": cross_entropy(out.logits, batch.labels, reduction=p.reduction)}
        if ctx.step > 0:
            old_logits = require_old_logits(old_out, self.name)
            terms["kd"] = p.lambda_kd * kd_old_channels(out.logits, old_logits, temperature=p.temperature,
                                                         reduction=p.reduction)
        return terms
