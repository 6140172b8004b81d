"""Write tiny datasets in the real on-disk formats (VOC, ADE20K, generic folder) for tests.

Images are deterministic RGB pictures of the mask (palette colour + a gradient),
so a test can also check that image and mask stay aligned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from sats.data.classes import make_palette

PALETTE = make_palette(256)


def class_mask(classes: Sequence[int], height: int = 12, width: int = 16,
               border: bool = False) -> np.ndarray:
    """(H, W) uint8 mask of vertical stripes, one per class in ``classes`` (in order).

    With ``border`` the first row is 255 (an ignore border, as in VOC).
    """
    if not classes:
        raise ValueError("need at least one class")
    columns = np.array_split(np.arange(width), len(classes))
    mask = np.zeros((height, width), dtype=np.uint8)
    for value, cols in zip(classes, columns):
        mask[:, cols] = value
    if border:
        mask[0, :] = 255
    return mask


def picture_of(mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image: palette colour of the mask plus a horizontal gradient."""
    rgb = PALETTE[mask].astype(np.int32)
    rgb[..., 2] = (rgb[..., 2] + np.arange(mask.shape[1])[None, :] * 7) % 256
    return rgb.astype(np.uint8)


def save_image(path: Path, pixels: np.ndarray) -> Path:
    """Save (H, W, 3) uint8 as JPEG (.jpg/.jpeg) or PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if path.suffix.lower() in (".jpg", ".jpeg") else {}
    Image.fromarray(pixels).save(path, **options)
    return path


def save_mask(path: Path, mask: np.ndarray, palette: bool = True) -> Path:
    """Save (H, W) uint8 as a palette ("P", VOC style) or grayscale ("L", ADE style) PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    if palette:
        img.putpalette(PALETTE.reshape(-1).tolist())
    img.save(path)
    return path


def write_voc(root: Path, masks: Mapping[str, np.ndarray], split_lists: Mapping[str, Iterable[str]],
              leading_slash: bool = False) -> Path:
    """VOC layout: JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png (palette), splits/*.txt.

    Args:
        masks: image id → (H, W) uint8 mask; the image gets the same size.
        split_lists: split → ids; "train" is written as splits/train_aug.txt,
            others as splits/<split>.txt, lines "JPEGImages/<id>.jpg SegmentationClassAug/<id>.png".
        leading_slash: write the paths with a leading "/" (the DeepLab list style).
    """
    root = Path(root)
    for image_id, mask in masks.items():
        save_image(root / "JPEGImages" / f"{image_id}.jpg", picture_of(mask))
        save_mask(root / "SegmentationClassAug" / f"{image_id}.png", mask)
    slash = "/" if leading_slash else ""
    (root / "splits").mkdir(parents=True, exist_ok=True)
    for split, ids in split_lists.items():
        name = "train_aug" if split == "train" else split
        lines = [f"{slash}JPEGImages/{i}.jpg {slash}SegmentationClassAug/{i}.png" for i in ids]
        (root / "splits" / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def write_ade(root: Path, masks: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
    """ADEChallengeData2016 layout under ``root``; returns the ADEChallengeData2016 folder.

    Args:
        masks: split ("train"/"val") → image stem → (H, W) uint8 mask (grayscale PNG).
    """
    ade = Path(root) / "ADEChallengeData2016"
    folders = {"train": "training", "val": "validation"}
    for split, by_name in masks.items():
        for stem, mask in by_name.items():
            save_image(ade / "images" / folders[split] / f"{stem}.jpg", picture_of(mask))
            save_mask(ade / "annotations" / folders[split] / f"{stem}.png", mask, palette=False)
    return ade


def write_folder(root: Path, class_names: Sequence[str],
                 masks: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
    """Generic layout: images/<split>/<id>.png, masks/<split>/<id>.png, classes.txt."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(class_names) + "\n")
    for split, by_name in masks.items():
        for stem, mask in by_name.items():
            save_image(root / "images" / split / f"{stem}.png", picture_of(mask))
            save_mask(root / "masks" / split / f"{stem}.png", mask, palette=False)
    return root


def truncate_file(path: Path, keep: float = 0.5) -> Path:
    """Cut a file to ``keep`` of its bytes (a truncated download)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: max(1, int(len(data) * keep))])
    return path
