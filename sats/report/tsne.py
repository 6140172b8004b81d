"""t-SNE of the decoder features of one step's model, one colour per class (``sats visualize --tsne``).

Decoder features ``(B, D, h, w)`` are labelled by the test ground truth resized to ``(h, w)``
(nearest, pixel centres); up to ``per_class`` pixels per class are drawn uniformly from every
labelled pixel of the images visited, embedded in 2-D with openTSNE (an optional dependency:
``pip install 'sats[tsne]'``) and scatter-plotted in the dataset palette.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sats.engine.rundir import RunDir
from sats.report.runs import class_span

INSTALL_HINT = "pip install 'sats[tsne]'  (or: pip install openTSNE)"


def select_per_class(labels: Tensor, priorities: Tensor, limit: int) -> Tensor:
    """Boolean mask keeping, for every label value, the ``limit`` entries of lowest priority.

    With priorities drawn uniformly at random this is a uniform sample without replacement
    of each class, and applying it again to a union of kept sets keeps it uniform.

    Args:
        labels: (P,) int64 class of every entry.
        priorities: (P,) float, distinct.
        limit: entries kept per class (>= 1).
    Returns:
        (P,) bool.
    """
    if limit < 1:
        raise ValueError(f"select_per_class: limit must be >= 1, got {limit}")
    by_priority = torch.argsort(priorities)
    order = by_priority[torch.argsort(labels[by_priority], stable=True)]  # by class, then priority
    sorted_labels = labels[order]
    rank = torch.arange(len(order), device=labels.device) - torch.searchsorted(sorted_labels, sorted_labels)
    keep = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    keep[order[rank < limit]] = True
    return keep


@dataclass
class ClassFeatures:
    features: np.ndarray  # (P, D) float32
    labels: np.ndarray  # (P,) int64 channels
    images: int  # images visited


@torch.no_grad()
def collect_decoder_features(model: torch.nn.Module, loader, num_channels: int, per_class: int = 200,
                             max_images: int = 100, device: torch.device | str = "cpu",
                             seed: int = 0) -> ClassFeatures:
    """Up to ``per_class`` decoder-feature vectors per channel from the first ``max_images`` images.

    ``loader`` yields ``(images (B, 3, H, W), labels (B, H, W))`` in channel space (255 ignored,
    as are labels >= ``num_channels``).
    """
    gen = torch.Generator().manual_seed(seed)
    kept_feat = torch.zeros(0, 0)
    kept_lab = torch.zeros(0, dtype=torch.int64)
    kept_prio = torch.zeros(0)
    seen = 0
    for images, labels in loader:
        images, labels = images[: max_images - seen], labels[: max_images - seen]
        decoder = model(images.to(device), need={"decoder"}).decoder.float().cpu()  # (B, D, h, w)
        small = F.interpolate(labels[:, None].float(), size=decoder.shape[-2:], mode="nearest-exact")[:, 0].long()
        feats = decoder.permute(0, 2, 3, 1).reshape(-1, decoder.shape[1])
        labs = small.reshape(-1)
        valid = labs < num_channels  # 255 and out-of-task values dropped
        feats, labs = feats[valid], labs[valid]
        prio = torch.rand(len(labs), generator=gen)
        if kept_feat.numel():
            feats, labs, prio = torch.cat([kept_feat, feats]), torch.cat([kept_lab, labs]), torch.cat([kept_prio, prio])
        keep = select_per_class(labs, prio, per_class)
        kept_feat, kept_lab, kept_prio = feats[keep], labs[keep], prio[keep]
        seen += len(images)
        if seen >= max_images:
            break
    if kept_lab.numel() == 0:
        raise ValueError(f"no labelled pixel in the {seen} image(s) visited; nothing to embed")
    return ClassFeatures(kept_feat.numpy().astype(np.float32), kept_lab.numpy(), seen)


def embed_tsne(features: np.ndarray, seed: int = 0, perplexity: float = 30.0, n_jobs: int = 1) -> np.ndarray:
    """(P, D) → (P, 2) with openTSNE; the perplexity is clamped to what ``P`` points allow."""
    try:
        from openTSNE import TSNE
    except ImportError as exc:
        raise ImportError(f"t-SNE needs the optional dependency openTSNE, which is not installed: {INSTALL_HINT}") from exc
    if len(features) < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {len(features)}")
    perplexity = float(min(perplexity, max(1.0, (len(features) - 1) / 3.0)))
    embedding = TSNE(n_components=2, perplexity=perplexity, random_state=seed, n_jobs=n_jobs,
                     verbose=False).fit(np.ascontiguousarray(features, dtype=np.float64))
    return np.asarray(embedding, dtype=np.float64)


def plot_embedding(coords: np.ndarray, labels: np.ndarray, channel_classes: Sequence[int], class_names: Sequence[str],
                   palette: np.ndarray, new_channels: Sequence[int], title: str, path: Path) -> Path:
    """Scatter ``coords (P, 2)`` coloured by class (palette of the raw class id); the classes of
    the plotted step (``new_channels``) are drawn as triangles, older ones as dots."""
    from sats.report.plots import pyplot

    plt = pyplot()
    present = sorted(int(c) for c in np.unique(labels))
    fig, ax = plt.subplots(figsize=(8.5, 6.5), dpi=120)
    new = set(int(c) for c in new_channels)
    for ch in present:
        cid = int(channel_classes[ch])
        sel = labels == ch
        color = palette[cid] / 255.0
        ax.scatter(coords[sel, 0], coords[sel, 1], s=7 if ch not in new else 12, marker="^" if ch in new else "o",
                   color=color, edgecolors="black" if cid == 0 else "none", linewidths=0.2, alpha=0.8,
                   label=f"{cid} {class_names[cid]}{' (new)' if ch in new else ''}")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, markerscale=2,
              ncol=1 if len(present) <= 26 else 2, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def write_tsne(run_dir: str | Path, out: Optional[str | Path] = None, step: Optional[int] = None,
               per_class: int = 200, max_images: int = 100, device: Optional[str] = None, seed: int = 0,
               perplexity: float = 30.0) -> Path:
    """t-SNE of the step-``step`` model's decoder features on that step's test images (default: last step).

    The PNG goes to ``out`` (default ``RUN_DIR/figures/tsne_step{step}.png``).
    """
    from sats.report.visualize import open_run

    ctx = open_run(run_dir, device)
    finished = ctx.finished_steps()
    if not finished:
        raise FileNotFoundError(f"{RunDir(ctx.run_dir).ckpt_dir}: no step checkpoint yet")
    step = finished[-1] if step is None else step
    model = ctx.model(step)
    loader = ctx.data.eval_loader(step, ctx.method.joint, "test", ctx.dist)
    collected = collect_decoder_features(model, loader, ctx.task.num_outputs(step), per_class, max_images,
                                         ctx.device, seed)
    coords = embed_tsne(collected.features, seed=seed, perplexity=perplexity)
    new = list(ctx.task.new_channels(step)) if step > 0 else []
    title = (f"{ctx.cfg.name}: decoder features after step {step} (+{class_span(ctx.task.new_classes(step))}), "
             f"{ctx.method.name}, {ctx.cfg.data.dataset} {ctx.cfg.data.task}\n"
             f"t-SNE of ≤ {per_class} pixels per class from {collected.images} test images")
    target = Path(out) if out else ctx.run_dir / "figures" / f"tsne_step{step}.png"
    return plot_embedding(coords, collected.labels, ctx.task.channel_classes, ctx.class_names, ctx.palette, new,
                          title, target)
