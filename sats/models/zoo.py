"""Named pretrained encoders: where each comes from, the file the configs expect, get / convert / check.

``mit_b0`` … ``mit_b5``: the ImageNet-1k MiT encoders. ``sats weights get mit_bX`` downloads the
Hugging Face copy (``nvidia/mit-bX``, ``pytorch_model.bin``), converts it to the official MiT
layout and writes ``pretrained/mit_bX.pth`` (what ``configs/_base_/models/segformer_mit-b2.yaml``
names). The official NVlabs files (Google Drive / OneDrive folders, no direct URL) are
already in that layout: ``sats weights convert mit_bX FILE`` checks one and writes the target.

``resnet101``: the In-Place-ABN ImageNet ResNet-101 (``resnet101_iabn_sync.pth.tar``, the file
MiB and PLOP start from, kept as published: sats converts it when loading), or with
``--source torchvision`` torchvision's ``resnet101-63fe2227.pth`` (ReLU, not Leaky ReLU).

Every written file is loaded into the encoder it is for; a missing or unexpected key stops with
the key report (`sats.models.weights.LoadReport`). No published SHA-256 exists for these files
except torchvision's (its file name holds the first 8 hex digits): `get` checks what is known and
records the SHA-256 of what it wrote in ``<file>.json`` next to it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from sats.download import Remote, check_file, download, file_hashes, resolve_urls
from sats.io import write_bytes_atomic, write_json_atomic
from sats.models.config import ModelConfig
from sats.models.weights import FORMATS, LoadReport, WeightsError, load_encoder_state, read_checkpoint

log = logging.getLogger(__name__)

__all__ = ["WEIGHTS", "WeightEntry", "WeightSource", "check_weights", "convert_weights", "get_weights"]


@dataclass(frozen=True)
class WeightSource:
    """One place a named encoder can come from.

    key: the ``--source`` name. remote: the downloadable file (None: no direct URL; ``page`` says
    where to get it by hand). format: its checkpoint layout (`sats.models.weights.FORMATS`).
    convert: whether `get` rewrites it in the entry's layout (else the file is kept as published).
    target: the file it is written to (None: the entry's target). note: printed after `get`.
    """

    key: str
    remote: Remote | None
    format: str
    page: str
    convert: bool = True
    target: str | None = None
    note: str = ""


@dataclass(frozen=True)
class WeightEntry:
    """A named encoder: the model config it fills, the file the configs expect, its sources (first = default)."""

    name: str
    model: Mapping[str, Any]
    target: str
    sources: tuple[WeightSource, ...]
    description: str = ""
    converted: str = field(default="")  # default output of `convert` (default: target)

    def source(self, key: str | None) -> WeightSource:
        if key is None:
            return self.sources[0]
        for source in self.sources:
            if source.key == key:
                return source
        raise WeightsError(f"{self.name}: no source {key!r}; known: {[s.key for s in self.sources]}")

    def encoder(self) -> torch.nn.Module:
        from sats.models.segmenter import build_encoder

        return build_encoder(ModelConfig(**self.model))


_NVLABS = ("the NVlabs/SegFormer README's 'ImageNet-1K pretrained weights' (Google Drive / OneDrive folder); "
           "download mit_bX.pth by hand, then `sats weights convert mit_bX FILE`")


def _mit(i: int) -> WeightEntry:
    name = f"mit_b{i}"
    hf = Remote(f"nvidia-mit-b{i}-pytorch_model.bin",
                (f"https://huggingface.co/nvidia/mit-b{i}/resolve/main/pytorch_model.bin",),
                source="no published hash")
    return WeightEntry(
        name, {"backbone": name, "drop_path": 0.0}, f"pretrained/{name}.pth",
        (WeightSource("hf", hf, "hf", f"https://huggingface.co/nvidia/mit-b{i}"),
         WeightSource("official", None, "mit", _NVLABS.replace("mit_bX", name))),
        f"MiT-B{i}, ImageNet-1k (SegFormer)")


_TORCHVISION = Remote("resnet101-63fe2227.pth", ("https://download.pytorch.org/models/resnet101-63fe2227.pth",),
                      hashes={"sha256": "63fe2227"}, source="torchvision: the file name holds the SHA-256's start")
_IABN = Remote("resnet101_iabn_sync.pth.tar",
               ("https://github.com/arthurdouillard/CVPR2021_PLOP/releases/download/v1.0/resnet101_iabn_sync.pth.tar",
                "https://github.com/Ze-Yang/LGKD/releases/download/v1.0/resnet101_iabn_sync.pth.tar"),
               source="no published hash (the PLOP release's copy of the In-Place-ABN file)")

#: every named encoder, by name
WEIGHTS: dict[str, WeightEntry] = {e.name: e for e in (
    *(_mit(i) for i in range(6)),
    WeightEntry(
        "resnet101", {"backbone": "resnet101", "norm": "bn", "activation": "leaky_relu"},
        "pretrained/resnet101_iabn_sync.pth.tar",
        (WeightSource("iabn", _IABN, "iabn", "https://github.com/mapillary/inplace_abn", convert=False),
         WeightSource("torchvision", _TORCHVISION, "torchvision", "https://pytorch.org/vision/stable/models.html",
                      convert=False, target="pretrained/resnet101-63fe2227.pth",
                      note="torchvision's ResNet uses ReLU: model.pretrained=pretrained/resnet101-63fe2227.pth "
                           "model.activation=relu")),
        "ResNet-101, ImageNet-1k (In-Place-ABN, Leaky ReLU; or torchvision)", converted="pretrained/resnet101.pth"),
)}


def entry(name: str) -> WeightEntry:
    """The `WeightEntry` ``name``; WeightsError listing the known names otherwise."""
    if name not in WEIGHTS:
        raise WeightsError(f"no pretrained encoder named {name!r}; known: {', '.join(WEIGHTS)}")
    return WEIGHTS[name]


def describe_weights() -> str:
    """One line per named encoder: the file the configs expect and its sources (`sats weights list`)."""
    lines = []
    for item in WEIGHTS.values():
        sources = "; ".join(f"{s.key}: {s.remote.describe() if s.remote else 'by hand (' + s.page.split(' (')[0] + ')'}"
                            for s in item.sources)
        lines.append(f"{item.name:10s} {item.target:40s} {item.description} [{sources}]")
    return "\n".join(lines)


def _relocate(path: str, root: str | os.PathLike[str] | None) -> Path:
    """``pretrained/x`` under another folder than ``pretrained`` when ``root`` is given."""
    return Path(path) if root is None else Path(root) / Path(path).name


# ------------------------------------------------------------------------------------------------ get

@dataclass
class WeightsResult:
    """What `get_weights` / `convert_weights` / `check_weights` did."""

    path: Path
    report: LoadReport
    sha256: str
    hash_status: str = ""
    note: str = ""

    @property
    def clean(self) -> bool:
        """No missing and no unexpected key."""
        return not (self.report.missing or self.report.unexpected)

    def summary(self) -> str:
        """The key report, the SHA-256 and what it was compared with, and the note."""
        lines = [str(self.report), f"{self.path}: sha256 {self.sha256} ({self.hash_status})"]
        return "\n".join(lines + ([self.note] if self.note else []))


def _strict(entry_: WeightEntry, state: Mapping[str, torch.Tensor], fmt: str, source: str) -> tuple[dict, LoadReport]:
    """Load ``state`` into the entry's encoder (WeightsError on any missing/unexpected key); the encoder's state."""
    encoder = entry_.encoder()
    report = load_encoder_state(encoder, state, fmt, partial=False, source=source)
    loaded = set(report.loaded)
    return {k: v for k, v in encoder.state_dict().items() if k in loaded}, report


def _serialize(state: Mapping[str, torch.Tensor]) -> tuple[memoryview, str]:
    """(bytes of ``torch.save(state)``, their SHA-256)."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    data = buffer.getbuffer()
    return data, hashlib.sha256(data).hexdigest()


def get_weights(name: str, source: str | None = None, *, url: str | None = None, mirrors: Sequence[str] = (),
                root: str | os.PathLike[str] | None = None, force: bool = False, progress: bool = True
                ) -> WeightsResult:
    """Download encoder ``name`` from ``source`` (default: its first) and write the file the configs expect.

    ``root`` replaces the ``pretrained`` folder. A file already there is checked (known hash,
    strict load) and kept unless ``force``. Downloads resume; `sats.download.DownloadError` when
    no URL works; WeightsError when the file does not fill the encoder exactly.
    """
    item = entry(name)
    src = item.source(source)
    out = _relocate(src.target or item.target, root)
    if out.is_file() and not force:
        result = check_weights(name, out, src.format if not src.convert else "auto")
        if src.remote is not None and not src.convert and src.remote.hashes:
            check_file(out, replace(src.remote, filename=out.name), progress)
            result.hash_status = f"matches the published {src.remote.describe()}"
        result.note = f"{out} is already there; nothing to do (--force downloads it again)"
        return result
    if src.remote is None:
        raise WeightsError(f"{name} from {src.key}: no direct download; get it from {src.page}")
    urls = resolve_urls(src.remote, url, mirrors)
    if not src.convert:  # kept as published: download straight to the target name
        remote = replace(src.remote, filename=out.name)
        if force and out.is_file():
            out.unlink()
        path, record = download(remote, out.parent, urls, progress)
        try:
            _, report = _strict(item, read_checkpoint(path), src.format, str(path))
        except WeightsError:
            log.error("%s does not fit the %s encoder; it is left in place for inspection", path, name)
            raise
        sha256 = record["sha256"]
        provenance = {"url": record.get("url"), "sha256": sha256, "size": record["size"]}
    else:
        downloads = out.parent / "downloads"
        path, record = download(src.remote, downloads, urls, progress)
        state, report = _strict(item, read_checkpoint(path), src.format, str(path))
        data, sha256 = _serialize(state)
        write_bytes_atomic(out, [data], what="weights file")
        provenance = {"url": record.get("url"), "download": str(path), "download_sha256": record["sha256"],
                      "sha256": sha256, "converted_from": src.format}
    write_json_atomic(out.with_name(out.name + ".json"), {"name": name, "source": src.key, **provenance,
                                                          "tensors": len(report.loaded)})
    status = (f"matches the published {src.remote.describe()}" if src.remote.hashes and not src.convert
              else "no published hash: SHA-256 recorded in " + out.name + ".json")
    return WeightsResult(out, report, sha256, status, src.note)


# -------------------------------------------------------------------------------------------- convert

def convert_weights(name: str, checkpoint: str | os.PathLike[str], output: str | os.PathLike[str] | None = None,
                    fmt: str = "auto", force: bool = False) -> WeightsResult:
    """Convert a foreign checkpoint of encoder ``name`` to the layout sats loads (our encoder's names).

    Accepts every format `sats.models.weights` reads (official MiT, mmseg, HF, torchvision,
    In-Place-ABN, a sats checkpoint). The result must fill the encoder exactly (WeightsError with
    the key report otherwise). ``output`` defaults to the entry's ``converted`` file (MiT: the
    file the configs expect). An existing different output is kept unless ``force``.
    """
    item = entry(name)
    if fmt not in ("auto", *FORMATS):
        raise WeightsError(f"--format {fmt!r}: expected auto or one of {list(FORMATS)}")
    src = Path(checkpoint)
    state, report = _strict(item, read_checkpoint(src), fmt, str(src))
    out = Path(output) if output is not None else Path(item.converted or item.target)
    data, sha256 = _serialize(state)
    if out.is_file() and not force and file_hashes(out, progress=False)["sha256"] != sha256:
        raise WeightsError(f"{out} exists and holds other weights: pass --force to replace it, or -o OTHER")
    write_bytes_atomic(out, [data], what="weights file")
    write_json_atomic(out.with_name(out.name + ".json"), {"name": name, "source": str(src), "converted_from":
                                                          report.format, "sha256": sha256,
                                                          "tensors": len(report.loaded)})
    note = "" if str(out) == item.target else f"use it with model.pretrained={out}"
    return WeightsResult(out, report, sha256, "written", note)


# ---------------------------------------------------------------------------------------------- check

def check_weights(name: str, path: str | os.PathLike[str] | None = None, fmt: str = "auto",
                  model: ModelConfig | None = None) -> WeightsResult:
    """Load ``path`` (default: the file the configs expect) into encoder ``name`` and report the keys.

    ``model``: build that config's encoder instead of the entry's (``sats weights check CONFIG``).
    Never raises for missing/unexpected keys (the report lists them); WeightsError for an
    unreadable file or a shape mismatch.
    """
    if model is not None:
        from sats.models.segmenter import build_encoder

        encoder = build_encoder(model)
        file = Path(path) if path is not None else Path(model.pretrained or "")
        if not str(file) or str(file) == ".":
            raise WeightsError("the config sets no model.pretrained file to check")
    else:
        item = entry(name)
        encoder = item.encoder()
        file = Path(path) if path is not None else Path(item.target)
    report = load_encoder_state(encoder, read_checkpoint(file), fmt, partial=True, source=str(file))
    sha256 = file_hashes(file, progress=False)["sha256"]
    status = _known_hash_status(name, file, sha256)
    return WeightsResult(file, report, sha256, status)


def _known_hash_status(name: str, file: Path, sha256: str) -> str:
    known = [s.remote for s in WEIGHTS[name].sources if s.remote is not None and s.remote.hashes] \
        if name in WEIGHTS else []
    for remote in known:
        if sha256.startswith(remote.hashes["sha256"]):
            return f"matches the published SHA-256 of {remote.filename}"
    sidecar = file.with_name(file.name + ".json")
    if sidecar.is_file():
        try:
            recorded = json.loads(sidecar.read_text()).get("sha256")
        except ValueError as error:
            raise WeightsError(f"{sidecar}: unreadable record ({error})") from error
        if recorded == sha256:
            return f"matches the SHA-256 recorded in {sidecar.name} when it was written"
        return f"differs from the SHA-256 recorded in {sidecar.name} ({recorded}): the file changed since"
    return "no published hash to compare with"
