"""``sats visualize``: predictions of every step's checkpoint on the same test images, as one PNG grid.

Rows are images; columns are the image, its ground truth (the test labels after the last
step: every class of the task) and the prediction after step 0, 1, …, in the dataset
palette. It shows how old classes fade under fine-tuning and survive under SATS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from sats.config import ExperimentConfig
from sats.experiment import load_experiment
from sats.data.tasks import Task
from sats.engine import results as results_io
from sats.engine.data import ExperimentData
from sats.engine.distributed import DistInfo
from sats.methods.addon import build_method
from sats.methods.base import Method
from sats.engine.rundir import RunDir, load_step_model
from sats.models.segmenter import Segmenter
from sats.data.overlay import colorize, denormalize
from sats.report.runs import class_span


@dataclass
class RunContext:
    """What the figures need from a run directory: its config, data, method and task."""

    run_dir: Path
    cfg: ExperimentConfig
    data: ExperimentData
    method: Method
    task: Task  # the task the checkpoints were trained on (all classes in one step for joint runs)
    num_steps: int
    device: torch.device

    @property
    def dist(self) -> DistInfo:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=self.device, is_main=True, backend=None)

    def checkpoint(self, step: int) -> Path:
        return RunDir(self.run_dir).step_checkpoint(step)

    def finished_steps(self) -> List[int]:
        return [t for t in range(self.num_steps) if self.checkpoint(t).is_file()]

    def model(self, step: int) -> Segmenter:
        """The end-of-step model of ``step`` in eval mode on the device (the engine's strict loader)."""
        expected = self.method.model_head_sizes(self.task, step)  # + extra channels (SSUL's unknown)
        model, _ = load_step_model(self.checkpoint(step), step, self.cfg.model, expected, self.task, self.device)
        return model.eval()

    def recorded_steps(self) -> List[int]:
        """Steps with a results row (finished steps, whose checkpoints should exist)."""
        return sorted(results_io.load_rows(self.run_dir))

    @property
    def palette(self) -> np.ndarray:
        return self.data.val_files.palette

    @property
    def class_names(self) -> List[str]:
        return self.data.val_files.class_names


def open_run(run_dir: str | Path, device: Optional[str] = None) -> RunContext:
    """Rebuild a run's data and method from ``run_dir/config.yaml`` (no file re-check, cached splits)."""
    run_dir = Path(run_dir)
    cfg_path = RunDir(run_dir).config_path
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not a run directory (no config.yaml)")
    cfg = load_experiment(cfg_path, [f"run_dir={run_dir}", "data.check=false"])
    if device is None:
        device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    single = DistInfo(rank=0, world_size=1, local_rank=0, device=dev, is_main=True, backend=None)
    data = ExperimentData.build(cfg, single)
    method = build_method(cfg.method)
    task = data.step_task(method.joint)
    return RunContext(run_dir, cfg, data, method, task, 1 if method.joint else task.num_steps, dev)


def _pick(ctx: RunContext, dataset, num_images: int, start: int, ids: Optional[Sequence[str]]) -> List[int]:
    """Indices into the test dataset: the given image ids, or ``num_images`` from ``start``."""
    if ids:
        index = {ctx.data.val_files.ids[int(p)]: k for k, p in enumerate(dataset.positions)}
        unknown = [i for i in ids if i not in index]
        if unknown:
            raise ValueError(f"image ids {unknown} are not in the test set of {ctx.run_dir} "
                             f"({len(index)} images, e.g. {list(index)[:3]})")
        return [index[i] for i in ids]
    if num_images < 1:
        raise ValueError(f"--images must be >= 1, got {num_images}")
    if not 0 <= start < len(dataset):
        raise ValueError(f"--start {start} is outside the test set of {len(dataset)} images")
    return list(range(start, min(start + num_images, len(dataset))))


@dataclass
class PredictionGrid:
    """The panels of a prediction grid (channel maps, before colouring) and where the PNG went."""

    image_ids: List[str]
    images: List[np.ndarray]  # (H, W, 3) uint8 each
    labels: List[np.ndarray]  # (H, W) int64 channels, 255 = ignore
    predictions: Dict[int, List[np.ndarray]]  # step → (H, W) int64 channels per image
    channel_classes: List[int]
    path: Optional[Path] = None


@torch.no_grad()
def predict_grid(ctx: RunContext, num_images: int = 4, steps: Optional[Sequence[int]] = None, start: int = 0,
                 ids: Optional[Sequence[str]] = None) -> PredictionGrid:
    """Predictions of each step's checkpoint on the same test images of the last step."""
    finished = ctx.finished_steps()
    if not finished:
        raise FileNotFoundError(f"{RunDir(ctx.run_dir).ckpt_dir}: no step checkpoint yet")
    if steps is None:  # every finished step: one recorded in results.json must have its checkpoint
        steps = sorted(set(finished) | set(ctx.recorded_steps()))
    steps = list(steps)
    missing = [t for t in steps if t not in finished]
    if missing:
        raise FileNotFoundError(f"{ctx.run_dir}: no checkpoint for step(s) {missing} (steps with one: {finished}); "
                                "--step chooses the steps to show")
    dataset = ctx.data.eval_loader(ctx.num_steps - 1, ctx.method.joint, "test", ctx.dist).dataset
    picked = _pick(ctx, dataset, num_images, start, ids)
    samples = [dataset[k] for k in picked]
    grid = PredictionGrid(image_ids=[ctx.data.val_files.ids[int(dataset.positions[k])] for k in picked],
                          images=[denormalize(x[None])[0] for x, _ in samples],
                          labels=[y.numpy() for _, y in samples], predictions={},
                          channel_classes=list(ctx.task.channel_classes))
    for t in steps:
        model = ctx.model(t)
        grid.predictions[t] = [ctx.method.predict(model(x[None].to(ctx.device)).logits.float())[0].cpu().numpy()
                               for x, _ in samples]
        del model
    return grid


def _legend_entries(grid: PredictionGrid, names: Sequence[str], limit: int = 40) -> List[tuple]:
    """(class id, name) of the channels shown in any panel, most frequent first (at most ``limit``)."""
    maps = grid.labels + [p for preds in grid.predictions.values() for p in preds]
    counts = np.zeros(len(grid.channel_classes), dtype=np.int64)
    for m in maps:
        valid = m[(m >= 0) & (m < len(counts))]
        counts += np.bincount(valid.reshape(-1), minlength=len(counts))
    shown = [c for c in np.argsort(-counts, kind="stable") if counts[c] > 0][:limit]
    return [(grid.channel_classes[c], names[grid.channel_classes[c]]) for c in sorted(shown)]


def plot_prediction_grid(grid: PredictionGrid, ctx: RunContext, path: Path) -> Path:
    """Draw ``grid`` as image | ground truth | after step 0 | … rows, with a class legend."""
    from matplotlib.patches import Patch

    from sats.report.plots import pyplot

    plt = pyplot()
    steps = sorted(grid.predictions)
    rows, cols = len(grid.images), 2 + len(steps)
    palette, classes = ctx.palette, grid.channel_classes
    entries = _legend_entries(grid, ctx.class_names)
    handles = [Patch(facecolor=palette[cid] / 255.0, edgecolor="black", linewidth=0.5, label=f"{cid} {name}")
               for cid, name in entries]
    handles.append(Patch(facecolor="white", edgecolor="black", linewidth=0.5, label="ignore (255)"))
    ncol = min(len(handles), max(3, int(cols * 1.4)))
    legend_in = 0.15 + 0.17 * -(-len(handles) // ncol)  # inches below the panels
    cell, gap, left_in, title_in = 2.0, 0.08, 0.35, 0.8
    fig_w = left_in + cols * cell + (cols - 1) * gap + 0.1
    fig_h = title_in + rows * cell + (rows - 1) * gap + legend_in
    fig, axes = plt.subplots(rows, cols, figsize=(fig_w, fig_h), dpi=110, squeeze=False,
                             gridspec_kw={"hspace": gap / cell, "wspace": gap / cell})
    fig.subplots_adjust(left=left_in / fig_w, right=1 - 0.1 / fig_w, top=1 - title_in / fig_h,
                        bottom=legend_in / fig_h)
    titles = ["image", "ground truth"] + [
        ("joint (all classes)" if ctx.method.joint else f"after step {t}\n+{class_span(ctx.task.new_classes(t))}")
        for t in steps]
    for i in range(rows):
        panels = [grid.images[i], colorize(torch.from_numpy(grid.labels[i][None]), palette, classes)[0]]
        panels += [colorize(torch.from_numpy(grid.predictions[t][i][None]), palette, classes)[0] for t in steps]
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("#999999")
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
        axes[i][0].set_ylabel(grid.image_ids[i], fontsize=8)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    cfg = ctx.cfg
    fig.suptitle(f"{cfg.name}: {ctx.method.name} on {cfg.data.dataset} {cfg.data.task} "
                 f"({'overlapped' if cfg.data.overlap else 'disjoint'}), {cfg.model.backbone}", fontsize=11,
                 y=1 - 0.12 / fig_h, va="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def write_prediction_grid(run_dir: str | Path, out: Optional[str | Path] = None, num_images: int = 4,
                          steps: Optional[Sequence[int]] = None, start: int = 0, ids: Optional[Sequence[str]] = None,
                          device: Optional[str] = None) -> PredictionGrid:
    """Predict and draw; the PNG goes to ``out`` (default ``RUN_DIR/figures/predictions.png``)."""
    ctx = open_run(run_dir, device)
    grid = predict_grid(ctx, num_images, steps, start, ids)
    grid.path = plot_prediction_grid(grid, ctx, Path(out) if out else ctx.run_dir / "figures" / "predictions.png")
    return grid
