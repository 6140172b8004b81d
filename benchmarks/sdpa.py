"""Efficient self-attention of MiT: ``F.scaled_dot_product_attention`` vs the explicit softmax path.

``python -m benchmarks sdpa [--device cuda] [--dtypes float32 float16]``: forward+backward ms of
the attention core ``softmax(q kᵀ / √d) v`` at the shapes of MiT-B0 / B2 stages at 512 px, batch 8,
through SDPA (whatever backend PyTorch picks) and explicitly (the path that SATS's attention-returning
blocks use). Prints a table; writes ``results/sdpa-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"
# (name, heads, queries N, keys M, head dim) of MiT stages at 512 px (N = (512/4/2^i)^2, M = N / sr^2)
SHAPES = [("b0 stage1", 1, 16384, 256, 32), ("b0 stage2", 2, 4096, 256, 32), ("b2 stage1", 1, 16384, 256, 64),
          ("b2 stage2", 2, 4096, 256, 64), ("b2 stage3", 5, 1024, 256, 64), ("b2 stage4", 8, 256, 256, 64)]


def explicit(q, k, v):
    probs = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).float().softmax(-1)
    return probs.to(v.dtype) @ v


def fused(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def time_ms(fn, q, k, v, iters: int, device: torch.device) -> float:
    grad = torch.randn_like(q)
    for _ in range(3):
        fn(q, k, v).backward(grad)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(q, k, v).backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks sdpa", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for name, heads, n, m, d in SHAPES:
            q = torch.randn(args.batch, heads, n, d, device=device, dtype=dtype, requires_grad=True)
            k = torch.randn(args.batch, heads, m, d, device=device, dtype=dtype, requires_grad=True)
            v = torch.randn(args.batch, heads, m, d, device=device, dtype=dtype, requires_grad=True)
            row = {"shape": name, "dtype": dtype_name, "heads": heads, "N": n, "M": m, "d": d,
                   "sdpa_ms": round(time_ms(fused, q, k, v, args.iters, device), 3),
                   "explicit_ms": round(time_ms(explicit, q, k, v, args.iters, device), 3)}
            rows.append(row)
            print(f"{dtype_name:8s} {name:10s} SDPA {row['sdpa_ms']:8.3f} ms   explicit {row['explicit_ms']:8.3f} ms")
    payload = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "tf32": torch.backends.cuda.matmul.allow_tf32, "batch": args.batch,
               "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sdpa-{device.type}.json").write_text(json.dumps(payload, indent=1))
    return payload
