"""Typed experiment configuration: YAML files with ``_base_`` inheritance, dotted overrides.

Every key and its default lives in one of the dataclasses below. A config file is a
few lines over its ``_base_`` files; the merged result is validated against this
schema, so an unknown key or a value of the wrong type is an error at start-up that
names the key. Method hyper-parameters live in each method's own ``Params``
dataclass (see :mod:`sats.methods.base`) and are validated the same way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sats.io import write_text_atomic
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
    #: the optimiser's kernels: fused (one kernel per group, CPU and CUDA; MiT-B2's SGD step 19 ms vs 50–59 on one
    #: CPU thread, benchmarks/results/) | foreach | loop (one parameter at a time) | auto (PyTorch's choice, the
    #: behaviour before this key existed). The same update up to rounding; speed only
    optimizer_impl: str = "fused"
    #: torch.compile the model for training (inductor; needs a C++ compiler on CPU). Off: eager
    compile: bool = False
    #: channels-last memory format for the model and its inputs (faster convolutions on CUDA and recent CPUs)
    channels_last: bool = False
    lr: float = 0.01  # step 0
    lr_incremental: float = 0.001  # steps > 0
    epochs: int = 30  # step 0
    epochs_incremental: Optional[int] = None  # steps > 0 (None: same as epochs)
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4  # on every parameter, norms and biases included (reference)
    poly_power: float = 0.9  # lr_i = lr_0 (1 - i / I) ** power, per iteration
    warmup_iters: int = 0  # linear warm-up iterations (0 in the paper)
    #: warm-up over this fraction of the step's iterations, multiplied into the poly factor: the factor goes
    #: linearly from ``warmup_factor`` to 1 (DKD's/STAR's ADE schedule: 0.2); 0: off. Excludes warmup_iters
    warmup_fraction: float = 0.0
    warmup_factor: float = 0.001  # the factor at iteration 0 of a warmup_fraction warm-up
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
        _choice("train.optimizer_impl", self.optimizer_impl, ("auto", "foreach", "fused", "loop"))
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
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"train.warmup_fraction: must lie in [0, 1), got {self.warmup_fraction}")
        if self.warmup_fraction > 0 and self.warmup_iters > 0:
            raise ConfigError("train.warmup_fraction and train.warmup_iters are two warm-ups: set one of them to 0")
        if not 0.0 <= self.warmup_factor <= 1.0:
            raise ConfigError(f"train.warmup_factor: must lie in [0, 1], got {self.warmup_factor}")

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
    ``selection: round_robin``, ``batching: concat`` and ``labels: current`` give DKD's memory instead
    (docs/methods.md §3.14): ``size`` images in total, one class at a time, concatenated to the step's
    training list and labelled like it.
    """

    enabled: bool = False
    size: int = 100  # total budget N: k = ceil(N / old foreground classes) images per class (VOC 100, ADE 300)
    #: fixed images per class instead of ceil(size / classes): the released code loads the first 7 entries
    #: per class on VOC for every method but SATS (which loads all ~300: memory.size=300 reproduces that)
    per_class: Optional[int] = None
    #: True: pseudo-labelling methods (PLOP, SATS) overwrite the old-class ground truth of memory images,
    #: as the reference does; False: memory images keep it (the methods read ``cfg.memory.reference_labels``)
    reference_labels: bool = False
    #: balanced: every old class gets ceil(size / classes) images, lists walked in order (§3.12);
    #: round_robin: ``size`` images in total, a seeded round over the old classes, one image per class and turn,
    #: candidates = the previous step's images and the previous memory (DKD, §3.14)
    selection: str = "balanced"
    #: half: every batch is half current, half memory images; concat: the memory joins the step's training list
    batching: str = "half"
    #: seen: memory images keep every seen class; current: they are labelled like the step's images (old → 0)
    labels: str = "seen"
    #: round_robin only: a candidate's classes also include the old classes that the model of the step that
    #: ends predicts with confidence >= this on its background pixels (DKD: 0.9); None: ground truth only
    pseudo_threshold: Optional[float] = None

    def __post_init__(self) -> None:
        _positive("memory.size", self.size)
        if self.per_class is not None:
            _positive("memory.per_class", self.per_class)
        _choice("memory.selection", self.selection, ("balanced", "round_robin"))
        _choice("memory.batching", self.batching, ("half", "concat"))
        _choice("memory.labels", self.labels, ("seen", "current"))
        if self.selection == "round_robin" and self.per_class is not None:
            raise ConfigError("memory.per_class is a quota of the balanced selection; round_robin has a total budget "
                              "(memory.size)")
        if self.pseudo_threshold is not None:
            if self.selection != "round_robin":
                raise ConfigError("memory.pseudo_threshold is used by memory.selection=round_robin only")
            if not 0.0 <= self.pseudo_threshold <= 1.0:
                raise ConfigError(f"memory.pseudo_threshold: must lie in [0, 1], got {self.pseudo_threshold}")


