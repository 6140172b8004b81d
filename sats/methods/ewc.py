"""EWC: CE + λ · Σ F̂ (θ − θ_old)², F an online EMA of squared gradients (docs/methods.md §3.5).

``F ← α g² + (1 − α) F`` after every backward of the main loss (``F₀ = 1``, α = 0.9), carried across
steps; the penalty of step ``t`` uses step ``t−1``'s ``F``, min-max normalised per tensor, with
λ = 100. Step 0 is the method's own (it accumulates ``F``). The shared machinery (hook order,
state, DDP, the missing-importance guard) is in :mod:`sats.methods._importance`.
"""

from __future__ import annotations

from typing import Any, Dict

from sats.methods._importance import EMAParams, ImportanceMethod
from sats.methods.base import register_method


@register_method
class EWC(ImportanceMethod):
    """``L = CE + λ · Σ F̂ (θ − θ_old)²`` (terms ``ce``, ``ewc``); own step 0, default head init."""

    name = "ewc"
    label = "EWC"
    Params = EMAParams
    tracker_kind = "ewc"

    def tracker_kwargs(self) -> Dict[str, Any]:
        return {"alpha": self.params.alpha}
