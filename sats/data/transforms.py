"""Joint image/mask transforms (docs/methods.md §4 train augmentation, §1.7 evaluation).

All transforms take ``(PIL RGB image, (H, W) uint8 mask)`` and return
``((3, H', W') float32 ImageNet-normalised, (H', W') int64 mask)``. Images are
resized bilinearly, masks with nearest neighbour (PIL, pixel-centre sampling);
a pad, where one is needed, fills the mask with 255 (ignore) and the image with 0.

Randomness comes from Python's ``random`` module by default (seeded per step and
per DataLoader worker by PyTorch), or from a passed ``random.Random`` /
``torch.Generator`` for explicit control.
"""

from __future__ import annotations

import math
import random
from typing import Literal

import numpy as np
import torch
from PIL import Image

from sats.data.classes import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = int | tuple[int, int]
Rng = random.Random | torch.Generator | None
EvalMode = Literal["center_crop", "full", "resize"]


def _pair(size: Size) -> tuple[int, int]:
    """(height, width) from an int or a pair."""
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size}")
    return int(height), int(width)


class _Random:
    """uniform / randint / random over Python's global RNG, a Random, or a torch.Generator."""

    def __init__(self, rng: Rng) -> None:
        self.rng = rng

    def _python_rng(self) -> random.Random:
        return self.rng if isinstance(self.rng, random.Random) else random._inst  # type: ignore[attr-defined]

    def random(self) -> float:
        if isinstance(self.rng, torch.Generator):
            return float(torch.rand((), generator=self.rng))
        return self._python_rng().random()

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def randint(self, low: int, high: int) -> int:
        """Uniform integer in [low, high] (both inclusive)."""
        if isinstance(self.rng, torch.Generator):
            return int(torch.randint(low, high + 1, (), generator=self.rng))
        return self._python_rng().randint(low, high)


_STD = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
_PIXEL_SCALE = 1.0 / (255.0 * _STD)  # (3, 1, 1): x / 255 / std
_PIXEL_SHIFT = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None] / _STD  # mean / std


def to_tensor(image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB image → (3, H, W) float32 ImageNet-normalised ((x/255 - mean) / std); mask → (H, W) int64."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    pixels = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
    pixels *= _PIXEL_SCALE
    pixels -= _PIXEL_SHIFT
    return torch.from_numpy(pixels), torch.from_numpy(np.array(mask, dtype=np.int64))


def resized_crop(image: Image.Image, mask: np.ndarray, box: tuple[int, int, int, int],
                 size: tuple[int, int]) -> tuple[Image.Image, np.ndarray]:
    """Crop ``box`` = (top, left, height, width) and resize to ``size`` = (height, width)."""
    top, left, height, width = box
    pil_box = (left, top, left + width, top + height)
    out_wh = (size[1], size[0])
    image_out = image.crop(pil_box).resize(out_wh, Image.Resampling.BILINEAR)
    mask_img = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    mask_out = np.asarray(mask_img.crop(pil_box).resize(out_wh, Image.Resampling.NEAREST))
    return image_out, mask_out


def resized_crop_map(values: np.ndarray, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """Crop ``box`` = (top, left, height, width) of a (H, W) uint8 map and resize it (nearest) to ``size``."""
    top, left, height, width = box
    img = Image.fromarray(np.asarray(values, dtype=np.uint8))
    return np.asarray(img.crop((left, top, left + width, top + height)).resize((size[1], size[0]),
                                                                                 Image.Resampling.NEAREST))


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float],
                            ratio: tuple[float, float], rng: Rng = None,
                            attempts: int = 10) -> tuple[int, int, int, int]:
    """Crop box (top, left, h, w) with torchvision RandomResizedCrop semantics.

    Up to ``attempts`` draws of area ``U(scale) × W·H`` and log-uniform aspect
    ratio; the first crop that fits inside the image is taken. Otherwise a
    central crop: the whole image if its ratio lies in ``ratio``, else the
    largest central crop with the ratio clamped to the range.
    """
    draw = _Random(rng)
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * draw.uniform(scale[0], scale[1])
        aspect = math.exp(draw.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return draw.randint(0, height - crop_h), draw.randint(0, width - crop_w), crop_h, crop_w
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, int(round(height * max(ratio)))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


class TrainTransform:
    """Random resized crop → horizontal flip (p = 0.5) → tensor → normalise."""

    def __init__(self, crop_size: Size, scale: tuple[float, float] = (0.5, 2.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                 rng: Rng = None) -> None:
        if not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"need 0 < min <= max for scale {scale} and ratio {ratio}")
        self.crop_size = _pair(crop_size)
        self.scale, self.ratio, self.flip, self.rng = scale, ratio, flip, rng

    def __call__(self, image: Image.Image, mask: np.ndarray,
                 aux: np.ndarray | None = None) -> tuple[torch.Tensor, ...]:
        """``aux``: an optional (H, W) uint8 map (e.g. saliency 0–255) given the mask's crop, resize
        (nearest) and flip, returned third as (H', W') float32 in [0, 1]."""
        _check_pair(image, mask)
        if aux is not None and np.asarray(aux).shape != (image.height, image.width):
            raise ValueError(f"aux map shape {np.asarray(aux).shape} differs from image size "
                             f"{image.height}x{image.width} (H x W)")
        box = random_resized_crop_box(image.width, image.height, self.scale, self.ratio, self.rng)
        image, mask = resized_crop(image, mask, box, self.crop_size)
        flipped = self.flip and _Random(self.rng).random() < 0.5
        if flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            mask = mask[:, ::-1]
        if aux is None:
            return to_tensor(image, mask)
        aux_out = resized_crop_map(aux, box, self.crop_size)
        if flipped:
            aux_out = aux_out[:, ::-1]
        return (*to_tensor(image, mask), torch.from_numpy(aux_out.astype(np.float32) / 255.0))


def resize_shorter(image: Image.Image, mask: np.ndarray, size: int) -> tuple[Image.Image, np.ndarray]:
    """Resize so the shorter side is ``size``; the longer side is truncated like torchvision."""
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) == (width, height):
        return image, mask
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    mask_img = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    return image, np.asarray(mask_img.resize((new_w, new_h), Image.Resampling.NEAREST))


