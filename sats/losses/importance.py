"""Parameter-importance penalties of EWC, RW and PI (docs/methods.md §3.5–3.7): the pure functions.

All three methods penalise ``λ Σ_k Î_k (θ_k − θ_k^old)²`` over the parameters that exist in the
old model (new heads are free), with an importance ``Î`` from the previous step, min-max
normalised per tensor (:func:`minmax_normalize`). How the importance is accumulated during a step
is stateful and lives with the methods (:mod:`sats.methods._importance_trackers`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = [
    "minmax_normalize",
    "quadratic_penalty",
]

NamedParams = Iterable[tuple[str, Tensor]]


def minmax_normalize(t: Tensor, eps: float = 1e-8) -> Tensor:
    """``(t − min t) / (max t − min t + eps)`` over the whole tensor (a constant tensor → 0)."""
    minimum = t.min()
    return (t - minimum) / (t.max() - minimum + eps)


def quadratic_penalty(
    named_params: NamedParams, old_params: Mapping[str, Tensor], importance: Mapping[str, Tensor]
) -> Tensor:
    """``Σ_k Σ importance_k · (θ_k − θ_k^old)²`` (0-dim tensor).

    Only trainable parameters whose name is in ``old_params`` are penalised, so new
    heads are free.  Each of them must have an ``importance`` entry.
    """
    total: Tensor | None = None
    device: torch.device | None = None
    for name, param in named_params:
        device = param.device if device is None else device
        if not param.requires_grad or name not in old_params:
            continue
        if name not in importance:
            raise KeyError(f"quadratic_penalty: parameter {name!r} is in old_params but has no importance")
        diff = param - old_params[name].detach()
        term = torch.dot((importance[name] * diff).flatten(), diff.flatten())
        total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=device)
    return total
