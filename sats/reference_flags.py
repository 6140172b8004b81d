"""The reference code's command-line flags, read into sats overrides.

Researchers arrive with the command lines of the reference implementation (the argparser of
arthurdouillard/CVPR2021_PLOP and of its SATS derivative QIU023/SATS_Continual_Semantic_Seg)::

    sats train cfg.yaml --dataset voc --task 15-5s --step 1 --method LWF-MC --overlapped --lr 0.001 --epochs 30

:func:`parse_command_line` turns them (and ``key.sub=value`` overrides) into dotted overrides and the
options of ``sats train`` (``--step``, ``--test``, ``--ckpt``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from sats.config import ConfigError, ExperimentConfig

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


def normalise_override(arg: str) -> str:
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
                out.append(normalise_override(arg))
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

