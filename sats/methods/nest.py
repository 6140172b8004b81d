"""NeST (ECCV 2024, new classifier pre-tuning): an add-on that prepares the new head before a step trains
(docs/methods.md §3.18).

At the start of every step t ≥ 1, before the first iteration of the base method, the whole network is frozen
and only a small transformation is trained: every new classifier is generated from **all** old classifiers,

    w_c = Σ_k P[c, k] · (M[c, k] ⊙ w̄_k)   (c = 1 … N),      ŵ_0 = P_0 · (M_0 ⊙ w̄_0)   (background row),

``M`` (N × K' × D) and ``P`` (N × K') initialised from how the old model sees the new-class pixels (one
statistics pass: ``M[c] = mean over the pixels of class c of q ⊗ 1[f ⊙ w̄ > 0]``, ``P[c] = softmax_k Σ_d M[c]``),
then tuned for ``pretune_epochs`` passes with MiB's unbiased CE (old channels = K'). The generated weights are
written into the new head and row 0 of head 0 (norms restored and aligned, §3.18), the transformation is
dropped, and the base method trains as usual. NeST adds no loss term: ``mib+nest`` reports MiB's terms.

The transformation lives only inside ``begin_step``: not in the model, the optimiser or any checkpoint. A
resumed step (``ctx.iteration > 0``) does not pre-tune again: the pre-tuned head is in the loaded weights.
Everything runs under the add-on's own random streams (``ctx.isolated_rng("nest")``) and named data passes, so
the main training sees the same batches and random numbers with and without a resume.

Composes with any softmax base method that has a background channel: ``method: {name: mib, addons: [nest]}``
or ``--method MiB+NeST``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor

from sats.losses.ce import IGNORE_INDEX, unbiased_cross_entropy
from sats.methods.addon import AddOn, freeze_old_heads, register_addon
from sats.methods.base import Method, StepContext
from sats.models.segmenter import train_mode
from sats.rng import isolated_rng, pass_seed

log = logging.getLogger("sats")

#: the values of every choice key of :class:`NeSTParams` (the default first)
CHOICES = {"pretune_body_mode": ("train", "eval"), "bias_init": ("background", "reference"),
           "bias_rescale": ("l2_total", "none"), "label_resize": ("nearest", "nearest-exact"),
           "similarity": ("model_softmax", "bias_free"), "empty_class": ("error", "background")}
#: the pre-tuning optimiser of the reference (whatever the main one is): SGD, Nesterov momentum, weight decay
PRETUNE_MOMENTUM, PRETUNE_WEIGHT_DECAY, PRETUNE_POLY_POWER = 0.9, 1e-4, 0.9


@dataclass
class NeSTParams:
    pretune_epochs: int = 5  # passes over the step's data that tune the transformation (VOC 5, ADE 15; 0: init only)
    pretune_lr_scale: float = 1.0  # pre-tuning lr = the step's lr (train.lr_incremental) × this (VOC 1, ADE 500)
    #: the body during pre-tuning: "train" (the reference: BatchNorm normalises with, and updates, batch statistics;
    #: dropout / stochastic depth on, except what the base method freezes) | "eval"
    pretune_body_mode: str = "train"
    #: the new biases before pre-tuning: "background" (the trained background bias b̄_0, for every new class) |
    #: "reference" (the reference's bug: one default-init draw of a fresh head-0 bias, the same for every class)
    bias_init: str = "background"
    bias_rescale: str = "l2_total"  # new biases × ‖b̄‖₂ / ‖b_new‖₂ over the whole vectors (the reference) | "none"
    weight_align: bool = True  # new rows × mean old-row norm / mean new-row norm after the write-back
    label_resize: str = "nearest"  # statistics labels: "nearest" (index ⌊i·s⌋, the reference) | "nearest-exact"
    stat_grid: int = 4  # the statistics grid is the crop / stat_grid (the reference: 512 → 128)
    #: the per-pixel old-class distribution q of the statistics: "model_softmax" (the old model's softmax, biases
    #: included: the code) | "bias_free" (softmax of the bias-free products Σ_d w̄_k[d] f[d]: the paper)
    similarity: str = "model_softmax"
    freeze_old_heads: bool = False  # old heads (the pre-tuned background row included) out of the optimiser
    #: the reference steps its pre-tuning scheduler before the optimiser: update i uses the lr of i + 1 (the first
    #: update is already decayed, the last one has lr 0); false: update i uses lr·(1 − i/I)^0.9
    scheduler_off_by_one: bool = False
    #: a new class without a pixel on the statistics grid: "error" (names the class) | "background" (its classifier
    #: starts as a copy of the background row: M = 1, P = one-hot(0)); never NaN
    empty_class: str = "error"

    def __post_init__(self) -> None:
        if isinstance(self.pretune_epochs, bool) or not isinstance(self.pretune_epochs, int) or self.pretune_epochs < 0:
            raise ValueError(f"pretune_epochs: must be an integer >= 0, got {self.pretune_epochs!r}")
        if not (math.isfinite(self.pretune_lr_scale) and self.pretune_lr_scale > 0):
            raise ValueError(f"pretune_lr_scale: must be a finite number > 0, got {self.pretune_lr_scale!r}")
        if isinstance(self.stat_grid, bool) or not isinstance(self.stat_grid, int) or self.stat_grid < 1:
            raise ValueError(f"stat_grid: must be an integer >= 1, got {self.stat_grid!r}")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: {getattr(self, key)!r} is not one of {list(allowed)}")


# ----------------------------------------------------------------------------------------------
# The transformation and the classifier it generates (§3.18, "generated classifiers")


def num_transformation_parameters(num_new: int, num_old: int, dim: int) -> int:
    """``N·K'·D + N·K' + N + D + 1``: entries of ``M, P, b_new, M_0, P_0`` (5398 for N = 1, K' = 20, D = 256)."""
    return num_new * num_old * dim + num_new * num_old + num_new + dim + 1


@dataclass
class Transformation:
    """The transient parameters of one step: ``M (N, K', D)``, ``P (N, K')``, ``bias (N,)``, ``M0 (1, D)``,
    ``P0 (1, 1)``, float32 leaf tensors with ``requires_grad`` (never registered in the model)."""

    M: Tensor
    P: Tensor
    bias: Tensor
    M0: Tensor
    P0: Tensor

    @classmethod
    def create(cls, importance: Tensor, projection: Tensor, bias: Tensor) -> "Transformation":
        """From ``A (N, K', D)``, ``β (N, K')`` and the initial new biases ``(N,)``; ``M_0 = 1``, ``P_0 = 1``."""
        dim, like = importance.shape[-1], importance.float()
        leaf = [t.detach().float().clone().requires_grad_(True) for t in (importance, projection, bias)]
        return cls(*leaf, like.new_ones(1, dim).requires_grad_(True), like.new_ones(1, 1).requires_grad_(True))

    def tensors(self) -> List[Tensor]:
        return [self.M, self.P, self.bias, self.M0, self.P0]

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors())


