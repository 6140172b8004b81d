"""The embedded synthetic dataset, written in Pascal VOC layout.

Twenty foreground classes (ids 1..20) plus background (0), so every VOC task
name ("15-1", "10-1", ...) works unchanged. Class ``c`` is one *shape* drawn
with one *texture*::

    shape   = SHAPES[(c - 1) % 5]     disc, square, triangle, cross, ring
    texture = TEXTURES[(c - 1) // 5]  hstripes, vstripes, checker, solid

so neither the shape nor the texture alone names the class (ids 1-5 are the
five shapes with horizontal stripes, 16-20 the five solid shapes). Colour is a
weak cue only: every class has a base hue, jittered by +-0.1 of the hue circle
per object (base hues are 0.05 apart, so about +-2 hue slots). Texture
periods and object sizes scale with the image's shorter side, so resizing an
image to any training size keeps the cues at the same relative scale.

A second *world*, ``world="pretrain"``, is drawn by the same code with twenty
other classes: five other shapes with the same four textures::

    shape   = PRETRAIN_SHAPES[(c - 1) % 5]   diamond, star, crescent, half-disc, frame
    texture = TEXTURES[(c - 1) // 5]

No shape is shared, so no (shape, texture) class of one world is a class of the
other; the textures, the colours, the backgrounds and the image statistics are
shared, as ImageNet shares edges and textures with VOC but not its label set.
It has its own hue permutation and its own random streams (other images for the
same seed). The demo's tiny encoder is pretrained on it (`sats.pretrain`).

Layout written under ``root`` (the layout `build_files("voc", root, split)` reads)::

    JPEGImages/<id>.jpg              RGB, JPEG quality 90
    SegmentationClassAug/<id>.png    palette ("P") PNG, standard VOC palette,
                                     value = class id, 255 = object border (ignore)
    splits/train_aug.txt             "JPEGImages/<id>.jpg SegmentationClassAug/<id>.png"
    splits/val.txt
    synthetic.json                   generation arguments + version

Generation is deterministic: the per-split plan (image sizes, classes per image)
comes from ``(seed, split)`` and each image's pixels from ``(seed, split,
index)``, so the same arguments give byte-identical files for any ``workers``.
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sats.data.classes import VOC_PALETTE

log = logging.getLogger("sats")

__all__ = [
    "CLASS_SHAPE_TEXTURE",
    "NUM_CLASSES",
    "PRETRAIN_CLASS_SHAPE_TEXTURE",
    "PRETRAIN_SHAPES",
    "SHAPES",
    "SYNTHETIC_VERSION",
    "TEXTURES",
    "WORLDS",
    "world_classes",
    "dataset_statistics",
    "ensure_synthetic",
    "generate_synthetic",
    "read_synthetic_info",
    "render_sample",
]

SYNTHETIC_VERSION = 1
"""Bump whenever the drawing changes: `ensure_synthetic` then regenerates old folders."""

NUM_CLASSES = 21
IGNORE = 255
SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "cross", "ring")
TEXTURES: tuple[str, ...] = ("hstripes", "vstripes", "checker", "solid")
CLASS_SHAPE_TEXTURE: tuple[tuple[str, str], ...] = tuple(
    (SHAPES[k % len(SHAPES)], TEXTURES[k // len(SHAPES)]) for k in range(NUM_CLASSES - 1)
)
"""Entry ``c - 1`` is the (shape, texture) of class ``c``."""
PRETRAIN_SHAPES: tuple[str, ...] = ("diamond", "star", "crescent", "halfdisc", "frame")
PRETRAIN_CLASS_SHAPE_TEXTURE: tuple[tuple[str, str], ...] = tuple(
    (PRETRAIN_SHAPES[k % len(PRETRAIN_SHAPES)], TEXTURES[k // len(PRETRAIN_SHAPES)]) for k in range(NUM_CLASSES - 1)
)
"""The pretraining world: entry ``c - 1`` is the (shape, texture) of its class ``c``; no shape of `SHAPES`."""
WORLDS: tuple[str, ...] = ("voc", "pretrain")
"""``voc``: the demo's classes (`CLASS_SHAPE_TEXTURE`); ``pretrain``: the encoder-pretraining world."""

