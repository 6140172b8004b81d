"""Image/mask file lists of a dataset split, validated reading, and the per-step dataset.

Layouts (docs/methods.md §1.2):

* ``voc``: ``root/splits/train_aug.txt`` (split "train") or ``root/splits/<split>.txt``,
  one ``image_rel_path mask_rel_path`` pair per line relative to ``root`` (a
  leading "/" is allowed, as in the DeepLab lists). Fallback: the official
  single-column id list ``root/ImageSets/Segmentation/<split>.txt`` with images
  in ``JPEGImages/<id>.jpg`` and masks in ``SegmentationClassAug/<id>.png`` (or
  ``SegmentationClass/`` when the augmented folder is absent).
* ``ade``: ``ADEChallengeData2016`` (``root`` itself or ``root/ADEChallengeData2016``)
  with ``images/{training,validation}/*.jpg`` and ``annotations/<same>/<stem>.png``;
  image order = sorted file names, hidden files skipped. Splits "train"/"val".
* ``folder``: ``root/images/<split>/*.{jpg,jpeg,png}``, ``root/masks/<split>/<stem>.png``
  and ``root/classes.txt`` (one class name per line, the first is background).

The list order defines the positions used by split index files, so it is kept
exactly as the list file / sorted directory gives it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sats.data.classes import IGNORE_INDEX, class_names as builtin_class_names, make_palette
from sats.data.fingerprint import combine, file_fingerprints
from sats.data.labels import LUT_SIZE, apply_lut
from sats.progress import progress_bar

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MASK_MODES = ("P", "L")  # palette masks are read as indices, "L" as values
# PIL raises these for unreadable or truncated files (UnidentifiedImageError ⊂ OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)

Transform = Callable[[Image.Image, np.ndarray], tuple[torch.Tensor, torch.Tensor]]


class DataError(ValueError):
    """A dataset file (or list) is missing, unreadable or inconsistent.

    ``DataError(path, problem)`` names the file (message ``"<path>: <problem>"``);
    ``DataError(message)`` carries a summary message only (``path`` is None).
    """

    def __init__(self, path: str | os.PathLike[str], problem: str | None = None) -> None:
        self.path: Path | None
        if problem is None:
            self.path, self.problem = None, str(path)
            super().__init__(self.problem)
        else:
            self.path, self.problem = Path(path), problem
            super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class DataProblem:
    """One bad file found by `check_dataset`."""

    path: Path
    problem: str
    position: int = -1  # position of the bad pair in its SegmentationFiles list (-1: unknown)

    @classmethod
    def from_error(cls, error: DataError, position: int = -1) -> DataProblem:
        return cls(error.path if error.path is not None else Path(), error.problem, position)

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def format_problems(problems: Sequence[DataProblem], limit: int = 50) -> str:
    """Multi-line summary of ``problems`` (at most ``limit`` lines, then a count)."""
    if not problems:
        return "no problems found"
    lines = [f"{len(problems)} bad file(s):"]
    lines += [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def _open_decoded(path: Path, kind: str) -> Image.Image:
    """Open and fully decode an image file; DataError naming the file on failure."""
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except FileNotFoundError:
        raise DataError(path, f"missing {kind} file") from None
    except _DECODE_ERRORS as e:
        raise DataError(path, f"unreadable {kind} file ({type(e).__name__}: {e})") from e


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header only."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise DataError(path, "missing image file") from None
    except _DECODE_ERRORS as e:
        raise DataError(path, f"unreadable image file ({type(e).__name__}: {e})") from e


class SegmentationFiles:
    """The ordered image/mask list of one split of a dataset.

    Position ``i`` (0-based) is the index used by split lists; ``ids[i]`` is the
    image id (file stem). ``list_digest`` identifies the exact ordered list (names only);
    :meth:`fingerprint` adds the content of every file (:mod:`sats.data.fingerprint`), which
    is what caches are keyed by.
    """

    def __init__(self, name: str, root: str | os.PathLike[str], split: str, ids: Sequence[str],
                 image_paths: Sequence[Path], mask_paths: Sequence[Path], num_classes: int,
                 class_names: Sequence[str], palette: np.ndarray | None = None) -> None:
        if not len(ids) == len(image_paths) == len(mask_paths):
            raise ValueError(f"{name}/{split}: {len(ids)} ids, {len(image_paths)} images and "
                             f"{len(mask_paths)} masks; the lists must have equal length")
        if len(class_names) != num_classes:
            raise ValueError(f"{name}/{split}: {len(class_names)} class names for "
                             f"{num_classes} classes")
        if not 1 <= num_classes <= IGNORE_INDEX:
            raise ValueError(f"{name}/{split}: num_classes must be in 1..255, got {num_classes}")
        self.name = name
        self.root = Path(root)
        self.split = split
        self.ids = list(ids)
        self.image_paths = [Path(p) for p in image_paths]
        self.mask_paths = [Path(p) for p in mask_paths]
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.palette = make_palette(num_classes) if palette is None else np.asarray(palette, np.uint8)
        self.list_digest = self._digest()
        self.mask_hashes: list[str | None] | None = None  # set by fingerprint()
        self.image_hashes: list[str | None] | None = None
        self.content_digest: str | None = None
        valid = np.zeros(LUT_SIZE, dtype=bool)
        valid[:num_classes] = True
        valid[IGNORE_INDEX] = True
        self._valid_values = valid

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"SegmentationFiles({self.name!r}, split={self.split!r}, root={str(self.root)!r}, "
                f"{len(self)} images, {self.num_classes} classes, digest={self.list_digest[:12]})")

    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def _digest(self) -> str:
        sha = hashlib.sha1()
        for image_id, image, mask in zip(self.ids, self.image_paths, self.mask_paths):
            sha.update(f"{image_id}\t{self._relative(image)}\t{self._relative(mask)}\n".encode())
        return sha.hexdigest()

    def fingerprint(self, cache_dir: str | os.PathLike[str] | None = None, workers: int = 2) -> str:
        """Content digest of the list: names, class count and the bytes of every image and mask.

        Computed once (files whose stat is unchanged since the memo in ``cache_dir`` are not
        read again) and kept in ``mask_hashes``, ``image_hashes`` and ``content_digest``.
        Independent of the dataset root: a copy elsewhere has the same digest.
        """
        if self.content_digest is None:
            hashes = file_fingerprints([*self.mask_paths, *self.image_paths], cache_dir, workers)
            self.set_fingerprints(hashes[:len(self)], hashes[len(self):])
        assert self.content_digest is not None
        return self.content_digest

    def set_fingerprints(self, mask_hashes: Sequence[str | None], image_hashes: Sequence[str | None]) -> None:
        """Adopt known per-file hashes (e.g. of the full list this one is a subset of)."""
        if not len(mask_hashes) == len(image_hashes) == len(self):
            raise ValueError(f"{len(mask_hashes)} mask and {len(image_hashes)} image hashes for {len(self)} files")
        self.mask_hashes, self.image_hashes = list(mask_hashes), list(image_hashes)
        self.content_digest = combine([*self.mask_hashes, *self.image_hashes], self.list_digest,
                                      str(self.num_classes))

    def positions_digest(self, positions: Sequence[int] | np.ndarray) -> str:
        """Content digest of the entries ``positions`` (ids, masks, images): a step's share of the list."""
        if self.mask_hashes is None or self.image_hashes is None:
            raise RuntimeError(f"{self!r}: call fingerprint() before positions_digest()")
        parts: list[str | None] = []
        for i in positions:
            i = int(i)
            parts += [self.ids[i], self.mask_hashes[i], self.image_hashes[i]]
        return combine(parts, str(self.num_classes))

    def read_image(self, i: int) -> Image.Image:
        """Fully decoded RGB image at position ``i``; DataError naming the file on any problem."""
        image = _open_decoded(self.image_paths[i], "image")
        return image if image.mode == "RGB" else image.convert("RGB")

    def image_size(self, i: int) -> tuple[int, int]:
        """(width, height) of image ``i`` read from its header."""
        return _image_size(self.image_paths[i])

    def read_mask(self, i: int, check_size: bool = True) -> np.ndarray:
        """Mask at position ``i`` as (H, W) uint8 class ids (255 = ignore).

        Raises DataError naming the file if it is missing, unreadable, not a
        single-channel index image, holds values outside 0..num_classes-1 ∪ {255},
        or (``check_size``) differs in size from its image.
        """
        mask = self._load_mask(i)
        if check_size:
            self._check_size(i, self.image_size(i), mask)
        return mask

    def read_pair(self, i: int) -> tuple[Image.Image, np.ndarray]:
        """(RGB image, (H, W) uint8 mask) at position ``i``, both validated."""
        image = self.read_image(i)
        mask = self._load_mask(i)
        self._check_size(i, image.size, mask)
        return image, mask

    def mask_classes(self, i: int) -> np.ndarray:
        """(num_classes,) bool: which classes occur in mask ``i`` (255 not counted)."""
        counts = np.bincount(self._load_mask(i).ravel(), minlength=LUT_SIZE)
        return counts[: self.num_classes] > 0

    def _load_mask(self, i: int) -> np.ndarray:
        path = self.mask_paths[i]
        img = _open_decoded(path, "mask")
        if img.mode not in MASK_MODES:
            raise DataError(path, f"mask has PIL mode {img.mode!r}; expected a single-channel "
                                  f"index image (mode 'P' palette or 'L' grayscale)")
        mask = np.array(img, dtype=np.uint8)
        valid = self._valid_values[mask]
        if not valid.all():
            bad = np.unique(mask[~valid]).tolist()
            raise DataError(path, f"mask values {bad} outside the classes 0..{self.num_classes - 1} "
                                  f"and the ignore value 255")
        return mask

    def _check_size(self, i: int, image_size: tuple[int, int], mask: np.ndarray) -> None:
        width, height = image_size
        if mask.shape != (height, width):
            raise DataError(self.mask_paths[i],
                            f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                            f"{width}x{height} ({self.image_paths[i]})")