def old_classifier(model: torch.nn.Module, num_old: int) -> Tuple[Tensor, Tensor]:
    """``(W̄ (K', D), b̄ (K',))``: the rows of every head but the last (the heads are 1×1 convs, weight (n, D, 1, 1))."""
    heads = list(model.classifier.heads)[:-1]  # type: ignore[union-attr]
    weight = torch.cat([h.weight.detach().flatten(1) for h in heads]).float()
    bias = torch.cat([h.bias.detach() for h in heads]).float()
    if weight.shape[0] != num_old:
        raise RuntimeError(f"NeST: the old heads have {weight.shape[0]} rows but the step has K' = {num_old} old channels")
    return weight, bias


def generated_new_rows(weight_old: Tensor, t: Transformation) -> Tensor:
    """``w_c = Σ_k P[c, k] (M[c, k] ⊙ w̄_k)``, ``(N, D)``: ``(M ⊙ W̄)ᵀ P`` per class."""
    return torch.einsum("ck,ckd,kd->cd", t.P, t.M, weight_old)


def generated_background_row(weight_old: Tensor, t: Transformation) -> Tensor:
    """``ŵ_0 = P_0 (M_0 ⊙ w̄_0)``, ``(1, D)``."""
    return t.P0 * (t.M0 * weight_old[:1])