DEFAULTS: dict[str, Any] = {"num_train": 800, "num_val": 120, "size": (64, 112), "seed": 0, "world": "voc"}
"""Generation defaults (those of `sats.config.SyntheticConfig`, which has no world: always ``voc``)."""
INFO_FILE = "synthetic.json"
SPLIT_LISTS = {"train": "splits/train_aug.txt", "val": "splits/val.txt"}
_SPLIT_CODE = {"train": 0, "val": 1}
_OBJECTS_PER_IMAGE = np.array([1, 2, 3])
_OBJECTS_PROBS = np.array([0.40, 0.40, 0.20])
_JPEG_QUALITY = 90
# Base hue of class c is _HUE_ORDER[c - 1] / 20: a permutation, so classes with
# neighbouring ids (same texture or same shape) do not get neighbouring hues.
_HUE_ORDER = (np.arange(NUM_CLASSES - 1) * 7) % (NUM_CLASSES - 1)
# The pretraining world's hues: another permutation, half a slot (0.025) off the demo's hues.
_PRETRAIN_HUES = (((np.arange(NUM_CLASSES - 1) * 3) % (NUM_CLASSES - 1)) + 0.5) / (NUM_CLASSES - 1)
_WORLD_TABLES = {"voc": (CLASS_SHAPE_TEXTURE, _HUE_ORDER / (NUM_CLASSES - 1)),
                 "pretrain": (PRETRAIN_CLASS_SHAPE_TEXTURE, _PRETRAIN_HUES)}
# Extra entry of every random stream of a world (none for voc: its streams are those of version 1).
_WORLD_STREAM: dict[str, tuple[int, ...]] = {"voc": (), "pretrain": (1,)}
_HUE_JITTER = 0.1
# Radius multipliers that give every shape about the area of the unit disc (pi).
_SHAPE_SCALE = {"disc": 1.0, "square": 0.90, "triangle": 1.30, "cross": 1.18, "ring": 1.10,
                "diamond": 1.25, "star": 1.46, "crescent": 1.32, "halfdisc": 1.41, "frame": 1.06}


_PALETTE_BYTES = VOC_PALETTE.tobytes()


