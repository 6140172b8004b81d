"""The step sequence of one experiment: data → model → method → train → test → checkpoint → results.

Method-agnostic: it reads what a method declares (``needs``, ``uses_old_model``, ``head_init``, ``step0``,
``joint``) and calls its hooks, never its name. The epochs of a step are :class:`sats.engine.loop.StepTrainer`'s;
the run directory (layout, lock, config, shared step 0, checkpoint → model) is :mod:`sats.engine.rundir`'s.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from sats.allocator import tune_host_allocator
from sats.config import ConfigError, ExperimentConfig, config_to_dict
from sats.data.tasks import Task
from sats.engine import results as results_io
from sats.engine.cache import ArtifactCache
from sats.engine.checkpoint import save_checkpoint, state_digest
from sats.engine.data import ExperimentData, first_batch_images
from sats.engine.distributed import DistInfo, all_agree, all_reduce_sum_, barrier, init_distributed, set_deterministic
from sats.engine.evaluator import Metrics, evaluate_loader
from sats.engine.logging_sinks import RunLogger
from sats.engine.loop import NonFiniteGradientError, NonFiniteLossError, StepTrainer, TrainOutcome
from sats.engine.optim import amp_dtype, autocast_factory, configure_cuda_math
from sats.engine.rundir import RunDir, RunError, SharedStep0, load_step_model
from sats.engine.signals import RunInterrupted, StopRequest
from sats.io import digest
from sats.methods.addon import build_method
from sats.methods.base import Method, StepContext
from sats.models.segmenter import Segmenter, build_segmenter, frozen_copy
from sats.rng import seed_everything, step_seed

__all__ = ["NonFiniteGradientError", "NonFiniteLossError", "RunError", "Runner"]

log = logging.getLogger("sats")

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
        if self.dist.is_main:
            try:
                self.rundir.lock()
            except RunError:
                all_agree(False, self.device)
                raise
        if not all_agree(True, self.device):
            raise RunError(f"{self.run_dir}: the main process could not lock the run directory (see its error)")
        try:
            if self.dist.is_main:  # an existing run logs this start at once; a new one once it is valid
                self.rundir.attach_log() if self.rundir.config_path.exists() else self.rundir.hold_start_log()
            self.data = ExperimentData.build(cfg, self.dist)
            self.task: Task = self.data.task
            self.joint = self.method.joint
            self.num_steps = 1 if self.joint else self.task.num_steps
            if cfg.log.wandb and importlib.util.find_spec("wandb") is None:
                raise ConfigError("log.wandb=true needs the wandb package: pip install wandb (or log.wandb=false)")
            if not cfg.data.saliency_root and any(self.method.needs_saliency_at(t) for t in range(self.num_steps)):
                raise ConfigError(f"method {self.method.name!r} needs saliency maps: set data.saliency_root (a "
                                  "folder of <image id>.png grayscale maps, relative paths under data.root)")
            if self.dist.is_main:
                self.rundir.record_config(cfg)
                self.rundir.attach_log()
                log.info(tune_host_allocator())  # applied at start-up by `sats`; recorded in train.log
                self.rundir.remove_stale_temp_files()
                self.rundir.ckpt_dir.mkdir(parents=True, exist_ok=True)
                self.rundir.warn_if_data_changed(self.data.fingerprint())
        except BaseException:
            if self.dist.is_main:
                self.rundir.abandon()
            raise
        barrier()

    def close(self) -> None:
        """Release the run directory's lock (also done at the end of :meth:`run`)."""
        self.rundir.unlock()

    def __del__(self) -> None:
        rundir = getattr(self, "rundir", None)
        if rundir is not None:
            rundir.unlock()

    @property
    def writer(self) -> Optional[RunLogger]:
        """Tensorboard and/or W&B (``log.*``) on the main process, created at first use; None: no sink."""
        c = self.cfg.log
        if self._writer is None and (c.tensorboard or c.wandb) and self.dist.is_main:
            self._writer = RunLogger(self.run_dir, c.tensorboard, c.wandb, c.wandb_project, c.wandb_mode,
                                     self.cfg.name, config_to_dict(self.cfg))
        return self._writer or None

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
        self.rundir.verify_finished_steps(steps, self.device, self.dist.is_main)
        log.info("run %s: method %s, task %s/%s (%d steps), %s", self.run_dir, self.method.describe(),
                 self.task.dataset, self.task.name, self.num_steps, "overlapped" if self.cfg.data.overlap else "disjoint")
        rows = results_io.load_rows(self.run_dir)
        for t in steps:
            if t in rows and self.rundir.step_checkpoint(t).exists():
                log.info("step %d already finished (mIoU %.2f, checkpoint verified); skipping", t,
                         rows[t]["miou"] * 100)
                continue
            task = self.data.step_task(self.joint)
            recovered = None if t in rows else self.rundir.row_from_checkpoint(
                t, self.method.model_head_sizes(task, t), self.cfg.model.backbone, task)
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

    def header(self) -> Dict[str, Any]:
        """The run-level part of ``results.json`` (what ran, on which data)."""
        return results_io.run_header(self.cfg, self.method.name, self.task, self.num_steps, self.joint,
                                     self.data.train_files.class_names, self.data.skipped, self.data.fingerprint())

    # -- one step -----------------------------------------------------------------------------
    def run_step(self, t: int) -> Dict[str, Any]:
        task = self.data.step_task(self.joint)
        seed_everything(step_seed(self.cfg.train.seed, t), self.dist.rank)
        shared = self._shared_step0(t)
        if shared is not None and shared.available():
            row = self._adopt(shared)
            if row is not None:
                return row
        model, old_model, old_digest = self._build_models(t, task)
        ctx = self._context(t, task, model, old_model, old_digest)
        memory = self.data.step_memory(t, self.run_dir, write=self.dist.is_main, confidence=self._confidence(old_model))
        loader = self.data.train_loader(t, self.joint, self.cfg.train, self.dist, step_seed(self.cfg.train.seed, t),
                                        memory=memory, saliency=self.method.needs_saliency_at(t))
        trainer = StepTrainer(self.cfg, self.dist, self.rundir, self.method, self.stop, self.autocast, self.amp,
                              lambda m, kind: self._evaluate(m, t, kind),
                              self._scalar if self.writer is not None else None)
        outcome = trainer.train(ctx, loader, len(memory) if memory is not None else None)
        row = self._finish_step(t, task, model, ctx, outcome)
        if shared is not None and self.dist.is_main:
            shared.store(self.rundir.step_checkpoint(0), row)
        return row

    def _build_models(self, t: int, task: Task):
        """The step-t model (step t-1 weights + a new head) and, if needed, the frozen step t-1 model."""
        if t == 0:
            model = build_segmenter(self.cfg.model, self.method.model_head_sizes(task, 0))
            return model.to(self.device), None, None
        prev_path = self.rundir.step_checkpoint(t - 1)
        if not prev_path.exists():
            raise RunError(f"step {t} needs the step {t - 1} checkpoint {prev_path}; run step {t - 1} first")
        model, prev = load_step_model(prev_path, t - 1, self.cfg.model, self.method.model_head_sizes(task, t - 1),
                                      task)
        self.method.load_state_dict(prev.get("method", {}))
        old_model = frozen_copy(model).to(self.device) if self.method.old_model_at(t) else None
        model.add_step(len(task.new_classes(t)), init=self.method.head_init, source=self.method.head_init_source)
        # what the step-(t-1) model is, not when it was written: identical runs share their caches
        return model.to(self.device), old_model, state_digest({"model": prev["model"], "method": prev.get("method")})

    def _context(self, t: int, task: Task, model: Segmenter, old_model: Optional[Segmenter],
                 old_digest: Optional[str]) -> StepContext:
        loader = self.data.extra_passes(t, self.joint, self.dist, self.device, self.method.needs_saliency_at(t))
        ctx = StepContext(step=t, task=task, cfg=self.cfg, model=model, old_model=old_model, device=self.device,
                          run_dir=self.run_dir, old_checkpoint_digest=old_digest, train_loader=loader,
                          autocast=self.autocast, grad_scaled=self.amp == torch.float16,
                          log_scalar=lambda name, value: None, data_digest=self.data.step_digest(t, self.joint),
                          cache=ArtifactCache(Path(self.cfg.data.cache_dir), self.device, self.dist.is_main),
                          rank=self.dist.rank, world_size=self.dist.world_size,
                          all_agree=lambda flag: all_agree(flag, self.device), all_reduce_sum_=all_reduce_sum_,
                          evaluate=lambda m, kind: self._evaluate(m, t, kind))
        ctx.log_scalar = lambda name, value: self._scalar(f"step{t}/{name}", value, ctx.iteration)
        return ctx

    def _scalar(self, tag: str, value: float, it: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, it)

    # -- end of step: method hook, test, checkpoint, results ------------------------------------
    def _finish_step(self, t: int, task: Task, model: Segmenter, ctx: StepContext,
                     outcome: TrainOutcome) -> Dict[str, Any]:
        if outcome.best_state is not None:  # train.select=best_val: the selected weights are the step's model
            model.load_state_dict(outcome.best_state)
        self.method.end_step(ctx)  # may change the model (EWF fuses it): what is tested is what is saved
        tic = time.perf_counter()
        metrics = self._evaluate(model, t, "test")
        eval_time = time.perf_counter() - tic
        state = model.state_dict()
        groups = self.task.groups(self.task.num_steps - 1) if self.joint else task.groups(t)
        row = results_io.make_row(t, metrics, groups, task, self.data.train_files.class_names)
        row.update(results_io.training_record(outcome.counters, ctx.iteration, eval_time), shared_step0=None,
                   data=self.data.fingerprint())
        if self.dist.is_main:  # the row travels with the weights: a run killed before results.json is written
            save_checkpoint({"model": state, "method": self.method.state_dict(), "step": t,  # recovers it
                             "head_sizes": self.method.model_head_sizes(task, t), "backbone": self.cfg.model.backbone,
                             "task": {"dataset": task.dataset, "name": task.name, "steps": [list(s) for s in task.steps]},
                             "config_digest": digest(config_to_dict(self.cfg)), "row": row},
                            self.rundir.step_checkpoint(t))
            self.rundir.epoch_checkpoint(t).unlink(missing_ok=True)
        if t + 1 < self.num_steps and self.dist.is_main:  # the next step's memory, from this step's images
            self.data.step_memory(t + 1, self.run_dir, write=True, confidence=self._confidence(model))
        barrier()
        log.info("step %d test: mIoU %.2f | old %s | new %s", t, row["miou"] * 100, _pct(row["old"]), _pct(row["new"]))
        if self.writer is not None:
            for k in ("miou", "old", "new", "all"):
                if row.get(k) is not None:
                    self.writer.add_scalar(f"test/{k}", row[k], t)
            self._overlays(model, t)
        return row

    def _confidence(self, model: Optional[Segmenter]) -> Optional[Any]:
        """``images → (scores, channels)`` of ``model`` (``method.confidence``) when the memory pseudo-labels."""
        m = self.cfg.memory
        if model is None or not m.enabled or m.pseudo_threshold is None:
            return None

        def confidence(images: torch.Tensor) -> tuple:
            model.eval()
            with torch.no_grad(), self.autocast():
                logits = model(images.to(self.device)).logits
            return self.method.confidence(logits)

        return confidence

    def _evaluate(self, model: Segmenter, t: int, kind: str) -> Metrics:
        """Confusion matrix on the device over the step's test (C^{0:t}) or val (C^t) images."""
        loader = self.data.eval_loader(t, self.joint, kind, self.dist)
        return evaluate_loader(model, loader, self.data.step_task(self.joint).num_outputs(t), self.method.predict,
                               self.device, self.autocast, self.cfg.log.progress and self.dist.is_main,
                               f"step {t} {kind}")

    def _overlays(self, model: Segmenter, t: int) -> None:
        """Image | ground truth | prediction of the first test images, to tensorboard."""
        n = self.cfg.log.overlay_images
        first = first_batch_images(self.data.eval_loader(t, self.joint, "test", self.dist), n) if n > 0 else None
        if first is None:
            return
        from sats.data.overlay import overlay_grid

        images, labels = first
        model.eval()
        with torch.no_grad(), self.autocast():
            pred = self.method.predict(model(images.to(self.device)).logits.float()).cpu()
        grid = overlay_grid(images, labels, pred, self.data.train_files.palette,
                            self.data.step_task(self.joint).channel_classes)
        self.writer.add_image(f"predictions/step{t}", grid, t)

    # -- step-0 sharing -------------------------------------------------------------------------
    def _shared_step0(self, t: int) -> Optional[SharedStep0]:
        """The shared entry of a plain-CE step 0 (None: this step is not shareable)."""
        recipe = self.method.step0_key()
        if t != 0 or not self.cfg.train.share_step0 or recipe is None or self.joint:
            return None
        return SharedStep0.for_run(self.cfg, recipe, self.data.step_digest(0, False), self.dist.world_size)

    def _adopt(self, shared: SharedStep0) -> Optional[Dict[str, Any]]:
        """Take the shared step 0 as this run's step 0 (None: it was damaged, set aside, and step 0 trains)."""
        task = self.data.step_task(self.joint)
        row = shared.adopt(self.rundir.step_checkpoint(0), self.method.model_head_sizes(task, 0),
                           self.cfg.model.backbone, task, self.device, self.dist.is_main)
        if row is not None:
            row["data"] = self.data.fingerprint()
        return row


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 100:.2f}"
