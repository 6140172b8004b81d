"""SATS attention loss cost: vectorised class pooling vs a per-image, per-class loop.

``sats.losses.attention.sats_attention_loss`` pools every class region of every image
with one batched matrix product ``(B, K, N) @ (B, H, N, M)`` per stage.  The naive form
(the reference's structure) loops over images, present classes and heads, gathering
the class's attention rows with a boolean mask.  Both are timed forward + backward on
MiT-B2-shaped attention (last block of each stage, keys spatially reduced) and checked
to give the same loss.

Usage::

    python -m benchmarks.attention_loss [--device cpu|cuda] [--sizes 256 512] [--batch 2]

Writes ``benchmarks/results/attention_loss-<device>.json`` by default.
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

import torch

from sats.io import write_json_atomic
from sats.losses.attention import downsample_labels, sats_attention_loss

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# MiT-B2: (heads, total stride, spatial-reduction ratio) per stage (docs/methods.md §2.2).
MIT_B2_STAGES = ((1, 4, 8), (2, 8, 4), (5, 16, 2), (8, 32, 1))


def mit_b2_attention_shapes(size: int, batch: int) -> list[tuple[int, int, int, int]]:
    """``(B, heads, N_s, M_s)`` of the last block of every stage for a ``size × size`` input."""
    shapes = []
    for heads, stride, reduction in MIT_B2_STAGES:
        side = size // stride
        shapes.append((batch, heads, side * side, (side // reduction) ** 2))
    return shapes


def naive_loss(new_attn: list[torch.Tensor], old_attn: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Per image, per class, per head loop (correct layout), same formula as the library."""
    stage_losses = []
    for new, old in zip(new_attn, old_attn):
        batch, heads, num_queries, _ = new.shape
        side = int(num_queries**0.5)
        small = downsample_labels(labels, (side, side)).flatten(1)
        stage = new.new_zeros(())
        for b in range(batch):
            classes = [c for c in torch.unique(small[b]).tolist() if c not in (0, 255)]
            image = new.new_zeros(())
            for c in classes:
                region = small[b] == c
                head_sum = new.new_zeros(())
                for h in range(heads):
                    v_new = new[b, h][region].mean(dim=0)
                    v_old = old[b, h][region].detach().mean(dim=0)
                    head_sum = head_sum + torch.linalg.vector_norm(v_new - v_old)
                image = image + head_sum / heads
            if classes:
                stage = stage + image / len(classes)
        stage_losses.append(stage / batch)
    return torch.stack(stage_losses).mean()


def blob_labels(batch: int, size: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """Background with rectangular class blobs and a 255 border band, like a VOC crop."""
    labels = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        for c in torch.randperm(num_classes - 1, generator=gen)[:5].tolist():
            y, x = torch.randint(0, size * 3 // 4, (2,), generator=gen).tolist()
            h, w = torch.randint(size // 8, size // 3, (2,), generator=gen).tolist()
            labels[b, y : y + h, x : x + w] = c + 1
        labels[b, :, : size // 32] = 255
    return labels


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


def run(device: torch.device, sizes: list[int], batch: int, num_classes: int, warmup: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for size in sizes:
        shapes = mit_b2_attention_shapes(size, batch)
        new_attn = [torch.softmax(torch.randn(s, generator=gen), dim=-1).to(device).requires_grad_(True) for s in shapes]
        old_attn = [torch.softmax(torch.randn(s, generator=gen), dim=-1).to(device) for s in shapes]
        labels = blob_labels(batch, size, num_classes, gen).to(device)

        def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
            def call() -> None:
                for a in new_attn:
                    a.grad = None
                loss_fn().backward()

            return call

        def vectorised() -> torch.Tensor:
            return sats_attention_loss(new_attn, old_attn, labels, num_channels=num_classes)

        def naive() -> torch.Tensor:
            return naive_loss(new_attn, old_attn, labels)

        loss_vec, loss_naive = vectorised().item(), naive().item()
        if abs(loss_vec - loss_naive) > 1e-5 * max(abs(loss_naive), 1e-12):
            raise AssertionError(f"size {size}: vectorised loss {loss_vec} != naive loss {loss_naive}")
        t_vec = _time(step(vectorised), device, warmup, repeats)
        t_naive = _time(step(naive), device, warmup, repeats)
        row: dict = {"size": size, "attention_shapes": [list(s) for s in shapes], "loss": loss_vec}
        for name, times in (("vectorised", t_vec), ("naive_loop", t_naive)):
            row[name] = {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2)}
        row["speedup_median"] = round(row["naive_loop"]["median_ms"] / row["vectorised"]["median_ms"], 2)
        rows.append(row)
        print(
            f"{size}px batch {batch}: vectorised {row['vectorised']['median_ms']:8.1f} ms   "
            f"naive loop {row['naive_loop']['median_ms']:8.1f} ms   speedup x{row['speedup_median']}"
        )
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    return {
        "benchmark": "SATS attention loss, forward + backward, MiT-B2 shapes",
        "batch": batch,
        "num_channels": num_classes,
        "classes_per_image": "up to 5 foreground blobs + background + 255 band",
        "warmup": warmup,
        "repeats": repeats,
        "env": env,
        "results": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/attention_loss-<device>.json)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    result = run(device, args.sizes, args.batch, args.num_classes, args.warmup, args.repeats)
    out = args.out or RESULTS_DIR / f"attention_loss-{device.type}.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
