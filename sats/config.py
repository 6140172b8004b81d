"""Typed experiment configuration: YAML files with ``_base_`` inheritance, dotted overrides.

Every key and its default lives in one of the dataclasses below. A config file is a
few lines over its ``_base_`` files; the merged result is validated against this
schema, so an unknown key or a value of the wrong type is an error at start-up that
names the key. Method hyper-parameters live in each method's own ``Params``
dataclass (see :mod:`sats.methods.base`) and are validated the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sats.models.config import ModelConfig


class ConfigError(ValueError):
    """A configuration file, key or value is wrong; the message names it."""


@dataclass
class SyntheticConfig:
    """Arguments of the embedded synthetic dataset (used when ``data.dataset == "synthetic"``)."""

    num_train: int = 800
    num_val: int = 240
    min_size: int = 64
    max_size: int = 112
    seed: int = 0


@dataclass
class DataConfig:
    """Dataset, task, protocol and data pipeline."""

    dataset: str = "voc"  # voc | ade | folder | synthetic (VOC layout, generated on demand)
    root: str = "data/voc"  # dataset root (VOC: folder with JPEGImages/, SegmentationClassAug/, splits/)
    task: str = "15-5"  # task name ("15-1", "100-10", any "B-I") or "custom" with `order`
    order: Optional[List[List[int]]] = None  # explicit class order: raw class ids per step
    overlap: bool = True  # overlapped (True) or disjoint (False) protocol
    reference_splits: Optional[str] = None  # folder of reference index files (<kind>-<step>.npy)
    crop_size: int = 512  # training random-resized-crop size
    scale_min: float = 0.5  # random resized crop: area scale range
    scale_max: float = 2.0
    eval_size: int = 512  # evaluation: shorter side to this, then center crop (eval_mode)
    eval_mode: str = "center_crop"  # center_crop (reference) | full (whole image, batch 1)
    batch_size: int = 12  # per process
    eval_batch_size: int = 12  # per process (forced to 1 in full-image mode)
    workers: int = 1  # data-loader workers per process
    scan_workers: int = 2  # processes for the one-off mask scan (split computation)
    on_error: str = "raise"  # raise | skip: what a bad image/mask does (up-front check)
    check: bool = True  # validate every file of the used lists before training
    cache_dir: str = ".cache/sats"  # split and threshold caches (keys include their inputs)
    saliency_root: Optional[str] = None  # folder of precomputed saliency maps <id>.png (SSUL; sats.data.saliency)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        _choice("data.dataset", self.dataset, ("voc", "ade", "folder", "synthetic"))
        _choice("data.eval_mode", self.eval_mode, ("center_crop", "full"))
        _choice("data.on_error", self.on_error, ("raise", "skip"))
        _positive("data.crop_size", self.crop_size)
        _positive("data.batch_size", self.batch_size)
        _positive("data.eval_batch_size", self.eval_batch_size)
        if not 0 < self.scale_min <= self.scale_max:
            raise ConfigError(f"data.scale_min/scale_max: need 0 < min <= max, got {self.scale_min}, {self.scale_max}")
        if self.workers < 0:
            raise ConfigError(f"data.workers: must be >= 0, got {self.workers}")
        self.check_task()

    def check_task(self) -> None:
        """``data.task`` / ``data.order`` name a task of the dataset's class table (ConfigError otherwise).

        The ``folder`` layout reads its class count from ``classes.txt``; its task is checked when the data
        is opened."""
        from sats.data.tasks import get_task

        table = "voc" if self.dataset == "synthetic" else self.dataset
        if table not in ("voc", "ade"):
            return
        try:
            get_task(table, self.task, self.order)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"data.task={self.task!r}{' with data.order' if self.order else ''}: {exc}") from exc


@dataclass
class TrainConfig:
    """Optimisation schedule (docs/methods.md §4). Step 0 and later steps have their own lr/epochs."""

    optimizer: str = "sgd"  # sgd (Nesterov, the paper) | adamw (training from scratch, the demo)
    lr: float = 0.01  # step 0
    lr_incremental: float = 0.001  # steps > 0
    epochs: int = 30  # step 0
    epochs_incremental: Optional[int] = None  # steps > 0 (None: same as epochs)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4  # on every parameter, norms and biases included (reference)
    poly_power: float = 0.9  # lr_i = lr_0 (1 - i / I) ** power, per iteration
    warmup_iters: int = 0  # linear warm-up iterations (0 in the paper)
    #: off | bf16 | fp16 (GradScaler; CUDA only) | auto (fp16 on CUDA, the reference's apex O1; off on CPU)
    amp: str = "off"
    tf32: bool = True  # CUDA: TF32 matrix products and convolutions (Ampere and newer); false = strict fp32
    seed: int = 42  # reset at the start of every step and epoch
    deterministic: bool = False  # torch.use_deterministic_algorithms
    drop_last: bool = True
    val_every: int = 0  # per-epoch validation every N epochs (0: off)
    select: str = "last"  # last | best_val (the reference's selection on val, a reproduction switch)
    on_nonfinite: str = "error"  # error | skip (skip counts and logs every skipped batch)
    #: with on_nonfinite=skip: a step that skipped more than this fraction of its iterations fails, unsaved
    max_skipped_fraction: float = 0.1
    log_every: int = 10  # iterations between logged losses
    grad_clip: float = 0.0  # max gradient norm (0: off)
    share_step0: bool = True  # reuse a plain-CE step-0 checkpoint keyed by what determines it
    threads: int = 0  # torch CPU threads (0: leave PyTorch's default)
    #: collective timeout under torchrun: a dead or stuck rank makes the others fail after this long, not hang
    dist_timeout_s: float = 1800.0

    def __post_init__(self) -> None:
        _choice("train.optimizer", self.optimizer, ("sgd", "adamw"))
        _choice("train.amp", self.amp, ("off", "bf16", "fp16", "auto"))
        _choice("train.select", self.select, ("last", "best_val"))
        _choice("train.on_nonfinite", self.on_nonfinite, ("error", "skip"))
        _positive("train.epochs", self.epochs)
        if self.epochs_incremental is not None:
            _positive("train.epochs_incremental", self.epochs_incremental)
        if self.lr <= 0 or self.lr_incremental <= 0:
            raise ConfigError(f"train.lr / train.lr_incremental must be > 0, got {self.lr}, {self.lr_incremental}")
        if self.select == "best_val" and self.val_every <= 0:
            raise ConfigError("train.select=best_val needs train.val_every > 0")
        _positive("train.dist_timeout_s", self.dist_timeout_s)

    def epochs_at(self, step: int) -> int:
        return self.epochs if step == 0 or self.epochs_incremental is None else self.epochs_incremental

    def lr_at(self, step: int) -> float:
        return self.lr if step == 0 else self.lr_incremental


@dataclass
class MemoryConfig:
    """Exemplar memory of the "-M" variants (docs/methods.md §3.12; :mod:`sats.data.memory`).

    At the end of every step ``s`` the images of step ``s + 1``'s memory are selected from step
    ``s``'s training list (class-balanced, deterministic) and stored as image ids in
    ``<run_dir>/memory/step{s+1}.json``. Each training batch of a step ``t > 0`` is then half
    current-step images and half memory images, and an epoch has twice as many iterations.
    """

    enabled: bool = False
    size: int = 100  # total budget N: k = ceil(N / old foreground classes) images per class (VOC 100, ADE 300)
    #: fixed images per class instead of ceil(size / classes): the released code loads the first 7 entries
    #: per class on VOC for every method but SATS (which loads all ~300: memory.size=300 reproduces that)
    per_class: Optional[int] = None
    #: True: pseudo-labelling methods (PLOP, SATS) overwrite the old-class ground truth of memory images,
    #: as the reference does; False: memory images keep it (the methods read ``cfg.memory.reference_labels``)
    reference_labels: bool = False

    def __post_init__(self) -> None:
        _positive("memory.size", self.size)
        if self.per_class is not None:
            _positive("memory.per_class", self.per_class)


@dataclass
class LogConfig:
    tensorboard: bool = True
    overlay_images: int = 4  # prediction overlays written to tensorboard after each step
    progress: bool = True  # progress bars


@dataclass
class ExperimentConfig:
    """The whole experiment. ``method`` is validated by the chosen method's own Params."""

    name: str = "experiment"
    output_dir: str = "runs"  # the run directory is output_dir/name unless run_dir is given
    run_dir: Optional[str] = None
    device: str = "auto"  # auto | cpu | cuda
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    method: Dict[str, Any] = field(default_factory=lambda: {"name": "ft"})

    def __post_init__(self) -> None:
        _choice("device", self.device, ("auto", "cpu", "cuda"))

    @property
    def method_name(self) -> str:
        return str(self.method.get("name", "ft")).lower()

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.output_dir) / self.name


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


