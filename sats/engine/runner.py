"""The step sequence of one experiment: data → model → method → train → test → checkpoint → results.

The runner is method-agnostic: it reads what a method declares (``needs``, ``uses_old_model``,
``head_init``, ``step0``, ``joint``) and calls its hooks; it never looks at a method's name.

The run directory's layout, lock, config record and the one way from a step checkpoint to a model
are in :mod:`sats.engine.rundir`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from sats.config import ConfigError, ExperimentConfig, config_to_dict, digest
from sats.data.fingerprint import file_fingerprints
from sats.data.tasks import Task
from sats.engine import results as results_io
from sats.engine.checkpoint import CheckpointError, file_digest, load_checkpoint, load_state_strict, save_checkpoint
from sats.engine.data import ExperimentData, data_cache_dir, first_batch_images, same_data
from sats.engine.distributed import (DistInfo, all_agree, all_reduce_mean_, all_reduce_sum_, barrier, init_distributed,
                                     seed_everything, set_deterministic)
from sats.engine.evaluator import Metrics, evaluate_loader
from sats.engine.optim import (amp_dtype, autocast_factory, build_grad_scaler, build_optimizer, build_scheduler,
                               configure_cuda_math)
from sats.engine.rundir import RunDir, RunError, check_step_checkpoint, load_step_model
from sats.engine.signals import RunInterrupted, StopRequest, StoppableFetch, capture_rng, gather_per_rank, restore_rng
from sats.methods.base import Method, StepContext, build_method
from sats.models.segmenter import Segmenter, build_segmenter, frozen_copy
from sats.progress import progress_bar

log = logging.getLogger("sats")


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/Inf; the message names step, epoch, iteration and term."""


class NonFiniteGradientError(NonFiniteLossError):
    """The loss is finite but a gradient is NaN/Inf; the message names step, epoch, iteration and parameters."""


def step_seed(seed: int, step: int, epoch: int = -1) -> int:
    """Seed of a step (epoch -1) or of one epoch of a step; independent of resumption."""
    return (seed * 1_000_003 + step * 10_007 + (epoch + 1) * 101) % (2**31 - 1)


@dataclass
class TrainOutcome:
    """What a step's training loop leaves for the end-of-step phase."""

    counters: Dict[str, Any]  # nonfinite_skipped, images, train_time_s
    best_state: Optional[Dict[str, Tensor]]  # best-on-val weights (only with train.select=best_val)


