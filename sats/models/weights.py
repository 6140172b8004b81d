"""Load pretrained encoder weights from local checkpoint files, converting foreign key names.

Formats (``fmt``; ``"auto"`` detects it from the keys):

* ``"mit"``: official NVlabs MiT ImageNet checkpoints (``mit_b*.pth``). Our MiT
  uses the same names; ``head.*`` (ImageNet classifier) is dropped. mmseg
  SegFormer checkpoints (``backbone.*`` + ``decode_head.*``) and our own
  Segmenter checkpoints (``encoder.*``) are read too: only the encoder part is kept.
* ``"hf"``: Hugging Face SegFormer/MiT (``model.safetensors`` or
  ``pytorch_model.bin``), both the hub naming
  (``segformer.encoder.block.0.0.attention.self.query`` …) and the
  transformers ≥ 5 naming (``stages.0.blocks.0.attention.q_proj`` …), with or
  without the ``segformer.`` prefix. HF's separate key/value projections are
  concatenated into our ``attn.kv`` (key rows first, as in the official MiT).
  ``classifier.*`` and ``decode_head.*`` are dropped.
* ``"torchvision"``: torchvision ResNet (same names as ours); ``fc.*`` dropped.
* ``"iabn"``: In-Place-ABN ResNet (``resnet101_iabn_sync.pth.tar``, keys
  ``module.mod1.conv1``, ``module.mod2.block1.convs.conv1``,
  ``….convs.bn1``, ``….proj_conv``, ``….proj_bn``, ``module.classifier.fc``),
  naming taken from the In-Place-ABN / PLOP ``ResNet`` and ``ResidualBlock``.
  ``modN.blockK`` becomes ``layer{N-1}.{K-1}``, ``proj_conv``/``proj_bn`` become
  ``downsample.0/1``, ``classifier.*`` is dropped. In-Place ABN scales by
  ``|weight| + eps`` (eps 1e-5), so BN weights are converted to that value
  (identical to the stored value when it is positive and ≫ 1e-5).

Checkpoints wrapped in ``{"state_dict": …}``, ``{"model": …}`` or
``{"module": …}`` are unwrapped, and a leading ``module.`` (DataParallel/DDP) is
stripped. Every load returns a `LoadReport`; missing encoder keys and
unexpected (unconverted) checkpoint keys raise unless ``partial=True``; a shape
mismatch always raises. ``builtin:<name>`` names weights shipped with the package
(`sats.models.builtin`): they load through the same path.

Into an encoder with RC modules (``model.rc_branches``, `sats.models.reparam`), every plain tensor of a
twinned conv (ResNet ``conv2``/``bn2``, MiT ``mlp.dwconv.dwconv``), in any format, is copied into both
branches, so they start identical; the keys only an RC encoder has (branch-A conv biases the plain conv
lacks, ``merged`` flags) are not reported missing.
"""

import logging
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sats.models.builtin import resolve_weights
from sats.models.errors import WeightsError
from sats.models.reparam import twin_plain_state

log = logging.getLogger(__name__)

FORMATS = ("mit", "hf", "torchvision", "iabn")
IABN_EPS = 1e-5
HF_MIT_REPOS = {f"mit_b{i}": f"nvidia/mit-b{i}" for i in range(6)}
_WRAPPER_KEYS = ("state_dict", "model", "module")


