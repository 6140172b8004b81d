"""The training data pipeline's throughput: images/s per data-loader worker on VOC-sized files.

It generates ``--images`` JPEG images of 500×375 (VOC's typical size; quality 90) with palette PNG
masks in the VOC layout, then times the real training pipeline of a step: JPEG decode, mask decode
and check, the label lookup table, the reference random resized crop to ``--crop`` px, flip and
normalisation, collated into batches by a ``DataLoader`` with 0, 1, 2… workers (``--workers``).
For a GPU step the question is how many workers keep it fed: ``workers needed = ms of data per image
× images per step / ms per GPU step`` — the GPU step times are in ``results/methods-cuda.md``.

Usage::

    python -m benchmarks dataloader [--images 96] [--crop 512] [--batch 8] [--workers 0,1,2] [--out PATH]

Writes ``benchmarks/results/dataloader-cpu.json`` and ``.md`` by default.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sats.data.classes import make_palette
from sats.data.datasets import build_files
from sats.data.labels import train_lut
from sats.data.tasks import get_task
from sats.data.transforms import train_transform
from sats.engine.data import SeededStepDataset
from sats.io import write_json_atomic, write_text_atomic

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def make_voc_like(root: Path, count: int, seed: int = 0) -> Path:
    """``count`` 500×375 JPEG photos-like images (smooth noise, so JPEG sizes are realistic) and masks."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    (root / "splits").mkdir(exist_ok=True)
    palette = make_palette(256).reshape(-1).tolist()
    lines = []
    yy, xx = np.mgrid[0:375, 0:500]
    for i in range(count):
        low = rng.integers(0, 256, size=(12, 16, 3)).astype(np.uint8)
        image = Image.fromarray(low).resize((500, 375), Image.BICUBIC)
        noise = rng.integers(-12, 13, size=(375, 500, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{i:06d}.jpg", quality=90)
        mask = np.zeros((375, 500), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):  # a few elliptic objects of random classes, 255 borders
            cy, cx, ry, rx = rng.integers(60, 315), rng.integers(60, 440), rng.integers(30, 120), rng.integers(30, 160)
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            mask[inside <= 1.0] = int(rng.integers(1, 21))
            mask[(inside > 1.0) & (inside <= 1.08)] = 255
        m = Image.fromarray(mask, mode="P")
        m.putpalette(palette)
        m.save(root / "SegmentationClassAug" / f"{i:06d}.png")
        lines.append(f"JPEGImages/{i:06d}.jpg SegmentationClassAug/{i:06d}.png")
    (root / "splits" / "train_aug.txt").write_text("\n".join(lines) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(lines[:4]) + "\n")
    return root


def measure(root: Path, workers: int, crop: int, batch: int, passes: int = 2) -> Dict[str, float]:
    """Images/s of the training pipeline with ``workers`` data-loader processes (median of ``passes``)."""
    files = build_files("voc", root, "train")
    task = get_task("voc", "15-5")
    dataset = SeededStepDataset(files, np.arange(len(files)), train_lut(task, 0), train_transform(crop), seed=1)
    rates = []
    for p in range(passes + 1):  # the first pass warms the page cache and the workers
        loader = DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers, drop_last=False)
        dataset.set_epoch_seed(p)
        tic = time.perf_counter()
        seen = sum(len(images) for images, _ in loader)
        if p:
            rates.append(seen / (time.perf_counter() - tic))
    rate = float(np.median(rates))
    return {"workers": workers, "images_per_s": round(rate, 2), "ms_per_image": round(1000.0 / rate, 2),
            "images_per_s_per_worker": round(rate / max(1, workers), 2)}


def markdown(payload: Dict) -> str:
    lines = [f"# Training data pipeline ({payload['setting']})", "", f"Machine: {payload['machine']}.", "",
             "| workers | images/s | ms / image | images/s per worker |", "|---:|---:|---:|---:|"]
    for r in payload["rows"]:
        lines.append(f"| {r['workers']} | {r['images_per_s']:.1f} | {r['ms_per_image']:.1f} | "
                     f"{r['images_per_s_per_worker']:.1f} |")
    lines += ["", "Workers a GPU step needs = (ms / image with 0 workers) × batch / (GPU ms per step); "
              "see benchmarks/README.md."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks dataloader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    parser.add_argument("--root", default=None, help="an existing VOC-layout folder (default: generate one)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "dataloader-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root) if args.root else make_voc_like(Path(tmp) / "voc", args.images)
        rows: List[Dict[str, float]] = [measure(root, int(w), args.crop, args.batch) for w in args.workers.split(",")]
    payload = {"setting": f"{args.images} VOC-sized JPEG/PNG pairs, crop {args.crop}, batch {args.batch}",
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                          f"{torch.__version__}", "rows": rows}
    out = Path(args.out)
    write_json_atomic(out, payload)
    write_text_atomic(out.with_suffix(".md"), markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
