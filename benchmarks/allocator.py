"""The host allocator setting (``SATS_HOST_ALLOCATOR``, ``sats/allocator.py``): page faults and time, per setting.

Usage (from the repository root)::

    python -m benchmarks allocator                 # both settings, each in a fresh process, 1 thread
    python -m benchmarks allocator --with-step     # + SATS's training step at 512 px against its bound (slow)

Each measurement runs in a fresh process per setting (the C library's options are per process, and one block's
heap must not shape the next one's):

* ``pattern``: 60 rounds of 4 live and 6 temporary tensors of 1–60 MiB (sizes from a fixed seed): wall time,
  minor page faults, peak RSS;
* ``attention``: MiT-B2's stage-1 attention at 512 px, batch 2 (``q (2, 1, 16384, 64)``, 256 keys), forward +
  backward: the explicit softmax path SATS reads vs the fused SDPA kernel;
* ``losses``: the 512-px loss blocks of PLOP/SATS on ``(2, 21, 512, 512)`` logits (16 old channels): entropy
  pseudo-labels + CE + UNKD (forward + backward), and SATS's attention loss on the 4 stage maps;
* ``sats_step`` (``--with-step``): SATS's training iteration on MiT-B2 at 512 px, batch 2, VOC 15-5 step 1, measured
  by the ``cost`` benchmark (:func:`benchmarks.methods.measure`: interleaved with FT's iteration and the old model's
  forward; its ratio to that bound) and the process's peak RSS.

Medians of 7 rounds; faults are those of the timed rounds. Results: ``benchmarks/results/allocator-cpu.{json,md}``;
every ``cost`` row also records its setting (``host_allocator`` in ``methods-cpu.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import write_results  # noqa: E402
from sats.allocator import CHOICES, ENV, tune_host_allocator  # noqa: E402

ROUNDS = 7


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _timed(fn: Callable[[], Any]) -> dict[str, float]:
    """Median ms of ``ROUNDS`` calls after one untimed call, and the minor faults per call."""
    fn()
    times, start = [], _faults()
    for _ in range(ROUNDS):
        tic = time.perf_counter()
        fn()
        times.append((time.perf_counter() - tic) * 1000)
    return {"ms": round(statistics.median(times), 1), "faults_per_call": (_faults() - start) // ROUNDS}


def measure(setting: str, block: str) -> dict[str, Any]:
    """One block's figures under one setting, in this process (``$SATS_HOST_ALLOCATOR`` set by the caller)."""
    state = tune_host_allocator()
    import torch
    import torch.nn.functional as F

    from sats.losses.attention import sats_attention_loss
    from sats.losses.ce import cross_entropy
    from sats.losses.kd import unbiased_kd
    from sats.losses.pseudo_labels import entropy_pseudo_labels, normalized_entropy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if block == "pattern":
        rng = random.Random(0)
        mib = 2**20 // 4  # float32 elements per MiB
        tic, start = time.perf_counter(), _faults()
        for _ in range(60):
            live = [torch.empty(rng.randint(5, 60) * mib).fill_(1.0) for _ in range(4)]
            for _ in range(6):
                torch.empty(rng.randint(1, 60) * mib).fill_(1.0)
            del live
        figures = {"s": round(time.perf_counter() - tic, 2), "faults": _faults() - start,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
        return {"setting": setting, "state": state, "block": block, **figures}

    if block == "sats_step":
        from benchmarks.methods import Spec
        from benchmarks.methods import measure as measure_cost

        row = measure_cost(Spec(backbone="mit_b2", size=512, method="sats", batch=2, dataset="voc", task="15-5",
                                step=1, iters=3, warmup=1, device="cpu", amp="off", threads=1, optimizer="sgd",
                                profile_dir=None))
        return {"setting": setting, "state": state, "block": block, "ratio": round(row["ratio"], 3),
                "sats_ms": round(row["train_ms"]), "ft_ms": round(row["ft_ms"]), "old_ms": round(row["old_forward_ms"]),
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}

    if block.startswith("attention"):
        q = torch.randn(2, 1, 16384, 64, requires_grad=True)
        k = torch.randn(2, 1, 256, 64, requires_grad=True)
        v = torch.randn(2, 1, 256, 64, requires_grad=True)

        def explicit() -> None:
            probs = (torch.matmul(q, k.transpose(-2, -1)) * 0.125).softmax(dim=-1)
            torch.matmul(probs, v).sum().backward()

        def fused() -> None:
            F.scaled_dot_product_attention(q, k, v, scale=0.125).sum().backward()

        fn = explicit if block == "attention_explicit" else fused
    elif block == "pseudo_ce_unkd":
        size, old_channels = 512, 16
        logits = torch.randn(2, old_channels + 5, size, size, requires_grad=True)
        old_logits = torch.randn(2, old_channels, size, size)
        labels = torch.randint(0, old_channels + 5, (2, size, size))
        labels[:, : size // 2] = 0
        thresholds = torch.full((old_channels,), 0.9)

        def fn() -> None:
            pseudo, _ = entropy_pseudo_labels(labels, old_logits, thresholds, normalized_entropy(old_logits),
                                              old_channels)
            (cross_entropy(logits, pseudo) + unbiased_kd(logits, old_logits)).backward()
            logits.grad = None
    else:
        labels = torch.randint(0, 21, (2, 512, 512))
        labels[:, :256] = 0
        shapes = [(2, 1, 16384, 256), (2, 2, 4096, 256), (2, 5, 1024, 256), (2, 8, 256, 256)]
        new_maps = [torch.rand(s).softmax(-1).requires_grad_() for s in shapes]
        old_maps = [torch.rand(s).softmax(-1) for s in shapes]

        def fn() -> None:
            sats_attention_loss(new_maps, old_maps, labels, num_channels=21).backward()
            for m in new_maps:
                m.grad = None
    return {"setting": setting, "state": state, "block": block, **_timed(fn)}


BLOCKS = ("pattern", "attention_explicit", "attention_sdpa", "pseudo_ce_unkd", "sats_attention_loss")
ROWS = (("attention_explicit", "stage-1 attention, explicit (SATS reads it), fwd + bwd"),
        ("attention_sdpa", "stage-1 attention, fused SDPA, fwd + bwd"),
        ("pseudo_ce_unkd", "pseudo-labels + CE + UNKD at 512², fwd + bwd"),
        ("sats_attention_loss", "SATS attention loss, 4 stages, fwd + bwd"))


def markdown(rows: list[dict[str, Any]]) -> str:
    system = {r["block"]: r for r in rows if r["setting"] == "system"}
    tuned = {r["block"]: r for r in rows if r["setting"] == "tuned"}
    lines = [f"# Host allocator: `{ENV}=system` vs `tuned` ({platform.processor() or platform.machine()}, 1 thread)",
             "", "Written by `python -m benchmarks allocator`; each block and setting in a fresh process (module docstring).",
             f"tuned: {tuned['pattern']['state']}.", "",
             "| measurement | system | tuned | tuned / system |", "|---|---:|---:|---:|"]
    sp, tp = system["pattern"], tuned["pattern"]
    lines.append(f"| 60 rounds of 1–60 MiB tensors: time (s) | {sp['s']} | {tp['s']} | {tp['s'] / sp['s']:.2f} |")
    lines.append(f"| same: page faults | {sp['faults']:,} | {tp['faults']:,} | {tp['faults'] / max(sp['faults'], 1):.3f} |")
    lines.append(f"| same: peak RSS (MB) | {sp['peak_rss_mb']} | {tp['peak_rss_mb']} | "
                 f"{tp['peak_rss_mb'] / sp['peak_rss_mb']:.2f} |")
    for key, label in ROWS:
        s, t = system[key], tuned[key]
        lines.append(f"| {label}: ms (faults per call) | {s['ms']} ({s['faults_per_call']:,}) | "
                     f"{t['ms']} ({t['faults_per_call']:,}) | {t['ms'] / s['ms']:.2f} |")
    if "sats_step" in tuned:
        s, t = system["sats_step"], tuned["sats_step"]
        lines.append(f"| SATS step, MiT-B2 512 px b2: × its bound (SATS / FT / old ms) | {s['ratio']} "
                     f"({s['sats_ms']} / {s['ft_ms']} / {s['old_ms']}) | {t['ratio']} ({t['sats_ms']} / {t['ft_ms']} / "
                     f"{t['old_ms']}) | {t['ratio'] / s['ratio']:.2f} |")
        lines.append(f"| same: peak RSS (MB) | {s['peak_rss_mb']} | {t['peak_rss_mb']} | "
                     f"{t['peak_rss_mb'] / s['peak_rss_mb']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "allocator-cpu.json")
    parser.add_argument("--with-step", action="store_true", help="also SATS's 512-px training step (minutes)")
    parser.add_argument("--single", nargs=2, metavar=("SETTING", "BLOCK"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single:
        print(json.dumps(measure(*args.single)))
        return {}
    rows = []
    for block in BLOCKS + (("sats_step",) if args.with_step else ()):
        for setting in CHOICES:
            env = {**os.environ, ENV: setting}
            done = subprocess.run([sys.executable, __file__, "--single", setting, block], env=env,
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"benchmarks allocator: {block} with {setting} failed:\n{done.stderr[-2000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    payload = {"device": "cpu", "results": rows}
    write_results(args.out, payload, markdown(rows))
    return payload


if __name__ == "__main__":
    main()
