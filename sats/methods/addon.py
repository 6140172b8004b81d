"""Add-ons: plug-ins that any base method can take (EWF, NeST), and the ``method:`` section that names them.

An add-on changes a base method around its hooks, never its loss: it may freeze parameters before the optimiser
is built (``prepare_model``), run a phase before the first iteration (``begin_step``, after the base's) or change
the model after the last one (``end_step``, after the base's). A config names a base method and its add-ons::

    method:
      name: mib
      addons: [ewf]          # or name: mib+ewf (the command line: --method MiB+EWF)
      lambda_kd: 10          # the base method's parameters
      ewf: {fuse_buffers: true}   # an add-on's parameters, under its name

:func:`compose_method` builds, once per combination, a subclass of the base method whose hooks call the
add-ons' after the base's; the engine sees one :class:`~sats.methods.base.Method` (named ``mib+ewf``) and never
an add-on's name (docs/methods.md §3.17).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sats.config import ConfigError
from sats.methods.base import Method, NoParams, StepContext, get_method_class, register_into

__all__ = ["AddOn", "ComposedMethod", "build_method", "compose_method", "freeze_old_heads", "get_addon_class",
           "list_addons", "register_addon", "split_method_name", "validate_method_config"]


class AddOn:
    """Base class of an add-on. Override the hooks it changes; each receives the composed ``method``."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # "EWF" in "MiB+EWF"
    Params: ClassVar[type] = NoParams
    #: the add-on reads the step t−1 model (``ctx.old_model``): the composed method keeps one at steps > 0 even
    #: when the base method does not (the engine then never runs its forward)
    needs_old_model: ClassVar[bool] = False
    #: replaces the base method's new-head initialisation (None: the base's)
    head_init: ClassVar[Optional[str]] = None

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    @classmethod
    def check_base(cls, base: Type[Method]) -> None:
        """Raise ValueError when this add-on cannot take ``base`` (nothing by default)."""

    def check_experiment(self, cfg: Any) -> None:
        """Raise ValueError (naming the keys) when the config cannot run this add-on (nothing by default)."""

    def prepare_model(self, model: torch.nn.Module, step: int, method: Method) -> None:
        """Before the optimiser is built, after the base method's ``prepare_model``."""

    def begin_step(self, ctx: StepContext, method: Method) -> None:
        """Before the first iteration, after the base method's ``begin_step``."""

    def end_step(self, ctx: StepContext, method: Method) -> None:
        """After the last iteration, after the base method's ``end_step`` (before the test and the checkpoint)."""

    def describe(self) -> str:
        fields = dataclasses.asdict(self.params) if dataclasses.is_dataclass(self.params) else {}
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in fields.items())})"


def freeze_old_heads(model: torch.nn.Module, step: int) -> int:
    """``requires_grad = False`` on every classifier head but the step's own (weights and biases, background row
    included), so the optimiser never sees them (no update, no weight decay). Returns the tensors frozen."""
    if step == 0:
        return 0
    frozen = [p for head in list(model.classifier.heads)[:-1] for p in head.parameters()]  # type: ignore[union-attr]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return len(frozen)


# ----------------------------------------------------------------------------------------------
# Registry

_ADDONS: Dict[str, Type[AddOn]] = {}


def register_addon(cls: Type[AddOn]) -> Type[AddOn]:
    """Class decorator: make an add-on available by its ``name``."""
    return register_into(_ADDONS, cls, "add-on")


def list_addons() -> List[str]:
    return sorted(_ADDONS)


def get_addon_class(name: str) -> Type[AddOn]:
    key = str(name).strip().lower().replace("-", "_")
    if key not in _ADDONS:
        raise ValueError(f"unknown add-on {name!r}; available: {', '.join(list_addons()) or 'none'}")
    return _ADDONS[key]


# ----------------------------------------------------------------------------------------------
# Composition


class ComposedMethod(Method):
    """A base method with add-ons (placed before the base class in the MRO: ``super()`` is the base method)."""

    base_class: ClassVar[Type[Method]] = Method
    addon_classes: ClassVar[Tuple[Type[AddOn], ...]] = ()

    def __init__(self, params: Any = None, addons: Optional[Sequence[AddOn]] = None) -> None:
        super().__init__(params)
        self.addons: List[AddOn] = list(addons) if addons is not None else [cls() for cls in self.addon_classes]

    def check_experiment(self, cfg: Any) -> None:
        super().check_experiment(cfg)
        for addon in self.addons:
            addon.check_experiment(cfg)

    def prepare_model(self, model: torch.nn.Module, step: int) -> None:
        super().prepare_model(model, step)
        for addon in self.addons:
            addon.prepare_model(model, step, self)

    def begin_step(self, ctx: StepContext) -> None:
        super().begin_step(ctx)
        for addon in self.addons:
            addon.begin_step(ctx, self)

    def end_step(self, ctx: StepContext) -> None:
        super().end_step(ctx)
        for addon in self.addons:
            addon.end_step(ctx, self)

    def describe(self) -> str:
        return " + ".join([super().describe(), *(addon.describe() for addon in self.addons)])


