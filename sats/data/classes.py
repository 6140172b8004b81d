"""Class names and colour palettes of the supported datasets.

Class index = mask value for both datasets (docs/methods.md §1.2, Appendix B).
"""

from __future__ import annotations

import numpy as np

VOC_CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

ADE_CLASSES: tuple[str, ...] = (
    "other", "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed",
    "windowpane", "grass", "cabinet", "sidewalk", "person", "earth", "door", "table",
    "mountain", "plant", "curtain", "chair", "car", "water", "painting", "sofa", "shelf",
    "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock",
    "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column",
    "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning",
    "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel",
    "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike",
    "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

IGNORE_INDEX = 255

NUM_CLASSES: dict[str, int] = {"voc": len(VOC_CLASSES), "ade": len(ADE_CLASSES)}


def make_palette(num_colors: int = 256) -> np.ndarray:
    """PASCAL VOC bit-interleaving palette for indices ``0..num_colors-1``.

    The bits of the index are spread over the three channels, most significant
    first (index 1 → (128, 0, 0), 255 → (224, 224, 192)). Defined for any count;
    colours repeat only beyond 2**24 entries.

    Returns:
        (num_colors, 3) uint8.
    """
    if num_colors < 0:
        raise ValueError(f"num_colors must be >= 0, got {num_colors}")
    index = np.arange(num_colors, dtype=np.int64)
    palette = np.zeros((num_colors, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return palette.astype(np.uint8)


VOC_PALETTE: np.ndarray = make_palette(256)
"""(256, 3) uint8: the standard PASCAL palette (255 = border colour (224, 224, 192))."""

ADE_PALETTE: np.ndarray = make_palette(256)
"""(256, 3) uint8: the same bit-interleaving scheme; colours for ADE ids 0..150 and 255."""


def class_names(dataset: str) -> list[str]:
    """Class names (index = mask value) of a built-in dataset ("voc" or "ade")."""
    if dataset == "voc":
        return list(VOC_CLASSES)
    if dataset == "ade":
        return list(ADE_CLASSES)
    raise KeyError(f"no built-in class list for dataset {dataset!r}; expected 'voc' or 'ade'")


def colorize(mask: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Map an index mask (H, W) to RGB (H, W, 3) uint8 with a 256-entry palette."""
    table = make_palette(256) if palette is None else np.asarray(palette, dtype=np.uint8)
    if table.shape[0] < 256:
        full = make_palette(256)
        full[: table.shape[0]] = table
        table = full
    return table[np.asarray(mask, dtype=np.uint8)]
