"""Confusion-matrix update cost: on-device ``torch.bincount`` vs the reference host-side NumPy path.

The reference (MiB/PLOP ``StreamSegMetrics``) copies predictions and labels to the host and
accumulates with ``np.bincount`` per batch. ``sats.engine.evaluator.ConfusionMatrix`` stays on
the device with one ``torch.bincount`` per batch.

Usage::

    python -m benchmarks.confusion [--device cpu|cuda] [--repeats 10] [--out PATH]

Writes ``benchmarks/results/confusion-<device>.json`` by default.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sats.io import write_json_atomic
from sats.engine.evaluator import ConfusionMatrix

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def reference_update(conf: np.ndarray, pred: torch.Tensor, target: torch.Tensor, k: int) -> None:
    """Host-side accumulation as in the reference: copy to NumPy, mask, ``np.bincount``."""
    p = pred.cpu().numpy()
    t = target.cpu().numpy()
    valid = (t >= 0) & (t < k)
    conf += np.bincount(k * t[valid].astype(np.int64) + p[valid], minlength=k * k).reshape(k, k)


def _time(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Wall time of each call in milliseconds (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def run(device: torch.device, classes: list[int], batch: int, size: int, warmup: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    pixels = batch * size * size
    rows = []
    for k in classes:
        target = torch.randint(0, k, (batch, size, size), generator=gen)
        target[torch.rand(batch, size, size, generator=gen) < 0.1] = 255  # ~10 % ignored pixels
        pred = torch.randint(0, k, (batch, size, size), generator=gen)
        target, pred = target.to(device), pred.to(device)

        cm = ConfusionMatrix(k, device)
        conf_ref = np.zeros((k, k), dtype=np.int64)
        t_torch = _time(lambda: cm.update(pred, target), device, warmup, repeats)
        t_ref = _time(lambda: reference_update(conf_ref, pred, target, k), device, warmup, repeats)
        if not np.array_equal(cm.matrix.cpu().numpy(), conf_ref):  # same number of calls on both sides
            raise AssertionError(f"K={k}: torch and reference confusion matrices differ")
        row = {"num_classes": k}
        for name, times in (("torch_bincount_device", t_torch), ("numpy_reference_host", t_ref)):
            med = statistics.median(times)
            row[name] = {"median_ms": round(med, 3), "min_ms": round(min(times), 3), "mpix_per_s": round(pixels / med / 1e3, 1)}
        row["speedup_median"] = round(row["numpy_reference_host"]["median_ms"] / row["torch_bincount_device"]["median_ms"], 2)
        rows.append(row)
        print(
            f"K={k:4d}  torch bincount ({device.type}): {row['torch_bincount_device']['median_ms']:8.2f} ms   "
            f"numpy reference (host): {row['numpy_reference_host']['median_ms']:8.2f} ms   "
            f"speedup x{row['speedup_median']}"
        )
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    return {
        "benchmark": "confusion-matrix update per batch",
        "batch": batch,
        "size": [size, size],
        "pixels_per_batch": pixels,
        "ignored_fraction": 0.1,
        "warmup": warmup,
        "repeats": repeats,
        "env": env,
        "results": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 151])
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/confusion-<device>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = run(device, args.classes, args.batch, args.size, args.warmup, args.repeats)
    out = args.out or RESULTS_DIR / f"confusion-{device.type}.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