# --------------------------------------------------------------------------- drawing


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a unit-size shape in object coordinates `u, v` (H, W) -> bool (H, W)."""
    if shape == "disc":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 1.0
    if shape == "triangle":  # apex up at v = -1, base at v = 0.75
        return (v <= 0.75) & (np.abs(u) <= (v + 1.0) * 0.6)
    if shape == "cross":
        arm = 0.38
        return ((np.abs(u) <= arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= arm) & (np.abs(u) <= 1.0))
    if shape == "ring":
        radius2 = u * u + v * v
        return (radius2 <= 1.0) & (radius2 >= 0.42 * 0.42)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "star":  # five points (apex up) at radius 1, inner corners at 0.5
        return _star_mask(u, v, inner=0.5)
    if shape == "crescent":  # the unit disc minus a disc of radius 0.75 shifted right by 0.6
        return (u * u + v * v <= 1.0) & ((u - 0.6) ** 2 + v * v > 0.75 * 0.75)
    if shape == "halfdisc":  # the lower half of the unit disc
        return (u * u + v * v <= 1.0) & (v >= 0.0)
    if shape == "frame":  # a square ring
        side = np.maximum(np.abs(u), np.abs(v))
        return (side <= 1.0) & (side >= 0.55)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES + PRETRAIN_SHAPES}")


def _star_mask(u: np.ndarray, v: np.ndarray, inner: float) -> np.ndarray:
    """Five-pointed star: outer corners at radius 1 (one straight up), inner corners at radius `inner`."""
    sector = 2 * np.pi / 5
    angle = np.abs(np.mod(np.arctan2(u, -v) + sector / 2, sector) - sector / 2)  # 0 at a point, pi/5 between
    radius = np.hypot(u, v)
    px, py = radius * np.cos(angle), radius * np.sin(angle)
    # inside = on the centre's side of the edge from the point (1, 0) to the inner corner
    ex, ey = inner * np.cos(sector / 2) - 1.0, inner * np.sin(sector / 2)
    return ex * py - ey * (px - 1.0) >= 0.0


def _texture_pattern(texture: str, ys: np.ndarray, xs: np.ndarray, period: float, phase: np.ndarray) -> np.ndarray:
    """Binary texture in image coordinates: `ys` (H, 1), `xs` (1, W) -> bool (H, W)."""
    row_on = np.sin(2 * np.pi * (ys / period + phase[0])) > 0
    col_on = np.sin(2 * np.pi * (xs / period + phase[1])) > 0
    if texture == "hstripes":
        return np.broadcast_to(row_on, (ys.shape[0], xs.shape[1]))
    if texture == "vstripes":
        return np.broadcast_to(col_on, (ys.shape[0], xs.shape[1]))
    if texture == "checker":
        return row_on ^ col_on
    if texture == "solid":
        return np.zeros((ys.shape[0], xs.shape[1]), dtype=bool)
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of a bool (H, W) mask (pixels outside count as False)."""
    padded = np.pad(mask, 1)
    height, width = mask.shape
    out = np.zeros_like(mask)
    for dy in range(3):
        for dx in range(3):
            out |= padded[dy : dy + height, dx : dx + width]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion of a bool (H, W) mask (pixels outside count as True)."""
    return ~_dilate(~mask)


def _object_colours(rng: np.random.Generator, base_hue: float) -> tuple[np.ndarray, np.ndarray]:
    """Main and contrast colour (float RGB in 0..255) of one object: jittered class hue, strong luminance contrast."""
    hue = (base_hue + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 1.0
    saturation = rng.uniform(0.5, 1.0)
    value = rng.uniform(0.55, 1.0)
    main = np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255.0
    if rng.random() < 0.5:  # dark partner
        partner = main * rng.uniform(0.15, 0.4)
    else:  # pale partner, shifted towards white
        partner = main + (255.0 - main) * rng.uniform(0.6, 0.85)
    return main, partner


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-frequency blotches of greyish colours (a 3x3..5x5 grid, bicubic upsampled) -> float (H, W, 3)."""
    grid = int(rng.integers(3, 6))
    hsv = np.stack([rng.random(grid * grid), rng.uniform(0.0, 0.35, grid * grid), rng.uniform(0.25, 0.75, grid * grid)], 1)
    coarse = np.array([colorsys.hsv_to_rgb(*colour) for colour in hsv]).reshape(grid, grid, 3)
    small = Image.fromarray(np.round(coarse * 255).astype(np.uint8))
    return np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)


def world_classes(world: str = "voc") -> tuple[tuple[str, str], ...]:
    """The (shape, texture) of every class of `world` (entry ``c - 1`` for class ``c``)."""
    if world not in _WORLD_TABLES:
        raise ValueError(f"unknown synthetic world {world!r}; expected one of {WORLDS}")
    return _WORLD_TABLES[world][0]


