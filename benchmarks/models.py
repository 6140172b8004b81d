"""Speed and memory of the segmenters: forward and forward+backward per iteration.

Usage (from the repository root)::

    python benchmarks/models.py                                  # mit_b0, mit_b2, resnet101 × 128/256/512
    python benchmarks/models.py --backbones mit_b0 mit_b2 --sizes 128 256 --iters 5

For every backbone × input size (× attentions requested or not, MiT only) it
reports the **median** milliseconds per iteration after ``--warmup`` untimed
iterations of

* ``forward_ms``: eval mode, ``torch.no_grad()`` (inference);
* ``train_ms``: train mode, forward + backward of ``logits.mean()`` (plus the
  mean of every attention map when they are requested, so their graph is
  exercised), gradients zeroed between iterations, no optimiser step.
* ``forward_cpu_ms`` / ``train_cpu_ms``: the same in process CPU time (all
  threads summed); on a shared CPU machine it is less disturbed by other
  processes than the wall-clock figures.

Compute: ``forward_gflop`` is the forward's FLOP count (``torch.utils.flop_counter``, one batch); a training
iteration is taken as 3× that (forward + backward; FlopCounterMode over-counts depth-wise convolutions'
backward, so the backward is not counted directly), and ``train_gflops`` = that / ``train_ms``: the achieved
FLOP rate, to set against the machine's peak.

Options (``--options``, each a ``+``-joined set, one row each): ``plain``; ``checkpoint`` (the
``model.checkpoint_activations`` switch, MiT); ``channels_last`` (``train.channels_last``); ``compile``
(``torch.compile``, inductor: the first iterations compile, so give it ``--warmup 3`` or more).

Memory (``*_peak_mb``):

* CUDA: ``torch.cuda.max_memory_allocated`` during the phase minus the memory
  allocated before it (weights, inputs and gradients of the previous phase excluded),
  i.e. the activation/workspace peak of the phase;
* CPU: every configuration runs in a fresh subprocess, and the figure is the
  growth of the process's peak resident set size (``resource.getrusage`` max
  RSS) over the RSS measured just before the phase. Forward runs before
  forward+backward, so each figure is that phase's own peak. RSS includes the
  allocator's cached pages, so it is an upper bound of the tensors' memory.

Models: MiT backbones with the reference simplified head, ResNet with ASPP;
one classifier head of 21 channels (VOC). Results are merged into
``benchmarks/results/models-<device>.json`` (keyed by backbone, size,
attentions, batch and AMP).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import write_results  # noqa: E402
from sats.allocator import tune_host_allocator  # noqa: E402
from sats.models import ModelConfig, build_segmenter  # noqa: E402


def current_rss_mb() -> float:
    """Resident set size now (Linux ``/proc/self/statm``), MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


OPTIONS = ("plain", "checkpoint", "channels_last", "compile")


def matmul_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """The practical fp32 ceiling: the best GFLOP/s of an ``n``×``n`` matrix product (2n³ FLOPs) on this device."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        tic = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - tic) / 1e9)
    return best


def forward_gflop(model: torch.nn.Module, x: torch.Tensor, need: set) -> float:
    """FLOPs of one forward of ``model`` on ``x`` (no grad), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, need=need)
    return counter.get_total_flops() / 1e9


def measure(backbone: str, size: int, attentions: bool, batch: int, iters: int, warmup: int, device: torch.device,
            amp: bool, option: str = "plain") -> dict[str, Any]:
    """Time and memory of one configuration (see the module docstring)."""
    allocator = tune_host_allocator()  # as `sats train` does; SATS_HOST_ALLOCATOR=system measures the defaults
    switches = set(option.split("+"))
    unknown = switches - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; known: {', '.join(OPTIONS)}")
    torch.manual_seed(0)
    head = "aspp" if backbone.startswith("resnet") else "simple"
    model = build_segmenter(ModelConfig(backbone=backbone, head=head,
                                        checkpoint_activations="checkpoint" in switches), [21]).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    if "channels_last" in switches:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    gflop = forward_gflop(model, x, {"attentions"} if attentions else set())
    plain_model = model
    if "compile" in switches:
        model = torch.compile(model)
    need = {"attentions"} if attentions else set()
    autocast = torch.autocast(device.type, dtype=torch.float16, enabled=amp)

    def phase(train: bool) -> tuple[float, float, float]:
        model.train(train)
        times: list[float] = []
        cpu_times: list[float] = []
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            base = current_rss_mb()
        for i in range(warmup + iters):
            start, start_cpu = time.perf_counter(), time.process_time()
            if train:
                model.zero_grad(set_to_none=True)
                with autocast:
                    out = model(x, need=need)
                    loss = out.logits.float().mean()
                    if out.attentions is not None:
                        loss = loss + sum(a.mean() for a in out.attentions)
                loss.backward()
            else:
                with torch.no_grad(), autocast:
                    model(x, need=need)
            sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
                cpu_times.append((time.process_time() - start_cpu) * 1000)
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            peak = peak_rss_mb() - base
        return statistics.median(times), statistics.median(cpu_times), peak

    forward_ms, forward_cpu_ms, forward_peak = phase(train=False)
    train_ms, train_cpu_ms, train_peak = phase(train=True)
    return {
        "backbone": backbone,
        "size": size,
        "attentions": attentions,
        "batch": batch,
        "amp": amp,
        "iters": iters,
        "forward_ms": round(forward_ms, 2),
        "train_ms": round(train_ms, 2),
        "forward_cpu_ms": round(forward_cpu_ms, 2),
        "train_cpu_ms": round(train_cpu_ms, 2),
        "forward_peak_mb": round(forward_peak, 1),
        "train_peak_mb": round(train_peak, 1),
        "params_m": round(sum(p.numel() for p in plain_model.parameters()) / 1e6, 3),
        "option": option,
        "host_allocator": allocator,
        "forward_gflop": round(gflop, 4),
        "train_gflops": round(3 * gflop / (train_ms / 1000), 1),
        "memory_measure": "cuda max_memory_allocated - allocated before" if device.type == "cuda" else "cpu peak RSS growth (getrusage)",
    }


