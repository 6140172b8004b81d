"""Small torchrun helpers: process-group setup, collectives that are no-ops single-process, seeding.

Launch with ``torchrun --nproc_per_node=N ...``: torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. Without them every helper works in single-process mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "barrier",
    "broadcast_object",
    "cleanup",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main",
    "set_deterministic",
    "unwrap",
]

T = TypeVar("T")
_BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    backend: str | None  # None when single-process (no process group)


def is_distributed() -> bool:
    """True when a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 or when single-process."""
    return get_rank() == 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def _cuda_device(local_rank: int) -> torch.device:
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(backend: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the process group from torchrun's environment; single-process when absent.

    Args:
        backend: "auto" (nccl with CUDA, else gloo), "nccl" or "gloo".
        timeout_s: collective timeout; a dead or stuck rank makes the others fail after this
            long instead of hanging forever (NCCL async error handling is enabled for it).
    Returns:
        ``DistInfo``; on CUDA the current device is set to ``cuda:LOCAL_RANK``.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"init_distributed: backend must be one of {_BACKENDS}, got {backend!r}")
    use_cuda = torch.cuda.is_available() if backend == "auto" else backend == "nccl"
    chosen = "nccl" if use_cuda else "gloo"
    if is_distributed():  # already initialised (e.g. by a caller): describe it
        group_backend = str(dist.get_backend())
        local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
        device = _cuda_device(local_rank) if "nccl" in group_backend else torch.device("cpu")
        rank = dist.get_rank()
        return DistInfo(rank, dist.get_world_size(), local_rank, device, rank == 0, group_backend)
    present = [name for name in ("RANK", "WORLD_SIZE") if name in os.environ]
    if not present:
        device = _cuda_device(0) if use_cuda else torch.device("cpu")
        return DistInfo(0, 1, 0, device, True, None)
    missing = [n for n in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if n not in os.environ]
    if missing:
        raise RuntimeError(f"init_distributed: {present} set but {missing} missing; launch with torchrun")
    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"init_distributed: RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    if timeout_s <= 0:
        raise ValueError(f"init_distributed: timeout_s must be > 0, got {timeout_s}")
    if chosen == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        device = _cuda_device(local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(
        backend=chosen, init_method="env://", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    return DistInfo(rank, world_size, local_rank, device, rank == 0, chosen)


def barrier() -> None:
    """Wait for every rank (no-op single-process)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (no-op single-process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average a floating-point ``tensor`` over ranks in place and return it."""
    if not tensor.is_floating_point():
        raise TypeError(f"all_reduce_mean_: needs a floating-point tensor, got {tensor.dtype}")
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_agree(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True only if ``flag`` holds on every rank, so that all ranks take the same branch (single-process: ``flag``)."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_object(obj: T, src: int = 0) -> T:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects; no-op single-process)."""
    if not is_distributed():
        return obj
    holder: list[Any] = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if is_distributed():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def set_deterministic(on: bool) -> None:
    """Toggle deterministic kernels.

    On: ``torch.use_deterministic_algorithms(True, warn_only=True)`` (ops without a
    deterministic kernel, e.g. bilinear-upsampling backward on CUDA, warn instead of failing),
    cuDNN deterministic with benchmarking off, and ``CUBLAS_WORKSPACE_CONFIG`` set if unset
    (effective only before the first cuBLAS call). Off: restores the non-deterministic defaults.
    """
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    elif torch.are_deterministic_algorithms_enabled():  # (toggling imports torch._inductor: ~4 s)
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