def render_sample(
    rng: np.random.Generator, height: int, width: int, classes: Sequence[int], world: str = "voc"
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image with one object per entry of `classes` (class ids of `world`), later objects on top.

    Returns the image `(H, W, 3)` uint8 and the mask `(H, W)` uint8 (class id per
    pixel, 0 background, 255 on a 1 px (short side <= 80) or 2 px band along every
    object boundary, like VOC's borders).
    """
    table = world_classes(world)
    hues = _WORLD_TABLES[world][1]
    side = min(height, width)
    ys = np.arange(height, dtype=np.float64)[:, None]
    xs = np.arange(width, dtype=np.float64)[None, :]
    image = _background(rng, height, width)
    mask = np.zeros((height, width), dtype=np.uint8)
    border_two_px = side > 80
    centres: list[tuple[float, float, float]] = []
    for class_id in classes:
        if not 1 <= class_id < NUM_CLASSES:
            raise ValueError(f"class id {class_id} outside 1..{NUM_CLASSES - 1}")
        shape, texture = table[class_id - 1]
        radius = 0.5 * side * rng.uniform(0.4, 0.65)
        # Of 12 candidate centres take the one farthest from earlier objects: overlaps stay partial.
        candidates = np.stack(
            [rng.uniform(0.6 * radius, width - 0.6 * radius, 12), rng.uniform(0.6 * radius, height - 0.6 * radius, 12)],
            axis=1,
        )
        if centres:
            previous = np.array(centres)
            gaps = np.hypot(candidates[:, None, 0] - previous[None, :, 0], candidates[:, None, 1] - previous[None, :, 1])
            gaps = gaps / (radius + previous[None, :, 2])
            best = int(np.argmax(gaps.min(axis=1)))
        else:
            best = 0
        cx, cy = candidates[best]
        centres.append((cx, cy, radius))
        angle = rng.uniform(-0.25, 0.25)
        stretch = np.exp(rng.uniform(-0.15, 0.15))
        scale = radius * _SHAPE_SCALE[shape]
        dx, dy = (xs - cx) / scale, (ys - cy) / scale
        u = (np.cos(angle) * dx + np.sin(angle) * dy) * stretch
        v = (-np.sin(angle) * dx + np.cos(angle) * dy) / stretch
        inside = _shape_mask(shape, u, v)
        if not inside.any():
            continue
        period = side * rng.uniform(0.15, 0.2)
        pattern = _texture_pattern(texture, ys, xs, period, rng.random(2))
        main, partner = _object_colours(rng, float(hues[class_id - 1]))
        colour = np.where(pattern[..., None], partner, main)
        image[inside] = colour[inside]
        core = _erode(inside) if border_two_px else inside
        band = _dilate(inside) & ~core
        mask[band] = IGNORE
        mask[core] = class_id
    image += rng.normal(0.0, 6.0, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


# --------------------------------------------------------------------------- dataset files


@dataclass(frozen=True)
class _SamplePlan:
    split: str
    index: int
    image_id: str
    height: int
    width: int
    classes: tuple[int, ...]
    world: str = "voc"


def _normalise_args(num_train: int, num_val: int, size: int | Sequence[int], seed: int, world: str = "voc") -> dict[str, Any]:
    """Validated generation arguments as stored in synthetic.json (size as [lo, hi])."""
    world_classes(world)  # raises for an unknown world
    for key, value in (("num_train", num_train), ("num_val", num_val)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        low = high = int(size)
    elif isinstance(size, Sequence) and len(size) == 2 and all(isinstance(s, (int, np.integer)) for s in size):
        low, high = int(size[0]), int(size[1])
    else:
        raise ValueError(f"size must be an int or a (low, high) pair of ints, got {size!r}")
    if not 16 <= low <= high:
        raise ValueError(f"size must satisfy 16 <= low <= high, got {size!r}")
    return {"num_train": int(num_train), "num_val": int(num_val), "size": [low, high], "seed": int(seed), "world": world}


def _plan_split(split: str, count: int, size: Sequence[int], seed: int, world: str = "voc") -> list[_SamplePlan]:
    """Image sizes and classes of every image of a split, balanced so every class is in about as many images.

    Each image takes its 1-3 classes among those used least so far (random tie-break).
    """
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], *_WORLD_STREAM[world]])
    counts = np.zeros(NUM_CLASSES - 1, dtype=np.int64)
    plans = []
    for index in range(count):
        num_objects = int(rng.choice(_OBJECTS_PER_IMAGE, p=_OBJECTS_PROBS))
        order = np.lexsort((rng.random(NUM_CLASSES - 1), counts))
        chosen = order[:num_objects]
        counts[chosen] += 1
        height, width = (int(s) for s in rng.integers(size[0], size[1] + 1, 2))
        plans.append(
            _SamplePlan(split, index, f"{split}_{index:05d}", height, width,
                        tuple(int(c) + 1 for c in rng.permutation(chosen)), world)
        )
    return plans


def _write_sample(job: tuple[str, int, _SamplePlan]) -> None:
    """Render one planned image and write its JPEG and palette PNG under `root`."""
    root, seed, plan = job
    rng = np.random.default_rng([seed, _SPLIT_CODE[plan.split], plan.index, *_WORLD_STREAM[plan.world]])
    image, mask = render_sample(rng, plan.height, plan.width, plan.classes, plan.world)
    Image.fromarray(image).save(Path(root, "JPEGImages", f"{plan.image_id}.jpg"), quality=_JPEG_QUALITY)
    mask_image = Image.fromarray(mask).convert("P")  # L -> P keeps the values as indices
    mask_image.putpalette(_PALETTE_BYTES)
    mask_image.save(Path(root, "SegmentationClassAug", f"{plan.image_id}.png"))


def read_synthetic_info(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Contents of `root/synthetic.json`, or None when the folder holds no synthetic dataset."""
    path = Path(root, INFO_FILE)
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(info).__name__}")
    return info


def _check_target(target: Path) -> None:
    """Raise FileExistsError unless `target` is absent, an empty folder or a synthetic dataset."""
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if read_synthetic_info(target) is None and any(target.iterdir()):
        raise FileExistsError(f"{target} is a non-empty folder without {INFO_FILE}; refusing to overwrite it")


def _holds_dataset(root: Path, args: dict[str, Any]) -> bool:
    """True when `root` holds a complete dataset of this version generated with `args`."""
    info = read_synthetic_info(root) if root.is_dir() else None
    if info is None or info.get("version") != SYNTHETIC_VERSION:
        return False
    info = {"world": "voc", **info}  # folders written before worlds existed hold the voc world
    return all(info.get(key) == value for key, value in args.items()) and _listed_files_exist(root)


def _move_into_place(source: Path, target: Path, args: dict[str, Any]) -> None:
    """Rename the finished folder `source` to `target`, replacing an older synthetic dataset there.

    When another process finished the same generation first (same arguments, so
    the same bytes), its folder is kept and `source` is left for the caller to delete.
    """
    _check_target(target)
    if target.exists():
        if _holds_dataset(target, args):
            return
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(trash / "old")
        try:
            source.rename(target)
        finally:
            shutil.rmtree(trash)
        return
    try:
        source.rename(target)
    except OSError as error:  # another process renamed its copy into place in between
        if not _holds_dataset(target, args):
            raise OSError(f"could not move {source} to {target}: {error}") from error


def _make_partial_dir(root: Path) -> Path:
    """A new empty sibling folder of `root` with the usual permissions (0o777 & ~umask).

    Not `tempfile.mkdtemp`: its 0700 folder would become the dataset folder when renamed into place.
    """
    for _ in range(100):
        partial = root.parent / f".{root.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            partial.mkdir()
        except FileExistsError:
            continue
        return partial
    raise FileExistsError(f"could not create a temporary folder next to {root}")


def generate_synthetic(
    root: str | os.PathLike[str],
    *,
    num_train: int = DEFAULTS["num_train"],
    num_val: int = DEFAULTS["num_val"],
    size: int | Sequence[int] = DEFAULTS["size"],
    seed: int = DEFAULTS["seed"],
    world: str = DEFAULTS["world"],
    workers: int = 1,
) -> Path:
    """Write the synthetic dataset in VOC layout under `root` and return `root` as a Path.

    `size` is a square side or a `(low, high)` range each image's height and width
    are drawn from. The files are first written to a sibling temporary folder and
    then renamed into place, so an interrupted run never leaves a partial dataset;
    an existing synthetic dataset at `root` is replaced, any other non-empty folder
    raises FileExistsError. `workers > 1` renders in a process pool (same bytes).
    `world` picks the class table (`WORLDS`): ``voc`` (the demo's) or ``pretrain``.
    """
    args = _normalise_args(num_train, num_val, size, seed, world)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    root = Path(root)
    _check_target(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    partial = _make_partial_dir(root)
    try:
        for folder in ("JPEGImages", "SegmentationClassAug", "splits"):
            (partial / folder).mkdir()
        plans = {split: _plan_split(split, args[f"num_{split}"], args["size"], args["seed"], world) for split in SPLIT_LISTS}
        jobs = [(str(partial), args["seed"], plan) for split_plans in plans.values() for plan in split_plans]
        if workers == 1:
            for job in jobs:
                _write_sample(job)
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                list(pool.map(_write_sample, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
        for split, list_path in SPLIT_LISTS.items():
            lines = [f"JPEGImages/{p.image_id}.jpg SegmentationClassAug/{p.image_id}.png\n" for p in plans[split]]
            (partial / list_path).write_text("".join(lines))
        info = {
            "generator": "sats.data.synthetic",
            "version": SYNTHETIC_VERSION,
            **args,
            "classes": {str(c + 1): f"{shape}/{texture}" for c, (shape, texture) in enumerate(world_classes(world))},
        }
        (partial / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
        _move_into_place(partial, root, args)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return root


def ensure_synthetic(root: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Return `root` as a Path holding the synthetic dataset of `kwargs` (the arguments of `generate_synthetic`).

    Generates only if `root` has no synthetic.json, its version or generation
    arguments differ from the requested ones (defaults filled in), or a listed
    file is missing. `workers` only affects speed, not the files.
    """
    workers = kwargs.pop("workers", 1)
    unknown = set(kwargs) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"ensure_synthetic got unexpected arguments {sorted(unknown)}")
    args = _normalise_args(**{**DEFAULTS, **kwargs})
    if _holds_dataset(Path(root), args):
        return Path(root)
    log.info("generating the synthetic dataset (%d train / %d val images) in %s …", args["num_train"],
             args["num_val"], root)
    start = time.perf_counter()
    path = generate_synthetic(root, workers=workers, **args)
    log.info("synthetic dataset ready in %s (%.1f s)", root, time.perf_counter() - start)
    return path


def _read_list(root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) paths of a split's list file."""
    list_path = root / SPLIT_LISTS[split]
    pairs = []
    for number, line in enumerate(list_path.read_text().splitlines(), start=1):
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{list_path}:{number}: expected 'image mask', got {line!r}")
        pairs.append((root / fields[0], root / fields[1]))
    return pairs


def _listed_files_exist(root: Path) -> bool:
    """True when both list files exist and every file they name exists."""
    if not all((root / path).is_file() for path in SPLIT_LISTS.values()):
        return False
    return all(image.is_file() and mask.is_file() for split in SPLIT_LISTS for image, mask in _read_list(root, split))


def dataset_statistics(root: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Per split ("train", "val"): pixel and image counts of every class, read from the masks.

    Each split maps to `num_images`, `total_pixels`, `ignore_pixels`,
    `pixels_per_class` and `images_per_class` (lists of length 21, index = class
    id) and `classes_per_image` (histogram: entry k = images with k foreground classes).
    """
    root = Path(root)
    statistics: dict[str, dict[str, Any]] = {}
    for split in SPLIT_LISTS:
        pixels = np.zeros(256, dtype=np.int64)
        images = np.zeros(256, dtype=np.int64)
        classes_per_image = np.zeros(NUM_CLASSES, dtype=np.int64)
        pairs = _read_list(root, split)
        for _, mask_path in pairs:
            with Image.open(mask_path) as mask_image:
                mask = np.asarray(mask_image)
            counts = np.bincount(mask.ravel(), minlength=256)
            pixels += counts
            images += counts > 0
            classes_per_image[int(np.count_nonzero(counts[1:NUM_CLASSES]))] += 1
        statistics[split] = {
            "num_images": len(pairs),
            "total_pixels": int(pixels.sum()),
            "ignore_pixels": int(pixels[IGNORE]),
            "pixels_per_class": pixels[:NUM_CLASSES].tolist(),
            "images_per_class": images[:NUM_CLASSES].tolist(),
            "classes_per_image": classes_per_image.tolist(),
            "other_values": sorted(int(v) for v in np.flatnonzero(pixels) if NUM_CLASSES <= v < IGNORE),
        }
    return statistics