def generated_classifier(weight_old: Tensor, bias_old: Tensor, t: Transformation) -> Tuple[Tensor, Tensor]:
    """The pre-tuning classifier ``(W (K, D), b (K,))``: ``[ŵ_0, w̄_1 … w̄_{K'−1}, w_1 … w_N]`` and ``[b̄, b_new]`` (the
    old rows 1 … K'−1 and every old bias unchanged)."""
    weight = torch.cat([generated_background_row(weight_old, t), weight_old[1:], generated_new_rows(weight_old, t)])
    return weight, torch.cat([bias_old, t.bias])


def classifier_logits(feature: Tensor, weight: Tensor, bias: Tensor, size: Sequence[int]) -> Tensor:
    """``(B, D, h, w)`` decoder feature → ``(B, K, H, W)`` logits of ``weight (K, D)``, ``bias (K,)``, upsampled as the
    model does (bilinear, align_corners False)."""
    small = F.conv2d(feature, weight[:, :, None, None].to(feature.dtype), bias.to(feature.dtype))
    return F.interpolate(small, size=tuple(size), mode="bilinear", align_corners=False)


def pretune_loss(feature: Tensor, labels: Tensor, weight_old: Tensor, bias_old: Tensor, t: Transformation) -> Tensor:
    """UNCE (old channels = K') of the generated classifier on a batch, averaged over all pixels (ignored ones
    counting 0): ``feature (B, D, h, w)``, ``labels (B, H, W)``."""
    weight, bias = generated_classifier(weight_old, bias_old, t)
    logits = classifier_logits(feature, weight, bias, labels.shape[-2:])
    return unbiased_cross_entropy(logits, labels, weight_old.shape[0], reduction="all_pixels")


# ----------------------------------------------------------------------------------------------
# Initialisation from cross-task class similarity (§3.18, "statistics")


def sign_statistics(q: Tensor, feature: Tensor, classes: Tensor, weight_old: Tensor, num_new: int) -> Tuple[Tensor, Tensor]:
    """``(S (N, K', D), n (N,))`` of pixels with old-class distributions ``q (n, K')``, features ``(n, D)`` and new
    class index ``classes (n,)`` in ``[0, N)``: ``S_c = Σ_{u: y_u = c} q_u ⊗ 1 ⊙ 1[f_u ⊙ w̄ > 0]``.

    Vectorised by signs: ``S_c = 1[W̄ > 0] ⊙ (Q_cᵀ 1[F_c > 0]) + 1[W̄ < 0] ⊙ (Q_cᵀ 1[F_c < 0])`` (the product is 0 where
    either factor is), two ``K' × n_c · n_c × D`` products per class present.
    """
    q, feature = q.float(), feature.float()
    num_old, dim = weight_old.shape
    positive = q.new_zeros(num_new, num_old, dim)
    negative = q.new_zeros(num_new, num_old, dim)
    counts = torch.bincount(classes, minlength=num_new)[:num_new].to(q.dtype)
    for c in torch.unique(classes).tolist():
        rows = classes == c
        qc, fc = q[rows], feature[rows]
        positive[c] = qc.T @ (fc > 0).to(qc.dtype)
        negative[c] = qc.T @ (fc < 0).to(qc.dtype)
    w = weight_old.float()
    return (w > 0) * positive + (w < 0) * negative, counts


