"""The training loop of one step: :func:`train_iteration` (shared with ``benchmarks/``) and
:class:`StepTrainer` (epochs, mid-epoch stop and resume, the non-finite policy).

One iteration, in this order: forward of the model (asked only for the outputs the method needs)
and, under ``no_grad``, of the frozen old model → ``method.loss`` (named terms) → sum →
``zero_grad`` → backward → ``unscale_`` → finiteness of the loss and of the gradients, and under
DDP the stop flag, in one host sync → (skip, or) ``after_backward`` → clipping → optimiser step →
scaler update → scheduler step → ``after_optimizer_step``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import Tensor

from sats.config import ExperimentConfig
from sats.data.batch import Batch
from sats.engine.checkpoint import load_checkpoint, load_state_strict, save_checkpoint
from sats.engine.distributed import DistInfo, all_reduce_mean_, all_reduce_sum_, barrier
from sats.engine.evaluator import Metrics
from sats.engine.optim import build_grad_scaler, build_optimizer, build_scheduler, optimizer_groups
from sats.engine.rundir import RunDir, RunError
from sats.engine.signals import RunInterrupted, StopRequest, StoppableFetch, gather_per_rank
from sats.methods.base import Method, StepContext
from sats.models.segmenter import train_mode
from sats.progress import progress_bar
from sats.rng import capture_rng, restore_rng, seed_everything, step_seed

log = logging.getLogger("sats")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/Inf; the message names step, epoch, iteration and term."""


class NonFiniteGradientError(NonFiniteLossError):
    """The loss is finite but a gradient is NaN/Inf; the message names step, epoch, iteration and parameters."""


@dataclass
class Optimisation:
    """What a training iteration steps: optimiser, poly scheduler, grad scaler (fp16) and clipping."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    grad_clip: float = 0.0


@dataclass
class Iteration:
    """What one :func:`train_iteration` did: its named terms, and why it was skipped, if it was."""

    terms: Dict[str, Tensor]
    bad_loss: bool = False
    bad_grad: bool = False
    stop: bool = False  # a stop request agreed by every rank (DDP; a single process reads its own flag)
    bad_params: List[str] = field(default_factory=list)  # parameters with non-finite gradients (this rank)

    @property
    def skipped(self) -> bool:
        return self.bad_loss or self.bad_grad


def train_iteration(model: torch.nn.Module, old_model: Optional[torch.nn.Module], method: Method, batch: Batch,
                    ctx: StepContext, autocast: Callable[[], Any], opt: Optimisation, *, world_size: int = 1,
                    stop_requested: Callable[[], bool] = lambda: False) -> Iteration:
    """One training iteration (module docstring). ``model`` may be DDP-wrapped; ``ctx.model`` is the bare one.

    A non-finite loss or gradient skips the update (the caller applies the policy); the gradients are
    then cleared and, with fp16, the scaler closes the iteration's ``unscale_``. ``stop_requested`` is read
    with the finiteness flags under DDP (every rank agrees), at the end of the iteration in one process.
    """
    with autocast():
        out = model(batch.images, need=method.needs_at(ctx.step))
        old_out = None
        if old_model is not None and method.old_forward:
            with torch.no_grad():
                old_out = old_model(batch.images, need=method.old_needs)
        terms = method.loss(batch, out, old_out, ctx)
    del out, old_out  # the old model's maps (e.g. attention) are freed before backward
    loss = sum(terms.values())
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scaler.scale(loss).backward()
    opt.scaler.unscale_(opt.optimizer)  # after_backward and clipping see true gradients (no-op unless fp16)
    flags = iteration_flags(loss, ctx.model, opt.scaler, world_size, stop_requested)
    flags.terms = terms
    if flags.skipped:
        flags.bad_params = [n for n, p in ctx.model.named_parameters()
                            if p.grad is not None and not torch.isfinite(p.grad).all()]
        opt.optimizer.zero_grad(set_to_none=True)
        if opt.scaler.is_enabled():
            opt.scaler.update()  # closes this iteration's unscale_ (fp16)
        flags.stop = flags.stop or (world_size == 1 and stop_requested())
        return flags
    method.after_backward(ctx)
    if opt.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), opt.grad_clip)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    method.after_optimizer_step(ctx)
    ctx.iteration += 1
    flags.stop = flags.stop or (world_size == 1 and stop_requested())
    return flags


def iteration_flags(loss: Tensor, model: torch.nn.Module, scaler: Any, world_size: int,
                    stop_requested: Callable[[], bool]) -> Iteration:
    """(non-finite loss, non-finite gradient, stop requested), agreed by every rank; one host sync.

    Gradients are checked after backward and unscaling, before the method's ``after_backward``
    hook (which may fold them into importance estimates); with fp16 the GradScaler skips
    overflowing steps itself, so only the loss is checked. The gradient check is the largest
    ``|g|`` (the ∞-norm, which cannot overflow).
    """
    bad_loss = ~torch.isfinite(loss.detach())
    bad_grad = torch.zeros_like(bad_loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads and not scaler.is_enabled():
        bad_grad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))
    flags = torch.stack([bad_loss, bad_grad]).float()
    if world_size == 1:
        loss_flag, grad_flag = flags.tolist()
        return Iteration({}, loss_flag > 0, grad_flag > 0)  # a single process reads its stop flag at the end
    flags = all_reduce_sum_(torch.cat([flags, flags.new_tensor([1.0 if stop_requested() else 0.0])]))
    loss_flag, grad_flag, stop_flag = flags.tolist()
    return Iteration({}, loss_flag > 0, grad_flag > 0, stop_flag > 0)


@dataclass
class TrainOutcome:
    """What a step's training leaves for the end-of-step phase."""

    counters: Dict[str, Any]  # nonfinite_skipped, images, train_time_s, epoch_losses
    best_state: Optional[Dict[str, Tensor]]  # best-on-val weights (only with train.select=best_val)