_COMPOSED: Dict[Tuple[Type[Method], Tuple[Type[AddOn], ...]], Type[ComposedMethod]] = {}


def compose_method(base: Type[Method], addons: Sequence[Type[AddOn]]) -> Type[Method]:
    """The class of ``base`` with ``addons`` (``base`` itself when there are none); one class per combination.

    Named ``base+addon+…`` (label ``MiB+EWF``). It keeps the old model when an add-on needs one (without the old
    forward if the base never ran it) and takes an add-on's ``head_init``; everything else is the base's.
    """
    addons = tuple(addons)
    if not addons:
        return base
    if len({a.name for a in addons}) != len(addons):
        raise ValueError(f"an add-on is listed twice: {[a.name for a in addons]}")
    for addon in addons:
        addon.check_base(base)
    key = (base, addons)
    if key not in _COMPOSED:
        uses_old = base.uses_old_model or any(a.needs_old_model for a in addons)
        head_init = next((a.head_init for a in reversed(addons) if a.head_init is not None), base.head_init)
        attrs = {"name": "+".join([base.name, *(a.name for a in addons)]),
                 "label": "+".join([base.label or base.name, *(a.label for a in addons)]),
                 "base_class": base, "addon_classes": addons, "uses_old_model": uses_old,
                 "old_forward": base.old_forward if base.uses_old_model else False, "head_init": head_init,
                 "__doc__": base.__doc__, "__module__": base.__module__}
        _COMPOSED[key] = type(f"{base.__name__}With{''.join(a.__name__ for a in addons)}", (ComposedMethod, base),
                              attrs)
    return _COMPOSED[key]


def split_method_name(name: str) -> Tuple[str, List[str]]:
    """``"MiB+EWF"`` → ``("MiB", ["EWF"])``: a base method and the add-ons named after it."""
    parts = [p.strip() for p in str(name).split("+")]
    if any(not p for p in parts):
        raise ValueError(f"method name {name!r}: empty part around '+'")
    return parts[0], parts[1:]


def _addon_names(section: Dict[str, Any]) -> Tuple[str, List[str]]:
    base, from_name = split_method_name(str(section.pop("name", "ft")))
    listed = section.pop("addons", None) or []
    if isinstance(listed, str):
        listed = [listed]
    names = [*from_name, *[str(a) for a in listed]]  # `--method MiB+EWF` over `addons: [ewf]`: named once
    return base, [n for i, n in enumerate(names) if n.strip().lower() not in {m.strip().lower() for m in names[:i]}]


def _params(cls: type, section: Dict[str, Any], where: str) -> Any:
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls.Params), section))  # type: ignore[attr-defined]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "")
        raise ConfigError(f"{where}: invalid key {key!r}: {str(exc).splitlines()[0]}") from exc
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def validate_method_config(section: Dict[str, Any]) -> Dict[str, Any]:
    """Check ``method:`` against the method's Params and each add-on's (``method.<addon>``): unknown keys, bad
    types and unknown names are errors naming the key. Returns the canonical section: ``name`` (the base),
    the base's parameters, ``addons`` (names, only when there are any) and one section per add-on."""
    section = dict(section)
    try:
        base_name, addon_names = _addon_names(section)
        base = get_method_class(base_name)
        addons = [get_addon_class(a) for a in addon_names]
        compose_method(base, addons)
    except ValueError as exc:
        raise ConfigError(f"method.name: {exc}") from exc
    addon_sections = {}
    for addon in addons:
        given = section.pop(addon.name, None) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"method.{addon.name}: must be a mapping of the add-on's parameters, got {given!r}")
        addon_sections[addon.name] = dataclasses.asdict(_params(addon, given, f"method.{addon.name} (add-on)"))
    stray = sorted(k for k in section if k in _ADDONS)
    if stray:
        raise ConfigError(f"method.{stray[0]}: parameters of the add-on {stray[0]!r}, which method.addons does not "
                          f"list (add it: method.addons=[{stray[0]}])")
    params = _params(base, section, f"method {base.name!r}")
    canonical: Dict[str, Any] = {"name": base.name, **dataclasses.asdict(params)}
    if addons:
        canonical["addons"] = [a.name for a in addons]
        canonical.update(addon_sections)
    return canonical


def build_method(section: Dict[str, Any]) -> Method:
    """Instantiate the (composed) method of a validated ``method:`` section."""
    section = dict(section)
    base_name, addon_names = _addon_names(section)
    addon_classes = [get_addon_class(a) for a in addon_names]
    addons = [cls(_params(cls, section.pop(cls.name, None) or {}, f"method.{cls.name}")) for cls in addon_classes]
    base = get_method_class(base_name)
    params = _params(base, section, f"method {base.name!r}")
    composed = compose_method(base, addon_classes)
    if addons:
        return composed(params, addons)  # type: ignore[call-arg]
    return composed(params)
