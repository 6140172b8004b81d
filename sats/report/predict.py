"""``sats predict RUN_DIR IMAGES… [--step t] -o OUT``: segment any images with a run's checkpoint.

For every input image (files, folders, globs) it writes to ``OUT``:

* ``<stem>.png``: the prediction as a palette PNG whose values are the **dataset's class ids**
  (the format of the dataset's own masks: channels are mapped back through the task's order);
* ``<stem>_overlay.jpg``: the image with the prediction blended over it (``--no-overlay``: off);
* ``<stem>.json``: the area of every predicted class (pixels and fraction), by id and name;

and ``predictions.json`` with the run, step and every image's file. Images are segmented whole
(``--mode full``, batched by size), at the run's evaluation size (``resize``: shorter side to
``data.eval_size``, then the prediction is resized back), or with a sliding window of
``data.crop_size`` tiles (``sliding``, for images much larger than the training crops).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sats.data.datasets import IMAGE_EXTENSIONS, DataError, _open_decoded
from sats.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from sats.engine.rundir import RunDir, RunError
from sats.io import write_json_atomic
from sats.report.visualize import RunContext, open_run

MODES = ("full", "resize", "sliding")


def expand_inputs(items: Sequence[str]) -> List[Path]:
    """Files, folders (their images, sorted) and glob patterns → image paths (DataError if none or missing)."""
    out: List[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            out += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        elif path.is_file():
            out.append(path)
        elif any(ch in item for ch in "*?["):
            out += sorted(Path(p) for p in glob.glob(item) if Path(p).suffix.lower() in IMAGE_EXTENSIONS)
        else:
            raise DataError(path, "no such image file, folder or pattern")
    if not out:
        raise DataError(f"no image found in {list(items)} (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return out


def _normalised(image: Image.Image) -> torch.Tensor:
    """PIL RGB → (3, H, W) float32, ImageNet-normalised (as the training and test pipelines)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


@dataclass
class Predictor:
    """A run's step-``step`` model with its method's prediction rule."""

    ctx: RunContext
    step: int
    mode: str = "full"
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}")
        self.model = self.ctx.model(self.step)
        self.channel_classes = np.asarray(self.ctx.task.channel_classes, dtype=np.int64)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised → (B, K, H, W) float logits at the input size."""
        cfg = self.ctx.cfg.data
        x = images.to(self.ctx.device)
        if self.mode == "full":
            return self.model(x).logits.float()
        if self.mode == "resize":
            h, w = x.shape[-2:]
            scale = cfg.eval_size / min(h, w)
            small = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="bilinear",
                                  align_corners=False)
            return F.interpolate(self.model(small).logits.float(), size=(h, w), mode="bilinear", align_corners=False)
        return self._sliding(x, cfg.crop_size)

    def _sliding(self, x: torch.Tensor, tile: int) -> torch.Tensor:
        """Overlapping ``tile``² windows (stride 2/3 of a tile); logits averaged where windows overlap."""
        b, _, h, w = x.shape
        stride = max(1, tile * 2 // 3)
        ys = list(range(0, max(h - tile, 0) + 1, stride)) or [0]
        xs = list(range(0, max(w - tile, 0) + 1, stride)) or [0]
        if ys[-1] + tile < h:
            ys.append(h - tile)
        if xs[-1] + tile < w:
            xs.append(w - tile)
        total: Optional[torch.Tensor] = None
        count = torch.zeros(1, 1, h, w, device=x.device)
        for y0 in ys:
            for x0 in xs:
                window = x[..., y0:y0 + tile, x0:x0 + tile]
                out = self.model(window).logits.float()
                if total is None:
                    total = x.new_zeros(b, out.shape[1], h, w, dtype=torch.float32)
                total[..., y0:y0 + window.shape[-2], x0:x0 + window.shape[-1]] += out
                count[..., y0:y0 + window.shape[-2], x0:x0 + window.shape[-1]] += 1
        assert total is not None
        return total / count

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) → (B, H, W) int64 dataset class ids (the method's rule, channels mapped back)."""
        channels = self.ctx.method.predict(self.logits(images)).cpu().numpy()
        return self.channel_classes[channels]


def _areas(ids: np.ndarray, names: Sequence[str]) -> List[Dict[str, object]]:
    counts = np.bincount(ids.reshape(-1), minlength=len(names))
    total = int(ids.size)
    return [{"class_id": int(c), "class": names[c] if c < len(names) else str(c), "pixels": int(n),
             "fraction": round(int(n) / total, 6)} for c, n in enumerate(counts) if n > 0]


def _overlay(image: Image.Image, ids: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> Image.Image:
    colours = palette[np.clip(ids, 0, len(palette) - 1)].astype(np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = np.where((ids > 0)[..., None], (1 - alpha) * base + alpha * colours, base)
    return Image.fromarray(blended.round().astype(np.uint8))


def predict_images(run_dir: str | Path, inputs: Sequence[str], out: str | Path, step: Optional[int] = None,
                   mode: str = "full", batch_size: int = 4, overlay: bool = True,
                   device: Optional[str] = None) -> Dict[str, object]:
    """Segment ``inputs`` with the step-``step`` checkpoint (default: the last finished step) of ``run_dir``."""
    ctx = open_run(run_dir, device)
    finished = ctx.finished_steps()
    if not finished:
        raise RunError(f"{RunDir(run_dir).ckpt_dir}: no step checkpoint yet")
    step = finished[-1] if step is None else step
    if step not in finished:
        raise RunError(f"{run_dir}: step {step} has no checkpoint (steps with one: {finished})")
    predictor = Predictor(ctx, step, mode, batch_size)
    names, palette = ctx.class_names, ctx.palette
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = expand_inputs(inputs)
    images = {p: _open_decoded(p, "image").convert("RGB") for p in paths}
    by_size: Dict[tuple, List[Path]] = {}
    for p, img in images.items():  # images of one size share a batch
        by_size.setdefault(img.size, []).append(p)
    records = []
    for group in by_size.values():
        for k in range(0, len(group), max(1, batch_size)):
            chunk = group[k:k + batch_size]
            ids = predictor.predict(torch.stack([_normalised(images[p]) for p in chunk]))
            for p, pred in zip(chunk, ids):
                stem = p.stem
                mask = Image.fromarray(pred.astype(np.uint8), mode="P")
                mask.putpalette(palette.reshape(-1).tolist())
                mask.save(out / f"{stem}.png")
                record = {"image": str(p), "mask": f"{stem}.png", "size": list(images[p].size),
                          "areas": _areas(pred, names)}
                if overlay:
                    _overlay(images[p], pred, palette).save(out / f"{stem}_overlay.jpg", quality=92)
                    record["overlay"] = f"{stem}_overlay.jpg"
                write_json_atomic(out / f"{stem}.json", record)
                records.append(record)
    summary = {"run_dir": str(run_dir), "step": step, "mode": mode, "method": ctx.method.name,
               "images": sorted(records, key=lambda r: r["image"])}
    write_json_atomic(out / "predictions.json", summary)
    return summary