class StepTrainer:
    """The epochs of one step: the epoch checkpoint (resume, also mid-epoch after SIGINT/SIGTERM), the per-epoch
    seeds, the non-finite policy and the optional per-epoch validation.

    ``evaluate(model, kind)`` runs the engine's evaluation of this step; ``scalar(tag, value, iteration)`` logs
    to tensorboard (None: nothing is logged, and the losses are not read back every ``train.log_every``).
    """

    def __init__(self, cfg: ExperimentConfig, dist: DistInfo, rundir: RunDir, method: Method, stop: StopRequest,
                 autocast: Callable[[], Any], amp: Optional[torch.dtype],
                 evaluate: Callable[[torch.nn.Module, str], Metrics],
                 scalar: Optional[Callable[[str, float, int], None]] = None) -> None:
        self.cfg, self.dist, self.rundir, self.method, self.stop = cfg, dist, rundir, method, stop
        self.autocast, self.amp, self.evaluate, self.scalar = autocast, amp, evaluate, scalar

    def train(self, ctx: StepContext, loader: Any, memory_size: Optional[int] = None) -> TrainOutcome:
        """Train step ``ctx.step`` over ``loader`` (a ``TrainBatches``) for its epochs; resumes a stopped step."""
        t, cfg, model = ctx.step, self.cfg.train, ctx.model
        epochs, per_epoch = cfg.epochs_at(t), len(loader)
        ctx.total_iterations = epochs * per_epoch
        if cfg.channels_last:  # before the optimiser: parameters keep their identity, their layout changes
            for m in (model, ctx.old_model):
                if m is not None:
                    m.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(optimizer_groups(self.method, model, t), cfg, cfg.lr_at(t))
        opt = Optimisation(optimizer, build_scheduler(optimizer, cfg, ctx.total_iterations),
                           build_grad_scaler(ctx.device, self.amp), cfg.grad_clip)
        train_model: torch.nn.Module = model
        if self.dist.world_size > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        if cfg.compile:  # the same parameters: checkpoints keep saving ``model``'s state dict
            train_model = torch.compile(train_model)
        self.resume_path = self.rundir.epoch_checkpoint(t)
        state = self._resume(ctx, opt, per_epoch)
        start_epoch, counters, best, partial = state
        self.method.begin_step(ctx)
        task = ctx.task
        log.info("step %d: %d classes new %s, %d images%s, %d epochs × %d iterations, lr %g", t,
                 len(task.new_classes(t)), list(task.new_classes(t)), loader.num_current,
                 f" + {memory_size} memory images" if memory_size is not None else "", epochs, per_epoch,
                 cfg.lr_at(t))
        for epoch in range(start_epoch, epochs):
            ctx.epoch = epoch
            seed_everything(step_seed(cfg.seed, t, epoch), self.dist.rank)
            loader.set_epoch_seed(step_seed(cfg.seed, t, epoch))
            train_mode(model, self.method.frozen_at(t))
            sums: Dict[str, Tensor] = {}
            replay, resumed = 0, {}  # batches trained before a mid-epoch stop (fetched again, not trained)
            if partial is not None:
                replay, resumed = partial["batches_done"], partial["per_rank"][self.dist.rank]
                sums = {k: v.to(ctx.device) for k, v in resumed["loss_sums"].items()}
                partial = None
            tic = time.perf_counter()
            bar = progress_bar(loader, self.cfg.log.progress and self.dist.is_main, f"step {t} epoch {epoch + 1}/{epochs}")
            fetch = StoppableFetch(bar, self.stop)
            i = -1
            for i, cpu_batch in enumerate(fetch):
                if i < replay:  # the data pipeline's random streams advance exactly as in the stopped run
                    if i + 1 == replay:
                        restore_rng(resumed["rng"])
                    continue
                batch = cpu_batch.to(ctx.device)
                if cfg.channels_last:
                    batch.images = batch.images.contiguous(memory_format=torch.channels_last)
                step = train_iteration(train_model, ctx.old_model, self.method, batch, ctx, self.autocast, opt,
                                       world_size=self.dist.world_size, stop_requested=lambda: self.stop.requested)
                if step.skipped:
                    self._nonfinite(t, f"step {t}, epoch {epoch + 1}, iteration {i + 1}", step, counters)
                else:
                    for k, v in step.terms.items():
                        sums[k] = sums.get(k, 0.0) + v.detach()
                    if self.scalar is not None and ctx.iteration % max(1, cfg.log_every) == 0:
                        for k, v in step.terms.items():
                            self.scalar(f"step{t}/loss/{k}", float(v.detach()), ctx.iteration)
                        self.scalar(f"step{t}/lr", opt.scheduler.get_last_lr()[0], ctx.iteration)
                    counters["images"] += len(batch.images) * self.dist.world_size
                if step.stop:
                    self._stop_mid_epoch(ctx, opt, counters, best, epoch, i + 1, per_epoch, sums)
            if fetch.failed is not None:  # data-loader workers got the signal too: stop after the last good batch
                if i + 1 > replay and self.dist.world_size == 1:
                    self._stop_mid_epoch(ctx, opt, counters, best, epoch, i + 1, per_epoch, sums)
                kept = self.resume_path if self.resume_path.exists() else f"the start of step {t}"
                raise RunInterrupted(f"interrupted by {self.stop.name} at step {t} epoch {epoch + 1} while loading "
                                     f"data ({fetch.failed}); run the same command again to resume from {kept}",
                                     self.stop.signum or 0)
            counters["train_time_s"] += time.perf_counter() - tic
            self._epoch_losses(t, epoch, epochs, per_epoch, sums, counters)
            if cfg.val_every > 0 and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == epochs):
                best = self._validate(ctx, epoch, best)
            if epoch + 1 < epochs:
                self._save(ctx, opt, counters, best, epoch, per_epoch)
            barrier()
            if epoch + 1 < epochs and self.stop.agreed(ctx.device):
                raise RunInterrupted(f"interrupted by {self.stop.name} at step {t} after epoch {epoch + 1}; run the "
                                     f"same command again to resume from {self.resume_path}", self.stop.signum or 0)
        self._check_skipped(t, counters, ctx.total_iterations)
        return TrainOutcome(counters=counters, best_state=best["state"])

    # -- the epoch checkpoint --------------------------------------------------------------------
    def _resume(self, ctx: StepContext, opt: Optimisation, per_epoch: int):
        """(first epoch, counters, best-on-val record, partial-epoch record) from the epoch checkpoint, if any."""
        counters: Dict[str, Any] = {"nonfinite_skipped": 0, "images": 0, "train_time_s": 0.0, "epoch_losses": {}}
        ctx.iteration = 0
        path = self.resume_path
        if not path.exists():
            return 0, counters, {"score": -math.inf, "state": None}, None
        state = load_checkpoint(path)
        self._check_resume_matches(state, ctx.step, per_epoch, path)
        load_state_strict(ctx.model, state["model"], path)
        opt.optimizer.load_state_dict(state["optimizer"])
        opt.scheduler.load_state_dict(state["scheduler"])
        opt.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        start_epoch = state["epoch"] + 1
        ctx.iteration = int(state.get("iteration", start_epoch * per_epoch))
        partial = state.get("partial")
        log.info("step %d: resuming after %s from %s", ctx.step, f"epoch {start_epoch}" if partial is None else
                 f"iteration {partial['batches_done']}/{per_epoch} of epoch {start_epoch + 1}", path)
        return start_epoch, state["counters"], {"score": state["best_score"], "state": state.get("best_state")}, partial

    def _check_resume_matches(self, state: Dict[str, Any], t: int, per_epoch: int, path: Path) -> None:
        """An epoch checkpoint fits the step's loader (a mid-epoch one also the process count)."""
        if state.get("per_epoch", per_epoch) != per_epoch:
            raise RunError(f"{path} was written with {state['per_epoch']} iterations per epoch but step {t} now has "
                           f"{per_epoch} (its training list, data.batch_size or the process count changed); "
                           "delete this file to restart the step")
        partial = state.get("partial")
        if partial is not None and partial["world_size"] != self.dist.world_size:
            raise RunError(f"{path} was written in the middle of an epoch by {partial['world_size']} process(es); "
                           f"resume it with the same number (this run has {self.dist.world_size})")

    def _save(self, ctx: StepContext, opt: Optimisation, counters: Dict[str, Any], best: Dict[str, Any],
              last_epoch: int, per_epoch: int, partial_epoch: Optional[Dict[str, Any]] = None) -> None:
        """The epoch checkpoint: state after epoch ``last_epoch`` (+ ``partial_epoch`` batches of the next)."""
        if not self.dist.is_main:
            return
        state = {"model": ctx.model.state_dict(), "optimizer": opt.optimizer.state_dict(),
                 "scheduler": opt.scheduler.state_dict(), "scaler": opt.scaler.state_dict(),
                 "method": self.method.state_dict(), "epoch": last_epoch, "iteration": ctx.iteration,
                 "per_epoch": per_epoch, "counters": counters, "best_score": best["score"],
                 "best_state": best["state"]}
        if partial_epoch is not None:
            state["partial"] = partial_epoch
        save_checkpoint(state, self.resume_path)

    def _stop_mid_epoch(self, ctx: StepContext, opt: Optimisation, counters: Dict[str, Any], best: Dict[str, Any],
                        epoch: int, batches_done: int, per_epoch: int, sums: Dict[str, Tensor]) -> None:
        """Write the state after ``batches_done`` batches of ``epoch`` (every rank calls this), then stop."""
        mine = {"rng": capture_rng(), "loss_sums": {k: v.detach().cpu() for k, v in sums.items()}}
        per_rank = gather_per_rank(mine)
        self._save(ctx, opt, counters, best, epoch - 1, per_epoch,
                   {"batches_done": batches_done, "world_size": self.dist.world_size, "per_rank": per_rank})
        barrier()
        raise RunInterrupted(f"interrupted by {self.stop.name} at step {ctx.step} epoch {epoch + 1} (after iteration "
                             f"{batches_done}/{per_epoch}); run the same command again to resume from "
                             f"{self.resume_path}", self.stop.signum or 0)

    # -- per epoch -------------------------------------------------------------------------------
    def _epoch_losses(self, t: int, epoch: int, epochs: int, per_epoch: int, sums: Dict[str, Tensor],
                      counters: Dict[str, Any]) -> None:
        if self.dist.world_size > 1 and sums:  # the epoch's mean over every rank's images
            names = sorted(sums)
            sums = dict(zip(names, all_reduce_mean_(torch.stack([sums[k].float() for k in names]))))
        means = {k: float(v) / max(1, per_epoch) for k, v in sums.items()}
        for k, v in means.items():
            counters["epoch_losses"].setdefault(k, []).append(round(v, 6))
        log.info("step %d epoch %d/%d: %s", t, epoch + 1, epochs, ", ".join(f"{k} {v:.4f}" for k, v in means.items()))

    def _validate(self, ctx: StepContext, epoch: int, best: Dict[str, Any]) -> Dict[str, Any]:
        val = self.evaluate(ctx.model, "val")
        log.info("step %d epoch %d: val mIoU (current classes) %.2f", ctx.step, epoch + 1, val.miou * 100)
        if self.scalar is not None:
            self.scalar(f"step{ctx.step}/val_miou", val.miou, ctx.iteration)
        if self.cfg.train.select == "best_val" and val.miou > best["score"]:
            return {"score": val.miou, "state": {k: v.detach().cpu().clone() for k, v in ctx.model.state_dict().items()}}
        return best

    # -- the non-finite policy -------------------------------------------------------------------
    def _nonfinite(self, t: int, where: str, step: Iteration, counters: Dict[str, Any]) -> None:
        """Raise (``train.on_nonfinite=error``) or count and log (``skip``) a non-finite loss or gradient."""
        terms = step.terms
        values = ", ".join(f"{k}={float(v.detach())}" for k, v in terms.items())
        if step.bad_loss:
            bad_terms = [k for k, v in terms.items() if not torch.isfinite(v)]
            what = f"non-finite loss at {where}, term(s) {bad_terms}{'' if bad_terms else ' (on another rank)'}"
            error: type[NonFiniteLossError] = NonFiniteLossError
        else:
            names = step.bad_params
            what = (f"non-finite gradient at {where} (every loss term finite), in {len(names)} parameter(s) "
                    f"{names[:6]}{'…' if len(names) > 6 else ''}")
            error = NonFiniteGradientError
        if self.cfg.train.on_nonfinite == "error":
            raise error(f"{what}: {values}; {self.kept(t)} (train.on_nonfinite=skip skips such batches and "
                        "counts them)")
        counters["nonfinite_skipped"] += 1
        log.warning("skipping a batch: %s: %s (%d skipped so far)", what, values, counters["nonfinite_skipped"])

    def kept(self, t: int) -> str:
        """What a rerun of step ``t`` starts from, naming a file that exists."""
        epoch = self.rundir.epoch_checkpoint(t)
        if epoch.exists():
            return f"the last completed epoch of step {t} is kept in {epoch} (rerunning resumes there)"
        if t > 0:
            return (f"step {t} has no checkpoint of its own yet; rerunning restarts it from the step {t - 1} checkpoint "
                    f"{self.rundir.step_checkpoint(t - 1)}")
        return "nothing of step 0 was saved yet; rerunning restarts step 0"

    def _check_skipped(self, t: int, counters: Dict[str, Any], total: int) -> None:
        """NonFiniteLossError when more than ``train.max_skipped_fraction`` of a step's iterations were skipped."""
        skipped, limit = counters["nonfinite_skipped"], self.cfg.train.max_skipped_fraction
        if skipped and skipped > limit * total:
            raise NonFiniteLossError(
                f"step {t}: {skipped} of {total} iterations ({skipped / max(total, 1):.0%}) were skipped for a "
                f"non-finite loss or gradient, more than train.max_skipped_fraction={limit:g}; the step is not saved "
                f"as finished ({self.kept(t)}). Lower the learning rate, try train.amp=off or train.grad_clip, or "
                "raise train.max_skipped_fraction")
