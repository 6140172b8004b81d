"""Optimiser (with the method's parameter groups), poly learning-rate schedule and mixed-precision settings
(docs/methods.md §4)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ContextManager, Iterable, List, Optional, Sequence, Union

import torch

from sats.config import TrainConfig
from sats.methods.base import Method, ParamGroup
from sats.models.segmenter import norm_layers


def optimizer_groups(method: Method, model: torch.nn.Module, step: int) -> List[ParamGroup]:
    """The method's parameter groups of ``step`` (``method.param_groups``, after ``method.prepare_model``),
    without the parameters of the normalisation layers when the method freezes them (``"norm" in
    method.frozen_at(step)``: their affine parameters then also get ``requires_grad = False``); empty groups
    are dropped."""
    method.prepare_model(model, step)
    groups = method.param_groups(model, step)
    if "norm" in method.frozen_at(step):
        frozen = [p for layer in norm_layers(model) for p in layer.parameters(recurse=False)]
        for parameter in frozen:
            parameter.requires_grad_(False)
        ids = {id(p) for p in frozen}
        groups = [dataclasses.replace(g, params=[p for p in g.params if id(p) not in ids]) for g in groups]
    return [g for g in groups if g.params]


def build_optimizer(params: Union[Iterable[torch.nn.Parameter], Sequence[ParamGroup]], cfg: TrainConfig,
                    lr: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (the paper) or AdamW over ``params``: parameters (one group, weight decay on
    every parameter) or :class:`~sats.methods.base.ParamGroup` s (each at ``lr · lr_mult`` with its weight decay,
    ``train.weight_decay`` when it sets none). One default group is the same optimiser as plain parameters."""
    items = list(params)
    if items and all(isinstance(g, ParamGroup) for g in items):
        if len(items) == 1 and items[0].lr_mult == 1.0 and items[0].weight_decay is None:
            items = list(items[0].params)
        else:
            items = [{"params": list(g.params), "lr": lr * g.lr_mult,
                      "weight_decay": cfg.weight_decay if g.weight_decay is None else g.weight_decay}
                     for g in items]  # type: ignore[union-attr]
    if not items or (isinstance(items[0], dict) and not any(g["params"] for g in items)):  # type: ignore[index]
        raise ValueError("the method hands no trainable parameter to the optimiser")
    groups: Any = items
    kernels = {"auto": {}, "foreach": {"foreach": True}, "fused": {"fused": True}, "loop": {"foreach": False}}
    impl = kernels[cfg.optimizer_impl]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, **impl)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, **impl)


def poly_lambda(total_iters: int, power: float, warmup_iters: int = 0, warmup_fraction: float = 0.0,
                warmup_factor: float = 0.001) -> Callable[[int], float]:
    """Multiplier of the base lr at iteration ``i`` of ``I = total_iters``.

    * ``warmup_iters = W > 0``: ``(i + 1) / W`` for ``i < W``, then ``(1 - i / I) ** power``;
    * ``warmup_fraction = f > 0`` (DKD's/STAR's ADE schedule): ``(w (1 − α) + α) · (1 − i / I) ** power`` with
      ``α = i / (f·I)`` and ``w = warmup_factor`` for ``i < f·I``, then the poly factor alone;
    * neither: ``(1 - i / I) ** power``.
    """
    total = max(1, total_iters)
    ramp = warmup_fraction * total

    def factor(i: int) -> float:
        if warmup_iters > 0 and i < warmup_iters:
            return (i + 1) / warmup_iters
        poly = max(0.0, 1.0 - i / total) ** power
        if ramp > 0 and i < ramp:
            alpha = i / ramp
            return (warmup_factor * (1 - alpha) + alpha) * poly
        return poly

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(total_iters, cfg.poly_power, cfg.warmup_iters,
                                                                     cfg.warmup_fraction, cfg.warmup_factor))


def amp_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of the run, or None. fp16 is refused on CPU (no GradScaler support there);
    ``auto`` is fp16 on CUDA (the reference's apex O1) and off elsewhere."""
    if cfg.amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    if cfg.amp == "off":
        return None
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs CUDA; use train.amp=bf16 on CPU")
    return torch.bfloat16 if cfg.amp == "bf16" else torch.float16


def configure_cuda_math(cfg: TrainConfig, device: torch.device) -> None:
    """Apply ``train.tf32`` to CUDA's float32 matrix products and cuDNN convolutions (no-op elsewhere)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def autocast_factory(device: torch.device, dtype: Optional[torch.dtype]) -> Callable[[], ContextManager]:
    """A zero-argument context-manager factory applying the run's autocast setting (same code on CPU/CUDA)."""
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def build_grad_scaler(device: torch.device, dtype: Optional[torch.dtype]) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