def statistics_pixels(old_logits: Tensor, old_feature: Tensor, labels: Tensor, weight_old: Tensor, grid: Sequence[int],
                      label_resize: str, similarity: str) -> Tuple[Tensor, Tensor, Tensor]:
    """The new-class pixels of a batch on the statistics grid: ``(q (n, K'), f (n, D), class index (n,))``.

    ``labels (B, H, W)`` resized with ``label_resize`` (255 stays 255; only channels ≥ K' are kept), the old
    ``logits (B, K', H, W)`` and ``feature (B, D, h, w)`` bilinearly (align_corners False); ``q`` is the softmax of the
    resized logits (``model_softmax``) or of the bias-free products ``W̄ f`` (``bias_free``).
    """
    num_old, dim = weight_old.shape
    grid = tuple(int(g) for g in grid)
    small = F.interpolate(labels[:, None].float(), size=grid, mode=label_resize)[:, 0].long().flatten()
    keep = (small >= num_old) & (small != IGNORE_INDEX)
    feature = F.interpolate(old_feature.float(), size=grid, mode="bilinear", align_corners=False)
    f = feature.permute(0, 2, 3, 1).reshape(-1, dim)[keep]
    if similarity == "model_softmax":
        logits = F.interpolate(old_logits.float(), size=grid, mode="bilinear", align_corners=False)
        scores = logits.permute(0, 2, 3, 1).reshape(-1, num_old)[keep]
    else:
        scores = f @ weight_old.float().T
    return torch.softmax(scores, dim=1), f, small[keep] - num_old


def initial_transformation(sums: Tensor, counts: Tensor, empty_class: str,
                           class_names: Sequence[str]) -> Tuple[Tensor, Tensor, List[int]]:
    """``(A = S / n (N, K', D), β = softmax_k Σ_d A (N, K'), empty class indices)``. A class with ``n = 0`` raises
    (``empty_class="error"``, naming ``class_names[c]``) or starts as the background copy ``A = 1``, ``β = one-hot(0)``."""
    empty = [c for c in range(counts.numel()) if counts[c] <= 0]
    if empty and empty_class == "error":
        raise RuntimeError(f"NeST: new class(es) {[class_names[c] for c in empty]} have no pixel on the statistics grid "
                           "(their similarity statistics would be 0/0); set method.nest.empty_class=background to start "
                           "them from the background classifier, or lower method.nest.stat_grid")
    importance = sums / counts.clamp(min=1)[:, None, None]
    projection = torch.softmax(importance.sum(dim=-1), dim=-1)
    if empty:
        importance[empty] = 1.0
        projection[empty] = 0.0
        projection[empty, 0] = 1.0
    return importance, projection, empty


def reference_bias_draw(in_channels: int, out_channels: int, seed: int) -> float:
    """``bias[0]`` of a freshly default-initialised ``Conv2d(in_channels, out_channels, 1)`` under ``seed`` (the
    reference's new-bias init, ``bias_init="reference"``): a draw of ``U(−1/√D, 1/√D)`` after the conv's weights."""
    with isolated_rng(seed, torch.device("cpu")):
        return float(torch.nn.Conv2d(in_channels, out_channels, 1).bias[0].detach())


# ----------------------------------------------------------------------------------------------
# Pre-tuning and write-back (§3.18)


def poly_lr(base: float, i: int, total: int, off_by_one: bool = False) -> float:
    """The lr of pre-tuning update ``i`` (0-based) of ``total``: ``base · (1 − i/total)^0.9``; ``off_by_one``: that of
    ``i + 1`` (the reference steps its scheduler before the optimiser)."""
    i = i + 1 if off_by_one else i
    return base * max(0.0, 1.0 - i / max(total, 1)) ** PRETUNE_POLY_POWER


def _rescaled(x: Tensor, target_norm: Tensor, what: str) -> Tensor:
    norm = x.norm()
    if not (torch.isfinite(norm) and norm > 0):
        log.warning("nest: %s has norm %s; not rescaled", what, float(norm))
        return x
    return x * (target_norm / norm)


