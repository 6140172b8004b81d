"""The optimiser step alone, per kernel choice (``train.optimizer_impl``), over a segmenter's parameters.

Usage (from the repository root)::

    python -m benchmarks optimizer                          # MiT-B2 + a 21-channel head, SGD and AdamW
    python -m benchmarks optimizer --backbone resnet101 --threads 1

Every parameter gets a random gradient once; the median of ``--iters`` ``optimizer.step()`` calls (after two
untimed ones) is reported per optimiser and kernel. Results: ``benchmarks/results/optimizer-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sats.config import TrainConfig  # noqa: E402
from sats.engine.optim import build_optimizer  # noqa: E402
from sats.models.config import ModelConfig  # noqa: E402
from sats.models.segmenter import build_segmenter  # noqa: E402

KERNELS = ("loop", "foreach", "fused", "auto")


def measure(backbone: str, optimizer: str, kernel: str, iters: int, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    head = "aspp" if backbone.startswith("resnet") else "simple"
    model = build_segmenter(ModelConfig(backbone=backbone, head=head), [16, 5]).to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opt = build_optimizer(params, TrainConfig(optimizer=optimizer, optimizer_impl=kernel), 0.01)
    times = []
    for i in range(iters + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append((time.perf_counter() - tic) * 1000)
    return {"backbone": backbone, "optimizer": optimizer, "kernel": kernel, "tensors": len(params),
            "params_m": round(sum(p.numel() for p in params) / 1e6, 2), "step_ms": round(statistics.median(times), 2)}


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mit_b2")
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [measure(args.backbone, o, k, args.iters, device) for o in args.optimizers for k in KERNELS]
    for row in rows:
        print(json.dumps(row), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    payload = {"device": device.type, "device_name": name, "torch": torch.__version__, "threads": args.threads,
               "results": rows}
    out = args.out or ROOT / "benchmarks" / "results" / f"optimizer-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# Optimiser step by kernel ({name}, {device.type}, torch {torch.__version__}, {args.threads} thread(s))",
             "", "`train.optimizer_impl`; written by `python -m benchmarks optimizer`.", "",
             "| backbone | optimiser | kernel | tensors | params (M) | step ms |", "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['backbone']} | {r['optimizer']} | {r['kernel']} | {r['tensors']} | {r['params_m']} | "
              f"{r['step_ms']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return payload


if __name__ == "__main__":
    main()
