"""Shared base of the importance-regularised methods EWC, RW and PI (docs/methods.md §3.5–3.7).

``L = CE(z, y) + λ Σ_k Î_k (θ_k − θ_k^old)²`` at steps > 0, with ``λ = lambda_reg`` (100) and ``Î``
the previous step's importance, min-max normalised per parameter tensor. Only parameters that exist
in the old model are penalised (new heads are free). The three methods differ only in the tracker of
:mod:`sats.methods._importance_trackers` that accumulates the importance during a step (EMA of squared
gradients, plus RW's path score, or PI's path integral), so each is a small subclass of
:class:`ImportanceMethod` naming its tracker and hyper-parameters.

One iteration (the engine's hooks, in order):

1. :meth:`ImportanceMethod.loss` returns ``{"ce": CE, <name>: λ·penalty}``. The penalty term is
   **detached**: the engine sums and logs it (``epoch_losses``, tensorboard), but it contributes no
   gradient to the engine's backward.
2. The engine back-propagates, so ``p.grad`` holds the gradient of the main loss only (unscaled
   under fp16 AMP).
3. :meth:`ImportanceMethod.after_backward` updates the tracker from these gradients, *then* adds the
   penalty's analytic gradient ``2λ Î (θ − θ_old)`` to ``p.grad`` in place. The importance therefore
   never sees the penalty's gradient (the reference's order: update after the main backward, before
   the penalty's backward), and no second backward is needed (it would clash with DDP's hooks).

Every step accumulates importance, step 0 included, so these methods train their own step 0
(``step0 = None``: a plain-CE step 0 is never shared with them, docs/methods.md §4.2). At step ``t ≥ 1``
a step ``t−1`` checkpoint without importance (a foreign step 0, e.g. FT's) raises
:class:`MissingImportanceError` instead of training with the penalty silently off (§6 item 16).

State: the tracker's ``state_dict`` under ``"tracker"``, saved by the engine in every epoch
checkpoint (mid-step, resumed with ``resume_step``) and step checkpoint (finished, loaded by the next
step). The old parameters are read from the engine's frozen old model (``uses_old_model``); its
forward is never run (``old_forward = False``).

DDP: the gradients read in ``after_backward`` are already averaged across ranks, so every rank
computes the same update and nothing is communicated per iteration. At the end of a step the
accumulators are averaged across ranks once (``all_reduce_`` with ``ctx.all_reduce_sum_`` and
``ctx.world_size``: the tracker never calls torch.distributed itself) before the step's importance is
finalised, a cheap guard against any rank drifting. (The reference updates on rank 0 only, §3.5,
which yields the same values.)

fp16 AMP: an iteration whose gradients overflowed (the GradScaler skips its optimiser step) leaves
the importance untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from sats.methods._importance_trackers import ImportanceTracker, build_importance_tracker
from sats.methods.base import Batch, CEParams, Method, StepContext, check_weight

NamedParameters = List[Tuple[str, torch.nn.Parameter]]


class MissingImportanceError(RuntimeError):
    """A step ``t ≥ 1`` of EWC/RW/PI found no importance from step ``t−1`` (docs/methods.md §6 item 16)."""


@dataclass
class ImportanceParams(CEParams):
    lambda_reg: float = 100.0  # λ: weight of the quadratic penalty (reference preset)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_weight("lambda_reg", self.lambda_reg)


@dataclass
class EMAParams(ImportanceParams):
    alpha: float = 0.9  # EMA weight of the newest squared gradient: F ← α g² + (1 − α) F

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha: must be in [0, 1], got {self.alpha!r}")


def gradients_finite(named_params: NamedParameters) -> bool:
    """Whether every existing ``p.grad`` is finite (one fused norm, one device sync)."""
    grads = [p.grad for _, p in named_params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)))


class ImportanceMethod(Method):
    """``L = CE + λ · Σ_k Î_k (θ_k − θ_k^old)²``; terms ``ce`` and ``<name>`` (detached, logged only).

    Subclasses set ``name``, ``Params`` and ``tracker_kind`` and pass their tracker hyper-parameters
    through :meth:`tracker_kwargs`.
    """

    Params = ImportanceParams
    uses_old_model = True
    old_forward = False  # only the old weights are read
    step0 = None  # importance accumulates at step 0: never share a plain-CE step 0
    tracker_kind: ClassVar[str] = ""

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.tracker: ImportanceTracker = self._new_tracker()
        self._params: NamedParameters = []  # the trainable parameters of the step in progress

    def tracker_kwargs(self) -> Dict[str, Any]:
        """Constructor arguments of the tracker (its hyper-parameters, from ``self.params``)."""
        return {}

    def _new_tracker(self) -> ImportanceTracker:
        return build_importance_tracker(self.tracker_kind, **self.tracker_kwargs())

    # -- hooks -----------------------------------------------------------------------------------
    def begin_step(self, ctx: StepContext) -> None:
        """Start (or, after an epoch checkpoint, continue) the step's importance tracking.

        Raises:
            MissingImportanceError: at step ``t ≥ 1`` when the step ``t−1`` state holds no importance.
        """
        self._params = [(n, p) for n, p in ctx.model.named_parameters() if p.requires_grad]
        resumed = ctx.iteration > 0  # the engine restored an epoch checkpoint of this step
        old_params = None
        if ctx.step > 0:
            if ctx.old_model is None:
                raise RuntimeError(f"method {self.name!r}, step {ctx.step}: the engine passed no old model "
                                   "(uses_old_model is set)")
            old_params = dict(ctx.old_model.named_parameters())
        if resumed:
            if self.tracker.phase != "running":
                raise RuntimeError(f"method {self.name!r}, step {ctx.step}: resuming at iteration {ctx.iteration} "
                                   f"but the epoch checkpoint's importance state is {self.tracker.phase!r}, "
                                   "not mid-step")
            self.tracker.resume_step(self._params, old_params)
            return
        if ctx.step == 0:
            self.tracker = self._new_tracker()
        elif self.tracker.phase != "ended":
            found = "empty" if self.tracker.phase == "fresh" else f"mid-step ({self.tracker.phase!r})"
            raise MissingImportanceError(
                f"method {self.name!r}, step {ctx.step}: the step {ctx.step - 1} checkpoint in {ctx.run_dir} holds "
                f"no finished {self.tracker_kind!r} importance (its method state is {found}, e.g. a step-0 "
                "checkpoint of a plain-CE method such as FT), so the penalty would be silently off "
                f"(docs/methods.md §6 item 16). Train step {ctx.step - 1} with method {self.name!r} instead.")
        self.tracker.begin_step(self._params, old_params)
        if ctx.step > 0 and not self.tracker.penalty_active:
            raise MissingImportanceError(f"method {self.name!r}, step {ctx.step}: no parameter of the old model "
                                         "has an importance; the penalty would be off")

    def loss(self, batch: Batch, out, old_out: Optional[object], ctx: StepContext) -> Dict[str, Tensor]:
        terms = self.ce_terms(batch, out)
        if self.tracker.penalty_active:
            # value only: the gradient is added analytically in after_backward, after the importance update
            # (from the same √Î·(θ − θ_old), computed once per iteration)
            with torch.autocast(ctx.device.type, enabled=False):
                terms[self.name] = self.params.lambda_reg * self.tracker.penalty_value(self._params)
        return terms

    def after_backward(self, ctx: StepContext) -> None:
        """Update the importance from the main-loss gradients, then add ``2λÎ(θ − θ_old)`` to ``p.grad``."""
        if ctx.grad_scaled and not gradients_finite(self._params):
            return  # overflow: the GradScaler skips this optimiser step; keep inf/NaN out of the importance
        self.tracker.update(self._params)
        if self.tracker.penalty_active:
            self.tracker.add_penalty_grad_(self._params, self.params.lambda_reg)

    def end_step(self, ctx: StepContext) -> None:
        """Average the accumulators across DDP ranks, then finalise this step's importance."""
        self.tracker.all_reduce_(ctx.all_reduce_sum_, ctx.world_size)
        self.tracker.end_step(self._params)
        self._params = []

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore a checkpoint's method state; an empty state (a foreign checkpoint) resets the tracker,
        and the next step > 0 then raises :class:`MissingImportanceError` in :meth:`begin_step`."""
        tracker = self._new_tracker()
        if state:
            unknown = sorted(set(state) - {"tracker"})
            if unknown:
                raise ValueError(f"method {self.name!r}: unexpected method-state keys {unknown} in the checkpoint")
            saved = state["tracker"]
            if saved.get("name") != self.tracker_kind:
                raise ValueError(f"method {self.name!r}: the checkpoint holds {saved.get('name')!r} importance, "
                                 f"not {self.tracker_kind!r}")
            for key, value in self.tracker_kwargs().items():
                if key in saved and saved[key] != value:
                    raise ValueError(f"method {self.name!r}: the checkpoint's importance was accumulated with "
                                     f"{key}={saved[key]!r} but method.{key}={value!r}")
            tracker.load_state_dict(saved)
        self.tracker = tracker
