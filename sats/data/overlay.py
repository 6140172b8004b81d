"""Image / ground truth / prediction grids in the dataset palette (tensorboard overlays, figures)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from sats.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def denormalize(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) normalised float → (B, H, W, 3) uint8."""
    x = images.detach().float().cpu().permute(0, 2, 3, 1).numpy() * np.asarray(IMAGENET_STD, np.float32) \
        + np.asarray(IMAGENET_MEAN, np.float32)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def colorize(channels: torch.Tensor, palette: np.ndarray, channel_classes: Sequence[int]) -> np.ndarray:
    """(B, H, W) channel indices (255 = ignore) → (B, H, W, 3) uint8 in the palette of the raw class ids."""
    lut = np.full((256, 3), 255, dtype=np.uint8)  # ignore → white
    ids = np.asarray(channel_classes, dtype=np.int64)
    lut[: len(ids)] = palette[ids]
    return lut[channels.detach().cpu().numpy().astype(np.int64).clip(0, 255)]


def overlay_grid(images: torch.Tensor, labels: torch.Tensor, preds: torch.Tensor, palette: np.ndarray,
                 channel_classes: Sequence[int]) -> np.ndarray:
    """Rows of [image | ground truth | prediction] for each image: (B·H, 3·W, 3) uint8."""
    rgb = denormalize(images)
    gt = colorize(labels, palette, channel_classes)
    pr = colorize(preds, palette, channel_classes)
    return np.concatenate([np.concatenate([a, b, c], axis=1) for a, b, c in zip(rgb, gt, pr)], axis=0)
