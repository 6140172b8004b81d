"""Saliency maps for SSUL's "unknown" class (docs/methods.md §2.5, §3.11).

SSUL labels the salient, otherwise unlabelled pixels of a training image as "unknown".
Two ways to get the saliency of an image:

* :class:`FolderSaliency` — precomputed maps in a folder, ``<root>/<image id>.png``, grayscale
  0–255 (the format of the ``saliency_map/`` folder SSUL's users download for VOC). A map is
  read with its image and goes through the same crop/flip/resize (nearest neighbour) as the
  mask; the training :class:`~sats.methods.base.Batch` carries it as ``saliency`` ``(B, H, W)``
  float32 in ``[0, 1]``. Configured by ``data.saliency_root`` (a relative path is taken under
  ``data.root``, like SSUL's ``VOC2012/saliency_map``).
* :class:`SaliencyModel` — any callable mapping a normalised image batch ``(B, 3, H, W)`` to
  probabilities ``(B, 1, H, W)`` (e.g. a DSS network with your own weights), loaded from a
  ``"package.module:factory"`` string with :func:`load_saliency_model` (SSUL's
  ``method.saliency_model``). No saliency weights ship with sats.

A pixel is salient where the probability is ``≥ SALIENCY_THRESHOLD`` (0.5; ``≥ 128`` on 0–255 maps).

For tests and the synthetic demo, :func:`write_saliency_from_masks` derives maps from the
ground truth (foreground = any class other than 0 and 255).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sats.data.classes import IGNORE_INDEX
from sats.data.datasets import DataError, SegmentationFiles
from sats.io import write_json_atomic

__all__ = ["SALIENCY_THRESHOLD", "FolderSaliency", "SaliencyModel", "SaliencySource", "ensure_saliency_from_masks",
           "load_saliency_model", "model_saliency", "resolve_saliency_root", "write_saliency_from_masks"]

SALIENCY_THRESHOLD = 0.5
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)
_STAMP = "saliency.json"


class SaliencySource(Protocol):
    """Dataset-side saliency: one 0–255 map per image id."""

    def read(self, image_id: str, shape: Optional[tuple[int, int]] = None) -> np.ndarray:
        """``(H, W)`` uint8 map of ``image_id``; DataError naming the file if missing or not ``shape``."""
        ...

    def check(self, image_ids: Iterable[str]) -> None:
        """DataError listing every id without a map."""
        ...


class FolderSaliency:
    """Precomputed saliency maps ``<root>/<image id>.png`` (grayscale; other modes are converted to 8-bit gray)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(self.root, "saliency folder not found (data.saliency_root): expected <image id>.png "
                                       "grayscale maps, e.g. SSUL's saliency_map/ folder for VOC")

    def __repr__(self) -> str:
        return f"FolderSaliency({str(self.root)!r})"

    def path(self, image_id: str) -> Path:
        return self.root / f"{image_id}.png"

    def read(self, image_id: str, shape: Optional[tuple[int, int]] = None) -> np.ndarray:
        path = self.path(image_id)
        try:
            with Image.open(path) as img:
                img.load()
                gray = img if img.mode == "L" else img.convert("L")
                saliency = np.array(gray, dtype=np.uint8)
        except FileNotFoundError:
            raise DataError(path, f"missing saliency map of image {image_id!r} "
                                  f"(data.saliency_root={self.root})") from None
        except _DECODE_ERRORS as e:
            raise DataError(path, f"unreadable saliency map ({type(e).__name__}: {e})") from e
        if shape is not None and saliency.shape != tuple(shape):
            raise DataError(path, f"saliency map size {saliency.shape[1]}x{saliency.shape[0]} differs from its image "
                                  f"{shape[1]}x{shape[0]} (W x H)")
        return saliency

    def check(self, image_ids: Iterable[str]) -> None:
        missing = [i for i in image_ids if not self.path(i).is_file()]
        if missing:
            shown = ", ".join(str(self.path(i)) for i in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise DataError(self.root, f"{len(missing)} saliency map(s) missing (data.saliency_root): {shown}{more}")


def resolve_saliency_root(saliency_root: str, data_root: str | os.PathLike[str]) -> Path:
    """``data.saliency_root`` as a path: absolute as given, relative under ``data.root``."""
    path = Path(saliency_root).expanduser()
    return path if path.is_absolute() else Path(data_root) / path


@runtime_checkable
class SaliencyModel(Protocol):
    """A saliency network: normalised images ``(B, 3, H, W)`` → probabilities ``(B, 1, H, W)`` in ``[0, 1]``."""

    def __call__(self, images: Tensor) -> Tensor:
        ...


def load_saliency_model(spec: str) -> SaliencyModel:
    """Import ``"package.module:factory"`` and call ``factory()``; the result must be a :class:`SaliencyModel`."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"saliency_model: {spec!r} is not of the form 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"saliency_model: cannot import {spec!r} ({type(e).__name__}: {e})") from e
    model = factory()
    if not callable(model):
        raise ValueError(f"saliency_model: {spec!r} returned a {type(model).__name__}, which is not callable")
    return model


def model_saliency(model: SaliencyModel, images: Tensor) -> Tensor:
    """Run ``model`` without gradients → ``(B, H, W)`` float32 probabilities (shape checked)."""
    with torch.no_grad():
        probabilities = model(images)
    expected = (images.shape[0], 1, *images.shape[-2:])
    if tuple(probabilities.shape) != expected:
        raise ValueError(f"saliency model returned shape {tuple(probabilities.shape)}, expected {expected}")
    return probabilities[:, 0].float()


# ---------------------------------------------------------------------------- from masks
def write_saliency_from_masks(files: SegmentationFiles, out_dir: str | os.PathLike[str],
                              positions: Optional[Sequence[int]] = None, overwrite: bool = True) -> Path:
    """Write ``<out_dir>/<id>.png``: 255 where the mask holds a class other than 0 and 255, else 0.

    A stand-in for a saliency network on data with ground truth (tests, the synthetic demo).
    Files are written atomically; with ``overwrite=False`` existing files are kept.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    indices = range(len(files)) if positions is None else [int(i) for i in positions]
    for i in indices:
        path = out / f"{files.ids[i]}.png"
        if not overwrite and path.is_file():
            continue
        mask = files.read_mask(i)
        salient = ((mask != 0) & (mask != IGNORE_INDEX)).astype(np.uint8) * 255
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        Image.fromarray(salient, "L").save(tmp, format="PNG")
        os.replace(tmp, path)
    return out


def ensure_saliency_from_masks(files: SegmentationFiles, out_dir: str | os.PathLike[str], fingerprint: str) -> Path:
    """Mask-derived maps for every image of ``files`` in ``out_dir``, rewritten when ``fingerprint`` changed.

    ``fingerprint`` identifies the masks by content (``SegmentationFiles.fingerprint()``); it is
    kept in ``<out_dir>/saliency.json``, so a regenerated or edited dataset never meets stale maps.
    """
    out = Path(out_dir)
    stamp = out / _STAMP
    current = {"source": "masks", "fingerprint": fingerprint, "list": files.list_digest}
    fresh = stamp.is_file() and json.loads(stamp.read_text()) == current
    if fresh and all((out / f"{i}.png").is_file() for i in files.ids):
        return out
    write_saliency_from_masks(files, out, overwrite=not fresh)
    write_json_atomic(stamp, current)
    return out