@dataclass
class LoadReport:
    """What `load_encoder_weights` did.

    loaded: encoder keys filled from the checkpoint.
    missing: encoder keys the checkpoint lacks (BN ``num_batches_tracked`` excluded).
    unexpected: converted checkpoint keys the encoder does not have.
    dropped: checkpoint keys discarded by design (classifier / decode heads).
    """

    path: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} encoder tensors from {self.path} (format {self.format}); "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.dropped)} dropped"
        ]
        for name in ("missing", "unexpected", "dropped"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:10]) + (f", … ({len(keys) - 10} more)" if len(keys) > 10 else "")
                lines.append(f"  {name}: {shown}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reading


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Flat ``{name: tensor}`` from a ``.safetensors`` or a torch pickle file, unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ImportError(f"reading {path} needs the 'safetensors' package (pip install safetensors)") from error
        return dict(load_file(str(path), device="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as error:
        raise WeightsError(f"cannot read {path} as a torch checkpoint (weights_only=True): {error}") from error
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: Any, source: str = "<checkpoint>") -> dict[str, Tensor]:
    """Descend through ``state_dict`` / ``model`` / ``module`` wrappers to the tensor dict."""
    while isinstance(obj, Mapping):
        wrapper = next((key for key in _WRAPPER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    bad = [key for key, value in obj.items() if not isinstance(value, Tensor)]
    if bad:
        raise WeightsError(f"{source}: entries {bad[:5]} are not tensors; not a state dict")
    return dict(obj)


# ------------------------------------------------------------------------------------------- detection


def detect_format(keys: list[str] | Any, source: str = "<checkpoint>") -> str:
    """One of `FORMATS`, from the key names; WeightsError when none fits."""
    keys = list(keys)
    if any("patch_embeddings." in k or ".attention.self." in k or ".blocks.0.attention." in k for k in keys):
        return "hf"
    if any(re.search(r"(^|\.)mod1\.conv1\.", k) or ".convs.conv1." in k for k in keys):
        return "iabn"
    if any(re.search(r"(^|\.)patch_embed1\.", k) for k in keys):
        return "mit"
    if any(re.search(r"(^|\.)layer1\.0\.conv1\.", k) for k in keys):
        return "torchvision"
    raise WeightsError(f"{source}: cannot recognise the checkpoint format from keys such as {keys[:5]}; pass format explicitly")


# ------------------------------------------------------------------------------------------ conversion


def _strip_module(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}


def _select_prefix(state: dict[str, Tensor], prefixes: tuple[str, ...]) -> tuple[dict[str, Tensor], list[str]] | None:
    """If some key starts with one of ``prefixes``, keep those (prefix removed) and drop the rest."""
    for prefix in prefixes:
        if any(key.startswith(prefix) for key in state):
            kept = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
            return kept, sorted(key for key in state if not key.startswith(prefix))
    return None


def _convert_native(state: dict[str, Tensor], drop_prefix: str) -> tuple[dict[str, Tensor], list[str]]:
    """Names already ours: keep an ``encoder.``/``backbone.`` part if present, else drop ``drop_prefix``."""
    selected = _select_prefix(state, ("encoder.", "backbone."))
    if selected is not None:
        return selected
    kept = {key: value for key, value in state.items() if not key.startswith(drop_prefix)}
    return kept, sorted(key for key in state if key.startswith(drop_prefix))


_HF_OUTER = [
    (re.compile(r"^encoder\.patch_embeddings\.(\d+)\.proj\.(.+)$"), "patch_embed{s}.proj.{rest}"),
    (re.compile(r"^encoder\.patch_embeddings\.(\d+)\.layer_norm\.(.+)$"), "patch_embed{s}.norm.{rest}"),
    (re.compile(r"^encoder\.layer_norm\.(\d+)\.(.+)$"), "norm{s}.{rest}"),
    (re.compile(r"^stages\.(\d+)\.patch_embeddings\.proj\.(.+)$"), "patch_embed{s}.proj.{rest}"),
    (re.compile(r"^stages\.(\d+)\.patch_embeddings\.layer_norm\.(.+)$"), "patch_embed{s}.norm.{rest}"),
    (re.compile(r"^stages\.(\d+)\.layer_norm\.(.+)$"), "norm{s}.{rest}"),
]
_HF_BLOCK = re.compile(r"^(?:encoder\.block|stages)\.(\d+)\.(?:blocks\.)?(\d+)\.(.+)$")
_HF_INNER = [
    ("layer_norm_1.", "norm1."),
    ("layernorm_before.", "norm1."),
    ("layer_norm_2.", "norm2."),
    ("layernorm_after.", "norm2."),
    ("attention.self.query.", "attn.q."),
    ("attention.q_proj.", "attn.q."),
    ("attention.self.key.", "attn.k."),
    ("attention.k_proj.", "attn.k."),
    ("attention.self.value.", "attn.v."),
    ("attention.v_proj.", "attn.v."),
    ("attention.self.sr.", "attn.sr."),
    ("attention.sequence_reduction.sequence_reduction.", "attn.sr."),
    ("attention.self.layer_norm.", "attn.norm."),
    ("attention.sequence_reduction.layer_norm.", "attn.norm."),
    ("attention.output.dense.", "attn.proj."),
    ("attention.o_proj.", "attn.proj."),
    ("mlp.dense1.", "mlp.fc1."),
    ("mlp.fc1.", "mlp.fc1."),
    ("mlp.dense2.", "mlp.fc2."),
    ("mlp.fc2.", "mlp.fc2."),
    ("mlp.dwconv.dwconv.", "mlp.dwconv.dwconv."),
]


def _hf_key(key: str) -> str | None:
    """Our name for an HF encoder key (``attn.k``/``attn.v`` still separate); None if not an encoder key."""
    for pattern, template in _HF_OUTER:
        match = pattern.match(key)
        if match:
            return template.format(s=int(match.group(1)) + 1, rest=match.group(2))
    match = _HF_BLOCK.match(key)
    if match:
        stage, index, inner = int(match.group(1)) + 1, match.group(2), match.group(3)
        for old, new in _HF_INNER:
            if inner.startswith(old):
                return f"block{stage}.{index}.{new}{inner[len(old):]}"
        return f"block{stage}.{index}.{inner}"  # unknown inner name: reported as unexpected
    return None


def _convert_hf(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    converted: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        name = key[len("segformer."):] if key.startswith("segformer.") else key
        ours = _hf_key(name)
        if ours is None:
            dropped.append(key)
        else:
            converted[ours] = value
    for key in [k for k in converted if ".attn.k." in k]:
        value_key = key.replace(".attn.k.", ".attn.v.")
        if value_key in converted:
            merged = torch.cat([converted.pop(key), converted.pop(value_key)], dim=0)
            converted[key.replace(".attn.k.", ".attn.kv.")] = merged
    return converted, sorted(dropped)


_IABN_STEM = re.compile(r"^mod1\.(conv1|bn1)\.(.+)$")
_IABN_BLOCK = re.compile(r"^mod(\d+)\.block(\d+)\.(convs\.conv\d|convs\.bn\d|proj_conv|proj_bn)\.(.+)$")
_IABN_PART = {"proj_conv": "downsample.0", "proj_bn": "downsample.1"}


def _convert_iabn(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    converted: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        if key.startswith("classifier."):
            dropped.append(key)
            continue
        is_bn_weight = False
        stem = _IABN_STEM.match(key)
        block = _IABN_BLOCK.match(key)
        if stem:
            name = f"{stem.group(1)}.{stem.group(2)}"
            is_bn_weight = stem.group(1) == "bn1" and stem.group(2) == "weight"
        elif block:
            module, index, part, param = block.groups()
            part_name = _IABN_PART.get(part, part.removeprefix("convs."))
            name = f"layer{int(module) - 1}.{int(index) - 1}.{part_name}.{param}"
            is_bn_weight = ("bn" in part) and param == "weight"
        else:
            name = key  # not an In-Place-ABN ResNet name: reported as unexpected
        converted[name] = value.abs() + IABN_EPS if is_bn_weight else value
    return converted, sorted(dropped)


def convert_state_dict(state: Mapping[str, Tensor], fmt: str = "auto", source: str = "<checkpoint>") -> tuple[dict[str, Tensor], list[str], str]:
    """``(encoder state dict in our names, dropped keys, format used)`` for a foreign state dict."""
    state = _strip_module(state)
    if fmt == "auto":
        fmt = detect_format(state.keys(), source)
    if fmt == "mit":
        converted, dropped = _convert_native(state, "head.")
        dropped_more = [k for k in converted if k.startswith(("decode_head.", "auxiliary_head."))]
        for key in dropped_more:
            converted.pop(key)
        return converted, sorted(dropped + dropped_more), fmt
    if fmt == "torchvision":
        converted, dropped = _convert_native(state, "fc.")
        return converted, dropped, fmt
    if fmt == "hf":
        converted, dropped = _convert_hf(state)
        return converted, dropped, fmt
    if fmt == "iabn":
        converted, dropped = _convert_iabn(state)
        return converted, dropped, fmt
    raise WeightsError(f"{source}: unknown checkpoint format {fmt!r}; known: {['auto', *FORMATS]}")


# --------------------------------------------------------------------------------------------- loading


def load_encoder_state(
    encoder: nn.Module,
    state: Mapping[str, Tensor],
    fmt: str = "auto",
    partial: bool = False,
    source: str = "<state dict>",
) -> LoadReport:
    """Convert ``state`` and copy it into ``encoder``; see the module docstring for the rules."""
    converted, dropped, used = convert_state_dict(state, fmt, source)
    converted, rc_only = twin_plain_state(converted, encoder)  # unchanged for an encoder without RC modules
    target = encoder.state_dict()
    missing = sorted(key for key in target
                     if key not in converted and key not in rc_only and not key.endswith("num_batches_tracked"))
    unexpected = sorted(key for key in converted if key not in target)
    mismatched = [
        f"{key}: checkpoint {tuple(converted[key].shape)} vs encoder {tuple(target[key].shape)}"
        for key in converted
        if key in target and converted[key].shape != target[key].shape
    ]
    if mismatched:
        raise WeightsError(f"{source} (format {used}): shape mismatch for {len(mismatched)} keys: " + "; ".join(mismatched[:5]))
    report = LoadReport(
        path=source,
        format=used,
        loaded=sorted(key for key in converted if key in target),
        missing=missing,
        unexpected=unexpected,
        dropped=dropped,
    )
    if (missing or unexpected) and not partial:
        raise WeightsError(f"{report}\n(set partial_load=True to accept an incomplete checkpoint)")
    usable = {key: value for key, value in converted.items() if key in target}
    encoder.load_state_dict(usable, strict=False)
    if missing or unexpected:
        log.warning("%s", report)
    return report


def load_encoder_weights(encoder: nn.Module, path: str | Path, fmt: str = "auto", partial: bool = False) -> LoadReport:
    """Read the local checkpoint ``path``, convert it (``fmt`` or detected) and load it into ``encoder``.

    ``path`` may name weights shipped with the package, ``builtin:<name>`` (`sats.models.builtin`)."""
    file, source = resolve_weights(path)
    return load_encoder_state(encoder, read_checkpoint(file), fmt, partial, source=source)


def download_hf_weights(backbone: str, cache_dir: str | Path | None = None, filename: str = "pytorch_model.bin") -> Path:
    """Download the Hugging Face MiT ImageNet weights (``nvidia/mit-b*``) and return the local file.

    Needs network access and ``huggingface_hub`` (imported here only). The result
    loads with ``fmt="hf"``. Never used by the tests.
    """
    if backbone not in HF_MIT_REPOS:
        raise ValueError(f"no Hugging Face weights known for {backbone!r}; known: {sorted(HF_MIT_REPOS)}")
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as error:
        raise ImportError("downloading weights needs 'huggingface_hub' (pip install sats[hub])") from error
    return Path(hf_hub_download(HF_MIT_REPOS[backbone], filename, cache_dir=None if cache_dir is None else str(cache_dir)))