@torch.no_grad()
def write_back(model: torch.nn.Module, weight_old: Tensor, bias_old: Tensor, t: Transformation,
               bias_rescale: str = "l2_total", weight_align: bool = True) -> Dict[str, float]:
    """Write the generated classifier into the model (in place, parameter identity kept), in the reference's order:

    1. new head weights ← ``w_c``;
    2. new head biases ← ``b_new · ‖b̄‖₂ / ‖b_new‖₂`` (``l2_total``: the norms of the whole vectors, all ``K'`` old
       biases against the ``N`` new ones) or ``b_new`` (``none``);
    3. background row (row 0 of head 0) ← ``ŵ_0 · ‖w̄_0‖₂ / ‖ŵ_0‖₂``; the background bias is unchanged;
    4. (``weight_align``) new rows × ``mean_k ‖W̄_k‖₂ / mean_c ‖w_c‖₂`` (old rows: the updated background included).

    Returns what was written (norms, scale factors) for logs and tests.
    """
    heads = list(model.classifier.heads)  # type: ignore[union-attr]
    new_head, head0 = heads[-1], heads[0]
    rows = generated_new_rows(weight_old, t).float()
    bias = t.bias.detach().float()
    if bias_rescale == "l2_total":
        bias = _rescaled(bias, bias_old.norm(), "the pre-tuned new bias vector")
    background = _rescaled(generated_background_row(weight_old, t).float()[0], weight_old[0].norm(),
                           "the transformed background row")
    gamma = 1.0
    if weight_align:
        old_rows = torch.cat([background[None], weight_old[1:]])
        new_norm = rows.norm(dim=1).mean()
        if torch.isfinite(new_norm) and new_norm > 0:
            gamma = float(old_rows.norm(dim=1).mean() / new_norm)
        rows = rows * gamma
    new_head.weight.copy_(rows.reshape(new_head.weight.shape).to(new_head.weight.dtype))
    new_head.bias.copy_(bias.to(new_head.bias.dtype))
    head0.weight[0].copy_(background.reshape(head0.weight[0].shape).to(head0.weight.dtype))
    return {"weight_align_gamma": gamma, "new_bias_norm": float(bias.norm()),
            "new_row_norm_mean": float(rows.norm(dim=1).mean()), "background_row_norm": float(background.norm())}


@dataclass
class PretuneRecord:
    """What the last pre-tuning phase did (logs and tests)."""

    step: int
    counts: List[int]  # statistics pixels per new class (summed over ranks)
    empty: List[int]  # new-class indices that took the background fallback
    initial_bias: float  # b_new before pre-tuning (every class)
    per_epoch: int  # pre-tuning iterations per epoch (the batches of the statistics pass)
    iterations: int = 0
    lrs: List[float] = field(default_factory=list)  # the lr of every update
    epoch_losses: List[float] = field(default_factory=list)  # mean pre-tuning loss per epoch
    num_parameters: int = 0
    written: Dict[str, float] = field(default_factory=dict)


class FrozenBody:
    """Within the block every model parameter has ``requires_grad = False`` and the model is in the pre-tuning mode;
    both (per parameter, per module) are restored after it."""

    def __init__(self, model: torch.nn.Module, mode: str, frozen: Sequence[str]) -> None:
        self.model, self.mode, self.frozen = model, mode, frozen

    def __enter__(self) -> "FrozenBody":
        self.grads = [(p, p.requires_grad) for p in self.model.parameters()]
        self.modes = [(m, m.training) for m in self.model.modules()]
        for p, _ in self.grads:
            p.requires_grad_(False)
        if self.mode == "train":
            train_mode(self.model, self.frozen)
        else:
            self.model.eval()
        return self

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.grads:
            p.requires_grad_(flag)
        for m, flag in self.modes:
            m.training = flag


def _all_reduce_mean_grads(tensors: Sequence[Tensor], ctx: StepContext) -> None:
    if ctx.world_size > 1:
        for tensor in tensors:
            if tensor.grad is not None:
                ctx.all_reduce_sum_(tensor.grad)
                tensor.grad /= ctx.world_size


