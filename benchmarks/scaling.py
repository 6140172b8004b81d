"""Scaling of step time and memory: with classes and heads (steps), and with resolution.

Usage (from the repository root; ``sats bench scaling ...`` is the same)::

    python -m benchmarks scaling                                   # both experiments, default methods
    python -m benchmarks scaling --experiments heads --methods all --backbone mit_b0 --size 128
    python -m benchmarks scaling --experiments resolution --sizes 128 256 512

Every point is one :mod:`benchmarks.methods` measurement (same phases, lower bound and memory
figures), so each row also carries the method's ratio to its bound at that point.

* ``heads``: the measured step of these layouts (K = channels, heads = steps so far):

  ====================  =====  =====================
  layout                K_t    heads
  ====================  =====  =====================
  voc 15-5, step 1      21     2 (16 + 5)
  voc 15-1, step 5      21     6 (16 + 5 × 1)
  ade 100-5, step 1     106    2 (101 + 5)
  ade 100-5, step 5     126    6 (101 + 5 × 5)
  ade 100-50, step 1    151    2 (101 + 50)
  ade 100-10, step 5    151    6 (101 + 5 × 10)
  ade 100-5, step 10    151    11 (101 + 10 × 5)
  ====================  =====  =====================

  At equal K the step index should change nothing but the classifier's per-head convolutions
  (heads 2 → 6 → 11 at K = 21 and K = 151); ``ade 100-5`` steps 1 → 5 → 10 adds the growth of K.
* ``resolution``: VOC 15-5 step 1 at every ``--sizes`` (ms per megapixel shows super-linear growth,
  e.g. the attention maps of MiT's first stage, whose size is quadratic in the pixels).

Results are merged into ``benchmarks/results/scaling-<device>.json`` and rendered to ``scaling-<device>.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Optional

import torch

from benchmarks.methods import (KEY_FIELDS, RESULTS_DIR, Spec, _fmt, add_common_arguments, environment, merge_results,
                                resolve_methods, run_specs)
from sats.engine.checkpoint import write_text_atomic

#: (dataset, task, step) of the heads experiment, in table order
HEAD_LAYOUTS: tuple[tuple[str, str, int], ...] = (
    ("voc", "15-5", 1), ("voc", "15-1", 5),
    ("ade", "100-5", 1), ("ade", "100-5", 5),
    ("ade", "100-50", 1), ("ade", "100-10", 5), ("ade", "100-5", 10),
)
DEFAULT_METHODS = ("ft", "lwf", "mib", "plop", "sats", "ewc", "rw", "ssul")
HEADS_TOLERANCE = 0.10  # equal K: more heads may cost at most 10 % more (noise included) to pass the check


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
        group = [r for r in group if (r["dataset"], r["task"], r["step"]) in order and r["method"] != "joint"]
        if len({(r["dataset"], r["task"], r["step"]) for r in group}) < 2:
            continue
        lines += [f"### Classes and heads: {backbone}, {size} px, batch {batch}, AMP {amp}", "",
                  "| method | layout | K | heads | train ms | FT ms | ratio to bound | peak MiB | growth MiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        group.sort(key=lambda r: (r["method"], order[(r["dataset"], r["task"], r["step"])]))
        for r in group:
            lines.append(f"| {r['method']} | {_layout(r)} | {r['num_outputs']} | {len(r['head_sizes'])} | "
                         f"{_fmt(r['train_ms'])} | {_fmt(r['ft_ms'])} | {r['ratio']:.2f} | "
                         f"{_fmt(r['train_peak_mb'], 0)} | {_fmt(r['train_peak_growth_mb'], 0)} |")
        lines += ["", "Equal K, more heads (the step index): train ms and ratio to bound, most heads vs 2 heads "
                      f"(check: within +{HEADS_TOLERANCE:.0%} of the 2-head time)", "",
                  "| method | K | heads | train ms | Δ train | ratio | Δ ratio | check |", "|---|---:|---|---|---:|---|---:|---|"]
        for method in sorted({r["method"] for r in group}):
            for k in sorted({r["num_outputs"] for r in group}):
                same = sorted((r for r in group if r["method"] == method and r["num_outputs"] == k),
                              key=lambda r: len(r["head_sizes"]))
                if len(same) < 2:
                    continue
                first, last = same[0], same[-1]
                change = last["train_ms"] / first["train_ms"] - 1
                ratio_change = last["ratio"] - first["ratio"]
                ok = "ok" if change <= HEADS_TOLERANCE else "**grows**"
                lines.append(f"| {method} | {k} | {len(first['head_sizes'])} → {len(last['head_sizes'])} | "
                             f"{first['train_ms']:.1f} → {last['train_ms']:.1f} | {change:+.1%} | "
                             f"{first['ratio']:.2f} → {last['ratio']:.2f} | {ratio_change:+.2f} | {ok} |")
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


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--experiments", nargs="+", choices=["heads", "resolution"], default=["heads", "resolution"])
    parser.add_argument("--backbone", default="mit_b2" if cuda else "mit_b0")
    parser.add_argument("--size", type=int, default=512 if cuda else 128, help="resolution of the heads experiment")
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
        specs += [Spec(backbone=args.backbone, size=args.size, method=m, dataset=d, task=t, step=s, **common)
                  for m in methods for d, t, s in HEAD_LAYOUTS]
    if "resolution" in args.experiments:
        specs += [Spec(backbone=args.backbone, size=size, method=m, **common)
                  for m in methods for size in args.sizes
                  if not any(x.key == Spec(backbone=args.backbone, size=size, method=m, **common).key for x in specs)]
    env_before = environment(torch.device(args.device), args.threads)
    rows = run_specs(specs, args.isolate, args.repeats)
    env = {**env_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           "command": "scaling " + " ".join(argv if argv is not None else sys.argv[1:])}
    payload = merge_results(out, rows, env, KEY_FIELDS)
    write_text_atomic(out.with_suffix(".md"), scaling_markdown(payload))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return payload


if __name__ == "__main__":
    main()
