"""The method contract and the method registry.

A method shapes the loss of each step; the engine does everything else. It declares
what it needs from the model (``needs`` / ``old_needs``), whether it uses a frozen
copy of the previous step's model, how new heads are initialised, and which
step-0 recipe it uses (so a plain-CE step 0 can be shared across methods). The
engine never looks at a method's name.

Also here: the helpers every method file may use (:class:`CEParams`, :func:`check_weight`,
:func:`require_old_logits`, :meth:`Method.ce_terms`), so that no method imports a sibling method
module; shared frames of several methods live in the ``_``-prefixed modules of this package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager, Dict, FrozenSet, Iterable, Iterator, List
from typing import Mapping, Optional, Protocol, Type

import torch
from torch import Tensor

from sats.data.batch import Batch
from sats.losses.ce import cross_entropy
from sats.losses.sigmoid import implicit_background_prediction
from sats.rng import isolated_rng, pass_seed

if TYPE_CHECKING:  # pragma: no cover
    from sats.config import ExperimentConfig
    from sats.data.tasks import Task
    from sats.models.segmenter import ModelOutput, Segmenter


class ArtifactStore(Protocol):
    """What ``ctx.cache`` offers (the engine's :class:`sats.engine.cache.ArtifactCache`)."""

    def get(self, kind: str, key: str) -> Optional[Dict[str, Any]]: ...

    def put(self, kind: str, key: str, artifact: Dict[str, Any]) -> Any: ...


@dataclass
class StepContext:
    """What a method may read during a step. Created by the runner for every step."""

    step: int
    task: "Task"
    cfg: "ExperimentConfig"
    model: "Segmenter"  # the model being trained (unwrapped from DDP)
    old_model: Optional["Segmenter"]  # frozen step t-1 model, when the method uses one
    device: torch.device
    run_dir: Any  # pathlib.Path
    old_checkpoint_digest: Optional[str]  # content hash of the step t-1 weights and method state (cache keys)
    #: ``train_loader(label_table=None)``: a fresh pass over this step's training data (current-step images
    #: only, never the exemplar memory; full ``data.batch_size``); a (256,) uint8 ``label_table`` (raw mask
    #: value → label) replaces the step's training table for that pass; ``name="…"``: a named pass, whose order
    #: and crops depend only on (seed, step, name), not on how many passes ran before it
    train_loader: Callable[..., Iterable[Batch]]
    autocast: Callable[[], Any]  # context manager: the run's mixed-precision setting
    log_scalar: Callable[[str, float], None]  # log a scalar at the current iteration
    epoch: int = 0
    iteration: int = 0  # iterations done in this step
    total_iterations: int = 0
    data_digest: Optional[str] = None  # hash of this step's image lists and classes (cache keys)
    #: gradients pass through an fp16 GradScaler: after_backward may see inf/NaN (that step is then skipped)
    grad_scaled: bool = False
    #: keyed artifacts that outlive the run (``get(kind, key)`` / ``put(kind, key, dict)``; rank 0 writes, every
    #: rank takes the same branch); None: nothing is cached. Keys must hold the content they depend on.
    cache: Optional["ArtifactStore"] = None
    rank: int = 0  # this process under torchrun (0 alone)
    world_size: int = 1
    #: ``all_agree(flag)``: True only if ``flag`` holds on every rank (so all take the same branch)
    all_agree: Callable[[bool], bool] = bool
    #: ``all_reduce_sum_(tensor)``: sum over ranks in place (statistics of a method's own pass)
    all_reduce_sum_: Callable[[Tensor], Tensor] = lambda tensor: tensor
    #: ``evaluate(model, kind)``: the engine's evaluation of this step (``kind`` "test": the classes seen so far on
    #: the test images; "val": the step's classes) → metrics with ``miou`` and ``class_iou``; every rank calls it.
    #: None: not offered (e.g. in the benchmarks)
    evaluate: Optional[Callable[[Any, str], Any]] = None

    def isolated_rng(self, name: str = "") -> ContextManager[None]:
        """A block with its own random streams, seeded by (``train.seed``, step, rank, ``name``); the training
        streams are restored after it (a method's extra pass over the data never shifts them)."""
        return isolated_rng(pass_seed(self.cfg.train.seed, self.step, self.rank, name), self.device)

    @property
    def num_old(self) -> int:
        """K_{t-1}: channels of the previous step (0 at step 0)."""
        return self.task.num_outputs(self.step - 1) if self.step > 0 else 0

    @property
    def num_outputs(self) -> int:
        """K_t: channels of the current step."""
        return self.task.num_outputs(self.step)


@dataclass
class ParamGroup:
    """Parameters the optimiser updates at one learning rate and weight decay (``Method.param_groups``)."""

    params: List[torch.nn.Parameter]
    lr_mult: float = 1.0  # × the step's base lr (train.lr at step 0, train.lr_incremental later)
    weight_decay: Optional[float] = None  # None: train.weight_decay
    name: str = ""  # for logs and tests ("encoder", "new_head", …)


#: the parts of a Segmenter that :func:`part_groups` names
MODEL_PARTS = ("encoder", "decoder", "old_heads", "new_head")


def part_groups(model: torch.nn.Module, lr_mult: Mapping[str, float],
                weight_decay: Optional[Mapping[str, Optional[float]]] = None) -> List[ParamGroup]:
    """One :class:`ParamGroup` per part of a Segmenter (:data:`MODEL_PARTS`): ``encoder``, ``decoder`` (the head
    module), ``old_heads`` (every classifier head but the last; none at step 0) and ``new_head`` (the last head:
    the step's own), at ``lr_mult[part]`` (1 when missing) and ``weight_decay[part]`` (None: train.weight_decay).
    Only parameters with ``requires_grad``; empty parts are left out."""
    unknown = (set(lr_mult) | set(weight_decay or {})) - set(MODEL_PARTS)
    if unknown:
        raise ValueError(f"unknown model parts {sorted(unknown)}; known: {list(MODEL_PARTS)}")
    heads = list(model.classifier.heads)  # type: ignore[union-attr]
    parts = {"encoder": [model.encoder], "decoder": [model.head], "old_heads": heads[:-1], "new_head": heads[-1:]}
    groups = []
    for name in MODEL_PARTS:
        params = [p for module in parts[name] for p in module.parameters() if p.requires_grad]  # type: ignore[union-attr]
        if params:
            groups.append(ParamGroup(params, float(lr_mult.get(name, 1.0)), (weight_decay or {}).get(name), name))
    return groups


@dataclass
class NoParams:
    """A method without hyper-parameters."""


@dataclass
class CEParams:
    """Parameters of every method with a cross-entropy (or BCE) term: its pixel ``reduction``."""

    reduction: str = "all_pixels"  # all_pixels (reference: / all pixels, ignored included) | valid_pixels

    def __post_init__(self) -> None:
        if self.reduction not in ("all_pixels", "valid_pixels"):
            raise ValueError(f"reduction: {self.reduction!r} is not 'all_pixels' or 'valid_pixels'")


def check_weight(name: str, value: float) -> None:
    """Raise if a loss weight is negative or NaN (names the Params key)."""
    if not value >= 0:
        raise ValueError(f"{name}: must be >= 0, got {value!r}")


def require_old_logits(old_out: Optional[object], method: str) -> Tensor:
    """The old model's logits ``(B, K_{t−1}, H, W)``; a clear error if the engine passed none."""
    if old_out is None:
        raise RuntimeError(f"method {method!r}: no old-model output at a step > 0 (uses_old_model is set)")
    return old_out.logits  # type: ignore[attr-defined]


class Method:
    """Base class of every continual-learning method. Override what the method changes."""

    name: ClassVar[str] = ""
    #: display name in tables, reports and generated configs ("LwF-MC"); never inherited: a registered class
    #: that sets none shows its ``name``
    label: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    #: outputs of the new model the loss reads at steps > 0 (subset of sats.models NEEDS; logits are always there)
    needs: ClassVar[frozenset] = frozenset()
    #: outputs of the old model the loss reads (only when ``uses_old_model``)
    old_needs: ClassVar[frozenset] = frozenset()
    uses_old_model: ClassVar[bool] = False
    #: whether the engine runs the old model's forward every iteration (False: the method reads only the
    #: old model's weights, e.g. EWC/RW/PI, so the frozen copy is kept but never run)
    old_forward: ClassVar[bool] = True
    #: new-head initialisation: "default" | "background" (MiB) | "background_weight" (RCIL: w_0, biases untouched) |
    #: "unknown" (SSUL) | "copy" (DKD: every new row copies weight and bias of output channel ``head_init_source``)
    head_init: ClassVar[str] = "default"
    head_init_source: ClassVar[int] = 0
    #: how ``predict`` maps logits to channels: "argmax" over every channel, or "sigmoid" (implicit background:
    #: the best of channels ≥ 1, and channel 0 where none has σ > 0.5; channel 0 itself is never predicted)
    prediction: ClassVar[str] = "argmax"
    #: step-0 recipe: "ce" = plain cross-entropy (shareable across methods); None = the method's own step 0
    step0: ClassVar[Optional[str]] = "ce"
    #: train every class of the task in one step (the joint-training upper bound)
    joint: ClassVar[bool] = False
    #: extra output channels of the step-0 head, placed after the background (SSUL: 1, the unknown channel);
    #: labels stay in task channels, the method maps them (``loss``) and back (``predict``)
    extra_channels: ClassVar[int] = 0
    #: whether the loss reads ``batch.saliency`` (see ``needs_saliency_at``; needs ``data.saliency_root``)
    needs_saliency: ClassVar[bool] = False

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    # -- what the step needs -------------------------------------------------------------------
    def needs_at(self, step: int) -> frozenset:
        """Outputs of the new model needed at ``step`` (nothing extra at step 0 by default)."""
        return self.needs if step > 0 else frozenset()

    def step0_key(self) -> Optional[str]:
        """Identifies the step-0 loss; methods with equal keys share one step-0 checkpoint (None: never shared)."""
        if self.step0 is None:
            return None
        return f"{self.step0}:{getattr(self.params, 'reduction', 'all_pixels')}"

    def old_model_at(self, step: int) -> bool:
        return self.uses_old_model and step > 0

    def needs_saliency_at(self, step: int) -> bool:
        """Whether training batches of ``step`` must carry ``saliency`` maps."""
        return self.needs_saliency

    def model_head_sizes(self, task: "Task", step: int) -> List[int]:
        """Classifier head sizes of the model after ``step``: the task's, plus ``extra_channels`` in head 0."""
        sizes = list(task.head_sizes(step))
        sizes[0] += self.extra_channels
        return sizes

    def ce_terms(self, batch: Batch, out: "ModelOutput") -> Dict[str, Tensor]:
        """``{"ce": CE(z, y)}`` with ``params.reduction``: the whole loss of the ``step0 = "ce"`` recipe (the
        step 0 that :meth:`step0_key` lets methods share) and the CE term that most methods keep later."""
        reduction = getattr(self.params, "reduction", "all_pixels")
        return {"ce": cross_entropy(out.logits, batch.labels, reduction=reduction)}

    def check_experiment(self, cfg: "ExperimentConfig") -> None:
        """At start-up: raise ValueError (naming the keys) when the rest of the config cannot run this method
        (RCIL needs ``model.rc_branches``). Nothing by default."""

    # -- hooks -----------------------------------------------------------------------------------
    def begin_step(self, ctx: StepContext) -> None:
        """Before the first iteration of a step (thresholds, importance, ...)."""

    def loss(self, batch: Batch, out: "ModelOutput", old_out: Optional["ModelOutput"], ctx: StepContext) -> Dict[str, Tensor]:
        """Named loss terms (each already weighted); the engine sums them and back-propagates."""
        raise NotImplementedError

    def after_backward(self, ctx: StepContext) -> None:
        """After ``backward`` and before the optimiser step: ``p.grad`` holds the true (unscaled, with fp16 AMP)
        gradients of the summed loss terms, which the method may read and modify in place."""

    def after_optimizer_step(self, ctx: StepContext) -> None:
        """After the optimiser step (parameters have moved)."""

    def end_step(self, ctx: StepContext) -> None:
        """After the last iteration of a step, before the step checkpoint is written."""

    def predict(self, logits: Tensor) -> Tensor:
        """(B, K, H, W) logits → (B, H, W) channel predictions, by the declared ``prediction``."""
        if self.prediction == "sigmoid":
            return implicit_background_prediction(logits)
        return logits.max(dim=1).indices  # = argmax(1) (first maximum), 2-4x faster on CPU

    def confidence(self, logits: Tensor) -> "tuple[Tensor, Tensor]":
        """``(scores, channels)``, each ``(B, H, W)``: the predicted channel of every pixel and its probability
        (softmax for ``prediction = "argmax"``; σ of the best channel ≥ 1 for ``"sigmoid"``). The engine's memory
        selection pseudo-labels with it (``memory.pseudo_threshold``)."""
        if self.prediction == "sigmoid":
            scores, index = torch.sigmoid(logits[:, 1:].float()).max(dim=1)
            return scores, index + 1
        return torch.softmax(logits.float(), dim=1).max(dim=1)

    def prepare_model(self, model: torch.nn.Module, step: int) -> None:
        """Once per step, before the optimiser is built (and before a resumed step's epoch checkpoint is loaded):
        change the step's model in place — freeze parameters (``requires_grad = False`` keeps them out of
        :meth:`param_groups`), re-parameterise modules. Must keep the state-dict keys unchanged. Nothing by
        default."""

    def trainable_parameters(self, model: torch.nn.Module, step: int) -> List[torch.nn.Parameter]:
        """Parameters handed to the optimiser (all of them by default)."""
        return [p for p in model.parameters() if p.requires_grad]

    def param_groups(self, model: torch.nn.Module, step: int) -> List[ParamGroup]:
        """The optimiser's groups at ``step``: one group of :meth:`trainable_parameters` at the base lr and
        ``train.weight_decay`` by default; :func:`part_groups` builds per-part learning-rate multipliers."""
        return [ParamGroup(self.trainable_parameters(model, step), name="all")]

    def frozen_at(self, step: int) -> FrozenSet[str]:
        """What the engine keeps frozen during ``step`` (``sats.models.segmenter.FROZEN_KINDS``): ``"norm"``
        (BatchNorm statistics in eval mode and their affine parameters out of the optimiser), ``"dropout"``
        (dropout and stochastic depth off). Nothing by default."""
        return frozenset()

    # -- state that survives resume and is carried to the next step -----------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} has no state but the checkpoint holds {sorted(state)}")

    def describe(self) -> str:
        fields = dataclasses.asdict(self.params) if dataclasses.is_dataclass(self.params) else {}
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in fields.items())})"