# ----------------------------------------------------------------------------------------------
# Loading

BASE_KEY = "_base_"

# Flags of the reference code (the argparser of arthurdouillard/CVPR2021_PLOP and of its SATS
# derivative QIU023/SATS_Continual_Semantic_Seg), so that researchers' command lines carry over:
#   sats train cfg.yaml --dataset voc --task 15-5s --step 1 --method LWF-MC --overlapped --lr 0.001 --epochs 30
# Every flag of that argparser is in exactly one table below: mapped to config keys
# (REFERENCE_FLAGS, REFERENCE_STEP_FLAGS, REFERENCE_CHOICES, REFERENCE_SWITCHES), an option of
# `sats train` itself (REFERENCE_COMMAND_FLAGS), or refused with a message naming the key or
# command to use, or why sats has no equivalent (REFERENCE_REFUSED). Flag names are compared with
# "-" read as "_" (--fusion-mode = --fusion_mode). `sats train --help` prints these tables.

#: ``--flag VALUE`` → every listed key = VALUE (--method values are normalised: "LWF-MC" → "lwf_mc")
REFERENCE_FLAGS: Dict[str, str | tuple[str, ...]] = {
    "dataset": "data.dataset",
    "task": "data.task",
    "data_root": "data.root",
    "method": "method.name",
    "name": "name",
    "logdir": "output_dir",
    "batch_size": "data.batch_size",  # per process, as in the reference
    "crop_size": ("data.crop_size", "data.eval_size"),  # the reference resizes and crops val images to it too
    "val_batch_size": "data.eval_batch_size",
    "num_workers": "data.workers",
    "random_seed": "train.seed",
    "weight_decay": "train.weight_decay",
    "momentum": "train.momentum",
    "lr_power": "train.poly_power",
    "print_interval": "train.log_every",
    "val_interval": "train.val_every",
    "sample_num": "log.overlay_images",
    "backbone": "model.backbone",
    "output_stride": "model.output_stride",
    "loss_kd": "method.lambda_kd",
    "loss_de": "method.lambda_de",
    "icarl_importance": "method.lambda_kd",
    "reg_importance": "method.lambda_reg",
    "reg_alpha": "method.alpha",
    "reg_iterations": "method.score_interval",
    "pod_factor": "method.pod_factor",
    "threshold": "method.threshold_floor",
    "pseudo_nb_bins": "method.threshold_bins",
    "temperature": "method.temperature",
    "distill_weight_args": "method.lambda_sat",
}

