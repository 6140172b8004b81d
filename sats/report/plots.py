"""PNG figures of runs: old / new / all mIoU per step, and per-class IoU across steps (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from sats.report.runs import RunResult, class_span

GROUP_TITLES = {
    "all": "all seen classes",
    "old": "old: step-0 classes (bg incl.)",
    "new": "new: classes added at steps ≥ 1",
}


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    pyplot().close(fig)
    return path


def plot_step_curves(runs: Sequence[RunResult], path: Path, groups: Sequence[str] = ("all", "old", "new")) -> Path:
    """One panel per group, mIoU (%) after each step, one line per run.

    A run of one step when others have several (joint training, the upper bound) is drawn
    as a dashed level at its value.
    """
    if not runs:
        raise ValueError("plot_step_curves: no runs")
    plt = pyplot()
    num_steps = max(max(r.num_steps, r.steps_done) for r in runs)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), dpi=120, sharey=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, group in zip(axes[0], groups):
        for i, run in enumerate(runs):
            color = colors[i % len(colors)]
            steps, values = run.series(group)
            if not values:
                continue
            percents = [100 * v for v in values]
            if run.num_steps == 1 and num_steps > 1:
                kind = "joint: upper bound" if run.joint else "one step"
                ax.axhline(percents[-1], ls="--", color=color, label=f"{run.label} ({kind})")
            else:
                ax.plot(steps, percents, marker="o", ms=4, color=color, label=run.label)
        ax.set_title(GROUP_TITLES.get(group, group))
        ax.set_xlabel("step")
        ax.set_xticks(range(num_steps) if num_steps <= 16 else range(0, num_steps, max(1, num_steps // 10)))
        ax.set_xlim(-0.3, max(num_steps - 1, 1) + 0.3)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mIoU (%)")
    axes[0][0].set_ylim(bottom=0)
    seen: dict = {}
    for ax in axes[0]:
        handles, labels = ax.get_legend_handles_labels()
        for handle, label in zip(handles, labels):
            seen.setdefault(label, handle)
    settings = sorted({r.setting for r in runs})
    fig.suptitle("mIoU after each step" + (f": {settings[0]}" if len(settings) == 1 else ""))
    ncol = min(4, max(1, len(seen)))
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=ncol, frameon=False)
    fig.tight_layout(rect=(0, 0.07 * math.ceil(len(seen) / ncol), 1, 1))
    return _save(fig, path)


def iou_matrix(run: RunResult) -> np.ndarray:
    """(C, S) per-class IoU in percent, channels × recorded steps; NaN where a class is not yet
    seen or has no ground-truth pixel."""
    num_channels = max(len(r["iou"]) for r in run.rows)
    out = np.full((num_channels, len(run.rows)), np.nan)
    for j, row in enumerate(run.rows):
        values = np.array([np.nan if v is None else 100 * v for v in row["iou"]], dtype=float)
        out[: len(values), j] = values
    return out


def plot_class_heatmap(run: RunResult, path: Path) -> Path:
    """Per-class IoU (%) after each step: classes (channel order) × steps, blank = not seen / no GT.

    Lines separate the class blocks of the steps; values are written in the cells when they fit.
    """
    plt = pyplot()
    matrix = iou_matrix(run)
    num_channels, num_cols = matrix.shape
    last = max(run.rows, key=lambda r: len(r["class_ids"]))
    labels = [f"{cid} {name}" for cid, name in zip(last["class_ids"], last["class_names"])]
    annotate = num_channels <= 40 and num_cols <= 16
    row_h = 0.28 if num_channels <= 40 else 0.13
    fig, ax = plt.subplots(figsize=(2.8 + 0.75 * num_cols, 1.6 + row_h * num_channels), dpi=120)
    cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=100, aspect="auto",
                      interpolation="nearest")
    ax.set_yticks(range(num_channels))
    ax.set_yticklabels(labels, fontsize=8 if num_channels <= 40 else 5)
    ax.set_xticks(range(num_cols))
    ax.set_xticklabels([f"step {r['step']}\n+{class_span(r.get('new_classes', []))}" for r in run.rows], fontsize=8)
    ax.set_xlabel("after step (classes added)")
    ax.set_ylabel("class (id name)")
    boundary = 0
    for row in run.rows[:-1] if not run.joint else []:
        boundary += len(row.get("new_classes", []))
        ax.axhline(boundary - 0.5, color="white", lw=1.5)
    if annotate:
        seen = [len(r["iou"]) for r in run.rows]
        for (i, j), value in np.ndenumerate(matrix):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 60 else "black")
            elif i < seen[j]:
                ax.text(j, i, "no GT", ha="center", va="center", fontsize=6, color="#777777")
    fig.colorbar(image, ax=ax, label="IoU (%)", fraction=0.04 if num_channels > 40 else 0.08, pad=0.02)
    ax.set_title(f"{run.label}: per-class IoU after each step\n{run.method}, {run.setting}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