class Runner:
    """Runs the steps of one experiment; ``run()`` resumes whatever a previous call left."""

    def __init__(self, cfg: ExperimentConfig, dist: Optional[DistInfo] = None) -> None:
        self.cfg = cfg
        self.dist = dist or init_distributed(timeout_s=cfg.train.dist_timeout_s)
        self.stop = StopRequest()  # SIGINT/SIGTERM while run() runs: checkpoint, then RunInterrupted
        # "cuda" under torchrun means this rank's GPU (cuda:LOCAL_RANK), as "auto" does
        self.device = self.dist.device if cfg.device in ("auto", self.dist.device.type) else torch.device(cfg.device)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        set_deterministic(cfg.train.deterministic)
        self.run_dir = cfg.resolved_run_dir()
        self.rundir = RunDir(self.run_dir)
        self.ckpt_dir = self.rundir.ckpt_dir
        self.method: Method = build_method(cfg.method)
        self.amp = amp_dtype(cfg.train, self.device)
        configure_cuda_math(cfg.train, self.device)
        self.autocast = autocast_factory(self.device, self.amp)
        self._writer = None
        self._start()

    def _start(self) -> None:
        """Lock the run directory, validate the whole experiment (task, data, saliency), and only then
        record the config: a failed start leaves the directory as it was (or removes the one it created)."""
        cfg = self.cfg
        locked = True
        if self.dist.is_main:
            try:
                self.rundir.lock()
            except RunError:
                all_agree(False, self.device)
                raise
        if not all_agree(locked, self.device):
            raise RunError(f"{self.run_dir}: the main process could not lock the run directory (see its error)")
        try:
            if self.dist.is_main:  # an existing run logs this start at once; a new one once it is valid
                self.rundir.attach_log() if self.rundir.config_path.exists() else self.rundir.hold_start_log()
            self.data = ExperimentData.build(cfg, self.dist)
            self.task: Task = self.data.task
            self.joint = self.method.joint
            self.num_steps = 1 if self.joint else self.task.num_steps
            if not cfg.data.saliency_root and any(self.method.needs_saliency_at(t) for t in range(self.num_steps)):
                raise ConfigError(f"method {self.method.name!r} needs saliency maps: set data.saliency_root (a "
                                  "folder of <image id>.png grayscale maps, relative paths under data.root)")
            if self.dist.is_main:
                self.rundir.record_config(cfg)
                self.rundir.attach_log()
                self.rundir.remove_stale_temp_files()
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                self._check_data_unchanged()
        except BaseException:
            if self.dist.is_main:
                self.rundir.abandon()
            raise
        barrier()

    def _check_data_unchanged(self) -> None:
        """Log which finished steps saw other data than this start does (their rows record what they saw)."""
        rows = results_io.load_rows(self.run_dir)
        now = self.data.fingerprint()
        changed = [t for t, r in sorted(rows.items()) if r.get("data") is not None and not same_data(r["data"], now)]
        if changed:
            log.warning("the dataset changed since step(s) %s were trained (recorded in results.json: %s; now: %s); "
                        "later steps train on the current files", changed, rows[changed[0]].get("data"), now)

    def close(self) -> None:
        """Release the run directory's lock (also done at the end of :meth:`run`)."""
        self.rundir.unlock()

    def __del__(self) -> None:
        rundir = getattr(self, "rundir", None)
        if rundir is not None:
            rundir.unlock()

    @property
    def writer(self):
        if self._writer is None and self.cfg.log.tensorboard and self.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.run_dir / "tb"))
        return self._writer

    # -- the experiment -------------------------------------------------------------------------
    def run(self, steps: Optional[Sequence[int]] = None) -> List[Dict[str, Any]]:
        """Run ``steps`` (default: all) in order, skipping finished ones; returns every results row.

        The first SIGINT/SIGTERM makes the run write a checkpoint at its next safe point and raise
        :class:`~sats.engine.signals.RunInterrupted` (calling ``run`` again resumes there).
        """
        try:
            if self.dist.is_main:
                self.rundir.lock()
            with self.stop:
                return self._run_steps(steps)
        finally:
            self.rundir.unlock()

    def redo_from(self, t: int) -> None:
        """``--redo-step t``: set the checkpoints and results of steps ≥ ``t`` aside, so they are trained again."""
        if not 0 <= t < self.num_steps:
            raise ConfigError(f"--redo-step {t} is outside task {self.task.name!r} ({self.num_steps} steps)")
        if self.dist.is_main:
            self.rundir.discard_steps_from(t)
        barrier()

    def _run_steps(self, steps: Optional[Sequence[int]]) -> List[Dict[str, Any]]:
        steps = list(range(self.num_steps)) if steps is None else list(steps)
        bad = [s for s in steps if not 0 <= s < self.num_steps]
        if bad:
            raise ConfigError(f"steps {bad} are outside task {self.task.name!r} ({self.num_steps} steps)")
        self._verify_finished(steps)
        log.info("run %s: method %s, task %s/%s (%d steps), %s", self.run_dir, self.method.describe(),
                 self.task.dataset, self.task.name, self.num_steps, "overlapped" if self.cfg.data.overlap else "disjoint")
        rows = results_io.load_rows(self.run_dir)
        for t in steps:
            if t in rows and self._step_checkpoint(t).exists():
                log.info("step %d already finished (mIoU %.2f, checkpoint verified); skipping", t,
                         rows[t]["miou"] * 100)
                continue
            recovered = self._recover_row(t) if t not in rows else None
            rows[t] = recovered if recovered is not None else self.run_step(t)
            if self.dist.is_main:
                results_io.write(self.run_dir, self.header(), rows)
            barrier()
            if t != steps[-1] and self.stop.agreed(self.device):
                raise RunInterrupted(f"interrupted by {self.stop.name} after step {t} (its checkpoint and results "
                                     f"are written); run the same command again to resume with step {t + 1}",
                                     self.stop.signum or 0)
        if self._writer is not None:
            self._writer.flush()
        return [rows[k] for k in sorted(rows)]

    def _verify_finished(self, steps: Sequence[int]) -> None:
        """Check the hash of every finished step's checkpoint that this run would skip over (RunError with
        what to do when one is damaged); every rank agrees before anything trains."""
        error: Optional[RunError] = None
        if self.dist.is_main:
            try:
                for t in steps:
                    if self._step_checkpoint(t).exists():
                        self.rundir.verify_finished(t)
            except RunError as exc:
                error = exc
        if not all_agree(error is None, self.device):
            raise error or RunError(f"{self.run_dir}: a step checkpoint is damaged (see the main process's error)")

    def _recover_row(self, t: int) -> Optional[Dict[str, Any]]:
        """The results row stored in a finished step's checkpoint (a run stopped before writing results.json)."""
        path = self._step_checkpoint(t)
        if not path.exists():
            return None
        ckpt = load_checkpoint(path)
        self._check_checkpoint_matches(ckpt, t, path)
        if "row" not in ckpt:
            return None
        log.info("step %d finished before the run stopped; its results row is taken from %s", t, path)
        return ckpt["row"]

    def header(self) -> Dict[str, Any]:
        """The run-level part of ``results.json`` (what ran, on which data)."""
        return {"name": self.cfg.name, "method": self.method.name, "method_params": self.cfg.method,
                "dataset": self.cfg.data.dataset, "task": self.task.name, "overlap": self.cfg.data.overlap,
                "backbone": self.cfg.model.backbone, "num_steps": self.num_steps, "joint": self.joint,
                "memory": self.cfg.memory.size if self.cfg.memory.enabled else None,
                "channel_classes": list(self.task.channel_classes),
                "class_names": [self.data.train_files.class_names[c] for c in self.task.channel_classes],
                "skipped_bad_files": self.data.skipped, "data": self.data.fingerprint()}

    def _step_checkpoint(self, t: int) -> Path:
        return self.rundir.step_checkpoint(t)

    def _epoch_checkpoint(self, t: int) -> Path:
        return self.rundir.epoch_checkpoint(t)

    # -- one step -----------------------------------------------------------------------------
    def run_step(self, t: int) -> Dict[str, Any]:
        task = self.data.step_task(self.joint)
        seed_everything(step_seed(self.cfg.train.seed, t), self.dist.rank)
        shared = self._shared_step0_dir(t)
        if shared is not None and (shared / "step0.ckpt").exists() and (shared / "row.json").exists():
            row = self._adopt_shared_step0(shared)
            if row is not None:
                return row

        model, old_model, old_digest = self._build_models(t, task)
        ctx = self._context(t, task, model, old_model, old_digest)
        outcome = self._train(t, task, model, old_model, ctx)
        row = self._finish_step(t, task, model, ctx, outcome)
        if shared is not None and self.dist.is_main:
            self._share_step0(shared, row)
        return row

    def _build_models(self, t: int, task: Task):
        """The step-t model (step t-1 weights + a new head) and, if needed, the frozen step t-1 model."""
        if t == 0:
            model = build_segmenter(self.cfg.model, self.method.model_head_sizes(task, 0))
            return model.to(self.device), None, None
        prev_path = self._step_checkpoint(t - 1)
        if not prev_path.exists():
            raise RunError(f"step {t} needs the step {t - 1} checkpoint {prev_path}; run step {t - 1} first")
        model, prev = load_step_model(prev_path, t - 1, self.cfg.model, self.method.model_head_sizes(task, t - 1),
                                      task)
        self.method.load_state_dict(prev.get("method", {}))
        old_model = frozen_copy(model).to(self.device) if self.method.old_model_at(t) else None
        model.add_step(len(task.new_classes(t)), init=self.method.head_init)
        return model.to(self.device), old_model, file_digest(prev_path)

    def _check_checkpoint_matches(self, ckpt: Dict[str, Any], t: int, path: Path) -> None:
        task = self.data.step_task(self.joint)
        check_step_checkpoint(ckpt, path, t, self.method.model_head_sizes(task, t), self.cfg.model.backbone, task)

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

    def _context(self, t: int, task: Task, model: Segmenter, old_model: Optional[Segmenter],
                 old_digest: Optional[str]) -> StepContext:
        def loader(label_table=None):  # the current-step images only (no memory), batch_size per process
            ld = self.data.train_loader(t, self.joint, self.cfg.train, self.dist, step_seed(self.cfg.train.seed, t),
                                        label_table=label_table, saliency=self.method.needs_saliency_at(t))
            for batch in ld:
                yield batch.to(self.device)

        ctx = StepContext(step=t, task=task, cfg=self.cfg, model=model, old_model=old_model, device=self.device,
                          run_dir=self.run_dir, cache_dir=Path(self.cfg.data.cache_dir),
                          old_checkpoint_digest=old_digest, train_loader=loader, autocast=self.autocast,
                          grad_scaled=self.amp == torch.float16,
                          log_scalar=lambda name, value: None, data_digest=self.data.step_digest(t, self.joint))
        ctx.log_scalar = lambda name, value: self._scalar(f"step{t}/{name}", value, ctx.iteration)
        return ctx

    def _scalar(self, tag: str, value: float, it: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, it)

    # -- training -------------------------------------------------------------------------------
    def _train(self, t: int, task: Task, model: Segmenter, old_model: Optional[Segmenter],
               ctx: StepContext) -> TrainOutcome:
        cfg = self.cfg.train
        memory = self.data.step_memory(t, self.run_dir, write=self.dist.is_main)
        loader = self.data.train_loader(t, self.joint, cfg, self.dist, step_seed(cfg.seed, t), memory=memory,
                                        saliency=self.method.needs_saliency_at(t))
        epochs, per_epoch = cfg.epochs_at(t), len(loader)
        total = epochs * per_epoch
        ctx.total_iterations = total
        optimizer = build_optimizer(self.method.trainable_parameters(model, t), cfg, cfg.lr_at(t))
        scheduler = build_scheduler(optimizer, cfg, total)
        scaler = build_grad_scaler(self.device, self.amp)
        train_model: torch.nn.Module = model
        if self.dist.world_size > 1:
            train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        start_epoch, best = 0, {"score": -math.inf, "state": None}
        counters: Dict[str, Any] = {"nonfinite_skipped": 0, "images": 0, "train_time_s": 0.0, "epoch_losses": {}}
        resume = self._epoch_checkpoint(t)
        ctx.iteration = 0
        partial: Optional[Dict[str, Any]] = None  # set when the checkpoint was written in the middle of an epoch
        if resume.exists():
            state = load_checkpoint(resume)
            self._check_resume_matches(state, t, per_epoch, resume)
            load_state_strict(model, state["model"], resume)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            self.method.load_state_dict(state["method"])
            start_epoch, counters = state["epoch"] + 1, state["counters"]
            ctx.iteration = int(state.get("iteration", start_epoch * per_epoch))
            best = {"score": state["best_score"], "state": state.get("best_state")}
            partial = state.get("partial")
            log.info("step %d: resuming after %s from %s", t, f"epoch {start_epoch}" if partial is None else
                     f"iteration {partial['batches_done']}/{per_epoch} of epoch {start_epoch + 1}", resume)

        def save_resume(last_epoch: int, partial_epoch: Optional[Dict[str, Any]] = None) -> None:
            """The epoch checkpoint: state after epoch ``last_epoch`` (+ ``partial_epoch`` batches of the next)."""
            if not self.dist.is_main:
                return
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                     "method": self.method.state_dict(), "epoch": last_epoch, "iteration": ctx.iteration,
                     "per_epoch": per_epoch, "counters": counters, "best_score": best["score"],
                     "best_state": best["state"]}
            if partial_epoch is not None:
                state["partial"] = partial_epoch
            save_checkpoint(state, resume)

        def stop_mid_epoch(epoch: int, batches_done: int, sums: Dict[str, Tensor]) -> None:
            """Write the state after ``batches_done`` batches of ``epoch`` (every rank calls this), then stop."""
            mine = {"rng": capture_rng(), "loss_sums": {k: v.detach().cpu() for k, v in sums.items()}}
            per_rank = gather_per_rank(mine)
            save_resume(epoch - 1, {"batches_done": batches_done, "world_size": self.dist.world_size,
                                    "per_rank": per_rank})
            barrier()
            raise RunInterrupted(f"interrupted by {self.stop.name} at step {t} epoch {epoch + 1} (after iteration "
                                 f"{batches_done}/{per_epoch}); run the same command again to resume from {resume}",
                                 self.stop.signum or 0)

        self.method.begin_step(ctx)
        needs, old_needs = self.method.needs_at(t), self.method.old_needs
        log.info("step %d: %d classes new %s, %d images%s, %d epochs × %d iterations, lr %g", t,
                 len(task.new_classes(t)), list(task.new_classes(t)), len(loader.dataset),
                 f" + {len(memory)} memory images" if memory is not None else "", epochs, per_epoch, cfg.lr_at(t))
        for epoch in range(start_epoch, epochs):
            ctx.epoch = epoch
            seed_everything(step_seed(cfg.seed, t, epoch), self.dist.rank)
            loader.set_epoch_seed(step_seed(cfg.seed, t, epoch))
            model.train()
            sums: Dict[str, Tensor] = {}
            replay, resumed = 0, {}  # batches trained before a mid-epoch stop (fetched again, not trained)
            if partial is not None:
                replay, resumed = partial["batches_done"], partial["per_rank"][self.dist.rank]
                sums = {k: v.to(self.device) for k, v in resumed["loss_sums"].items()}
                partial = None
            tic = time.perf_counter()
            bar = _progress(loader, self.cfg.log.progress and self.dist.is_main, f"step {t} epoch {epoch + 1}/{epochs}")
            fetch = StoppableFetch(bar, self.stop)
            i = -1
            for i, cpu_batch in enumerate(fetch):
                if i < replay:  # the data pipeline's random streams advance exactly as in the stopped run
                    if i + 1 == replay:
                        restore_rng(resumed["rng"])
                    continue
                batch = cpu_batch.to(self.device)
                with self.autocast():
                    out = train_model(batch.images, need=needs)
                    old_out = None
                    if old_model is not None and self.method.old_forward:
                        with torch.no_grad():
                            old_out = old_model(batch.images, need=old_needs)
                    terms = self.method.loss(batch, out, old_out, ctx)
                del out, old_out  # the old model's maps (e.g. attention) are freed before backward
                loss = sum(terms.values())
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # after_backward and clipping see true gradients (no-op unless fp16)
                bad_loss, bad_grad, stop_now = self._iteration_flags(loss, model, scaler)
                if bad_loss or bad_grad:
                    self._nonfinite(t, f"step {t}, epoch {epoch + 1}, iteration {i + 1}", terms, model, bad_loss,
                                    counters)
                    optimizer.zero_grad(set_to_none=True)
                    if scaler.is_enabled():
                        scaler.update()  # closes this iteration's unscale_ (fp16)
                    if stop_now or self._single_process_stop():
                        stop_mid_epoch(epoch, i + 1, sums)
                    continue
                self.method.after_backward(ctx)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                self.method.after_optimizer_step(ctx)
                ctx.iteration += 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.detach()
                if self.writer is not None and ctx.iteration % max(1, cfg.log_every) == 0:
                    for k, v in terms.items():
                        self.writer.add_scalar(f"step{t}/loss/{k}", float(v.detach()), ctx.iteration)
                    self.writer.add_scalar(f"step{t}/lr", scheduler.get_last_lr()[0], ctx.iteration)
                counters["images"] += len(batch.images) * self.dist.world_size
                if stop_now or self._single_process_stop():
                    stop_mid_epoch(epoch, i + 1, sums)
            if fetch.failed is not None:  # data-loader workers got the signal too: stop after the last good batch
                if i + 1 > replay and self.dist.world_size == 1:
                    stop_mid_epoch(epoch, i + 1, sums)
                kept = resume if resume.exists() else f"the start of step {t}"
                raise RunInterrupted(f"interrupted by {self.stop.name} at step {t} epoch {epoch + 1} while loading "
                                     f"data ({fetch.failed}); run the same command again to resume from {kept}",
                                     self.stop.signum or 0)
            counters["train_time_s"] += time.perf_counter() - tic
            if self.dist.world_size > 1 and sums:  # the epoch's mean over every rank's images
                names = sorted(sums)
                sums = dict(zip(names, all_reduce_mean_(torch.stack([sums[k].float() for k in names]))))
            means = {k: float(v) / max(1, per_epoch) for k, v in sums.items()}
            for k, v in means.items():
                counters["epoch_losses"].setdefault(k, []).append(round(v, 6))
            log.info("step %d epoch %d/%d: %s", t, epoch + 1, epochs, ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
            if cfg.val_every > 0 and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == epochs):
                val = self._evaluate(model, t, "val")
                log.info("step %d epoch %d: val mIoU (current classes) %.2f", t, epoch + 1, val.miou * 100)
                self._scalar(f"step{t}/val_miou", val.miou, ctx.iteration)
                if cfg.select == "best_val" and val.miou > best["score"]:
                    best = {"score": val.miou, "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
            if epoch + 1 < epochs:
                save_resume(epoch)
            barrier()
            if epoch + 1 < epochs and self.stop.agreed(self.device):
                raise RunInterrupted(f"interrupted by {self.stop.name} at step {t} after epoch {epoch + 1}; run the "
                                     f"same command again to resume from {resume}", self.stop.signum or 0)
        return TrainOutcome(counters=counters, best_state=best["state"])

    def _iteration_flags(self, loss: Tensor, model: torch.nn.Module, scaler: Any) -> Tuple[bool, bool, bool]:
        """(non-finite loss, non-finite gradient, stop requested), agreed by every rank; one host sync.

        Gradients are checked after backward and unscaling, before the method's ``after_backward``
        hook (which may fold them into importance estimates); with fp16 the GradScaler skips
        overflowing steps itself, so only the loss is checked.
        """
        bad_loss = ~torch.isfinite(loss.detach())
        bad_grad = torch.zeros_like(bad_loss)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if grads and not scaler.is_enabled():
            bad_grad = ~torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=math.inf))  # max |g|: no overflow
        flags = torch.stack([bad_loss, bad_grad]).float()
        if self.dist.world_size == 1:
            loss_flag, grad_flag = flags.tolist()
            return loss_flag > 0, grad_flag > 0, False  # single process: _single_process_stop() at its end
        flags = all_reduce_sum_(torch.cat([flags, flags.new_tensor([1.0 if self.stop.requested else 0.0])]))
        loss_flag, grad_flag, stop_flag = flags.tolist()
        return loss_flag > 0, grad_flag > 0, stop_flag > 0

    def _single_process_stop(self) -> bool:
        """A stop request of a single-process run, read at the end of an iteration (DDP: in the agreed flags)."""
        return self.dist.world_size == 1 and self.stop.requested

    def _nonfinite(self, t: int, where: str, terms: Dict[str, Tensor], model: torch.nn.Module, bad_loss: bool,
                   counters: Dict[str, Any]) -> None:
        """Raise (``train.on_nonfinite=error``) or count and log (``skip``) a non-finite loss or gradient."""
        values = ", ".join(f"{k}={float(v.detach())}" for k, v in terms.items())
        if bad_loss:
            bad_terms = [k for k, v in terms.items() if not torch.isfinite(v)]
            what = f"non-finite loss at {where}, term(s) {bad_terms}{'' if bad_terms else ' (on another rank)'}"
            error: type[NonFiniteLossError] = NonFiniteLossError
        else:
            names = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            what = (f"non-finite gradient at {where} (every loss term finite), in {len(names)} parameter(s) "
                    f"{names[:6]}{'…' if len(names) > 6 else ''}")
            error = NonFiniteGradientError
        if self.cfg.train.on_nonfinite == "error":
            raise error(f"{what}: {values}; {self._kept(t)} (train.on_nonfinite=skip skips such "
                        "batches and counts them)")
        counters["nonfinite_skipped"] += 1
        log.warning("skipping a batch: %s: %s (%d skipped so far)", what, values, counters["nonfinite_skipped"])

    def _kept(self, t: int) -> str:
        """What a rerun of step ``t`` starts from, naming a file that exists."""
        epoch = self._epoch_checkpoint(t)
        if epoch.exists():
            return f"the last completed epoch of step {t} is kept in {epoch} (rerunning resumes there)"
        if t > 0:
            return (f"step {t} has no checkpoint of its own yet; rerunning restarts it from the step {t - 1} checkpoint "
                    f"{self._step_checkpoint(t - 1)}")
        return "nothing of step 0 was saved yet; rerunning restarts step 0"

    def _check_skipped(self, t: int, counters: Dict[str, Any], total: int) -> None:
        """NonFiniteLossError when more than ``train.max_skipped_fraction`` of a step's iterations were skipped."""
        skipped, limit = counters["nonfinite_skipped"], self.cfg.train.max_skipped_fraction
        if skipped and skipped > limit * total:
            raise NonFiniteLossError(
                f"step {t}: {skipped} of {total} iterations ({skipped / max(total, 1):.0%}) were skipped for a "
                f"non-finite loss or gradient, more than train.max_skipped_fraction={limit:g}; the step is not saved "
                f"as finished ({self._kept(t)}). Lower the learning rate, try train.amp=off or train.grad_clip, or "
                "raise train.max_skipped_fraction")

    # -- end of step: method hook, test, checkpoint, results ------------------------------------
    def _finish_step(self, t: int, task: Task, model: Segmenter, ctx: StepContext,
                     outcome: TrainOutcome) -> Dict[str, Any]:
        self._check_skipped(t, outcome.counters, ctx.total_iterations)
        self.method.end_step(ctx)
        tic = time.perf_counter()
        metrics = self._evaluate(model, t, "test")
        eval_time = time.perf_counter() - tic
        counters = outcome.counters
        state = outcome.best_state or model.state_dict()
        groups = self.task.groups(self.task.num_steps - 1) if self.joint else task.groups(t)
        row = results_io.make_row(t, metrics, groups, task, self.data.train_files.class_names)
        row.update({"train_time_s": round(counters["train_time_s"], 3), "eval_time_s": round(eval_time, 3),
                    "train_images_per_s": round(counters["images"] / max(counters["train_time_s"], 1e-9), 2),
                    "iterations": ctx.iteration, "nonfinite_skipped": counters["nonfinite_skipped"],
                    "epoch_losses": counters["epoch_losses"],
                    "shared_step0": None, "data": self.data.fingerprint()})
        if self.dist.is_main:  # the row travels with the weights: a run killed before results.json is written
            save_checkpoint({"model": state, "method": self.method.state_dict(), "step": t,  # recovers it
                             "head_sizes": self.method.model_head_sizes(task, t), "backbone": self.cfg.model.backbone,
                             "task": {"dataset": task.dataset, "name": task.name, "steps": [list(s) for s in task.steps]},
                             "config_digest": digest(config_to_dict(self.cfg)), "row": row}, self._step_checkpoint(t))
            self._epoch_checkpoint(t).unlink(missing_ok=True)
        if t + 1 < self.num_steps and self.dist.is_main:  # the next step's memory, from this step's images
            self.data.step_memory(t + 1, self.run_dir, write=True)
        barrier()
        log.info("step %d test: mIoU %.2f | old %s | new %s", t, row["miou"] * 100, _pct(row["old"]), _pct(row["new"]))
        if self.writer is not None:
            for k in ("miou", "old", "new", "all"):
                if row.get(k) is not None:
                    self.writer.add_scalar(f"test/{k}", row[k], t)
            self._overlays(model, t)
        return row

    def _evaluate(self, model: Segmenter, t: int, kind: str) -> Metrics:
        """Confusion matrix on the device over the step's test (C^{0:t}) or val (C^t) images."""
        loader = self.data.eval_loader(t, self.joint, kind, self.dist)
        return evaluate_loader(model, loader, self.data.step_task(self.joint).num_outputs(t), self.method.predict,
                               self.device, self.autocast, self.cfg.log.progress and self.dist.is_main,
                               f"step {t} {kind}")

    def _overlays(self, model: Segmenter, t: int) -> None:
        n = self.cfg.log.overlay_images
        if n <= 0:
            return
        from sats.report.overlay import overlay_grid

        first = first_batch_images(self.data.eval_loader(t, self.joint, "test", self.dist), n)
        if first is None:
            return
        images, labels = first
        model.eval()
        with torch.no_grad(), self.autocast():
            pred = self.method.predict(model(images.to(self.device)).logits.float()).cpu()
        palette = self.data.train_files.palette
        grid = overlay_grid(images, labels, pred, palette, self.data.step_task(self.joint).channel_classes)
        self.writer.add_image(f"predictions/step{t}", grid, t, dataformats="HWC")

    def evaluate_checkpoint(self, t: int) -> Dict[str, Any]:
        """Test the saved step-t checkpoint exactly as the run did at the end of step t."""
        task = self.data.step_task(self.joint)
        model, _ = load_step_model(self._step_checkpoint(t), t, self.cfg.model, self.method.model_head_sizes(task, t),
                                   task, self.device)
        metrics = self._evaluate(model, t, "test")
        groups = self.task.groups(self.task.num_steps - 1) if self.joint else task.groups(t)
        return results_io.make_row(t, metrics, groups, task, self.data.train_files.class_names)

    # -- step-0 sharing -------------------------------------------------------------------------
    def _shared_step0_dir(self, t: int) -> Optional[Path]:
        """Where a plain-CE step 0 is stored, keyed by everything that determines it (None: not shareable)."""
        key = self.method.step0_key()
        if t != 0 or not self.cfg.train.share_step0 or key is None or self.joint:
            return None
        c = self.cfg
        determinants = {
            "recipe": key, "data": self.data.step_digest(0, False), "model": config_to_dict(c)["model"],
            # the encoder's starting weights by content: a replaced file under the same name is another step 0
            "pretrained": file_fingerprints([Path(c.model.pretrained)], data_cache_dir(c.data))[0]
            if c.model.pretrained else None,
            "train": {k: v for k, v in config_to_dict(c)["train"].items()
                      if k not in ("lr_incremental", "epochs_incremental", "log_every", "share_step0", "threads",
                                   "val_every", "select", "on_nonfinite", "max_skipped_fraction", "dist_timeout_s")},
            "data_pipeline": {k: getattr(c.data, k) for k in ("crop_size", "scale_min", "scale_max", "batch_size",
                                                               "eval_size", "eval_mode")},
            "world_size": self.dist.world_size,
        }
        return Path(c.data.cache_dir) / "step0" / digest(determinants)

    def _adopt_shared_step0(self, shared: Path) -> Optional[Dict[str, Any]]:
        """Take the shared step 0 as this run's step 0; a damaged one is reported, moved aside and retrained
        (None), so one bad cache entry never fails every run that shares it."""
        path = shared / "step0.ckpt"
        ckpt: Optional[Dict[str, Any]] = None
        problem = ""
        try:
            ckpt = load_checkpoint(path)  # verifies the hash before we adopt it
            row = json.loads((shared / "row.json").read_text())
        except (CheckpointError, OSError, ValueError) as exc:
            problem = str(exc)
        if not all_agree(not problem, self.device):
            if self.dist.is_main:
                aside = shared.with_name(f"{shared.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
                shared.replace(aside)
                log.warning("step 0: the shared step-0 checkpoint is damaged (%s); moved it to %s and training "
                            "step 0 again", problem or "on another rank", aside)
            barrier()
            return None
        assert ckpt is not None
        self._check_checkpoint_matches(ckpt, 0, path)
        if self.dist.is_main:  # unchanged bytes: caches keyed by its digest stay shared
            save_checkpoint(ckpt, self._step_checkpoint(0))
        barrier()
        row.update(shared_step0=shared.name, data=self.data.fingerprint())
        log.info("step 0: reusing the shared plain-CE step-0 checkpoint %s (mIoU %.2f)", shared, row["miou"] * 100)
        return row

    def _share_step0(self, shared: Path, row: Dict[str, Any]) -> None:
        """Copy this run's step 0 into the shared cache (atomically; the row last, so a half-written entry is
        never taken: adoption needs both files)."""
        tmp = shared / f"step0.ckpt.tmp-{os.getpid()}"
        try:
            shared.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._step_checkpoint(0), tmp)
            tmp.replace(shared / "step0.ckpt")
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise CheckpointError(f"cannot write the shared step-0 checkpoint {shared / 'step0.ckpt'}: "
                                  f"{exc.strerror or exc}") from exc
        results_io.write_json(shared / "row.json", row)


# ----------------------------------------------------------------------------------------------
def _progress(iterable, enabled: bool, desc: str):
    return progress_bar(iterable, enabled, desc)


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 100:.2f}"
