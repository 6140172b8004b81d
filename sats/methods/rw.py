"""RW (Riemannian Walk): EWC's ``F`` plus a path score ``s`` (docs/methods.md §3.6).

Penalty ``λ Σ (F̂ + ŝ)(θ − θ_old)²`` (λ = 100, both terms min-max normalised per tensor). ``F`` is
EWC's EMA (α = 0.9); every ``score_interval`` (10) iterations ``s += −g·Δθ / (½ F Δθ² + 1e-8)``
with ``Δθ`` the change since the last snapshot; at the end of a step ``s`` is clamped at 0 and
averaged with the previous step's. Step 0 is the method's own. Shared machinery:
:mod:`sats.methods._importance`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

from sats.methods._importance import EMAParams, ImportanceMethod
from sats.methods.base import register_method


@dataclass
class RWParams(EMAParams):
    score_interval: int = 10  # iterations between path-score updates

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score_interval < 1:
            raise ValueError(f"score_interval: must be >= 1, got {self.score_interval!r}")


@register_method
class RiemannianWalk(ImportanceMethod):
    """``L = CE + λ · Σ (F̂ + ŝ)(θ − θ_old)²`` (terms ``ce``, ``rw``); own step 0, default head init."""

    name = "rw"
    label = "RW"
    Params = RWParams
    tracker_kind = "rw"

    def tracker_kwargs(self) -> Dict[str, Any]:
        return {"alpha": self.params.alpha, "score_interval": self.params.score_interval}
