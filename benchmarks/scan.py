"""The one-off mask scan of a dataset at ADE20K's scale: content fingerprints and class presence.

Usage (from the repository root)::

    python -m benchmarks scan                          # 20,210 ADE-sized masks (ADE20K's training split)
    python -m benchmarks scan --num 2000 --workers 1 2

It writes ``--num`` synthetic ADE-like masks (8-bit PNG, sizes drawn around ADE20K's 512 × 683 median, 151
classes in blobs) into a temporary folder, then times, per ``--workers`` value and from a cold cache,

* ``fingerprint_s``: the content hash of every mask and image (what the caches are keyed by);
* ``presence_s``: the class-presence scan (decode + ``np.unique``-like presence per mask) given the hashes;
* ``cached_s``: the same ``class_presence`` call again, served from its content-addressed cache.

The masks are written once per run (``write_s``, not part of the scan). Results:
``benchmarks/results/scan-cpu.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import write_results  # noqa: E402
from sats.data.datasets import SegmentationFiles  # noqa: E402
from sats.data.splits import class_presence  # noqa: E402

NUM_CLASSES = 151


def write_masks(folder: Path, num: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """``num`` ADE-like masks (and 1×1 placeholder images: the scan reads masks; hashing reads both)."""
    rng = np.random.default_rng(seed)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    masks, images = [], []
    tile = Image.new("RGB", (1, 1))
    for i in range(num):
        h, w = int(rng.integers(384, 640)), int(rng.integers(512, 768))
        coarse = rng.integers(0, NUM_CLASSES, size=(h // 32 + 1, w // 32 + 1), dtype=np.uint8)
        mask = np.kron(coarse, np.ones((32, 32), np.uint8))[:h, :w]  # blobs, as real masks (PNG compresses)
        masks.append(folder / "annotations" / f"ADE_train_{i:08d}.png")
        images.append(folder / "images" / f"ADE_train_{i:08d}.jpg")
        Image.fromarray(mask).save(masks[-1])
        tile.save(images[-1], quality=90)
    return images, masks


def measure(folder: Path, images: list[Path], masks: list[Path], workers: int) -> dict[str, Any]:
    ids = [p.stem for p in masks]
    names = [f"class{c}" for c in range(NUM_CLASSES)]
    cache = Path(tempfile.mkdtemp(prefix="sats-scan-cache-"))
    files = SegmentationFiles("ade", folder, "train", ids, images, masks, NUM_CLASSES, names)
    tic = time.perf_counter()
    files.fingerprint(cache, workers)
    fingerprint_s = time.perf_counter() - tic
    tic = time.perf_counter()
    presence = class_presence(files, cache, workers, progress=False)
    presence_s = time.perf_counter() - tic
    again = SegmentationFiles("ade", folder, "train", ids, images, masks, NUM_CLASSES, names)
    tic = time.perf_counter()
    cached = class_presence(again, cache, workers, progress=False)
    cached_s = time.perf_counter() - tic
    if not np.array_equal(presence, cached):
        raise RuntimeError("the cached class presence differs from the scan")
    return {"masks": len(masks), "workers": workers, "fingerprint_s": round(fingerprint_s, 2),
            "presence_s": round(presence_s, 2), "total_s": round(fingerprint_s + presence_s, 2),
            "cached_s": round(cached_s, 2), "masks_per_s": round(len(masks) / (fingerprint_s + presence_s), 1)}


def scan_markdown(payload: dict[str, Any]) -> str:
    lines = [f"# Mask scan at ADE20K scale ({payload['machine']}, {payload['cpus']} CPUs)", "",
             f"{payload['rows'][0]['masks']} synthetic ADE-like masks (8-bit PNG, ~{payload['mean_kpixels']} kpixel); "
             "cold cache. Written by `python -m benchmarks scan`.", "",
             "| workers | fingerprint s | presence scan s | total s | masks/s | cached rerun s |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['workers']} | {r['fingerprint_s']} | {r['presence_s']} | {r['total_s']} | {r['masks_per_s']} | "
              f"{r['cached_s']} |" for r in payload["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=20210, help="masks (default: ADE20K's training split)")
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scan-cpu.json")
    args = parser.parse_args(argv)
    import os

    with tempfile.TemporaryDirectory(prefix="sats-scan-") as tmp:
        tic = time.perf_counter()
        images, masks = write_masks(Path(tmp), args.num)
        write_s = time.perf_counter() - tic
        with Image.open(masks[0]) as first:
            kpix = round(first.size[0] * first.size[1] / 1000)
        rows = []
        for workers in args.workers:
            rows.append(measure(Path(tmp), images, masks, workers))
            print(json.dumps(rows[-1]), flush=True)
    payload = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "write_s": round(write_s, 1), "mean_kpixels": kpix, "rows": rows}
    write_results(args.out, payload, scan_markdown(payload))
    return payload


if __name__ == "__main__":
    main()
