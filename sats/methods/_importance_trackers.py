"""Stateful importance trackers of EWC, RW and PI (docs/methods.md §3.5–3.7), for ``sats.methods._importance``.

All three penalise ``λ Σ_k Î_k (θ_k − θ_k^old)²`` over parameters that exist in
the old model (new heads are free), with an importance ``Î`` from the previous
step, min-max normalised per tensor once at the start of the step (the pure
penalty and normalisation are :mod:`sats.losses.importance`).  They differ
in how the importance is accumulated during a step:

* EWC: ``F ← α g² + (1 − α) F`` after every backward, ``F`` starts at ones.
* RW:  ``F`` as EWC, plus a score updated every ``score_interval`` iterations,
  ``s += −g·Δθ / (½ F Δθ² + 1e-8)``; at the end of the step ``s`` is clamped at 0
  and averaged with the previous step's score.  ``Î = F̂ + ŝ``.
* PI:  ``δ += −g·(θ − θ_prev)`` every iteration; at the end of the step
  ``ω = max(0, δ / ((θ − θ_start)² + 1e-20)) + ω_prev``.

Life cycle of a tracker (one object per step, state carried by the checkpoint)::

    tracker = EWCImportance()
    tracker.load_state_dict(state_of_previous_step)      # step t > 0 only
    tracker.begin_step(model.named_parameters(), old_params=dict(old_model.named_parameters()))
    for batch in loader:
        main_loss.backward()                   # gradients unscaled (AMP) before update
        tracker.update(model.named_parameters())          # before the penalty's backward
        (lam * tracker.penalty(model.named_parameters())).backward()
        # or, without a second backward (DDP): tracker.add_penalty_grad_(model.named_parameters(), lam)
        optimizer.step()
    tracker.all_reduce_(ctx.all_reduce_sum_, ctx.world_size)
    tracker.end_step(model.named_parameters())
    checkpoint["regularizer"] = tracker.state_dict()

A checkpoint taken mid-step is resumed with ``load_state_dict`` then
``resume_step``.  ``g`` is the gradient of the main loss (the reference updates
after the main backward, before the penalty's), so with DDP every rank sees the
same averaged gradients; :meth:`ImportanceTracker.all_reduce_` averages the
accumulators across ranks when they may differ, through the sum the step context
provides (a tracker never calls torch.distributed itself).  Pass the parameters
of the unwrapped model (no ``module.`` prefix) so names match the old model's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from sats.losses.importance import NamedParams, minmax_normalize, quadratic_penalty

__all__ = [
    "ImportanceTracker",
    "EWCImportance",
    "RWImportance",
    "PathIntegralImportance",
    "build_importance_tracker",
]

TensorDict = dict[str, Tensor]

RW_EPS = 1e-8
PI_EPS = 1e-20


def _trainable(named_params: NamedParams) -> dict[str, Tensor]:
    return {name: p for name, p in named_params if p.requires_grad}


def _cpu_copy(tensors: Mapping[str, Tensor]) -> TensorDict:
    return {name: t.detach().to("cpu", copy=True) for name, t in tensors.items()}


def _loaded(tensors: Mapping[str, Tensor], device: torch.device | str | None) -> TensorDict:
    return {name: t.detach().to(device=device, copy=True) for name, t in tensors.items()}


def _place_(tensors: TensorDict, params: Mapping[str, Tensor]) -> None:
    """Move every entry to its parameter's device and dtype (no-op when already there)."""
    for name, t in tensors.items():
        if name in params:
            param = params[name]
            if t.shape != param.shape:
                raise ValueError(
                    f"importance state for {name!r} has shape {tuple(t.shape)}, "
                    f"the parameter has {tuple(param.shape)}"
                )
            tensors[name] = t.to(device=param.device, dtype=param.dtype)


