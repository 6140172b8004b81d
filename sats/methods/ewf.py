"""EWF (Endpoints Weight Fusion, CVPR 2023): an add-on fusing the two endpoints of every step (docs/methods.md §3.17).

At the end of every step t ≥ 1, every tensor of the step t−1 model θ̂_{t−1} (parameters and, by default, the
BatchNorm running statistics) becomes ``(1 − α_t)·θ̂_{t−1} + α_t·θ_t`` in the trained model, with
``α_t = sqrt(|C^t| / K_t)`` (background counted in K_t). The new head keeps its trained value; integer buffers
(``num_batches_tracked``) keep the new value. The fused model is what the engine tests, saves, and starts the next
step from (and distils towards). During the step the old heads (background row included) are frozen, as in every
released script (``freeze_old_heads``). EWF adds no loss term: ``mib+ewf`` reports MiB's terms.

Composes with any base method: ``method: {name: mib, addons: [ewf]}`` or ``--method MiB+EWF``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor

from sats.methods.addon import AddOn, freeze_old_heads, register_addon
from sats.methods.base import Method, StepContext

log = logging.getLogger("sats")


@dataclass
class EWFParams:
    freeze_old_heads: bool = True  # the old heads get no update during a step t ≥ 1 (reference --fix_pre_cls)
    fuse_buffers: bool = True  # BatchNorm running mean/var are fused too (reference); false: keep the new ones
    #: the code's unpublished ``--threshold_choice`` variant: only the entries that moved most (this fraction of
    #: all, ranked over every tensor) are fused, the others keep the new value; None: plain fusion (every script)
    threshold_fraction: Optional[float] = None
    #: also test the trained, unfused model before the fusion (one more test pass per step; logged as
    #: ``ewf/unfused_test_miou`` and in train.log, for diagnosis: what is recorded is always the fused model)
    evaluate_unfused: bool = False

    def __post_init__(self) -> None:
        if self.threshold_fraction is not None and not 0 < self.threshold_fraction <= 1:
            raise ValueError(f"threshold_fraction: must be in (0, 1] or null, got {self.threshold_fraction!r}")


def fusion_alpha(num_new: int, num_outputs: int) -> float:
    """α_t = sqrt(|C^t| / K_t): the weight of the newly trained endpoint (K_t counts the background)."""
    if not 0 < num_new <= num_outputs:
        raise ValueError(f"fusion needs 0 < |C^t| <= K_t, got |C^t|={num_new}, K_t={num_outputs}")
    return math.sqrt(num_new / num_outputs)


def fuse_states(old: Mapping[str, Tensor], new: Mapping[str, Tensor], alpha: float,
                keep_new: frozenset = frozenset(), threshold_fraction: Optional[float] = None) -> Dict[str, Tensor]:
    """The fused state: ``new`` with every floating tensor named in ``old`` (and not in ``keep_new``) replaced by
    ``(1 − α)·old + α·new`` in float32 (then cast back). Tensors only in ``new`` (the step's head) and integer
    tensors keep the new value. ``threshold_fraction`` f: only the entries whose ``|old − new|`` is among the f
    largest of all fused tensors (ties included) are fused. A tensor of another shape is an error naming it."""
    names = [k for k in old if k in new and k not in keep_new and new[k].is_floating_point()]
    for name in names:
        if old[name].shape != new[name].shape:
            raise ValueError(f"EWF: tensor {name!r} has shape {tuple(old[name].shape)} in the step t-1 model but "
                             f"{tuple(new[name].shape)} in the trained one")
    fused = dict(new)
    tau = None
    if threshold_fraction is not None and names:
        moved = torch.cat([(old[k].float() - new[k].float()).abs().flatten().cpu() for k in names])
        k = max(1, int(threshold_fraction * moved.numel()))
        tau = torch.kthvalue(moved, moved.numel() - k + 1).values  # the k-th largest change
    for name in names:
        a, b = old[name].float().to(new[name].device), new[name].float()
        mixed = torch.lerp(a, b, alpha) if alpha != 1.0 else b
        if tau is not None:
            mixed = torch.where((a - b).abs() < tau.to(b.device), b, mixed)
        fused[name] = mixed.to(new[name].dtype)
    return fused


@register_addon
class EWF(AddOn):
    """Fuse the step t−1 and step t weights at the end of every step t ≥ 1; freeze the old heads during it."""

    name = "ewf"
    label = "EWF"
    Params = EWFParams
    needs_old_model = True

    def prepare_model(self, model: torch.nn.Module, step: int, method: Method) -> None:
        if self.params.freeze_old_heads:
            freeze_old_heads(model, step)

    @torch.no_grad()
    def end_step(self, ctx: StepContext, method: Method) -> None:
        if ctx.step == 0:
            return
        if ctx.old_model is None:
            raise RuntimeError("EWF: no step t-1 model at a step > 0 (needs_old_model is set)")
        alpha = fusion_alpha(len(ctx.task.new_classes(ctx.step)), ctx.num_outputs)
        model = ctx.model
        if self.params.evaluate_unfused:
            if ctx.evaluate is None:
                raise RuntimeError("EWF: ewf.evaluate_unfused needs the engine's evaluation (ctx.evaluate)")
            unfused = ctx.evaluate(model, "test").miou
            ctx.log_scalar("ewf/unfused_test_miou", unfused)
            log.info("EWF step %d: the trained (unfused) model tests at mIoU %.2f; fusing with alpha %.4f",
                     ctx.step, unfused * 100, alpha)
        buffers = frozenset(name for name, _ in model.named_buffers())
        new = model.state_dict()
        fused = fuse_states(ctx.old_model.state_dict(), new, alpha, frozenset() if self.params.fuse_buffers
                            else buffers, self.params.threshold_fraction)
        shifts = [(fused[k].float() - new[k].float()).pow(2).sum() for k in fused if fused[k] is not new[k]]
        moved = float(torch.stack(shifts).sum()) if shifts else 0.0  # one host sync, not one per tensor
        model.load_state_dict(fused)
        ctx.log_scalar("ewf/alpha", alpha)
        ctx.log_scalar("ewf/fusion_shift_l2", math.sqrt(moved))