def center_crop(image: Image.Image, mask: np.ndarray, size: Size) -> tuple[Image.Image, np.ndarray]:
    """Central (height, width) crop; pads first (image 0, mask 255) where the input is smaller."""
    crop_h, crop_w = _pair(size)
    width, height = image.size
    if width < crop_w or height < crop_h:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        left, top = pad_w // 2, pad_h // 2
        canvas = Image.new("RGB", (width + pad_w, height + pad_h))
        canvas.paste(image, (left, top))
        padded = np.full((height + pad_h, width + pad_w), IGNORE_INDEX, dtype=np.uint8)
        padded[top:top + height, left:left + width] = mask
        image, mask, (width, height) = canvas, padded, canvas.size
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    image = image.crop((left, top, left + crop_w, top + crop_h))
    return image, np.asarray(mask)[top:top + crop_h, left:left + crop_w]


class EvalTransform:
    """Deterministic evaluation preprocessing.

    Modes: "center_crop" = shorter side → size, then central size×size crop
    (the reference protocol); "resize" = shorter side → size only; "full" = no resize.
    """

    def __init__(self, size: int = 512, mode: EvalMode = "center_crop") -> None:
        if mode not in ("center_crop", "full", "resize"):
            raise ValueError(f"unknown eval mode {mode!r}; expected 'center_crop', 'full' or 'resize'")
        self.size, self.mode = int(size), mode

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(image, mask)
        if self.mode != "full":
            image, mask = resize_shorter(image, mask, self.size)
        if self.mode == "center_crop":
            image, mask = center_crop(image, mask, self.size)
        return to_tensor(image, mask)


def _check_pair(image: Image.Image, mask: np.ndarray) -> None:
    if np.asarray(mask).shape != (image.height, image.width):
        raise ValueError(f"mask shape {np.asarray(mask).shape} differs from image size "
                         f"{image.height}x{image.width} (H x W)")


def train_transform(crop_size: Size, scale: tuple[float, float] = (0.5, 2.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                    rng: Rng = None) -> TrainTransform:
    """Training augmentation of docs/methods.md §4 (see `TrainTransform`)."""
    return TrainTransform(crop_size, scale, ratio, flip, rng)


def eval_transform(size: int = 512, mode: EvalMode = "center_crop") -> EvalTransform:
    """Evaluation preprocessing of docs/methods.md §1.7 (see `EvalTransform`)."""
    return EvalTransform(size, mode)
