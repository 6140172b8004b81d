"""Scaling of step time and memory: with classes and heads (steps), and with resolution.

Usage (from the repository root; ``sats bench scaling ...`` is the same)::

    python -m benchmarks scaling                                   # both experiments, default methods
    python -m benchmarks scaling --experiments heads --methods all --backbone mit_b0 --size 128
    python -m benchmarks scaling --experiments resolution --sizes 128 256 512

Every point is one :mod:`benchmarks.methods` measurement (same phases, lower bound and memory
figures), so each row also carries the method's ratio to its bound at that point.

* ``heads``: the measured step of these layouts (K_t = channels, K_{t−1} = old channels, heads = steps so far):

  ====================  =====  =======  =====================
  layout                K_t    K_{t−1}  heads
  ====================  =====  =======  =====================
  voc 15-5, step 1      21     16       2 (16 + 5)
  voc 19-1, step 1      21     20       2 (20 + 1)
  voc 15-1, step 5      21     20       6 (16 + 5 × 1)
  ade 100-5, step 1     106    101      2 (101 + 5)
  ade 100-5, step 5     126    121      6 (101 + 5 × 5)
  ade 100-50, step 1    151    101      2 (101 + 50)
  ade 100-10, step 5    151    141      6 (101 + 5 × 10)
  ade 145-5, step 1     151    146      2 (146 + 5)
  ade 100-5, step 10    151    146      11 (101 + 10 × 5)
  ====================  =====  =======  =====================

  The step-index check compares layouts with the same K_t **and** K_{t−1} (19-1 vs 15-1 step 5;
  145-5 vs 100-5 step 10): there only the number of heads differs, so a method's ratio to its
  bound (whose FT part already pays for the classifier's per-head convolutions) should not move.
  At equal K_t alone, more steps also mean more old channels, and every distillation term costs
  ``O(K_{t−1} · pixels)``: that growth comes with the classes, not with the step index.
* ``resolution``: VOC 15-5 step 1 at every ``--sizes`` (ms per megapixel shows super-linear growth,
  e.g. the attention maps of MiT's first stage, whose size is quadratic in the pixels).

Results are merged into ``benchmarks/results/scaling-<device>.json`` and rendered to ``scaling-<device>.md``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

import torch

from benchmarks.methods import RESULTS_DIR, Spec, _fmt, add_common_arguments, measure_and_write, resolve_methods

#: (dataset, task, step) of the heads experiment, in table order
HEAD_LAYOUTS: tuple[tuple[str, str, int], ...] = (
    ("voc", "15-5", 1), ("voc", "19-1", 1), ("voc", "15-1", 5),
    ("ade", "100-5", 1), ("ade", "100-5", 5),
    ("ade", "100-50", 1), ("ade", "100-10", 5), ("ade", "145-5", 1), ("ade", "100-5", 10),
)
DEFAULT_METHODS = ("ft", "lwf", "mib", "plop", "sats", "ewc", "rw", "ssul")
RATIO_TOLERANCE = 0.10  # equal K_t and K_{t-1}: the ratio to the bound may rise by at most 0.10 (noise included)


def _layout(r: dict) -> str:
    return f"{r['dataset']} {r['task']} t={r['step']}"


def heads_markdown(rows: Sequence[dict]) -> str:
    """Long table per (backbone, size, batch, AMP) and the equal-K check per method."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backbone"], r["size"], r["batch"], r["amp"]), []).append(r)
    order = {layout: i for i, layout in enumerate(HEAD_LAYOUTS)}
    lines: list[str] = []
    for (backbone, size, batch, amp), group in groups.items():
        group = [r for r in group if r["method"] != "joint"]
        if len({(r["dataset"], r["task"], r["step"]) for r in group}) < 2:
            continue
        lines += [f"### Classes and heads: {backbone}, {size} px, batch {batch}, AMP {amp}", "",
                  "| method | layout | K_t | K_{t−1} | heads | train ms | FT ms | ratio to bound | peak MiB | growth MiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        group.sort(key=lambda r: (r["method"], order.get((r["dataset"], r["task"], r["step"]), len(order)), r["task"]))
        for r in group:
            lines.append(f"| {r['method']} | {_layout(r)} | {r['num_outputs']} | {r['num_outputs'] - r['head_sizes'][-1]} | "
                         f"{len(r['head_sizes'])} | "
                         f"{_fmt(r['train_ms'])} | {_fmt(r['ft_ms'])} | {r['ratio']:.2f} | "
                         f"{_fmt(r['train_peak_mb'], 0)} | {_fmt(r['train_peak_growth_mb'], 0)} |")
        lines += ["", "Step index: same K_t and K_{t−1}, more heads. The check uses the ratio to the bound "
                      f"(measured interleaved, robust to the machine's load): ok if it rises by at most {RATIO_TOLERANCE}; "
                      "train ms is shown for information (different processes, load-dependent).", "",
                  "| method | K_t | K_{t−1} | heads | train ms | ratio | Δ ratio | check |",
                  "|---|---:|---:|---|---|---|---:|---|"]
        for method in sorted({r["method"] for r in group}):
            pairs: dict[tuple[int, int], list[dict]] = {}
            for r in group:
                if r["method"] == method:
                    pairs.setdefault((r["num_outputs"], r["num_outputs"] - r["head_sizes"][-1]), []).append(r)
            for (k, k_old), same in sorted(pairs.items()):
                same.sort(key=lambda r: len(r["head_sizes"]))
                if len(same) < 2 or len(same[0]["head_sizes"]) == len(same[-1]["head_sizes"]):
                    continue
                first, last = same[0], same[-1]
                change = last["ratio"] - first["ratio"]
                ok = "ok" if change <= RATIO_TOLERANCE else "**grows**"
                lines.append(f"| {method} | {k} | {k_old} | {len(first['head_sizes'])} → {len(last['head_sizes'])} | "
                             f"{first['train_ms']:.1f} → {last['train_ms']:.1f} | "
                             f"{first['ratio']:.2f} → {last['ratio']:.2f} | {change:+.2f} | {ok} |")
        lines.append("")
    return "\n".join(lines)


def resolution_markdown(rows: Sequence[dict]) -> str:
    """Per (backbone, batch, AMP, layout): every size, with ms and MiB per megapixel."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["backbone"], r["batch"], r["amp"], r["dataset"], r["task"], r["step"]), []).append(r)
    lines: list[str] = []
    for (backbone, batch, amp, dataset, task, step), group in groups.items():
        if len({r["size"] for r in group}) < 2:
            continue
        lines += [f"### Resolution: {backbone}, batch {batch}, AMP {amp}, {dataset} {task} t={step}", "",
                  "| method | size | train ms | ms / Mpx | ratio to bound | peak MiB | growth MiB | growth MiB / Mpx |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(group, key=lambda r: (r["method"], r["size"])):
            mpx = r["batch"] * r["size"] ** 2 / 1e6
            growth = r["train_peak_growth_mb"]
            lines.append(f"| {r['method']} | {r['size']} | {_fmt(r['train_ms'])} | {r['train_ms'] / mpx:.0f} | "
                         f"{r['ratio']:.2f} | {_fmt(r['train_peak_mb'], 0)} | {_fmt(growth, 0)} | "
                         f"{'–' if growth is None else f'{growth / mpx:.0f}'} |")
        lines.append("")
    return "\n".join(lines)


def scaling_markdown(payload: dict) -> str:
    runs = payload["runs"]
    env_lines = [f"- run {i}: {e.get('device_name', '?')} ({e.get('device', '?')}), torch {e.get('torch', '?')}, "
                 f"{e.get('torch_threads', '?')} threads, load average {e.get('loadavg', '?')} → "
                 f"{e.get('loadavg_after', '?')}, {e.get('date', '?')}: `{e.get('command', '')}`"
                 for i, e in enumerate(runs)]
    return "\n".join(["# Scaling", "", "Each row is one `benchmarks.methods` measurement (see its docstring).", "",
                      *env_lines, "", heads_markdown(payload["results"]), resolution_markdown(payload["results"])])


def _parse_layout(text: str) -> tuple[str, str, int]:
    """``"ade:100-5:10"`` → ``("ade", "100-5", 10)``."""
    parts = text.split(":")
    if len(parts) != 3 or not parts[2].isdigit():
        raise SystemExit(f"--layouts: {text!r} is not DATASET:TASK:STEP (e.g. ade:100-5:10)")
    return parts[0], parts[1], int(parts[2])


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", nargs="+", choices=["heads", "resolution"], default=["heads", "resolution"])
    parser.add_argument("--backbone", default="mit_b2" if cuda else "mit_b0")
    parser.add_argument("--size", type=int, default=512 if cuda else 128, help="resolution of the heads experiment")
    parser.add_argument("--layouts", nargs="+", default=None,
                        help="heads experiment: DATASET:TASK:STEP entries (default: the table in the docstring)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256, 512] if cuda else [128, 256],
                        help="resolutions of the resolution experiment (VOC 15-5 step 1)")
    add_common_arguments(parser, cuda)
    args = parser.parse_args(argv)
    methods = resolve_methods(args.methods) if args.methods else list(DEFAULT_METHODS)
    common = dict(batch=args.batch, iters=args.iters, warmup=args.warmup, device=args.device, amp=args.amp,
                  threads=args.threads, optimizer=args.optimizer)
    out = args.out or RESULTS_DIR / f"scaling-{torch.device(args.device).type}.json"
    if args.profile:
        common["profile_dir"] = str(out.parent / "profiles")
    specs: list[Spec] = []
    if "heads" in args.experiments:
        layouts = [_parse_layout(x) for x in args.layouts] if args.layouts else list(HEAD_LAYOUTS)
        specs += [Spec(backbone=args.backbone, size=args.size, method=m, dataset=d, task=t, step=s, **common)
                  for m in methods for d, t, s in layouts]
    if "resolution" in args.experiments:
        specs += [Spec(backbone=args.backbone, size=size, method=m, **common)
                  for m in methods for size in args.sizes
                  if not any(x.key == Spec(backbone=args.backbone, size=size, method=m, **common).key for x in specs)]
    return measure_and_write(specs, args, f"scaling {' '.join(argv if argv is not None else sys.argv[1:])}", out,
                             scaling_markdown)


if __name__ == "__main__":
    main()