# ---------------------------------------------------------------------------------- builders

def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(path, f"{what} folder not found")


def _read_voc_list(list_path: Path, root: Path, mask_dir: str) -> tuple[list[str], list[Path], list[Path]]:
    ids: list[str] = []
    images: list[Path] = []
    masks: list[Path] = []
    for line_no, line in enumerate(list_path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 1:
            image_id = fields[0]
            image_rel, mask_rel = f"JPEGImages/{image_id}.jpg", f"{mask_dir}/{image_id}.png"
        elif len(fields) == 2:
            image_rel, mask_rel = fields[0].lstrip("/"), fields[1].lstrip("/")
            image_id = Path(image_rel).stem
        else:
            raise DataError(list_path, f"line {line_no} has {len(fields)} fields; expected "
                                       f"'image_path mask_path' or a single image id")
        ids.append(image_id)
        images.append(root / image_rel)
        masks.append(root / mask_rel)
    return ids, images, masks


def _build_voc(root: Path, split: str) -> SegmentationFiles:
    _require_dir(root, "VOC root")
    candidates = [root / "splits" / f"{split}.txt", root / "ImageSets" / "Segmentation" / f"{split}.txt"]
    if split == "train":
        candidates.insert(0, root / "splits" / "train_aug.txt")
    list_path = next((p for p in candidates if p.is_file()), None)
    if list_path is None:
        raise DataError(root, f"no list file for VOC split {split!r}; tried "
                              f"{', '.join(str(p) for p in candidates)}")
    mask_dir = "SegmentationClassAug" if (root / "SegmentationClassAug").is_dir() else "SegmentationClass"
    ids, images, masks = _read_voc_list(list_path, root, mask_dir)
    if not ids:
        raise DataError(list_path, "the list is empty")
    return SegmentationFiles("voc", root, split, ids, images, masks, 21, builtin_class_names("voc"),
                             make_palette(21))


def _sorted_images(folder: Path) -> list[Path]:
    """Sorted non-hidden image files of ``folder`` (the reference image order)."""
    names = sorted(os.listdir(folder))
    return [folder / n for n in names
            if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS) and (folder / n).is_file()]


