"""Optimiser, poly learning-rate schedule and mixed-precision settings (docs/methods.md §4)."""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Optional

import torch

from sats.config import TrainConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (the paper) or AdamW; one group, weight decay on every parameter."""
    params = list(params)
    if not params:
        raise ValueError("the method hands no trainable parameter to the optimiser")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def poly_lambda(total_iters: int, power: float, warmup_iters: int = 0) -> Callable[[int], float]:
    """Multiplier of the base lr at iteration ``i``: linear warm-up, then ``(1 - i / I) ** power``."""
    total = max(1, total_iters)

    def factor(i: int) -> float:
        if warmup_iters > 0 and i < warmup_iters:
            return (i + 1) / warmup_iters
        return max(0.0, 1.0 - i / total) ** power

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_iters: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(total_iters, cfg.poly_power, cfg.warmup_iters))


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
