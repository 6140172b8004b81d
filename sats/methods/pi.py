"""PI (Path Integral / Synaptic Intelligence): importance from the loss change along the path (docs/methods.md §3.7).

Every iteration ``δ += −g·(θ − θ_prev)``; at the end of a step
``ω = max(0, δ / ((θ − θ_start)² + 1e-20)) + ω_prev`` (``θ_start``: the old model's value, or for new
parameters their value at the start of the step). Penalty ``λ Σ ω̂ (θ − θ_old)²`` with λ = 100 and
``ω̂`` min-max normalised per tensor. Step 0 is the method's own. Shared machinery:
:mod:`sats.methods._importance`.
"""

from __future__ import annotations

from sats.methods._importance import ImportanceMethod, ImportanceParams
from sats.methods.base import register_method


@register_method
class PathIntegral(ImportanceMethod):
    """``L = CE + λ · Σ ω̂ (θ − θ_old)²`` (terms ``ce``, ``pi``); own step 0, default head init."""

    name = "pi"
    label = "PI"
    Params = ImportanceParams
    tracker_kind = "pi"
