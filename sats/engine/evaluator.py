"""Streaming segmentation metrics: a device-side confusion matrix and the evaluation loop.

The confusion matrix has ground truth in rows and predictions in columns (docs/methods.md §1.7).
Ground-truth values outside ``[0, K)`` (255 in practice) are skipped. Metrics follow the
reference definitions:

* per-class IoU = TP / (TP + FP + FN), reported as NaN (``None`` in JSON) for a class
  without any ground-truth pixel;
* mIoU = mean IoU over the classes with at least one ground-truth pixel, background included;
* pixel accuracy = trace / valid pixels; mean class accuracy = mean recall over classes with
  ground truth; frequency-weighted IoU = sum over classes of (GT share × IoU).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

__all__ = ["ConfusionMatrix", "Metrics", "ShardedEvalSampler", "evaluate_loader"]


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


class ConfusionMatrix:
    """Streaming ``(K, K)`` int64 confusion matrix accumulated on ``device``.

    ``update`` costs one ``torch.bincount`` per batch and adds no host synchronisation of its
    own: invalid pixels are routed to spare bins instead of being masked out (boolean indexing
    would sync). Note that CUDA's ``bincount`` itself reads the input's min/max on the host to
    size its output, one small sync per batch. Two spare
    bins follow the ``K * K`` matrix cells: ``K*K`` counts skipped ground-truth pixels and
    ``K*K + 1`` counts predictions outside ``[0, K)`` on valid pixels, which ``compute``
    reports as an error.
    """

    def __init__(self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"ConfusionMatrix: num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.ignore_index = int(ignore_index)
        k2 = self.num_classes * self.num_classes
        self._skipped_bin = k2
        self._bad_pred_bin = k2 + 1
        self._bins = torch.zeros(k2 + 2, dtype=torch.int64, device=self.device)

    def reset(self) -> None:
        """Zero all counts."""
        self._bins.zero_()

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Accumulate one batch.

        Args:
            pred: ``(B, H, W)`` integer predicted channels in ``[0, K)``.
            target: ``(B, H, W)`` integer ground-truth channels; values outside ``[0, K)``
                (and ``ignore_index``) are skipped.
        """
        if pred.shape != target.shape:
            raise ValueError(f"ConfusionMatrix.update: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point() or pred.is_complex() or target.is_complex():
            raise TypeError(f"ConfusionMatrix.update: pred/target must be integer tensors, got {pred.dtype} / {target.dtype}")
        k = self.num_classes
        t = target.reshape(-1).to(device=self.device, dtype=torch.int64, non_blocking=True)
        p = pred.reshape(-1).to(device=self.device, dtype=torch.int64, non_blocking=True)
        cell = t * k
        cell.add_(p)
        # spare bins instead of boolean indexing: no host sync, no data-dependent shapes
        cell.masked_fill_((p < 0) | (p >= k), self._bad_pred_bin)
        skip = (t < 0) | (t >= k)
        if 0 <= self.ignore_index < k:
            skip |= t == self.ignore_index
        cell.masked_fill_(skip, self._skipped_bin)  # after the bad-prediction fill: skipped wins
        self._bins += torch.bincount(cell, minlength=self._bins.numel())

    def all_reduce_(self) -> "ConfusionMatrix":
        """Sum the counts across ranks in place (no-op unless torch.distributed is initialised).

        Call once, after the last ``update`` on every rank.
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self._bins, op=dist.ReduceOp.SUM)
        return self

    @property
    def matrix(self) -> torch.Tensor:
        """``(K, K)`` int64 counts on ``device`` (rows: ground truth, columns: prediction)."""
        return self._bins[: self._skipped_bin].view(self.num_classes, self.num_classes)

    @property
    def skipped_pixels(self) -> int:
        """Ground-truth pixels skipped (ignore / out of range). Synchronises with the device."""
        return int(self._bins[self._skipped_bin].item())

    def compute(self) -> "Metrics":
        """Metrics of the accumulated counts (one device-to-host copy)."""
        bins = self._bins.cpu().numpy()
        bad = int(bins[self._bad_pred_bin])
        if bad:
            raise ValueError(
                f"ConfusionMatrix: {bad} valid pixels had a prediction outside [0, {self.num_classes}); "
                "the model's output channels do not match num_classes"
            )
        conf = bins[: self._skipped_bin].reshape(self.num_classes, self.num_classes)
        return Metrics.from_confusion(conf)


@dataclass
class Metrics:
    """Segmentation metrics of one confusion matrix. NaN marks "undefined" (no GT pixel)."""

    num_classes: int
    class_iou: list[float]  # (K,) NaN where the class has no ground-truth pixel
    class_acc: list[float]  # (K,) recall, NaN where the class has no ground-truth pixel
    miou: float
    pixel_acc: float
    mean_class_acc: float
    fw_iou: float
    num_pixels: int  # valid (counted) pixels
    confusion: np.ndarray = field(repr=False)  # (K, K) int64, rows GT, columns prediction

    @classmethod
    def from_confusion(cls, confusion: np.ndarray | torch.Tensor) -> "Metrics":
        """Build metrics from a ``(K, K)`` count matrix (rows ground truth, columns prediction)."""
        conf = confusion.detach().cpu().numpy() if isinstance(confusion, torch.Tensor) else np.asarray(confusion)
        if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
            raise ValueError(f"Metrics.from_confusion: expected a square matrix, got shape {conf.shape}")
        conf = conf.astype(np.int64, copy=False)
        counts = conf.astype(np.float64)
        tp = np.diag(counts)
        gt = counts.sum(axis=1)
        predicted = counts.sum(axis=0)
        total = gt.sum()
        has_gt = gt > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(has_gt, tp / (gt + predicted - tp), np.nan)
            acc = np.where(has_gt, tp / gt, np.nan)
        any_gt = bool(has_gt.any())
        miou = float(iou[has_gt].mean()) if any_gt else math.nan
        mean_acc = float(acc[has_gt].mean()) if any_gt else math.nan
        pixel_acc = float(tp.sum() / total) if total > 0 else math.nan
        fw_iou = float((gt[has_gt] / total * iou[has_gt]).sum()) if total > 0 else math.nan
        return cls(
            num_classes=int(conf.shape[0]),
            class_iou=[float(v) for v in iou],
            class_acc=[float(v) for v in acc],
            miou=miou,
            pixel_acc=pixel_acc,
            mean_class_acc=mean_acc,
            fw_iou=fw_iou,
            num_pixels=int(total),
            confusion=conf,
        )

    def group_miou(self, groups: Mapping[str, Sequence[int]]) -> dict[str, float | None]:
        """Mean IoU over each group's channels that have ground truth; ``None`` if none has.

        Args:
            groups: name -> channel list, e.g. ``task.groups(t)`` = {"old": [...], "new": [...], "all": [...]}.
        """
        out: dict[str, float | None] = {}
        for name, channels in groups.items():
            values: list[float] = []
            for c in channels:
                if not 0 <= int(c) < self.num_classes:
                    raise ValueError(f"group {name!r}: channel {c} outside [0, {self.num_classes})")
                if not math.isnan(self.class_iou[int(c)]):
                    values.append(self.class_iou[int(c)])
            out[name] = float(np.mean(values)) if values else None
        return out

    def to_dict(self, include_confusion: bool = False) -> dict[str, Any]:
        """JSON-serialisable dict; NaN becomes ``None``."""
        d: dict[str, Any] = {
            "num_classes": self.num_classes,
            "miou": _none_if_nan(self.miou),
            "pixel_acc": _none_if_nan(self.pixel_acc),
            "mean_class_acc": _none_if_nan(self.mean_class_acc),
            "fw_iou": _none_if_nan(self.fw_iou),
            "num_pixels": self.num_pixels,
            "class_iou": [_none_if_nan(v) for v in self.class_iou],
            "class_acc": [_none_if_nan(v) for v in self.class_acc],
        }
        if include_confusion:
            d["confusion"] = self.confusion.tolist()
        return d


class ShardedEvalSampler(Sampler[int]):
    """Rank ``r`` of ``W`` takes indices ``r, r + W, r + 2W, ...``: no padding, no duplicates.

    Unlike ``DistributedSampler`` (docs/methods.md §6 item 15) every sample is evaluated exactly
    once over all ranks, so the summed confusion matrix equals the single-process one.
    Ranks may get one sample more than others; evaluation has no collective per batch, so
    unequal lengths are fine.
    """

    def __init__(self, data_source: Sized | int, rank: int | None = None, world_size: int | None = None) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        self.world_size = int(world_size if world_size is not None else (dist.get_world_size() if initialised else 1))
        self.rank = int(rank if rank is not None else (dist.get_rank() if initialised else 0))
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"ShardedEvalSampler: invalid rank {self.rank} for world size {self.world_size}")
        self.num_total = int(data_source) if isinstance(data_source, int) else len(data_source)
        self._indices = range(self.rank, self.num_total, self.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)


def evaluate_loader(model: nn.Module, loader: Iterable[Any], num_outputs: int, predict: Callable[[Tensor], Tensor],
                    device: torch.device, autocast: Callable[[], Any], progress: bool = False,
                    desc: str = "eval") -> Metrics:
    """The evaluation loop of the engine and of ``sats test``: confusion matrix on the device, summed over
    DDP ranks (each rank evaluates its shard of ``loader``).

    ``loader`` yields ``(images (B, 3, H, W), labels (B, H, W))``; ``predict`` maps ``(B, K, H, W)`` float
    logits to ``(B, H, W)`` channels (the method's rule, e.g. SSUL's unknown → background).
    """
    from sats.progress import progress_bar

    cm = ConfusionMatrix(num_outputs, device)
    model.eval()
    with torch.no_grad():
        for images, labels in progress_bar(loader, progress, desc):
            with autocast():
                logits = model(images.to(device, non_blocking=True)).logits
            cm.update(predict(logits.float()), labels.to(device, non_blocking=True))
    cm.all_reduce_()
    return cm.compute()
