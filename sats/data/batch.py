"""The training batch that the data pipeline yields and a method's loss reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Batch:
    """One training batch. ``labels`` are channel indices after the step's lookup table, 255 = ignore.

    With the exemplar memory (``memory.enabled``, steps > 0) the batch is the current-step images
    followed by the memory images; memory labels keep every seen class (``memory_lut``).
    """

    images: Tensor  # (B, 3, H, W) float
    labels: Tensor  # (B, H, W) int64
    saliency: Optional[Tensor] = None  # (B, H, W) float32 in [0, 1], when the method needs saliency maps
    is_memory: Optional[Tensor] = None  # (B,) bool: True for exemplar-memory images (None: no memory)

    def to(self, device: torch.device) -> "Batch":
        """The same batch with every tensor on ``device`` (non-blocking copies)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=True)
                                            for f in dataclasses.fields(self) if getattr(self, f.name) is not None})