# ----------------------------------------------------------------------------------------------
# Registry

_REGISTRY: Dict[str, Type[Method]] = {}


def register_into(registry: Dict[str, Any], cls: Any, kind: str = "method") -> Any:
    """Add ``cls`` to ``registry`` under its ``name`` (a name taken by another class is an error); a class
    without its own ``label`` shows its name (a subclass never shows its parent's label). Returns ``cls``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in registry and registry[cls.name] is not cls:
        raise ValueError(f"{kind} name {cls.name!r} registered twice")
    if "label" not in vars(cls) or not cls.label:
        cls.label = cls.name
    registry[cls.name] = cls
    return cls


def register_method(cls: Type[Method]) -> Type[Method]:
    """Class decorator: make a method available by its ``name``."""
    return register_into(_REGISTRY, cls)


def list_methods() -> List[str]:
    return sorted(_REGISTRY)


def iter_methods() -> Iterator[Type[Method]]:
    return (_REGISTRY[k] for k in list_methods())


def _spelling(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def get_method_class(name: str) -> Type[Method]:
    """The method registered as ``name``, in any case and with ``-`` or ``_`` (the reference's "LWF-MC" is
    ``lwf_mc``, "MiB" is ``mib``)."""
    key = str(name).strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    matches = [cls for registered, cls in _REGISTRY.items() if _spelling(registered) == _spelling(key)]
    if len(matches) != 1:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return matches[0]