def run_isolated(args: argparse.Namespace, backbone: str, size: int, attentions: bool, option: str) -> dict[str, Any]:
    """`measure` in a fresh Python process (CPU: so the peak RSS belongs to this configuration only)."""
    command = [
        sys.executable, __file__, "--single", backbone, str(size), str(int(attentions)), "--options", option,
        "--batch", str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup),
        "--device", args.device, "--threads", str(args.threads),
    ] + (["--amp"] if args.amp else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of {backbone} at {size} px failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def models_markdown(payload: dict[str, Any]) -> str:
    """The rows as a markdown table: time, achieved FLOP rate and peak memory per backbone, size and option."""
    lines = [f"# Segmenter cost on {payload['device_name']} ({payload['device']}, torch {payload['torch']}, "
             f"{payload['threads']} thread(s))", "",
             "Training iteration = forward + backward of one batch (no optimiser step); GFLOP/s = 3 × forward FLOPs "
             "/ train time. Written by `python -m benchmarks models`.", "",
             f"The fp32 ceiling measured with the rows (best 2048² matrix product, the same threads): "
             f"{payload.get('matmul_gflops', '–')} GFLOP/s; `% peak` = train GFLOP/s over it.", "",
             "| backbone | px | batch | attn | option | forward ms | train ms | fwd GFLOP | train GFLOP/s | % peak | "
             "train peak MiB |", "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    peak = payload.get("matmul_gflops")
    for r in payload["results"]:
        share = f"{100 * r['train_gflops'] / peak:.0f}" if peak and "train_gflops" in r else "–"
        lines.append(f"| {r['backbone']} | {r['size']} | {r['batch']} | {'yes' if r['attentions'] else 'no'} | "
                     f"{r.get('option', 'plain')} | {r['forward_ms']} | {r['train_ms']} | {r.get('forward_gflop', '–')} | "
                     f"{r.get('train_gflops', '–')} | {share} | {r['train_peak_mb']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["mit_b0", "mit_b2", "resnet101"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--attentions", choices=["both", "on", "off"], default="both", help="MiT: with/without attention maps")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/models-<device>.json")
    parser.add_argument("--options", nargs="+", default=["plain"],
                        help=f"one row per option: {', '.join(OPTIONS)}, or a '+'-joined set (checkpoint+compile)")
    parser.add_argument("--single", nargs=3, metavar=("BACKBONE", "SIZE", "ATTN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.single:
        backbone, size, attn = args.single
        print(json.dumps(measure(backbone, int(size), bool(int(attn)), args.batch, args.iters, args.warmup, device,
                                 args.amp, args.options[0])))
        return 0

    out_path = args.out or ROOT / "benchmarks" / "results" / f"models-{device.type}.json"
    previous = json.loads(out_path.read_text())["results"] if out_path.is_file() else []
    def key(r: dict[str, Any]) -> tuple:
        return r["backbone"], r["size"], r["attentions"], r["batch"], r["amp"], r.get("option", "plain")

    results: dict[tuple, dict[str, Any]] = {key(r): r for r in previous}
    for backbone in args.backbones:
        modes = [False] if backbone.startswith("resnet") else {"both": [False, True], "on": [True], "off": [False]}[args.attentions]
        for size in args.sizes:
            for attentions in modes:
                for option in args.options:
                    if "checkpoint" in option and backbone.startswith("resnet"):
                        continue  # a MiT switch
                    if device.type == "cpu":
                        row = run_isolated(args, backbone, size, attentions, option)
                    else:
                        row = measure(backbone, size, attentions, args.batch, args.iters, args.warmup, device,
                                      args.amp, option)
                    results[key(row)] = row
                    print(
                        f"{backbone:10s} {size:4d}px attn={str(attentions):5s} batch={args.batch} {option:14s} "
                        f"forward {row['forward_ms']:9.1f} ms  train {row['train_ms']:9.1f} ms "
                        f"({row['train_gflops']:.1f} GFLOP/s)  peak fwd {row['forward_peak_mb']:8.1f} MiB  "
                        f"train {row['train_peak_mb']:8.1f} MiB",
                        flush=True,
                    )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    payload = {
        "matmul_gflops": round(matmul_gflops(device), 1),
        "device": device.type,
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": args.threads,
        "results": sorted(results.values(), key=key),
    }
    write_results(out_path, payload, models_markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