class ImportanceTracker:
    """Shared life cycle: ``begin_step`` → ``update``/``penalty`` per iteration → ``end_step``.

    Subclasses hold their accumulators as ``dict[str, Tensor]`` keyed by parameter
    name, in the parameter's dtype and device, updated in place.
    """

    name: ClassVar[str] = "base"
    _PHASES: ClassVar[tuple[str, ...]] = ("fresh", "running", "ended")

    def __init__(self) -> None:
        self.phase = "fresh"
        self.old_params: TensorDict = {}
        self.penalty_importance: TensorDict = {}  # normalised, fixed for the step
        self._roots: TensorDict | None = None  # √Î per parameter (Î ≥ 0), built at first use in a step
        #: (parameter versions, √Î·(θ − θ_old), its sum of squares): shared by the loss value and the gradient
        self._scaled_diff: tuple[tuple, list[Tensor], Tensor] | None = None

    # ------------------------------------------------------------------ subclass hooks
    def _previous_importance(self, names: Iterable[str]) -> TensorDict | None:
        """Normalised importance of the ended step for ``names``; ``None`` if there is none."""
        raise NotImplementedError

    def _start(self, params: Mapping[str, Tensor]) -> None:
        """Allocate / reset the accumulators of the new step."""
        raise NotImplementedError

    def _place_all_(self, params: Mapping[str, Tensor]) -> None:
        """Move the accumulators next to their parameters."""
        raise NotImplementedError

    def _accumulators(self) -> list[Tensor]:
        raise NotImplementedError

    def _tensor_state(self) -> dict[str, TensorDict]:
        raise NotImplementedError

    def _load_tensor_state(self, state: Mapping[str, Any], device: torch.device | str | None) -> None:
        raise NotImplementedError

    def _scalar_state(self) -> dict[str, Any]:
        return {}

    def _load_scalar_state(self, state: Mapping[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ life cycle
    @property
    def penalty_active(self) -> bool:
        """Whether :meth:`penalty` is non-zero this step (old model and previous importance exist)."""
        return bool(self.penalty_importance)

    def begin_step(self, named_params: NamedParams, old_params: Mapping[str, Tensor] | None = None) -> None:
        """Start a step: fix the normalised previous importance and reset the accumulators.

        Args:
            named_params: the model's ``named_parameters()``; only trainable ones are tracked.
            old_params: the old model's parameters by name (``None`` at step 0).
        """
        if self.phase == "running":
            raise RuntimeError(
                f"{type(self).__name__}.begin_step: the state is mid-step "
                "(end_step was not called); use resume_step to continue it"
            )
        params = _trainable(named_params)
        self._set_old_params(params, old_params)
        self._place_all_(params)
        self.penalty_importance = {}
        self._forget_penalty_cache()
        if self.old_params:
            names = [name for name in params if name in self.old_params]
            previous = self._previous_importance(names) if self.phase == "ended" else None
            if previous is None:
                warnings.warn(
                    f"{type(self).__name__}: an old model is given but there is no importance "
                    "from the previous step, so the penalty is off for this step (docs/methods.md §6 item 16)",
                    stacklevel=2,
                )
            else:
                self.penalty_importance = previous
        self._start(params)
        self.phase = "running"

    def resume_step(self, named_params: NamedParams, old_params: Mapping[str, Tensor] | None = None) -> None:
        """Continue a step from a mid-step :meth:`state_dict` (after :meth:`load_state_dict`)."""
        if self.phase != "running":
            raise RuntimeError(
                f"{type(self).__name__}.resume_step: the loaded state is {self.phase!r}, not mid-step"
            )
        params = _trainable(named_params)
        self._set_old_params(params, old_params)
        _place_(self.penalty_importance, params)
        self._place_all_(params)
        self._forget_penalty_cache()

    def _set_old_params(self, params: Mapping[str, Tensor], old_params: Mapping[str, Tensor] | None) -> None:
        self.old_params = {}
        for name, old in (old_params or {}).items():
            if name not in params:
                continue
            if old.shape != params[name].shape:
                raise ValueError(
                    f"old parameter {name!r} has shape {tuple(old.shape)}, "
                    f"the new one {tuple(params[name].shape)}"
                )
            self.old_params[name] = old.detach()

    @staticmethod
    def _with_grads(named_params: NamedParams, tracked: Mapping[str, Tensor]) -> list[tuple[str, Tensor, Tensor]]:
        """``(name, θ, g)`` of the parameters named in ``tracked`` that have a gradient."""
        return [(name, p.detach(), p.grad) for name, p in named_params if p.grad is not None and name in tracked]

    def _require_running(self, what: str) -> None:
        if self.phase != "running":
            raise RuntimeError(f"{type(self).__name__}.{what}: call begin_step first (phase is {self.phase!r})")

    def update(self, named_params: NamedParams) -> None:
        """Accumulate from the current gradients (after the main loss's backward)."""
        raise NotImplementedError

    def end_step(self, named_params: NamedParams) -> None:
        """Finalise this step's importance (kept in :meth:`state_dict` for the next step)."""
        raise NotImplementedError

    def penalty(self, named_params: NamedParams) -> Tensor:
        """``Σ_k Î_k (θ_k − θ_k^old)²`` with the previous step's normalised importance (unweighted),
        differentiable (the autograd path; training uses :meth:`penalty_value` + :meth:`add_penalty_grad_`)."""
        if not self.penalty_active:
            first = next(iter(named_params), None)
            return torch.zeros((), device=None if first is None else first[1].device)
        return quadratic_penalty(named_params, self.old_params, self.penalty_importance)

    # -- the training path: a few multi-tensor (foreach) kernels per iteration, not ~10 per tensor
    def _forget_penalty_cache(self) -> None:
        self._roots = None
        self._scaled_diff = None

    def _penalty_operands(self, named_params: NamedParams) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Aligned lists of the penalised parameters, their old values and ``√Î``."""
        if self._roots is None:
            self._roots = {name: imp.clamp(min=0).sqrt() for name, imp in self.penalty_importance.items()}
        params, olds, roots = [], [], []
        for name, param in named_params:
            if param.requires_grad and name in self.old_params and name in self._roots:
                params.append(param)
                olds.append(self.old_params[name])
                roots.append(self._roots[name])
        return params, olds, roots

    def _scaled_differences(self, params: list[Tensor], olds: list[Tensor], roots: list[Tensor],
                            device: torch.device | None) -> tuple[list[Tensor], Tensor]:
        """``√Î·(θ − θ_old)`` per parameter (detached) and its total sum of squares (the penalty), reused
        until a parameter changes (its version counter or storage)."""
        key = tuple((id(p), p._version, p.data_ptr()) for p in params)
        if self._scaled_diff is not None and self._scaled_diff[0] == key:
            return self._scaled_diff[1], self._scaled_diff[2]
        with torch.no_grad():
            scaled = torch._foreach_sub([p.detach() for p in params], olds)
            torch._foreach_mul_(scaled, roots)
            value = (torch.stack(torch._foreach_norm(scaled)).square().sum() if scaled
                     else torch.zeros((), device=device))
        self._scaled_diff = (key, scaled, value)
        return scaled, value

    def _penalty_pass(self, named_params: NamedParams) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor]:
        """(penalised parameters, ``√Î``, ``√Î·(θ − θ_old)``, the penalty value); empty lists and a
        zero value while the penalty is off."""
        named_params = list(named_params)
        device = named_params[0][1].device if named_params else None
        if not self.penalty_active:
            return [], [], [], torch.zeros((), device=device)
        params, olds, roots = self._penalty_operands(named_params)
        scaled, value = self._scaled_differences(params, olds, roots, device)
        return params, roots, scaled, value

    def penalty_value(self, named_params: NamedParams) -> Tensor:
        """:meth:`penalty`'s value, detached: ``Σ_k ‖√Î_k·(θ_k − θ_k^old)‖²`` (shared with the gradient)."""
        return self._penalty_pass(named_params)[3]

    def add_penalty_grad_(self, named_params: NamedParams, weight: float) -> Tensor:
        """Add ``weight · ∂penalty/∂θ = 2·weight·Î·(θ − θ_old)`` to ``p.grad`` in place.

        The analytic alternative to ``(weight * penalty).backward()``: no second
        autograd pass, so it also works after a DDP backward (whose gradient hooks
        fire only once per iteration).  Call it after :meth:`update`.  Returns the
        unweighted penalty value (detached) for logging; the ``√Î·(θ − θ_old)`` of
        the last :meth:`penalty_value` call is reused when no parameter changed since.
        """
        params, roots, scaled, value = self._penalty_pass(named_params)
        if params:
            with torch.no_grad():
                for param in params:
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                torch._foreach_addcmul_([p.grad for p in params], scaled, roots, value=2.0 * weight)
        self._scaled_diff = None  # used once: the optimiser step changes θ next
        return value

    def all_reduce_(self, all_reduce_sum_: Callable[[Tensor], Tensor], world_size: int) -> None:
        """Average the accumulators across DDP ranks: ``all_reduce_sum_`` (in place, the step context's
        ``ctx.all_reduce_sum_``), then ``/ world_size`` (``ctx.world_size``); nothing to do for one process."""
        if world_size == 1:
            return
        for t in self._accumulators():
            all_reduce_sum_(t)
            t.div_(world_size)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue (tensors copied to CPU)."""
        state: dict[str, Any] = {"name": self.name, "phase": self.phase, **self._scalar_state()}
        for key, tensors in self._tensor_state().items():
            state[key] = _cpu_copy(tensors)
        if self.phase == "running":
            state["penalty_importance"] = _cpu_copy(self.penalty_importance)
        return state

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
        """Restore :meth:`state_dict` output; tensors go to ``device`` (default: stay where they
        are) and are moved next to their parameters by ``begin_step`` / ``resume_step``."""
        if state.get("name") != self.name:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: state is for {state.get('name')!r}, not {self.name!r}"
            )
        phase = state.get("phase")
        if phase not in self._PHASES:
            raise ValueError(f"{type(self).__name__}.load_state_dict: unknown phase {phase!r}")
        self._load_scalar_state(state)
        self._load_tensor_state(state, device)
        self.penalty_importance = _loaded(state.get("penalty_importance", {}), device)
        self._forget_penalty_cache()
        self.phase = phase


class EWCImportance(ImportanceTracker):
    """EWC (§3.5): online EMA of squared gradients ``F ← α g² + (1 − α) F``, ``F₀ = 1``.

    ``F`` continues across steps; parameters first seen in a step start at ones.
    """

    name = "ewc"

    def __init__(self, alpha: float = 0.9) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"EWC alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.fisher: TensorDict = {}

    def _previous_importance(self, names: Iterable[str]) -> TensorDict | None:
        if not self.fisher:
            return None
        return {name: minmax_normalize(self._need(self.fisher, name, "fisher")) for name in names}

    def _need(self, tensors: TensorDict, name: str, what: str) -> Tensor:
        if name not in tensors:
            raise KeyError(f"{type(self).__name__}: no previous {what} for old parameter {name!r}")
        return tensors[name]

    def _start(self, params: Mapping[str, Tensor]) -> None:
        _place_(self.fisher, params)
        for name, param in params.items():
            if name not in self.fisher:
                self.fisher[name] = torch.ones_like(param, memory_format=torch.contiguous_format)

    def _place_all_(self, params: Mapping[str, Tensor]) -> None:
        _place_(self.fisher, params)

    def _update_fisher_(self, fisher: list[Tensor], grads: list[Tensor]) -> None:
        """``F ← α g² + (1 − α) F`` for aligned lists (two multi-tensor kernels)."""
        if fisher:
            torch._foreach_mul_(fisher, 1.0 - self.alpha)
            torch._foreach_addcmul_(fisher, grads, grads, value=self.alpha)

    def update(self, named_params: NamedParams) -> None:
        self._require_running("update")
        tracked = self._with_grads(named_params, self.fisher)
        with torch.no_grad():
            self._update_fisher_([self.fisher[name] for name, _, _ in tracked], [g for _, _, g in tracked])

    def end_step(self, named_params: NamedParams) -> None:
        self._require_running("end_step")
        self.phase = "ended"

    def _accumulators(self) -> list[Tensor]:
        return list(self.fisher.values())

    def _scalar_state(self) -> dict[str, Any]:
        return {"alpha": self.alpha}

    def _load_scalar_state(self, state: Mapping[str, Any]) -> None:
        self.alpha = float(state["alpha"])

    def _tensor_state(self) -> dict[str, TensorDict]:
        return {"fisher": self.fisher}

    def _load_tensor_state(self, state: Mapping[str, Any], device: torch.device | str | None) -> None:
        self.fisher = _loaded(state["fisher"], device)


class RWImportance(EWCImportance):
    """Riemannian Walk (§3.6): EWC's ``F`` plus a path score ``s``.

    Every ``score_interval``-th call of :meth:`update` (the 1st, 11th, 21st, …):
    ``s += −g·Δθ / (½ F Δθ² + 1e-8)`` with ``Δθ = θ − θ_snapshot``, then the
    snapshot is retaken (the first call only takes it).  ``F`` used there is the
    value before this iteration's EMA update, as in the reference.
    :meth:`end_step`: ``s ← max(s, 0)``, averaged with the previous step's score
    where one exists.  Penalty importance: ``minmax(F) + minmax(s)``.
    """

    name = "rw"

    def __init__(self, alpha: float = 0.9, score_interval: int = 10) -> None:
        super().__init__(alpha)
        if score_interval < 1:
            raise ValueError(f"RW score_interval must be >= 1, got {score_interval}")
        self.score_interval = score_interval
        self.score: TensorDict = {}  # running sum during a step, the final score after end_step
        self.score_prev: TensorDict = {}  # previous step's final score (during a step)
        self.snapshot: TensorDict = {}
        self.count = 0

    def _previous_importance(self, names: Iterable[str]) -> TensorDict | None:
        if not self.fisher or not self.score:
            return None
        return {
            name: minmax_normalize(self._need(self.fisher, name, "fisher"))
            + minmax_normalize(self._need(self.score, name, "score"))
            for name in names
        }

    def _start(self, params: Mapping[str, Tensor]) -> None:
        super()._start(params)
        self.score_prev = self.score
        _place_(self.score_prev, params)
        self.score = {
            name: torch.zeros_like(param, memory_format=torch.contiguous_format) for name, param in params.items()
        }
        self.snapshot = {}
        self.count = 0

    def _place_all_(self, params: Mapping[str, Tensor]) -> None:
        for tensors in (self.fisher, self.score, self.score_prev, self.snapshot):
            _place_(tensors, params)

    def update(self, named_params: NamedParams) -> None:
        self._require_running("update")
        tracked = self._with_grads(named_params, self.fisher)
        with torch.no_grad():
            if self.count % self.score_interval == 0:
                candidates = [item for item in tracked if item[0] in self.score]
                self._update_score_([item for item in candidates if item[0] in self.snapshot])
                for name, theta, _ in candidates:
                    if name not in self.snapshot:  # the first scoring call only takes the snapshot
                        self.snapshot[name] = theta.clone(memory_format=torch.contiguous_format)
            self._update_fisher_([self.fisher[name] for name, _, _ in tracked], [g for _, _, g in tracked])
        self.count += 1

    def _update_score_(self, scored: list[tuple[str, Tensor, Tensor]]) -> None:
        """``s −= g·Δθ / (½ F Δθ² + ε)``, ``Δθ = θ − θ_snapshot``, then retake the snapshots (F before its update)."""
        if not scored:
            return
        names = [name for name, _, _ in scored]
        thetas, grads = [t for _, t, _ in scored], [g for _, _, g in scored]
        snapshots = [self.snapshot[name] for name in names]
        delta = torch._foreach_sub(thetas, snapshots)
        denominator = torch._foreach_mul(delta, delta)
        torch._foreach_mul_(denominator, [self.fisher[name] for name in names])
        torch._foreach_mul_(denominator, 0.5)
        torch._foreach_add_(denominator, RW_EPS)
        torch._foreach_mul_(delta, grads)
        torch._foreach_div_(delta, denominator)
        torch._foreach_sub_([self.score[name] for name in names], delta)
        torch._foreach_copy_(snapshots, thetas)

    def end_step(self, named_params: NamedParams) -> None:
        self._require_running("end_step")
        with torch.no_grad():
            for name, score in self.score.items():
                score.masked_fill_(~(score >= 0), 0.0)
                previous = self.score_prev.get(name)
                if previous is not None:
                    score.add_(previous.to(score)).mul_(0.5)
        self.score_prev = {}
        self.snapshot = {}
        self.phase = "ended"

    def _accumulators(self) -> list[Tensor]:
        return list(self.fisher.values()) + list(self.score.values())

    def _scalar_state(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "score_interval": self.score_interval, "count": self.count}

    def _load_scalar_state(self, state: Mapping[str, Any]) -> None:
        self.alpha = float(state["alpha"])
        self.score_interval = int(state["score_interval"])
        self.count = int(state["count"])

    def _tensor_state(self) -> dict[str, TensorDict]:
        return {
            "fisher": self.fisher,
            "score": self.score,
            "score_prev": self.score_prev,
            "snapshot": self.snapshot,
        }

    def _load_tensor_state(self, state: Mapping[str, Any], device: torch.device | str | None) -> None:
        self.fisher = _loaded(state["fisher"], device)
        self.score = _loaded(state["score"], device)
        self.score_prev = _loaded(state["score_prev"], device)
        self.snapshot = _loaded(state["snapshot"], device)


class PathIntegralImportance(ImportanceTracker):
    """Path Integral / Synaptic Intelligence (§3.7).

    Every :meth:`update` after the first: ``δ += −g·(θ − θ_prev)``, then
    ``θ_prev ← θ`` (the first call only takes ``θ_prev``).  :meth:`end_step`:
    ``ω = max(0, δ / ((θ − θ_start)² + 1e-20)) + ω_prev``, where ``θ_start`` is the
    old model's value, or for parameters without one (new heads, every parameter at
    step 0) the value at ``begin_step``.  Penalty importance: ``minmax(ω_prev)``.
    """

    name = "pi"

    def __init__(self) -> None:
        super().__init__()
        self.delta: TensorDict = {}
        self.omega: TensorDict = {}  # previous step's ω during a step, this step's after end_step
        self.theta_prev: TensorDict = {}
        self.start_new: TensorDict = {}  # θ_start of parameters the old model lacks

    def _previous_importance(self, names: Iterable[str]) -> TensorDict | None:
        if not self.omega:
            return None
        result = {}
        for name in names:
            if name not in self.omega:
                raise KeyError(f"PathIntegralImportance: no previous omega for old parameter {name!r}")
            result[name] = minmax_normalize(self.omega[name])
        return result

    def _start(self, params: Mapping[str, Tensor]) -> None:
        _place_(self.omega, params)
        self.delta = {
            name: torch.zeros_like(param, memory_format=torch.contiguous_format) for name, param in params.items()
        }
        self.theta_prev = {}
        self.start_new = {
            name: param.detach().clone(memory_format=torch.contiguous_format)
            for name, param in params.items()
            if name not in self.old_params
        }

    def _place_all_(self, params: Mapping[str, Tensor]) -> None:
        for tensors in (self.delta, self.omega, self.theta_prev, self.start_new):
            _place_(tensors, params)

    def _theta_start(self, name: str) -> Tensor:
        if name in self.old_params:
            return self.old_params[name]
        if name in self.start_new:
            return self.start_new[name]
        raise KeyError(f"PathIntegralImportance: no starting value for parameter {name!r}")

    def update(self, named_params: NamedParams) -> None:
        self._require_running("update")
        tracked = self._with_grads(named_params, self.delta)
        with torch.no_grad():
            walked = [item for item in tracked if item[0] in self.theta_prev]
            for name, theta, _ in tracked:
                if name not in self.theta_prev:  # the first call only takes θ_prev
                    self.theta_prev[name] = theta.clone(memory_format=torch.contiguous_format)
            if walked:
                previous = [self.theta_prev[name] for name, _, _ in walked]
                thetas = [theta for _, theta, _ in walked]
                torch._foreach_sub_(previous, thetas)  # θ_prev − θ, in the snapshot buffers
                torch._foreach_addcmul_([self.delta[name] for name, _, _ in walked], [g for _, _, g in walked],
                                        previous)  # δ += −g·(θ − θ_prev)
                torch._foreach_copy_(previous, thetas)

    def end_step(self, named_params: NamedParams) -> None:
        self._require_running("end_step")
        params = _trainable(named_params)
        with torch.no_grad():
            for name, delta in self.delta.items():
                if name not in params:
                    raise KeyError(f"PathIntegralImportance.end_step: parameter {name!r} is missing from named_params")
                distance = (params[name].detach() - self._theta_start(name).to(delta)).square_().add_(PI_EPS)
                omega = delta / distance
                omega.masked_fill_(~(omega > 0), 0.0)
                previous = self.omega.get(name)
                if previous is not None:
                    omega.add_(previous.to(omega))
                self.omega[name] = omega
        self.theta_prev = {}
        self.start_new = {}
        self.phase = "ended"

    def _accumulators(self) -> list[Tensor]:
        return list(self.delta.values())

    def _tensor_state(self) -> dict[str, TensorDict]:
        return {
            "delta": self.delta,
            "omega": self.omega,
            "theta_prev": self.theta_prev,
            "start_new": self.start_new,
        }

    def _load_tensor_state(self, state: Mapping[str, Any], device: torch.device | str | None) -> None:
        self.delta = _loaded(state["delta"], device)
        self.omega = _loaded(state["omega"], device)
        self.theta_prev = _loaded(state["theta_prev"], device)
        self.start_new = _loaded(state["start_new"], device)


_TRACKERS: dict[str, type[ImportanceTracker]] = {
    EWCImportance.name: EWCImportance,
    RWImportance.name: RWImportance,
    PathIntegralImportance.name: PathIntegralImportance,
}


def build_importance_tracker(name: str, **kwargs: Any) -> ImportanceTracker:
    """``"ewc"`` | ``"rw"`` | ``"pi"`` → a fresh tracker (kwargs go to its constructor)."""
    if name not in _TRACKERS:
        raise ValueError(f"unknown importance tracker {name!r}; choose from {sorted(_TRACKERS)}")
    return _TRACKERS[name](**kwargs)