_ADE_SPLITS = {"train": "training", "training": "training", "val": "validation",
               "validation": "validation"}


def _build_ade(root: Path, split: str) -> SegmentationFiles:
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    if split not in _ADE_SPLITS:
        raise DataError(root, f"unknown ADE20K split {split!r}; expected 'train' or 'val'")
    folder = _ADE_SPLITS[split]
    image_dir, mask_dir = root / "images" / folder, root / "annotations" / folder
    _require_dir(image_dir, "ADE20K image")
    images = _sorted_images(image_dir)
    if not images:
        raise DataError(image_dir, "no images found")
    ids = [p.stem for p in images]
    masks = [mask_dir / f"{image_id}.png" for image_id in ids]
    return SegmentationFiles("ade", root, split, ids, images, masks, 151, builtin_class_names("ade"),
                             make_palette(151))


def _build_folder(root: Path, split: str) -> SegmentationFiles:
    _require_dir(root, "dataset root")
    classes_path = root / "classes.txt"
    if not classes_path.is_file():
        raise DataError(classes_path, "missing class list (one class name per line, background first)")
    names = [line.strip() for line in classes_path.read_text().splitlines() if line.strip()]
    if not 2 <= len(names) <= IGNORE_INDEX:
        raise DataError(classes_path, f"{len(names)} class names; expected 2..255 (background first)")
    image_dir = root / "images" / split
    _require_dir(image_dir, f"image ({split!r} split)")
    images = _sorted_images(image_dir)
    if not images:
        raise DataError(image_dir, "no images found")
    ids = [p.stem for p in images]
    masks = [root / "masks" / split / f"{image_id}.png" for image_id in ids]
    return SegmentationFiles(root.name or "folder", root, split, ids, images, masks, len(names),
                             names, make_palette(len(names)))