@dataclass
class LogConfig:
    tensorboard: bool = True
    overlay_images: int = 4  # prediction overlays written to tensorboard after each step
    progress: bool = True  # progress bars (drawn only when stderr is a terminal; sats/progress.py)
    wandb: bool = False  # mirror the tensorboard scalars and images to Weights & Biases (pip install wandb)
    wandb_project: str = "sats"
    wandb_mode: str = "offline"  # offline (sync later with `wandb sync`) | online | disabled

    def __post_init__(self) -> None:
        _choice("log.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))


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
        """The base method's name, with its add-ons after ``+`` (``mib+ewf``)."""
        return "+".join([str(self.method.get("name", "ft")).lower(), *(self.method.get("addons") or [])])

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path(self.output_dir) / self.name


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


#: config keys that never change a run's results: logging, placement, the machine, process-local settings.
#: A run directory accepts a change of them, run names leave them out, report seed groups ignore them.
RESULT_NEUTRAL_KEYS = ("log", "device", "output_dir", "run_dir", "train.threads", "train.log_every",
                       "train.dist_timeout_s", "data.workers", "data.scan_workers", "data.check", "data.cache_dir")


# ----------------------------------------------------------------------------------------------
# Loading

BASE_KEY = "_base_"


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
    """Load ``path`` (with its ``_base_`` chain), apply dotted ``overrides``, validate against the schema.

    The ``method:`` section is validated by the method's own Params: use
    :func:`sats.experiment.load_experiment`, which does both (and is what every entry point calls).
    """
    node = _read_yaml(Path(path)) if path is not None else OmegaConf.create({})
    if overrides:
        try:
            node = OmegaConf.merge(node, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"bad override in {list(overrides)}: {_first_line(exc)}") from exc
    return build_config(node)


def config_to_dict(cfg: ExperimentConfig) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


#: keys added to the schema after runs were recorded, with the value that gives the earlier behaviour: a recorded
#: config (or a shared step-0 key) that lacks one of them equals one that holds it at this value
LATER_DEFAULTS: Dict[str, Any] = {
    "train.warmup_fraction": 0.0, "train.warmup_factor": 0.001,
    "memory.selection": "balanced", "memory.batching": "half", "memory.labels": "seen", "memory.pseudo_threshold": None,
    "model.dilation_mode": "stage", "model.encoder_bn_momentum": None, "model.head_dropout": 0.1,
    "model.classifier_init": "default", "model.rc_branches": False, "model.stem_activation": True,
    "model.checkpoint_activations": False, "train.optimizer_impl": "auto", "train.compile": False,
    "train.channels_last": False,
}


def without_later_defaults(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``tree`` (a config as nested dicts, or one of its sections under ``prefix``) without the
    :data:`LATER_DEFAULTS` keys that hold their earlier-behaviour value, so that what was recorded before the
    keys existed still compares (and hashes) equal."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out[key] = without_later_defaults(value, f"{path}.")
        elif not (path in LATER_DEFAULTS and value == LATER_DEFAULTS[path]):
            out[key] = value
    return out


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.create(config_to_dict(cfg))))



def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