#: flags the reference passes per step: (key of step 0, key of steps > 0). With ``--step 0`` they set the
#: first key, with ``--step N`` (N > 0) the second; without ``--step`` (sats then runs every step) the
#: first, as the reference (which runs step 0 when --step is absent), and a log line says so.
REFERENCE_STEP_FLAGS: Dict[str, tuple[str, str]] = {
    "lr": ("train.lr", "train.lr_incremental"),  # the reference's scripts: 0.01 at step 0, 0.001 at steps > 0
    "epochs": ("train.epochs", "train.epochs_incremental"),
}

#: ``--flag VALUE`` where the value selects overrides (values compared case-insensitively)
REFERENCE_CHOICES: Dict[str, Dict[str, tuple[str, ...]]] = {
    "regularizer": {"ewc": ("method.name=ewc",), "rw": ("method.name=rw",), "pi": ("method.name=pi",)},
    "distill_object": {"sats-selfattn": ("method.pooling=class",), "sats-selfattn-GP": ("method.pooling=global",),
                       "sats-selfattn-NP": ("method.pooling=none",), "sats-feature-CNN": ("method.source=features",)},
    "opt_level": {"O0": ("train.amp=off",), "O1": ("train.amp=auto",)},  # auto: fp16 autocast on CUDA, off on CPU
    "norm_act": {"iabn_sync": ("model.norm=syncbn", "model.activation=leaky_relu"),
                 "iabn": ("model.norm=bn", "model.activation=leaky_relu"),
                 "abn": ("model.norm=bn", "model.activation=leaky_relu"),
                 "std": ("model.norm=bn", "model.activation=relu")},
    "lr_policy": {"poly": ()},  # sats's schedule (train.poly_power)
}
_CHOICE_NOTES = {
    "opt_level": "O2/O3 (fp16 weights) have no sats equivalent: train.amp=fp16 is autocast + GradScaler, like O1",
    "lr_policy": "sats schedules are poly only (train.poly_power, train.warmup_iters)",
    "norm_act": "keys model.norm (bn | syncbn) and model.activation (relu | leaky_relu)",
}

#: switches (no value) → overrides. ``--flag=false`` leaves a switch out; the protocol switches also take
#: a value (``--overlap false``, ``--disjoint``). The reference's store_false switches are mapped to what
#: passing them does there (--crop_val turns the centre crop off, --visualize turns tensorboard off).
REFERENCE_SWITCHES: Dict[str, str | tuple[str, ...]] = {
    "overlap": "data.overlap=true",
    "overlapped": "data.overlap=true",
    "disjoint": "data.overlap=false",
    "crop_val": "data.eval_mode=full",
    "no_pretrained": "model.pretrained=null",
    "strict_weights": "model.partial_load=true",
    "visualize": "log.tensorboard=false",
    "icarl": "method.name=lwf_mc",
    "classif_adaptive_factor": "method.adaptive_factor=true",
    "balance_exemplar": "memory.enabled=true",
}
_PROTOCOL_SWITCHES = ("overlap", "overlapped", "disjoint")

#: options of `sats train` itself (not config keys)
REFERENCE_COMMAND_FLAGS: Dict[str, str] = {
    "step": "run only these steps (= --steps): --step 1, --step 1 2, --step 2:5",
    "test": "evaluate instead of training: `sats test` on the run directory of the resolved config "
            "(with --step: only those steps)",
    "ckpt": "with --test: evaluate this sats checkpoint file (at --step N, or the step it records)",
    "debug": "debug logging (= sats -v)",
    "local_rank": "ignored: sats takes the rank from the environment (torchrun sets LOCAL_RANK)",
}