@register_addon
class NeST(AddOn):
    """Pre-tune the new classifiers (generated from all old ones) before every step t ≥ 1; write them back."""

    name = "nest"
    label = "NeST"
    Params = NeSTParams
    needs_old_model = True
    head_init = "default"  # the reference replaces MiB's init (no b_0 − log(N + 1)): the write-back sets the head

    def __init__(self, params: Optional[NeSTParams] = None) -> None:
        super().__init__(params)
        self.record: Optional[PretuneRecord] = None

    @classmethod
    def check_base(cls, base: Type[Method]) -> None:
        if base.prediction != "argmax" or base.extra_channels or base.joint:
            raise ValueError(f"NeST needs a softmax base method whose channel 0 is the background and whose steps add "
                             f"classes; {base.name!r} has prediction={base.prediction!r}, "
                             f"extra_channels={base.extra_channels}, joint={base.joint}")

    def check_experiment(self, cfg: object) -> None:
        crop = cfg.data.crop_size  # type: ignore[attr-defined]
        if crop // self.params.stat_grid < 1:
            raise ValueError(f"method.nest.stat_grid={self.params.stat_grid} leaves no statistics grid for "
                             f"data.crop_size={crop}")

    def prepare_model(self, model: torch.nn.Module, step: int, method: Method) -> None:
        if self.params.freeze_old_heads:
            freeze_old_heads(model, step)

    def begin_step(self, ctx: StepContext, method: Method) -> None:
        if ctx.step == 0:
            return
        if ctx.iteration > 0:
            log.info("nest: step %d resumed after %d iterations: the pre-tuned head is in the loaded weights",
                     ctx.step, ctx.iteration)
            return
        if ctx.old_model is None:
            raise RuntimeError("NeST: no step t-1 model at a step > 0 (needs_old_model is set)")
        with ctx.isolated_rng("nest"):
            self.record = self.prepare_head(ctx, method)
        record = self.record
        if record.epoch_losses:
            ctx.log_scalar("nest/pretune_loss", record.epoch_losses[-1])
            ctx.log_scalar("nest/pretune_loss_first_epoch", record.epoch_losses[0])
        ctx.log_scalar("nest/weight_align_gamma", record.written["weight_align_gamma"])

    # -- the three phases -------------------------------------------------------------------------
    def prepare_head(self, ctx: StepContext, method: Method) -> PretuneRecord:
        """Statistics pass → transformation → pre-tuning → write-back, for step ``ctx.step``."""
        p, model = self.params, ctx.model
        weight_old, bias_old = (x.to(ctx.device) for x in old_classifier(model, ctx.num_old))
        num_new = ctx.num_outputs - ctx.num_old
        if p.bias_init == "reference":
            seed = pass_seed(ctx.cfg.train.seed, ctx.step, 0, "nest/bias_init")  # one draw for every rank
            initial_bias = reference_bias_draw(weight_old.shape[1], model.head_sizes[0], seed)  # type: ignore[operator]
        else:
            initial_bias = float(bias_old[0])
        sums, counts, per_epoch = self.statistics(ctx, weight_old, num_new)
        names = [f"{c} (channel {ctx.num_old + i})" for i, c in enumerate(ctx.task.new_classes(ctx.step))]
        importance, projection, empty = initial_transformation(sums, counts, p.empty_class, names)
        if empty:
            log.warning("nest: step %d: new class(es) %s have no statistics pixel; they start from the background "
                        "classifier (method.nest.empty_class=background)", ctx.step, [names[c] for c in empty])
        t = Transformation.create(importance, projection, torch.full((num_new,), initial_bias, device=ctx.device))
        record = PretuneRecord(ctx.step, [int(c) for c in counts.tolist()], empty, initial_bias, per_epoch,
                               num_parameters=t.num_parameters())
        log.info("nest: step %d: %d transformation parameters from %d statistics pixels; pre-tuning %d epoch(s) × %d "
                 "iteration(s) at lr %g", ctx.step, record.num_parameters, sum(record.counts), p.pretune_epochs,
                 per_epoch, ctx.cfg.train.lr_at(ctx.step) * p.pretune_lr_scale)
        with FrozenBody(model, p.pretune_body_mode, sorted(method.frozen_at(ctx.step))):
            self.pretune(ctx, weight_old, bias_old, t, record)
        record.written = write_back(model, weight_old, bias_old, t, p.bias_rescale, p.weight_align)
        return record

    def statistics(self, ctx: StepContext, weight_old: Tensor, num_new: int) -> Tuple[Tensor, Tensor, int]:
        """One pass of the frozen old model over the step's data: ``(S (N, K', D), n (N,), batches)`` summed over
        ranks (the batch count is this rank's: the pre-tuning iterations per epoch)."""
        p = self.params
        sums = weight_old.new_zeros(num_new, *weight_old.shape)
        counts = weight_old.new_zeros(num_new)
        batches = 0
        with torch.no_grad():
            for batch in ctx.train_loader(name="nest/statistics"):
                with ctx.autocast():
                    out = ctx.old_model(batch.images, need={"decoder"})  # type: ignore[misc]
                size = batch.labels.shape[-2:]
                grid = (max(1, size[0] // p.stat_grid), max(1, size[1] // p.stat_grid))
                q, f, classes = statistics_pixels(out.logits, out.decoder, batch.labels, weight_old, grid,
                                                  p.label_resize, p.similarity)
                s, n = sign_statistics(q, f, classes, weight_old, num_new)
                sums += s
                counts += n
                batches += 1
        if batches == 0:
            raise RuntimeError(f"NeST: the training loader of step {ctx.step} yielded no batch")
        ctx.all_reduce_sum_(sums)
        ctx.all_reduce_sum_(counts)
        return sums, counts, batches

    def pretune(self, ctx: StepContext, weight_old: Tensor, bias_old: Tensor, t: Transformation,
                record: PretuneRecord) -> None:
        """``pretune_epochs`` passes: frozen decoder features → generated logits → UNCE → SGD on ``t`` only."""
        p, model = self.params, ctx.model
        tensors = t.tensors()
        base_lr = ctx.cfg.train.lr_at(ctx.step) * p.pretune_lr_scale
        optimizer = torch.optim.SGD(tensors, lr=base_lr, momentum=PRETUNE_MOMENTUM, nesterov=True,
                                    weight_decay=PRETUNE_WEIGHT_DECAY)
        scaler = torch.amp.GradScaler(ctx.device.type) if ctx.grad_scaled else None
        total = p.pretune_epochs * record.per_epoch
        for epoch in range(p.pretune_epochs):
            loss_sum, batches = torch.zeros((), device=ctx.device), 0
            for batch in ctx.train_loader(name=f"nest/pretune/{epoch}"):
                lr = poly_lr(base_lr, record.iterations, total, p.scheduler_off_by_one)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with torch.no_grad(), ctx.autocast():
                    feature = model(batch.images, need={"decoder"}).decoder
                with ctx.autocast():
                    loss = pretune_loss(feature, batch.labels, weight_old, bias_old, t)
                optimizer.zero_grad(set_to_none=True)
                (scaler.scale(loss) if scaler is not None else loss).backward()
                _all_reduce_mean_grads(tensors, ctx)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                record.iterations += 1
                record.lrs.append(lr)
                loss_sum += loss.detach()
                batches += 1
            mean = float(loss_sum) / max(batches, 1)
            if not math.isfinite(mean):
                raise RuntimeError(f"NeST: non-finite pre-tuning loss in epoch {epoch + 1} of step {ctx.step} "
                                   f"(lr {base_lr:g}); lower method.nest.pretune_lr_scale")
            record.epoch_losses.append(mean)
            log.info("nest: step %d pre-tuning epoch %d/%d: loss %.4f", ctx.step, epoch + 1, p.pretune_epochs, mean)


__all__: List[str] = ["FrozenBody", "NeST", "NeSTParams", "PretuneRecord", "Transformation", "classifier_logits",
                      "generated_classifier", "initial_transformation", "num_transformation_parameters",
                      "old_classifier", "poly_lr", "pretune_loss", "reference_bias_draw", "sign_statistics",
                      "statistics_pixels", "write_back"]
