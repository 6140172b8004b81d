"""STAR: prototype replay on sigmoid heads without a background classifier (docs/methods.md §3.15).

Chen et al., NeurIPS 2023. **Channels.** Channel 0 is kept in the layout but is no classifier: no loss reads
it and ``prediction = "sigmoid"`` never predicts it (it only decays); channel ``k ≥ 1`` is class ``k``.

**State** (``state_dict``, in every step checkpoint): per foreground class seen (row ``c − 1``) its
``prototype`` and per-dimension ``spread`` (``(F, D)``), ``norm_mean`` / ``norm_std`` of ‖f‖, and the grid
position ``numbers`` ``(1 + F,)`` (index 0 background). Computed for the step's new classes: the counts in
``begin_step`` (one pass over the step's data), the features statistics in ``end_step`` (one pass with the
trained model); the old classes' entries are carried over unchanged. A step-0 checkpoint shared between STAR
runs carries them (its key names the statistics).

**Loss** at t > 0 (``L = λ_mbce Σ_c L_c + λ_ocfm OCFM + λ_sad SAD``):

* ``L_c = (A_c + w_f F_c + w_b B_c) / (1 + w_f + w_b)``: ``A_c`` the pos-weighted BCE of new class ``c`` on the
  batch, ``F_c`` its BCE (target 0) on ``Q = Σ q_o`` synthetic old-class features ``(p_o + s_o ε) r``,
  ``B_c`` on the grid positions that are background for the label and the old model, ``w_f = Q / |G|``,
  ``w_b = ρ M / |G|`` (``|G|`` grid positions of the batch, ``M`` of them background); ``q``, ``ρ`` are fixed
  per step from the counts (``replay_plan``);
* OCFM: MSE of the decoder features to the old model's where the old model sees an old class on a pixel
  labelled 0 (0 when there is none); SAD: mean of ``1 / min_o ‖u_c − p_o‖`` over the new classes.

No logit distillation; at step 0 only ``mbce``. At t > 0 BatchNorm is frozen and dropout off; the new head
trains at ``lr_mult_new_head`` (100×), decoder and old heads at 10×, weight decay everywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from sats.losses.prototypes import (class_feature_sums, feature_statistics, grid_sample_positions,
                                    masked_feature_mse, prototype_separation, replay_plan, synthetic_features)
from sats.losses.sigmoid import foreground_prediction, mbce, negative_bce
from sats.methods._sigmoid import SigmoidHeadsMethod, SigmoidParams
from sats.methods.base import Batch, ParamGroup, StepContext, check_weight, part_groups, register_method, require_old_logits
from sats.models.segmenter import ModelOutput

log = logging.getLogger("sats")

STATISTICS = ("numbers", "prototypes", "spread", "norm_mean", "norm_std")


@dataclass
class STARParams(SigmoidParams):
    pos_weight: float = 4.0  # positive weight of the new classes' BCE at every step (VOC 4, ADE 30)
    lambda_ocfm: float = 5.0
    lambda_sad: float = 0.05
    lr_mult_new_head: float = 100.0  # the new head at steps > 0
    grid_stride: int = 16  # input pixels between the grid positions of the statistics (the reference's 8::16)
    old_logit_threshold: float = 0.5  # an old class where its raw logit exceeds this (reference 0.5; 0: σ > 0.5)
    background_share: float = 0.01  # overlapped: old background count shrinks by this per new class
    overlap_share: float = 0.5  # overlapped: assumed share of the old background seen again
    reference_norm_per_element: bool = False  # replayed features: one norm draw per entry (the reference's code)
    #: spread of the classes of a step t > 0 around row k of the prototype table (an old class) as the reference
    reference_spread_prototype: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("lambda_ocfm", "lambda_sad", "background_share", "overlap_share"):
            check_weight(key, getattr(self, key))
        if self.grid_stride < 1:
            raise ValueError(f"grid_stride: must be >= 1, got {self.grid_stride}")


@register_method
class STAR(SigmoidHeadsMethod):
    """BCE with replayed prototype features + OCFM + SAD (terms ``mbce``, ``ocfm``, ``sad``); sigmoid heads.

    ``mbce`` alone at step 0; per-class prototypes and statistics in the method state."""

    name = "star"
    label = "STAR"
    Params = STARParams
    step0 = "star-mbce"

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.stats: Dict[str, Tensor] = {}
        self.pending: Dict[str, Any] = {}  # the step in progress: its counts and replay plan
        self._index: Optional[Tensor] = None  # (Q,) class row of every replayed feature

    def step0_details(self) -> str:
        return f":stats=grid{self.params.grid_stride}"  # the statistics travel with a shared step 0

    def param_groups(self, model: torch.nn.Module, step: int) -> List[ParamGroup]:
        return part_groups(model, self.lr_multipliers(step))

    # -- statistics ------------------------------------------------------------------------------
    def begin_step(self, ctx: StepContext) -> None:
        """The step's grid counts (label 0 and new classes) and, at t > 0, the old model's and the replay plan;
        a resumed step keeps those saved in its epoch checkpoint."""
        t, p = ctx.step, self.params
        if t > 0 and not self.stats:
            raise RuntimeError(f"star: step {t} needs the class statistics of step {t - 1}, and its checkpoint has "
                               "none (was it trained by another method?)")
        new = torch.tensor(list(ctx.task.new_channels(t) if t > 0 else range(1, ctx.num_outputs)), device=ctx.device)
        counts = torch.zeros(1 + len(new), dtype=torch.float64, device=ctx.device)
        predicted = torch.zeros(ctx.num_old, dtype=torch.float64, device=ctx.device)
        with torch.no_grad(), ctx.isolated_rng("star-counts"):
            for batch in ctx.train_loader():
                grid, _ = grid_sample_positions(batch.labels, p.grid_stride)
                counts[0] += (grid == 0).sum()
                counts[1:] += (grid.reshape(-1, 1) == new.view(1, -1)).sum(0)
                if t > 0:
                    predicted += self._old_counts(ctx, batch, grid)
        ctx.all_reduce_sum_(counts)
        pending: Dict[str, Any] = {"step": t, "counts": counts.cpu()}
        if t > 0:
            ctx.all_reduce_sum_(predicted)
            epochs = ctx.cfg.train.epochs_at(t)
            per_epoch = max(1, ctx.total_iterations // max(1, epochs)) * ctx.world_size
            plan = replay_plan(self.stats["numbers"].to(ctx.device), predicted, per_epoch, len(new),
                               overlap=ctx.cfg.data.overlap, background_share=p.background_share,
                               overlap_share=p.overlap_share)
            pending.update(per_class=plan.per_class.cpu(), background_ratio=plan.background_ratio,
                           numbers=plan.numbers.cpu())
            log.info("star: step %d replays %d old-class features per iteration (%s per class), background x%.3f",
                     t, int(plan.per_class.sum()), plan.per_class.tolist(), plan.background_ratio)
        saved = self.pending if self.pending.get("step") == t else None
        if saved is not None:  # a resumed step keeps the plan of its start (the pass is repeated so that later
            pending = saved  # passes over the data see the same shuffles as in an uninterrupted run)
        self.pending = pending
        self._index = self._replay_index(ctx.device)

    def _old_counts(self, ctx: StepContext, batch: Batch, grid: Tensor) -> Tensor:
        """``(K_{t−1},)``: grid positions labelled 0 that the old model calls background (0) or old class c."""
        assert ctx.old_model is not None
        with ctx.autocast():
            old_logits = ctx.old_model(batch.images).logits
        old_grid, _ = grid_sample_positions(foreground_prediction(old_logits.float(), self.params.old_logit_threshold),
                                            self.params.grid_stride)
        return torch.bincount(old_grid[grid == 0], minlength=ctx.num_old)[:ctx.num_old].double()

    def _replay_index(self, device: torch.device) -> Tensor:
        per_class = self.pending.get("per_class")
        if per_class is None:
            return torch.zeros(0, dtype=torch.long, device=device)
        return torch.repeat_interleave(torch.arange(len(per_class)), per_class).to(device)

    def end_step(self, ctx: StepContext) -> None:
        """Prototype, spread and norm statistics of the step's new classes, from the trained model."""
        t, p = ctx.step, self.params
        if self.pending.get("step") != t:
            raise RuntimeError(f"star: end of step {t} without its counts (begin_step did not run)")
        new = list(ctx.task.new_channels(t)) if t > 0 else list(range(1, ctx.num_outputs))
        channels = torch.tensor(new, device=ctx.device)
        sums: Dict[str, Tensor] = {}
        model = ctx.model
        was_training = model.training
        model.eval()
        with torch.no_grad(), ctx.isolated_rng("star-statistics"):
            for batch in ctx.train_loader():
                with ctx.autocast():
                    decoder = model(batch.images, need={"decoder"}).decoder
                grid, features = grid_sample_positions(batch.labels, p.grid_stride, decoder.float())
                for key, value in class_feature_sums(features, grid, channels).items():
                    sums[key] = sums[key] + value if key in sums else value
        model.train(was_training)
        for value in sums.values():
            ctx.all_reduce_sum_(value)
        counts = self.pending["counts"].clone()
        around = None
        if t > 0 and p.reference_spread_prototype:  # row k of [old; new prototypes] for the step's k-th class
            table = torch.cat([self.stats["prototypes"].to(ctx.device), F.normalize(sums["unit"], dim=1).float()])
            around = table[:len(new)]
        stats = feature_statistics(sums, around)
        for j, (channel, n) in enumerate(zip(new, sums["count"].tolist())):
            if n < 2:
                log.warning("star: class channel %d has %d grid position(s) in the statistics pass of step %d; "
                            "it is %s", channel, int(n), t, "never replayed" if n == 0 else "replayed with norm std 0")
            if n == 0:
                counts[1 + j] = 0.0
        numbers = counts if t == 0 else torch.cat([self.pending["numbers"], counts[1:]])
        fresh = {"numbers": numbers, "prototypes": stats["prototype"].cpu(), "spread": stats["spread"].cpu(),
                 "norm_mean": stats["norm_mean"].cpu(), "norm_std": stats["norm_std"].cpu()}
        if t == 0:
            self.stats = fresh
        else:
            self.stats = {"numbers": numbers, **{k: torch.cat([self.stats[k], fresh[k]]) for k in STATISTICS[1:]}}
        self.pending = {}
        self._index = None

    # -- the loss --------------------------------------------------------------------------------
    def loss(self, batch: Batch, out: ModelOutput, old_out: Optional[ModelOutput], ctx: StepContext) -> Dict[str, Tensor]:
        p, labels = self.params, batch.labels
        if ctx.step == 0:
            return {"mbce": self.step0_mbce(batch, out)}
        k, num_new = ctx.num_old, ctx.num_outputs - ctx.num_old
        old_logits = require_old_logits(old_out, self.name)
        old_pred = foreground_prediction(old_logits.float(), p.old_logit_threshold)
        free = labels == 0
        head = ctx.model.classifier.heads[-1]
        real = mbce(out.logits[:, k:], labels, k, p.pos_weight)  # Σ_c A_c
        background, features = grid_sample_positions(free & (old_pred == 0), p.grid_stride, out.decoder)
        grid_size = background.numel()
        bg_loss = F.softplus(F.conv2d(features, head.weight, head.bias).float()) * background.unsqueeze(1)
        count = background.sum()
        b_sum = bg_loss.sum() / count.clamp_min(1)  # Σ_c B_c (0 when no position)
        w_b = self.pending["background_ratio"] * count / grid_size
        index = self._index if self._index is not None else self._replay_index(out.decoder.device)
        w_f = index.numel() / grid_size
        f_sum = torch.zeros((), device=out.decoder.device)
        if index.numel():
            s = self.stats
            replayed = synthetic_features(s["prototypes"].to(index.device), s["spread"].to(index.device),
                                          s["norm_mean"].to(index.device), s["norm_std"].to(index.device), index,
                                          p.reference_norm_per_element)
            f_sum = negative_bce(F.linear(replayed.to(out.decoder.dtype), head.weight.flatten(1), head.bias))
        pseudo_old = (free & (old_pred > 0)).unsqueeze(1)
        old_prototypes = self.stats["prototypes"][:k - 1].to(out.decoder.device)
        return {
            "mbce": p.lambda_mbce * (real + w_f * f_sum + w_b * b_sum) / (1 + w_f + w_b),
            "ocfm": p.lambda_ocfm * masked_feature_mse(out.decoder, old_out.decoder, pseudo_old),
            "sad": p.lambda_sad * prototype_separation(out.decoder, labels, k, num_new, old_prototypes),
        }

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {k: v.clone() for k, v in self.stats.items()}
        if self.pending:
            state["pending"] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.pending.items()}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        state = dict(state)
        pending = state.pop("pending", {})
        unknown = set(state) - set(STATISTICS)
        if unknown or (state and set(state) != set(STATISTICS)):
            raise ValueError(f"star: state keys {sorted(state)} are not the statistics {list(STATISTICS)}")
        self.stats = {k: v.clone() for k, v in state.items()}
        self.pending = {k: v.clone() if isinstance(v, Tensor) else v for k, v in pending.items()}
        self._index = None