_NO_EQUIVALENT = "experimental option of the reference code; sats has no equivalent"
_POD_ABLATION = "PLOP ablation option; method.name=plop is PLOP's published setting (no sats key)"
_PSEUDO_ABLATION = ("pseudo-label ablation of PLOP; method.name=plop / sats use PLOP's entropy thresholds "
                    "(method.threshold_*)")

#: flags refused, with the key or command to use instead (or why sats has none)
REFERENCE_REFUSED: Dict[str, str] = {
    "num_classes": "the number of classes follows from data.dataset (and data.task)",
    "dont_predict_bg": "a Cityscapes option of the reference; sats always predicts the background",
    "model": "the model is chosen by the config file: _base_/models/segformer_mit-b2.yaml (segformer_b2) or "
             "_base_/models/deeplabv3_r101.yaml (deeplab), keys model.backbone / model.head",
    "base_weights": "sats reuses a plain-CE step-0 checkpoint across methods by itself (train.share_step0)",
    "fix_bn": "no general sats key (SSUL: method.freeze_bn=true)",
    "freeze": "no general sats key (SSUL freezes its body after step 0 by design)",
    "lr_old": "sats has no separate learning rate for the old classifiers",
    "lr_decay_step": "sats schedules are poly only (train.poly_power, train.warmup_iters)",
    "lr_decay_factor": "sats schedules are poly only (train.poly_power, train.warmup_iters)",
    "bce": "the BCE losses belong to methods: method.name=lwf_mc (LwF-MC) or ssul",
    "test_on_val": "sats always tests on the dataset's val split (the papers' protocol)",
    "val_on_trainset": "no sats equivalent (per-epoch validation: train.val_every)",
    "cross_val": "no sats equivalent (per-epoch validation: train.val_every; selection: train.select)",
    "pooling": "the reference's ASPP pooling at validation; sats has no equivalent",
    "fusion_mode": "output fusion of the reference's ensembles; sats has no equivalent",
    "checkpoint": "checkpoints go to RUN_DIR/checkpoints (RUN_DIR = output_dir/name, or run_dir=PATH)",
    "step_ckpt": "step t starts from RUN_DIR/checkpoints/step{t-1}.ckpt of the same run: run the earlier steps "
                 "in that run directory (a shared plain-CE step 0 is reused by itself, train.share_step0)",
    "ckpt_interval": "sats writes a resumable checkpoint after every epoch and the step checkpoint at its end",
    "date": "it only names the reference's results file; put it into name=... or run_dir=... if you want it",
    "code_directory": "sats has no equivalent (nothing is copied)",
    "reg_no_normalize": "no sats key (importance normalisation is fixed; method.lambda_reg is the weight)",
    "icarl_disjoint": "no sats equivalent (method.name=lwf_mc is LwF-MC as published)",
    "icarl_bkg": "no sats equivalent (method.name=lwf_mc is LwF-MC as published)",
    "init_balanced": "the new-head initialisation is part of the method (background init: mib, plop, sats)",
    "unkd": "unbiased KD is part of the method (method.name=mib or sats; weight method.lambda_kd)",
    "unce": "unbiased CE is part of the method (method.name=mib)",
    "alpha": "MiB's soft-label hardening has no sats key (fixed at the reference default 1.0)",
    "no_mask": "no sats equivalent (other steps' labels are masked as in the papers)",
    "data_masking": "no sats equivalent (the papers' 'current' masking)",
    "pseudo": "pseudo-labelling is part of the method (method.name=plop or sats; method.threshold_*)",
    "step_threshold": _PSEUDO_ABLATION,
    "ce_on_pseudo": _PSEUDO_ABLATION,
    "classif_adaptive_min_factor": _PSEUDO_ABLATION,
    "pseudo_soft": _PSEUDO_ABLATION,
    "pseudo_soft_factor": _PSEUDO_ABLATION,
    "pseudo_ablation": _PSEUDO_ABLATION,
    "kd_new": _NO_EQUIVALENT,
    "pod": "POD is part of method.name=plop (local POD; weights method.pod_factor, method.pod_logits_factor)",
    "pod_options": "PLOP's preset is built in: method.pod_logits_factor is its logits factor (0.0005)",
    "pod_logits": "method.name=plop always distils the logits; method.pod_logits_factor sets the weight",
    **{flag: _POD_ABLATION for flag in ("pod_prepro", "no_pod_schedule", "pod_apply", "pod_deeplab_mask",
                                        "pod_deeplab_mask_factor", "deeplab_mask_downscale", "pod_interpolate_last",
                                        "pod_large_logits", "spp_scales")},
    **{flag: _NO_EQUIVALENT for flag in (
        "nb_background_modes", "init_multimodal", "multimodal_fusion", "align_weight", "align_weight_frequency",
        "cosine", "nca", "nca_margin", "kd_mask", "kd_mask_adaptative_factor", "disable_background",
        "ignore_test_bg", "entropy_min", "entropy_min_mean_pixels", "kd_scheduling", "sample_weights_new",
        "temperature_semiold", "temperature_apply", "kd_bce_sig", "kd_bce_sig_shape", "exkd_gt", "exkd_sum",
        "focal_loss", "focal_loss_new", "focal_loss_gamma", "ce_on_new", "small_sample_test")},
}


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    """Read one YAML file and, recursively, its ``_base_`` files (merged in order, file last)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular _base_ chain: {' -> '.join(map(str, seen + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    import yaml

    try:
        node = OmegaConf.load(path)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError, OSError) as exc:
        raise ConfigError(f"{path}: cannot parse YAML: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    bases = node.pop(BASE_KEY, None)
    if bases is None:
        return node
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, (list, ListConfig)):
        raise ConfigError(f"{path}: _base_ must be a path or a list of paths")
    merged = OmegaConf.create({})
    for base in bases:
        merged = OmegaConf.merge(merged, _read_yaml((path.parent / str(base)), seen + (path,)))
    return OmegaConf.merge(merged, node)


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


#: the reference's method names (its --method choices), as sats registers them
REFERENCE_METHODS = ("ft", "lwf", "lwf_mc", "ilt", "ewc", "rw", "pi", "mib", "plop", "ssul", "sats")


def normalize_method_name(name: Any) -> str:
    """A method name in lower case, the reference's spelled as sats registers them ("LWF-MC" → "lwf_mc",
    "MiB" → "mib"); other names keep their "-" (the registry also accepts either, see
    :func:`sats.methods.base.get_method_class`)."""
    lowered = str(name).strip().lower()
    return lowered.replace("-", "_") if lowered.replace("-", "_") in REFERENCE_METHODS else lowered


@dataclass
class CommandLine:
    """What :func:`parse_command_line` read from the arguments after the config file."""

    overrides: List[str] = field(default_factory=list)  # dotted key=value, in order
    steps: Optional[str] = None  # --step, in the `--steps` syntax ("1", "1,2", "2:5")
    test: bool = False  # --test
    ckpt: Optional[str] = None  # --ckpt PATH
    verbose: bool = False  # --debug
    #: keys a run's default name leaves out (the per-step flags of a --step command, see load_run_config)
    name_exclude: List[str] = field(default_factory=list)
    #: the overrides of per-step flags given with --step (load_run_config drops those that change nothing)
    per_step: List[str] = field(default_factory=list)
    #: (flag, value, key set, key left alone): a per-step flag given without --step
    unscoped: List[tuple[str, str, str, str]] = field(default_factory=list)


def _normalise_override(arg: str) -> str:
    key, value = arg.split("=", 1)
    if key.strip() in ("method", "method.name"):  # `method=LWF-MC` too: `method` itself is a section
        return f"method.name={normalize_method_name(value)}"
    return arg


def _looks_like_value(token: str) -> bool:
    return not token.startswith("--") and "=" not in token


def _parse_step_values(values: Sequence[str], errors: List[str]) -> tuple[Optional[str], List[int], bool, bool]:
    """--step values → (steps text, explicit step numbers, has step 0, has a step > 0)."""
    items: List[str] = []
    numbers: List[int] = []
    has_first = has_later = False
    for value in (v for text in values for v in text.split(",") if v):
        try:
            if ":" in value:
                lo, hi = value.split(":", 1)
                first, last = int(lo) if lo else 0, (int(hi) if hi else None)
                if first < 0 or (last is not None and last < first):
                    raise ValueError
                has_first |= first == 0
                has_later |= last is None or last > 0
                numbers = []  # a range: no explicit list to pair --lr values with
            else:
                step = int(value)
                if step < 0:
                    raise ValueError
                has_first |= step == 0
                has_later |= step > 0
                numbers.append(step)
        except ValueError:
            errors.append(f"--step {value!r}: expected step numbers (--step 1, --step 1 2) or a range A:B / A:")
            continue
        items.append(value)
    if any(":" in v for v in items):
        numbers = []
    return (",".join(items) or None), numbers, has_first, has_later


def _step_scoped(flag: str, values: List[str], steps: Optional[str], numbers: List[int], has_first: bool,
                 has_later: bool, cl: CommandLine, errors: List[str]) -> List[str]:
    """Overrides of a per-step flag (--lr, --epochs) for the --step values (REFERENCE_STEP_FLAGS)."""
    first_key, later_key = REFERENCE_STEP_FLAGS[flag]
    if steps is None:
        if len(values) > 1:
            errors.append(f"--{flag} {' '.join(values)}: several values need --step with as many steps")
            return []
        cl.unscoped.append((flag, values[0], first_key, later_key))
        return [f"{first_key}={values[0]}"]
    cl.name_exclude += [first_key, later_key]
    if len(values) == 1:
        first, later = (values if has_first else []), (values if has_later else [])
    elif len(values) != len(numbers):
        errors.append(f"--{flag} {' '.join(values)}: give one value, or one per step of --step (explicit numbers)")
        return []
    else:
        first = [v for s, v in zip(numbers, values) if s == 0]
        later = sorted({v for s, v in zip(numbers, values) if s > 0})
        if len(later) > 1:
            errors.append(f"--{flag} {' '.join(values)}: sats has one {later_key} for every step > 0")
            return []
    overrides = [f"{first_key}={first[0]}"] if first else []
    overrides += [f"{later_key}={later[0]}"] if later else []
    cl.per_step += overrides
    return overrides


def parse_command_line(args: Sequence[str]) -> CommandLine:
    """Read ``key=value`` overrides and the reference's flags (the tables above) after a config file.

    Every problem is collected and raised as one ConfigError (each flag that sats refuses names the
    key or command to use). ``method.name`` / ``--method`` values are normalised (``LWF-MC`` → ``lwf_mc``).
    """
    args = list(args)
    cl = CommandLine()
    errors: List[str] = []
    out: List[Any] = []  # override strings and (flag, values) of per-step flags, resolved once --step is known
    step_values: Optional[List[str]] = None
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--"):
            if "=" in arg and not arg.startswith("-"):
                out.append(_normalise_override(arg))
            else:
                errors.append(f"cannot read argument {arg!r}: expected key.sub=value or a reference flag "
                              "(`sats train --help` lists both)")
            continue
        name, eq, inline = arg[2:].partition("=")
        flag = name.replace("-", "_")
        inline_value = inline if eq else None

        def take(many: bool = False) -> Optional[List[str]]:
            nonlocal i
            if inline_value is not None:
                return [inline_value]
            values: List[str] = []
            while i < len(args) and _looks_like_value(args[i]) and (many or not values):
                values.append(args[i])
                i += 1
            if not values:
                errors.append(f"--{flag} needs a value")
                return None
            return values

        def switch_on() -> Optional[bool]:
            nonlocal i
            word = inline_value
            if word is None and flag in _PROTOCOL_SWITCHES and i < len(args) and args[i].lower() in _BOOL_WORDS:
                word = args[i]
                i += 1
            if word is None:
                return True
            if word.lower() not in _BOOL_WORDS:
                errors.append(f"--{flag}={word}: expected true or false")
                return None
            return _BOOL_WORDS[word.lower()]

        if flag == "step":
            values = take(many=True)
            if values:
                step_values = (step_values or []) + values
        elif flag == "test":
            on = switch_on()
            cl.test = bool(on) if on is not None else cl.test
        elif flag == "ckpt":
            values = take()
            if values:
                cl.ckpt = values[0]
        elif flag == "debug":
            cl.verbose = bool(switch_on())
        elif flag == "local_rank":
            take()
        elif flag in REFERENCE_STEP_FLAGS:
            values = take(many=flag == "lr")  # the reference's --lr takes one value per --step
            if values:
                out.append((flag, values))
        elif flag in REFERENCE_FLAGS:
            values = take()
            if values:
                value = normalize_method_name(values[0]) if flag == "method" else values[0]
                keys = REFERENCE_FLAGS[flag]
                out += [f"{key}={value}" for key in ((keys,) if isinstance(keys, str) else keys)]
        elif flag in REFERENCE_CHOICES:
            values = take()
            if values:
                choices = {value.lower(): overrides for value, overrides in REFERENCE_CHOICES[flag].items()}
                if values[0].lower() in choices:
                    out += list(choices[values[0].lower()])
                else:
                    note = _CHOICE_NOTES.get(flag)
                    errors.append(f"--{flag} {values[0]}: sats maps only {', '.join(REFERENCE_CHOICES[flag])}"
                                  + (f" ({note})" if note else ""))
        elif flag in REFERENCE_SWITCHES:
            on = switch_on()
            if flag in _PROTOCOL_SWITCHES and on is not None:
                overlap = on if flag != "disjoint" else not on
                out.append(f"data.overlap={'true' if overlap else 'false'}")
            elif on:
                target = REFERENCE_SWITCHES[flag]
                out += [target] if isinstance(target, str) else list(target)
        else:
            if inline_value is None and i < len(args) and _looks_like_value(args[i]):
                i += 1  # the flag's value, if it takes one: only this flag is reported
            if flag in REFERENCE_REFUSED:
                errors.append(f"--{flag} is not supported: {REFERENCE_REFUSED[flag]}")
            else:
                errors.append(f"unknown flag --{name}: neither a sats option nor a flag of the reference code; "
                              "set any config key as key.sub=value (`sats train --help` lists both)")
    steps, numbers, has_first, has_later = (None, [], False, False)
    if step_values is not None:
        steps, numbers, has_first, has_later = _parse_step_values(step_values, errors)
    cl.steps = steps
    for item in out:
        if isinstance(item, tuple):
            cl.overrides += _step_scoped(item[0], item[1], steps, numbers, has_first, has_later, cl, errors)
        else:
            cl.overrides.append(item)
    if errors:
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{len(errors)} problems in the arguments:\n" + "\n".join(f"  {e}" for e in errors))
    return cl


def parse_overrides(args: Sequence[str]) -> List[str]:
    """Turn ``key=value`` and reference-style ``--flag value`` arguments into dotted overrides.

    The options of `sats train` itself (--step, --test, --ckpt) are refused here; see :func:`parse_command_line`.
    """
    cl = parse_command_line(args)
    used = [flag for flag, given in (("--step", cl.steps is not None), ("--test", cl.test), ("--ckpt", cl.ckpt))
            if given]
    if used:
        raise ConfigError(f"{', '.join(used)}: only `sats train` takes {'these' if len(used) > 1 else 'this'}")
    return cl.overrides


def reference_notes(cl: CommandLine, cfg: "ExperimentConfig") -> List[str]:
    """Log lines for per-step flags given without --step (what they were taken to mean)."""
    notes = []
    for flag, value, first_key, later_key in cl.unscoped:
        section, key = later_key.split(".", 1)
        current = getattr(getattr(cfg, section), key)
        notes.append(f"--{flag} {value} without --step sets {first_key} (step 0, as the reference runs step 0 "
                     f"when --step is absent); steps > 0 use {later_key}={current} from the config: set it with "
                     f"{later_key}=VALUE, or give --step N to apply --{flag} to step N")
    return notes


def reference_flag_help() -> str:
    """The reference-flag tables as text (the epilog of `sats train --help`)."""
    lines = ["reference flags (CVPR2021_PLOP / SATS argparser) mapped to config keys:"]
    for flag, keys in REFERENCE_FLAGS.items():
        targets = (keys,) if isinstance(keys, str) else keys
        lines.append(f"  --{flag} V".ljust(30) + ", ".join(f"{k}=V" for k in targets))
    for flag, (first, later) in REFERENCE_STEP_FLAGS.items():
        lines.append(f"  --{flag} V".ljust(30) + f"{first}=V with --step 0, {later}=V with --step N>0, "
                     f"{first}=V without --step")
    for flag, choices in REFERENCE_CHOICES.items():
        shown = "; ".join(f"{value}: {' '.join(o) or '(default)'}" for value, o in choices.items())
        lines.append(f"  --{flag} V".ljust(30) + shown)
    for flag, target in REFERENCE_SWITCHES.items():
        lines.append(f"  --{flag}".ljust(30) + (target if isinstance(target, str) else " ".join(target)))
    lines.append("  --overlap false / --overlapped false = --disjoint")
    lines.append("options of sats train in the reference's spelling:")
    lines += [f"  --{flag}".ljust(30) + text for flag, text in REFERENCE_COMMAND_FLAGS.items()]
    lines.append("refused, each with the key or command to use (or why sats has none):")
    names = sorted(REFERENCE_REFUSED)
    lines += ["  " + " ".join(f"--{n}" for n in names[k:k + 6]) for k in range(0, len(names), 6)]
    return "\n".join(lines)


def build_config(node: DictConfig) -> ExperimentConfig:
    """Validate a merged config node against the schema; unknown keys and bad values name the key."""
    schema = OmegaConf.structured(ExperimentConfig)
    try:
        merged = OmegaConf.merge(schema, node)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"invalid config{f' key {key!r}' if key else ''}: {_first_line(exc)}") from exc
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc
    assert isinstance(cfg, ExperimentConfig)
    from sats.methods import validate_method_config  # late import: methods import the config module

    cfg.method = validate_method_config(cfg.method)
    check_finite(config_to_dict(cfg))
    return cfg


def check_finite(tree: Any, prefix: str = "") -> None:
    """ConfigError naming the first key whose float value is NaN or ±inf (anywhere in the config)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            check_finite(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            check_finite(v, f"{prefix.rstrip('.')}[{i}].")
    elif isinstance(tree, float) and not math.isfinite(tree):
        raise ConfigError(f"{prefix.rstrip('.')}: must be a finite number, got {tree}")


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load ``path`` (with its ``_base_`` chain), apply dotted ``overrides``, validate."""
    node = _read_yaml(Path(path)) if path is not None else OmegaConf.create({})
    overrides = [_normalise_override(o) if "=" in o else o for o in overrides]  # method.name=LWF-MC → lwf_mc
    if overrides:
        try:
            node = OmegaConf.merge(node, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad override in {list(overrides)}: {_first_line(exc)}") from exc
    return build_config(node)


#: keys a run's default name leaves out: they name or place the run themselves, or do not change its
#: results (the engine ignores them too when it compares a run directory's saved config)
NAME_IGNORED_KEYS = ("name", "run_dir", "output_dir", "log", "device", "train.threads", "train.log_every",
                     "train.dist_timeout_s", "data.workers", "data.scan_workers", "data.check", "data.cache_dir")
_MISSING = object()


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].strip()


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree


def _name_value(value: Any) -> str:
    """A config value as a filesystem-safe piece of a run name (long values and paths: shortened + hash)."""
    import re

    if isinstance(value, bool):
        raw = "true" if value else "false"
    elif value is None:
        raw = "null"
    elif isinstance(value, (list, tuple)):
        raw = "-".join(_name_value(v) for v in value)
    else:
        raw = str(value)
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "-", raw).strip("-.") or "x"
    if "/" in raw or "\\" in raw or len(safe) > 24:
        stem = re.sub(r"[^A-Za-z0-9._+-]+", "-", Path(raw).name).strip("-.")[:16]
        safe = f"{stem}-{digest(raw)[:6]}" if stem else digest(raw)[:8]
    return safe


def run_name_suffix(base: Optional[ExperimentConfig], cfg: ExperimentConfig, overrides: Sequence[str],
                    exclude: Sequence[str] = ()) -> str:
    """``_task=15-1_lr=0.002``: the overridden keys whose value differs from the config file's.

    ``base`` is the config file without overrides (None: every override counts as a change). Each
    key is named by its last component (``train.lr`` → ``lr``; ``method.name`` → ``method``), or in
    full where two changed keys share it. Keys under NAME_IGNORED_KEYS and ``exclude`` are left out.
    """
    new, old = config_to_dict(cfg), (config_to_dict(base) if base is not None else None)
    changed: Dict[str, Any] = {}
    for override in overrides:
        key = _override_key(override)
        if any(key == k or key.startswith(k + ".") for k in (*NAME_IGNORED_KEYS, *exclude)):
            continue
        value = _lookup(new, key)
        if value is _MISSING:
            value = override.split("=", 1)[1]
        if old is not None and _lookup(old, key) == value:
            continue
        changed.pop(key, None)
        changed[key] = value  # the last override of a key wins, at its position
    labels = {key: ("method" if key == "method.name" else key.rsplit(".", 1)[-1]) for key in changed}
    counts: Dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    suffix = "".join(f"_{labels[k] if counts[labels[k]] == 1 else k}={_name_value(v)}" for k, v in changed.items())
    if len(suffix) > 80:
        suffix = f"{suffix[:70]}_{digest(suffix)[:8]}"
    return suffix


def _same_schedule(cfg: ExperimentConfig, override: str) -> bool:
    """Whether a per-step override (train.lr/lr_incremental/epochs/epochs_incremental=V) changes nothing in
    ``cfg``'s schedule (``epochs_incremental=30`` where it is unset and ``epochs`` is 30)."""
    key, value = override.split("=", 1)
    step = 0 if key in ("train.lr", "train.epochs") else 1
    try:
        if key in ("train.lr", "train.lr_incremental"):
            return float(value) == cfg.train.lr_at(step)
        if key in ("train.epochs", "train.epochs_incremental"):
            return int(value) == cfg.train.epochs_at(step)
    except ValueError:
        return False
    return False


def load_run_config(path: Optional[str | Path], overrides: Sequence[str] = (),
                    exclude_from_name: Sequence[str] = (), per_step: Sequence[str] = ()) -> ExperimentConfig:
    """:func:`load_config` for a command line: the run's default name records what the overrides changed.

    Unless the overrides set ``name`` or ``run_dir``, the name becomes the config file's name plus
    :func:`run_name_suffix` (``demo-ft`` + ``_task=15-1_lr=0.002``), so commands that differ in
    their overrides write different run directories (``output_dir/name``) instead of colliding.
    ``per_step`` are the overrides of the reference's per-step flags (``CommandLine.per_step``); those
    that leave the schedule as it is are dropped, so that the step-by-step commands of one experiment
    (``--step 0 --epochs 30``, then ``--step 1 --epochs 30``) resolve to the same config.
    """
    if per_step:
        others = [o for o in overrides if o not in per_step]
        try:
            plain = load_config(path, others)
        except ConfigError:
            plain = None
        if plain is not None:
            overrides = [o for o in overrides if o not in per_step or not _same_schedule(plain, o)]
    cfg = load_config(path, overrides)
    keys = {_override_key(o) for o in overrides}
    if "name" in keys or "run_dir" in keys:
        return cfg
    try:
        base: Optional[ExperimentConfig] = load_config(path) if path is not None else ExperimentConfig()
    except ConfigError:  # the file alone does not validate: every override counts as a change
        base = None
    suffix = run_name_suffix(base, cfg, overrides, exclude_from_name)
    if suffix:
        cfg.name = f"{cfg.name}{suffix}"
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    from sats.engine.checkpoint import write_text_atomic

    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg))))


def digest(obj: Any) -> str:
    """Stable short hash of a JSON-able object (cache keys)."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
