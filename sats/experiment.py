"""The entry point to an experiment: a config file and overrides → a fully validated config.

:func:`load_experiment` validates the schema (:mod:`sats.config`), the ``method:`` section against the
chosen method's own Params (:mod:`sats.methods`), and that every number is finite — once, for the CLI,
the demo, ``sats test``, the figures and the tests. :func:`load_run_experiment` adds what a command line
needs: a run name that records what the overrides changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from sats.config import (RESULT_NEUTRAL_KEYS, ConfigError, ExperimentConfig, check_finite, config_to_dict,
                         load_config)
from sats.io import digest
from sats.methods import build_method, validate_method_config
from sats.reference_flags import normalise_override


def load_experiment(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load ``path`` (with its ``_base_`` chain), apply dotted ``overrides``; validate the schema, the method's
    parameters and the numbers (ConfigError naming the key)."""
    cfg = load_config(path, [normalise_override(o) if "=" in o else o for o in overrides])
    cfg.method = validate_method_config(cfg.method)
    check_finite(config_to_dict(cfg))
    try:
        build_method(cfg.method).check_experiment(cfg)
    except ValueError as exc:
        raise ConfigError(f"method {cfg.method['name']!r}: {exc}") from exc
    return cfg


#: keys a run's default name leaves out: they name or place the run themselves, or do not change its
#: results (the engine ignores them too when it compares a run directory's saved config)
NAME_IGNORED_KEYS = ("name", *RESULT_NEUTRAL_KEYS)
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


def load_run_experiment(path: Optional[str | Path], overrides: Sequence[str] = (),
                        exclude_from_name: Sequence[str] = (), per_step: Sequence[str] = ()) -> ExperimentConfig:
    """:func:`load_experiment` for a command line: the run's default name records what the overrides changed.

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
            plain = load_experiment(path, others)
        except ConfigError:
            plain = None
        if plain is not None:
            overrides = [o for o in overrides if o not in per_step or not _same_schedule(plain, o)]
    cfg = load_experiment(path, overrides)
    keys = {_override_key(o) for o in overrides}
    if "name" in keys or "run_dir" in keys:
        return cfg
    try:
        base: Optional[ExperimentConfig] = load_experiment(path) if path is not None else ExperimentConfig()
    except ConfigError:  # the file alone does not validate: every override counts as a change
        base = None
    suffix = run_name_suffix(base, cfg, overrides, exclude_from_name)
    if suffix:
        cfg.name = f"{cfg.name}{suffix}"
    return cfg

