"""Cost of every method: training ms/iter, images/s, peak memory, evaluation images/s, ratio to its lower bound.

Usage (from the repository root; ``sats bench cost ...`` is the same)::

    python -m benchmarks cost                                        # every method; mit_b0, mit_b2, resnet101
    python -m benchmarks cost --backbones mit_b0 --sizes 128 256 --methods ft,mib,sats --iters 5 --repeats 3
    python -m benchmarks cost --methods sats --profile               # + torch.profiler tables of SATS and FT

Defaults: 256 px, batch 2 on CPU; 512 px, batch 8 when CUDA is present. Each method is measured at
**step 1 of VOC 15-5** (heads ``[16, 5]``, ``--task``/``--step`` change it), on random-init weights
(speed does not depend on the values) and one fixed synthetic batch already on the device.

What one measurement does (a fresh subprocess per configuration unless ``--no-isolate``):

1. **History.** The method runs through the steps before the measured one exactly as the runner
   sequences them (build step-0 model; at each step ``s``: frozen old model if
   ``method.old_model_at(s)``, ``add_step(init=method.head_init)``, ``begin_step``, one training
   iteration, ``end_step``), on a small batch (≤ 64 px); the passes of ``begin_step`` / ``end_step``
   (``ctx.train_loader``) see one batch of the step at the measured size. So method state is real:
   EWC/RW/PI hold a finished importance, SSUL's head is the unknown-initialised one, STAR holds the
   class statistics of the earlier steps' batches, and so on.
2. **Method, memory.** ``method.param_groups`` → optimiser (``frozen_at``: BN frozen, dropout off),
   ``begin_step`` (PLOP / SATS compute their entropy thresholds there: ``ctx.train_loader`` yields the
   measured batch once, so the thresholds are the per-class medians on that batch and about half of the
   background pixels are accepted; for that call an epoch is one iteration, so STAR replays per iteration
   the old-class positions of one earlier batch minus those the old model finds in the measured one),
   ``--warmup`` iterations, then the memory peak of up to 2 iterations. An iteration is
   the engine's own :func:`sats.engine.loop.train_iteration`: ``model(x, need)`` and, under ``no_grad``,
   ``old_model(x, old_needs)`` → ``method.loss`` → sum → ``zero_grad`` → backward → unscale →
   loss/gradient finiteness check (one host sync, as the runner) → ``after_backward`` → optimiser
   and scheduler step → ``after_optimizer_step``.
3. **Time, interleaved with the lower bound.** ``--iters`` rounds of: one FT training iteration
   (plain CE, every parameter, same optimiser kind, on a copy of the step-``t`` model), one no-grad
   forward of the old model with the ``old_needs`` the method asks for (only when the method runs
   the old model: ``old_model_at(t) and old_forward``), one iteration of the method. Medians of
   each; ``bound = FT ms + old forward ms``; ``ratio = method ms / bound``. Interleaving exposes
   the method and its bound to the same machine load. ``ratio_cpu`` is the same on process CPU
   time (all threads), less disturbed by other processes on a shared CPU. With ``--repeats R``
   each configuration runs in R processes (round-robin over configurations) and every figure is
   the median over them.
4. **Evaluation.** ``model.eval()``, no grad: logits → ``method.predict`` → ``ConfusionMatrix.update``.

Memory: ``train_peak_mb`` is the peak of the method's training iterations (phase 2). CUDA:
``torch.cuda.max_memory_allocated`` (weights, old model, optimiser state included);
``train_peak_growth_mb`` subtracts the memory allocated just before those iterations. CPU: the peak
resident set size (``VmHWM``, reset with ``/proc/self/clear_refs`` after warm-up) and its growth
over the RSS before those iterations; RSS includes the allocator's cached pages and the Python/torch
runtime (~ constant across methods), so compare methods by the growth column.

Joint training (one step, every class) is measured at its only step against FT on the same
one-head layout. SATS on a ResNet uses its CNN-feature variant (``configs/_base_/methods/
sats_deeplab.yaml``): methods take their parameters from ``configs/_base_/methods/<name>.yaml``
(``<name>_deeplab.yaml`` for ResNet backbones when it exists), else their defaults.

Results are merged into ``benchmarks/results/methods-<device>.json`` (keyed by backbone, size,
batch, AMP, task, step, method) and the whole file is rendered to ``methods-<device>.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sats.allocator import tune_host_allocator  # noqa: E402
from sats.config import ExperimentConfig, TrainConfig  # noqa: E402
from sats.experiment import load_experiment  # noqa: E402
from sats.data.tasks import Task, get_task  # noqa: E402
from sats.engine.cache import ArtifactCache  # noqa: E402
from sats.engine.data import joint_task  # noqa: E402
from sats.engine.evaluator import ConfusionMatrix  # noqa: E402
from sats.engine.loop import Optimisation  # noqa: E402
from sats.engine.loop import train_iteration as engine_iteration  # noqa: E402
from sats.engine.optim import (amp_dtype, autocast_factory, build_grad_scaler, build_optimizer,  # noqa: E402
                               build_scheduler, configure_cuda_math, optimizer_groups)
from sats.io import write_json_atomic, write_text_atomic  # noqa: E402
from sats.methods import Batch, Method, StepContext, build_method, list_methods, validate_method_config  # noqa: E402
from sats.methods.ft import FineTuning  # noqa: E402
from sats.models import ModelConfig, Segmenter, build_segmenter, frozen_copy  # noqa: E402
from sats.models.segmenter import train_mode  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
METHOD_CONFIGS = ROOT / "configs" / "_base_" / "methods"
TARGET_RATIO = 1.15
HISTORY_MAX_SIZE = 64

#: Named model settings besides the backbone names (``mit_b0`` … ``resnet101``, built with their paper head).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # the tiny MiT of the tests (seconds on a CPU)
    "mit_custom-tiny": dict(backbone="mit_custom", embed_dims=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                            num_heads=[1, 2, 2, 4], sr_ratios=[8, 4, 2, 1], decoder_dim=16, drop_path=0.0),
    # the demo's MiT (configs/_base_/models/mit_tiny.yaml)
    "mit_custom-demo": dict(backbone="mit_custom", embed_dims=[16, 32, 64, 128], depths=[2, 2, 2, 2],
                            num_heads=[1, 2, 4, 8], sr_ratios=[4, 2, 1, 1], decoder_dim=64, drop_path=0.0),
    # MiT-B2 with activation checkpointing (model.checkpoint_activations: the memory switch)
    "mit_b2-ckpt": dict(backbone="mit_b2", checkpoint_activations=True),
}


# ----------------------------------------------------------------------------------------------
# What is measured
@dataclass(frozen=True)
class Spec:
    """One configuration: a method on a model, batch, resolution and head layout."""

    backbone: str  # a backbone name or a MODEL_PRESETS key
    size: int  # square input, px
    method: str
    batch: int = 2
    dataset: str = "voc"
    task: str = "15-5"
    step: int = 1  # the measured step (joint methods: always their only step, 0)
    iters: int = 3  # timed iterations (median reported)
    warmup: int = 1
    device: str = "cpu"
    amp: str = "off"  # off | bf16 | fp16
    threads: int = 0  # torch CPU threads (0: leave the default)
    optimizer: str = "sgd"
    profile_dir: Optional[str] = None  # write torch.profiler tables of the method and of FT there

    @property
    def key(self) -> tuple:
        return (self.backbone, self.size, self.batch, self.amp, self.dataset, self.task, self.step, self.method)


def model_config(name: str) -> ModelConfig:
    """``ModelConfig`` of a backbone name (MiT: the reference's simple head; ResNet: ASPP) or a preset."""
    if name in MODEL_PRESETS:
        return ModelConfig(head="simple", **MODEL_PRESETS[name])
    return ModelConfig(backbone=name, head="aspp" if name.startswith("resnet") else "simple")


def method_base(name: str, cnn: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The validated ``method:`` section of ``name`` from its base config (the ``_deeplab`` one for a CNN), and
    the model keys that file sets (RCIL: ``rc_branches``)."""
    stem = name.replace("+", "_")  # a base+add-on combination (mib+ewf): configs/_base_/methods/mib_ewf.yaml
    candidates = ([METHOD_CONFIGS / f"{stem}_deeplab.yaml"] if cnn else []) + [METHOD_CONFIGS / f"{stem}.yaml"]
    for path in candidates:
        if path.is_file():
            cfg = load_experiment(path)
            named = "+".join([cfg.method["name"], *cfg.method.get("addons", [])])
            if named != name:
                raise ValueError(f"{path}: method.name is {named!r}, expected {name!r}")
            defaults = dataclasses.asdict(ModelConfig())
            return cfg.method, {k: v for k, v in dataclasses.asdict(cfg.model).items() if v != defaults[k]}
    return validate_method_config({"name": name}), {}  # raises with the list of methods if unknown



def step_task(spec: Spec, method: Method) -> tuple[Task, int]:
    """The task the method sees and the measured step (joint methods: one step of every class)."""
    task = get_task(spec.dataset, spec.task)
    if method.joint:
        return joint_task(task), 0
    if not 0 <= spec.step < task.num_steps:
        raise ValueError(f"--step {spec.step} is outside task {spec.dataset}/{spec.task} ({task.num_steps} steps)")
    return task, spec.step


def synthetic_batch(task: Task, step: int, batch: int, size: int, device: torch.device, saliency: bool,
                    seed: int = 0) -> Batch:
    """A fixed training batch of step ``step``: random images, labels in the step's channels.

    Labels ``(B, H, W)``: background 0 (old and future classes are 0 after the training table), two
    rectangles of the step's new channels per image, a 255 border (``size // 32`` px, at least 1).
    Saliency (when asked): uniform random in [0, 1].
    """
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen)
    labels = torch.zeros(batch, size, size, dtype=torch.int64)
    new = list(task.new_channels(step)) if step > 0 else list(range(1, task.num_outputs(0)))
    if not new:
        new = [0]
    s = size
    for b in range(batch):  # batch-sized setup loop, outside the timed iterations
        labels[b, s // 8: s // 2, s // 8: s // 2] = new[(2 * b) % len(new)]
        labels[b, s // 2: 7 * s // 8, s // 3: 5 * s // 6] = new[(2 * b + 1) % len(new)]
    border = max(1, s // 32)
    labels[:, :border], labels[:, -border:], labels[:, :, :border], labels[:, :, -border:] = 255, 255, 255, 255
    sal = torch.rand(batch, size, size, generator=gen) if saliency else None
    return Batch(images=images, labels=labels, saliency=sal).to(device)


# ----------------------------------------------------------------------------------------------
# The engine's training iteration
def train_iteration(model: torch.nn.Module, old_model: Optional[Segmenter], method: Method, batch: Batch,
                    ctx: StepContext, autocast: Callable[[], Any], opt: Optimisation) -> dict:
    """One iteration of :func:`sats.engine.loop.train_iteration` (the very function the runner trains with);
    a non-finite loss or gradient raises here (the benchmark never skips)."""
    step = engine_iteration(model, old_model, method, batch, ctx, autocast, opt)
    if step.skipped:
        raise RuntimeError(f"method {method.name!r}: non-finite {'loss' if step.bad_loss else 'gradient'} in the "
                           f"benchmark: " + ", ".join(f"{k}={float(v.detach())}" for k, v in step.terms.items()))
    return step.terms


# ----------------------------------------------------------------------------------------------
# Time and memory
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


class MemoryProbe:
    """Peak memory of a phase: CUDA allocator statistics, or the process's RSS high-water mark on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.unavailable: Optional[str] = None
        if device.type != "cuda":
            try:
                self._clear_refs()
            except OSError as exc:  # not Linux, or /proc not writable: no CPU memory figures
                self.unavailable = f"cannot reset the RSS peak (/proc/self/clear_refs): {exc}"

    @staticmethod
    def _clear_refs() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "cuda max_memory_allocated"
        return self.unavailable or "cpu peak RSS (VmHWM reset before the phase)"

    def start(self) -> Optional[float]:
        """Reset the peak; return the memory in use now (MiB)."""
        gc.collect()
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return torch.cuda.memory_allocated(self.device) / 2**20
        if self.unavailable:
            return None
        self._clear_refs()
        return _proc_status_mb("VmRSS")

    def peak(self) -> Optional[float]:
        sync(self.device)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return None if self.unavailable else _proc_status_mb("VmHWM")


def timed(fn: Callable[[], Any], n: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Run ``fn`` ``n`` times; wall and process-CPU milliseconds of each call (device synchronised)."""
    wall, cpu = [], []
    for _ in range(n):
        sync(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    return wall, cpu


def profile_table(fn: Callable[[], Any], n: int, device: torch.device, title: str) -> str:
    """torch.profiler over ``n`` calls of ``fn``: the top operators by self time, as text."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(n):
            fn()
        sync(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"## {title} ({n} iterations)\n\n" + prof.key_averages().table(sort_by=sort, row_limit=30) + "\n"


def _median(values: Sequence[float]) -> float:
    return round(statistics.median(values), 3)


# ----------------------------------------------------------------------------------------------
# One measurement
class _Bench:
    """The models, method and batch of one :class:`Spec` (see the module docstring for the phases)."""

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        torch.manual_seed(0)
        self.model_cfg = model_config(spec.backbone)
        cnn = not self.model_cfg.is_mit
        section, model_keys = method_base(spec.method, cnn)
        self.model_cfg = dataclasses.replace(self.model_cfg, **model_keys)  # what the method's config sets
        self.method = build_method(section)
        self.task, self.step = step_task(spec, self.method)
        self.train_cfg = TrainConfig(optimizer=spec.optimizer, amp=spec.amp, epochs=1, warmup_iters=0)
        self.cfg = ExperimentConfig(model=self.model_cfg, train=self.train_cfg, method=section)
        self.amp = amp_dtype(self.train_cfg, self.device)
        configure_cuda_math(self.train_cfg, self.device)
        self.autocast = autocast_factory(self.device, self.amp)
        self.tmp = tempfile.TemporaryDirectory(prefix="sats-bench-")
        self.batch = synthetic_batch(self.task, self.step, spec.batch, spec.size, self.device,
                                     self.method.needs_saliency_at(self.step))
        self.model, self.old_model = self._history()

    # -- setup --------------------------------------------------------------------------------
    def context(self, step: int, model: Segmenter, old_model: Optional[Segmenter], batch: Batch,
                passes: Optional[Batch] = None) -> StepContext:
        def loader(label_table: Any = None, name: Optional[str] = None) -> Iterable[Batch]:
            return iter([passes or batch])  # the label table is ignored: the batch is already in channels

        # fixed digests: caches keyed on them (PLOP/SATS thresholds) land in this process's temporary folder
        return StepContext(step=step, task=self.task, cfg=self.cfg, model=model, old_model=old_model,
                           device=self.device, run_dir=Path(self.tmp.name),
                           cache=ArtifactCache(Path(self.tmp.name), self.device),
                           old_checkpoint_digest=f"benchmark-step{step - 1}" if step > 0 else None,
                           train_loader=loader, autocast=self.autocast,
                           grad_scaled=self.amp == torch.float16, log_scalar=lambda name, value: None,
                           data_digest=f"benchmark-{batch.images.shape[-1]}px")

    def optimizer(self, params: list, total: int, frozen_norm: bool = False) -> Optimisation:
        """SGD at ``train.lr_incremental``; at 0 when the step freezes BatchNorm (DKD, STAR): random weights behind
        eval-mode BN diverge in a few iterations, and a zero lr runs the same arithmetic."""
        lr = 0.0 if frozen_norm else self.train_cfg.lr_at(1)
        optimizer = build_optimizer(params, self.train_cfg, lr)
        return Optimisation(optimizer, build_scheduler(optimizer, self.train_cfg, total),
                            build_grad_scaler(self.device, self.amp))

    def _history(self) -> tuple[Segmenter, Optional[Segmenter]]:
        """The step-``t`` model and old model, after one real iteration of every earlier step."""
        method, task, t = self.method, self.task, self.step
        model = build_segmenter(self.model_cfg, method.model_head_sizes(task, 0)).to(self.device)
        old_model: Optional[Segmenter] = None
        small = min(self.spec.size, HISTORY_MAX_SIZE)
        for s in range(t + 1):
            if s > 0:
                old_model = frozen_copy(model).to(self.device) if method.old_model_at(s) else None
                model.add_step(len(task.new_classes(s)), init=method.head_init, source=method.head_init_source)
                model.to(self.device)
            if s == t:
                break
            batch = synthetic_batch(task, s, self.spec.batch, small, self.device, method.needs_saliency_at(s), seed=s + 1)
            passes = synthetic_batch(task, s, self.spec.batch, self.spec.size, self.device,
                                     method.needs_saliency_at(s), seed=s + 1)
            ctx = self.context(s, model, old_model, batch, passes)
            ctx.total_iterations = 1
            train_mode(model, method.frozen_at(s))
            opt = self.optimizer(optimizer_groups(method, model, s), 1, "norm" in method.frozen_at(s))
            method.begin_step(ctx)
            train_iteration(model, old_model, method, batch, ctx, self.autocast, opt)
            method.end_step(ctx)
            method.load_state_dict(method.state_dict())  # the checkpoint round trip between steps
        model.requires_grad_(True)  # undo a method's freezing (SSUL) before the FT bound
        model.zero_grad(set_to_none=True)
        return model, old_model

    # -- phases -------------------------------------------------------------------------------
    def method_step(self) -> tuple[Callable[[], None], dict]:
        """Set the method's step up as the runner does (optimiser, ``begin_step``); return its iteration."""
        method, t = self.method, self.step
        train_mode(self.model, method.frozen_at(t))
        ctx = self.context(t, self.model, self.old_model, self.batch)
        ctx.total_iterations = 10**6
        opt = self.optimizer(optimizer_groups(method, self.model, t), ctx.total_iterations, "norm" in method.frozen_at(t))
        ctx.total_iterations = self.train_cfg.epochs_at(t)  # begin_step's pass: one iteration per epoch
        method.begin_step(ctx)
        ctx.total_iterations = 10**6
        info: dict = {"terms": []}

        def step() -> None:
            terms = train_iteration(self.model, self.old_model, method, self.batch, ctx, self.autocast, opt)
            info["terms"] = sorted(terms)

        return step, info

    def ft_step(self) -> Callable[[], None]:
        """FT's training iteration on a copy of the step-``t`` model (every parameter, same optimiser kind)."""
        ft, model = FineTuning(), copy.deepcopy(self.model).requires_grad_(True).train()
        ctx = self.context(self.step, model, None, self.batch)
        ctx.total_iterations = 10**6
        opt = self.optimizer(list(model.parameters()), ctx.total_iterations)

        def step() -> None:
            train_iteration(model, None, ft, self.batch, ctx, self.autocast, opt)

        return step

    def old_forward(self) -> Optional[Callable[[], None]]:
        """The old model's no-grad forward with the method's ``old_needs`` (None: the method runs none)."""
        if self.old_model is None or not self.method.old_forward:
            return None
        old_model, needs = self.old_model, self.method.old_needs

        def forward() -> None:
            with torch.no_grad(), self.autocast():
                old_model(self.batch.images, need=needs)

        return forward

    def eval_step(self) -> Callable[[], None]:
        """Evaluation of one batch: logits → ``method.predict`` → confusion-matrix update."""
        model, method, labels = self.model, self.method, self.batch.labels
        cm = ConfusionMatrix(self.task.num_outputs(self.step), self.device)

        def step() -> None:
            with torch.no_grad():
                with self.autocast():
                    logits = model(self.batch.images).logits
                cm.update(method.predict(logits.float()), labels)

        return step


def measure(spec: Spec) -> dict[str, Any]:
    """Every figure of one configuration (one process); see the module docstring."""
    allocator = tune_host_allocator()  # as `sats train` does; SATS_HOST_ALLOCATOR=system measures the defaults
    if spec.threads > 0:
        torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    bench = _Bench(spec)
    probe = MemoryProbe(device)
    method, task, t = bench.method, bench.task, bench.step
    tables: list[str] = []

    # 1. the method alone: warm-up, then the memory peak of its iterations
    method_step, info = bench.method_step()
    timed(method_step, spec.warmup, device)
    base = probe.start()
    timed(method_step, max(1, min(2, spec.iters)), device)
    peak = probe.peak()
    trainable = sum(p.numel() for p in bench.model.parameters() if p.requires_grad)

    # 2. interleaved timing: FT iteration | old forward | method iteration, one of each per round
    ft_step, old_forward = bench.ft_step(), bench.old_forward()
    timed(ft_step, spec.warmup, device)
    if old_forward is not None:
        timed(old_forward, spec.warmup, device)
    times: dict[str, tuple[list[float], list[float]]] = {"ft": ([], []), "old": ([0.0], [0.0]), "method": ([], [])}
    if old_forward is not None:
        times["old"] = ([], [])
    for _ in range(spec.iters):
        for name, fn in (("ft", ft_step), ("old", old_forward), ("method", method_step)):
            if fn is not None:
                wall, cpu = timed(fn, 1, device)
                times[name][0].extend(wall)
                times[name][1].extend(cpu)
    if spec.profile_dir:
        tables.append(profile_table(method_step, 2, device, f"{method.name} training iteration"))
        tables.append(profile_table(ft_step, 2, device, "FT training iteration"))
        if old_forward is not None:
            tables.append(profile_table(old_forward, 2, device, f"old model forward, need={sorted(method.old_needs)}"))
        path = Path(spec.profile_dir) / f"{spec.backbone}-{spec.size}px-b{spec.batch}-{spec.method}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, f"# {spec.method} on {spec.backbone}, {spec.size} px, batch {spec.batch}, "
                                f"{spec.device}\n\n" + "\n".join(tables))
    del ft_step
    gc.collect()

    # 3. evaluation
    eval_step = bench.eval_step()
    bench.model.eval()
    timed(eval_step, spec.warmup, device)
    eval_base = probe.start()
    eval_wall, _ = timed(eval_step, spec.iters, device)
    eval_peak = probe.peak()

    ft_ms, old_ms, train_ms = (_median(times[k][0]) for k in ("ft", "old", "method"))
    ft_cpu_ms, old_cpu_ms, train_cpu_ms = (_median(times[k][1]) for k in ("ft", "old", "method"))
    bound, bound_cpu = ft_ms + old_ms, ft_cpu_ms + old_cpu_ms
    eval_ms = _median(eval_wall)
    runs_old = old_forward is not None
    return {
        **{k: v for k, v in asdict(spec).items() if k != "profile_dir"},
        "step": t,
        "host_allocator": allocator,
        "head_sizes": method.model_head_sizes(task, t),
        "num_outputs": task.num_outputs(t),
        "needs": sorted(method.needs_at(t)),
        "old_needs": sorted(method.old_needs) if runs_old else None,
        "old_model": bench.old_model is not None,
        "terms": info["terms"],
        "trainable_params_m": round(trainable / 1e6, 3),
        "train_ms": train_ms,
        "train_cpu_ms": train_cpu_ms,
        "images_per_s": round(spec.batch / train_ms * 1000, 3),
        "ft_ms": ft_ms,
        "ft_cpu_ms": ft_cpu_ms,
        "old_forward_ms": old_ms,
        "old_forward_cpu_ms": old_cpu_ms,
        "bound_ms": round(bound, 3),
        "bound_cpu_ms": round(bound_cpu, 3),
        "ratio": round(train_ms / bound, 4),
        "ratio_cpu": round(train_cpu_ms / bound_cpu, 4),
        "train_peak_mb": None if peak is None else round(peak, 1),
        "train_peak_growth_mb": None if peak is None else round(peak - base, 1),
        "eval_ms": eval_ms,
        "eval_images_per_s": round(spec.batch / eval_ms * 1000, 3),
        "eval_peak_growth_mb": None if eval_peak is None else round(eval_peak - eval_base, 1),
        "memory_measure": probe.kind,
        "threads": torch.get_num_threads(),
    }


# ----------------------------------------------------------------------------------------------
# Many measurements
def run_isolated(spec: Spec) -> dict[str, Any]:
    """:func:`measure` in a fresh Python process (its memory peak is this configuration's alone)."""
    command = [sys.executable, "-m", "benchmarks.methods", "--single", json.dumps(asdict(spec))]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark of {spec.method} on {spec.backbone} at {spec.size} px failed "
                           f"(exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


NUMERIC_MEDIAN = ("train_ms", "train_cpu_ms", "images_per_s", "ft_ms", "ft_cpu_ms", "old_forward_ms",
                  "old_forward_cpu_ms", "bound_ms", "bound_cpu_ms", "ratio", "ratio_cpu", "train_peak_mb",
                  "train_peak_growth_mb", "eval_ms", "eval_images_per_s", "eval_peak_growth_mb")


def combine(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median of every figure over repeated processes (ratios: median of the per-process ratios)."""
    out = dict(rows[-1])
    for key in NUMERIC_MEDIAN:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = round(statistics.median(values), 4) if values else None
    out["repeats"] = len(rows)
    out["ratio_runs"] = [r["ratio"] for r in rows]
    return out


def run_specs(specs: Sequence[Spec], isolate: bool, repeats: int, log: Callable[..., None] = print) -> list[dict]:
    """Measure every spec ``repeats`` times, round-robin (drift of the machine's load spreads over all)."""
    per_spec: dict[tuple, list[dict]] = {spec.key: [] for spec in specs}
    for r in range(repeats):
        for spec in specs:
            row = run_isolated(spec) if isolate else measure(spec)
            per_spec[spec.key].append(row)
            log(f"[{r + 1}/{repeats}] {spec.backbone} {spec.size}px b{spec.batch} {spec.dataset} {spec.task} "
                f"t={row['step']} {spec.method:7s} train {row['train_ms']:9.1f} ms  bound {row['bound_ms']:9.1f} ms "
                f"(FT {row['ft_ms']:.1f} + old {row['old_forward_ms']:.1f})  ratio {row['ratio']:.3f} "
                f"(cpu {row['ratio_cpu']:.3f})  peak {row['train_peak_mb']} MiB  eval {row['eval_images_per_s']:.2f} img/s", flush=True)
    return [combine(per_spec[spec.key]) for spec in specs]


def environment(device: torch.device, threads: int) -> dict[str, Any]:
    """Machine, software and load (the load average matters on a shared CPU)."""
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu_model = names[0]
    except OSError:
        pass  # not Linux: platform.processor() stays
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def merge_results(path: Path, rows: Sequence[dict], env: dict, key_fields: Sequence[str]) -> dict:
    """Merge ``rows`` into the JSON at ``path`` (same key → replaced); keeps every run's environment."""
    previous = json.loads(path.read_text()) if path.is_file() else {"runs": [], "results": []}
    keyed = {tuple(r[k] for k in key_fields): r for r in previous.get("results", [])}
    for r in rows:
        keyed[tuple(r[k] for k in key_fields)] = {**r, "run": len(previous.get("runs", []))}
    payload = {"runs": previous.get("runs", []) + [env],
               "results": sorted(keyed.values(), key=lambda r: tuple(str(r[k]) for k in key_fields))}
    write_json_atomic(path, payload)
    return payload


KEY_FIELDS = ("backbone", "size", "batch", "amp", "dataset", "task", "step", "method")


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def cost_markdown(payload: dict) -> str:
    """One table per (backbone, size, batch, AMP, layout); ratios above 1.15 in bold."""
    runs = payload["runs"]
    groups: dict[tuple, list[dict]] = {}
    for r in payload["results"]:
        groups.setdefault((r["backbone"], r["size"], r["batch"], r["amp"], r["dataset"], r["task"]), []).append(r)
    lines = ["# Method cost", "",
             f"Lower bound = FT ms/iter + old-model no-grad forward ms (same process); target ratio ≤ {TARGET_RATIO}. "
             "Medians over timed iterations, then over repeated processes. Peak = training peak "
             "(CPU: RSS, growth = over the RSS before the timed loop; CUDA: max allocated).", ""]
    for (backbone, size, batch, amp, dataset, task), rows in groups.items():
        env = runs[rows[0]["run"]] if rows[0].get("run", -1) < len(runs) else {}
        lines += [f"## {backbone}, {size} px, batch {batch}, AMP {amp}, {dataset} {task}",
                  "", f"{env.get('device_name', '?')} ({env.get('device', '?')}), torch {env.get('torch', '?')}, "
                      f"{env.get('torch_threads', '?')} threads, load average {env.get('loadavg', '?')}, "
                      f"{env.get('date', '?')}", "",
                  "| method | step | train ms/iter | img/s | peak MiB | growth MiB | eval img/s | FT ms | old fwd ms "
                  "| bound ms | ratio | ratio (CPU time) | repeats |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: r["method"]):
            ratio = f"{r['ratio']:.2f}"
            if r["ratio"] > TARGET_RATIO:
                ratio = f"**{ratio}**"
            lines.append(
                f"| {r['method']} | {r['step']} | {_fmt(r['train_ms'])} | {_fmt(r['images_per_s'], 2)} | "
                f"{_fmt(r['train_peak_mb'], 0)} | {_fmt(r['train_peak_growth_mb'], 0)} | "
                f"{_fmt(r['eval_images_per_s'], 2)} | {_fmt(r['ft_ms'])} | {_fmt(r['old_forward_ms'])} | "
                f"{_fmt(r['bound_ms'])} | {ratio} | {r['ratio_cpu']:.2f} | {r.get('repeats', 1)} |")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
def split_list(values: Optional[Sequence[str]]) -> list[str]:
    """``["ft,mib", "sats"]`` → ``["ft", "mib", "sats"]``."""
    return [v for item in values or [] for v in item.split(",") if v]


def resolve_methods(values: Optional[Sequence[str]]) -> list[str]:
    names = split_list(values)
    if not names or names == ["all"]:
        return list_methods()
    for name in names:
        validate_method_config({"name": name})  # raises naming the unknown method (or add-on) and the available ones
    return names


def add_common_arguments(parser: argparse.ArgumentParser, cuda: bool) -> None:
    """Options shared by the cost and scaling benchmarks."""
    parser.add_argument("--methods", nargs="+", default=None, help="comma/space separated (default: every registered)")
    parser.add_argument("--batch", type=int, default=8 if cuda else 2)
    parser.add_argument("--iters", type=int, default=20 if cuda else 3, help="timed iterations (median reported)")
    parser.add_argument("--warmup", type=int, default=5 if cuda else 1)
    parser.add_argument("--repeats", type=int, default=1, help="processes per configuration (median of them)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    parser.add_argument("--no-isolate", dest="isolate", action="store_false",
                        help="measure in this process (faster; CPU memory figures then share one process)")
    parser.add_argument("--profile", action="store_true", help="write torch.profiler tables to results/profiles/")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (the markdown goes next to it)")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks cost", description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["mit_b0", "mit_b2", "resnet101"],
                        help=f"backbone names or presets {sorted(MODEL_PRESETS)}")
    parser.add_argument("--sizes", nargs="+", type=int, default=[512] if cuda else [256])
    parser.add_argument("--task", default="voc:15-5", help="DATASET:TASK of the head layout")
    parser.add_argument("--step", type=int, default=1, help="the measured step")
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)
    add_common_arguments(parser, cuda)
    args = parser.parse_args(argv)
    if args.single:  # child process of run_isolated
        print(json.dumps(measure(Spec(**json.loads(args.single)))))
        return {}
    dataset, _, task = args.task.partition(":")
    out = args.out or RESULTS_DIR / f"methods-{torch.device(args.device).type}.json"
    profile_dir = str(out.parent / "profiles") if args.profile else None
    specs = [Spec(backbone=b, size=s, method=m, batch=args.batch, dataset=dataset, task=task, step=args.step,
                  iters=args.iters, warmup=args.warmup, device=args.device, amp=args.amp, threads=args.threads,
                  optimizer=args.optimizer, profile_dir=profile_dir)
             for b in args.backbones for s in args.sizes for m in resolve_methods(args.methods)]
    return measure_and_write(specs, args, f"cost {' '.join(argv if argv is not None else sys.argv[1:])}", out,
                             cost_markdown)


def measure_and_write(specs: Sequence[Spec], args: argparse.Namespace, command: str, out: Path,
                      markdown: Callable[[dict], str]) -> dict:
    """Measure ``specs``, merge the rows into the JSON at ``out`` with this run's machine and command,
    and rewrite its markdown rendering next to it (shared by ``cost`` and ``scaling``)."""
    env_before = environment(torch.device(args.device), args.threads)
    rows = run_specs(specs, args.isolate, args.repeats)
    env = {**env_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()], "command": command}
    payload = merge_results(out, rows, env, KEY_FIELDS)
    write_text_atomic(out.with_suffix(".md"), markdown(payload))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return payload


if __name__ == "__main__":
    main()