_BUILDERS: dict[str, Callable[[Path, str], SegmentationFiles]] = {
    "voc": _build_voc, "ade": _build_ade, "folder": _build_folder,
}


def build_files(name: str, root: str | os.PathLike[str], split: str) -> SegmentationFiles:
    """File list of split ``split`` ("train", "val", ...) of dataset layout ``name``.

    ``name`` is "voc", "ade" or "folder". Reads only list files/directory
    listings; file contents are validated when read (or by `check_dataset`).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown dataset layout {name!r}; expected one of {sorted(_BUILDERS)}")
    return _BUILDERS[name](Path(root).expanduser(), split)


# ------------------------------------------------------------------------------- validation

def _check_one(files: SegmentationFiles, i: int) -> list[DataProblem]:
    problems: list[DataProblem] = []
    image_size = None
    try:
        image_size = files.read_image(i).size
    except DataError as e:
        problems.append(DataProblem.from_error(e, i))
    try:
        mask = files._load_mask(i)
        if image_size is not None:
            files._check_size(i, image_size, mask)
    except DataError as e:
        problems.append(DataProblem.from_error(e, i))
    return problems


def check_dataset(files: SegmentationFiles, workers: int = 2, progress: bool = True,
                  positions: Sequence[int] | None = None) -> list[DataProblem]:
    """Fully decode and validate every image and mask of ``files`` (or only ``positions``).

    Returns every problem found (missing/unreadable files, wrong mask mode,
    out-of-range mask values, size mismatches), in list order; [] if all good.
    """
    indices = range(len(files)) if positions is None else [int(i) for i in positions]
    problems: list[DataProblem] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda i: _check_one(files, i), indices)
        for found in progress_bar(results, progress, f"check {files.name}/{files.split}", total=len(indices)):
            problems.extend(found)
    return problems


# ---------------------------------------------------------------------------- step dataset

class StepDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Images of one step: read → lookup table (raw value → channel) → transform.

    Args:
        files: the split's file list.
        positions: positions into ``files`` of the images of this step.
        lut: (256,) uint8 table from `sats.data.labels`.
        transform: ``(PIL image, (H, W) uint8 mask) -> ((3, H', W') float32, (H', W') int64)``.
        saliency: optional per-image saliency source (`sats.data.saliency.FolderSaliency`); its
            (H, W) uint8 map is passed to ``transform`` as a third argument, and the item becomes
            ``(image, mask, (H', W') float32 saliency in [0, 1])``.
    """

    def __init__(self, files: SegmentationFiles, positions: Sequence[int] | np.ndarray,
                 lut: np.ndarray, transform: Transform, saliency: Any = None) -> None:
        self.files = files
        self.positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if self.positions.size and (self.positions.min() < 0 or self.positions.max() >= len(files)):
            raise IndexError(f"positions must lie in 0..{len(files) - 1} for {files!r}; got "
                             f"min {self.positions.min()}, max {self.positions.max()}")
        self.lut = np.asarray(lut, dtype=np.uint8)
        if self.lut.shape != (LUT_SIZE,):
            raise ValueError(f"lookup table must have shape ({LUT_SIZE},), got {self.lut.shape}")
        self.transform = transform
        self.saliency = saliency

    def __len__(self) -> int:
        return int(self.positions.size)

    def lut_for(self, k: int) -> np.ndarray:
        """The lookup table of item ``k`` (one table for every item here)."""
        return self.lut

    def __getitem__(self, k: int) -> tuple[torch.Tensor, ...]:
        position = int(self.positions[k])
        image, mask = self.files.read_pair(position)
        lut = self.lut_for(k)
        if self.saliency is None:
            return self.transform(image, apply_lut(lut, mask))
        saliency = self.saliency.read(self.files.ids[position], shape=mask.shape)
        return self.transform(image, apply_lut(lut, mask), saliency)  # type: ignore[call-arg]
