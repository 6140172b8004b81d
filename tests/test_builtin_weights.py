"""Weights shipped with the package (``builtin:<name>``): record and hash, loader, package data, the pretrainer."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tomllib
from importlib import resources
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sats.models import builtin
from sats.models.builtin import builtin_file, builtin_names, builtin_record, pretrained_file, resolve_weights
from sats.models.config import ModelConfig
from sats.models.segmenter import build_encoder, build_segmenter
from sats.models.weights import WeightsError, load_encoder_weights
from sats.pretrain import MODEL, NAME, PretrainSettings, encoder_bytes, pretrain

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_file_matches_its_record():
    assert NAME in builtin_names()
    record = builtin_record(NAME)
    data = (builtin.WEIGHTS_DIR / record["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["sha256"] and len(data) == record["bytes"]
    assert len(data) < 1.5 * 2 ** 20  # well under 2 MB
    assert record["name"] == NAME and record["command"].endswith("python -m sats.pretrain")
    # the record describes what the regenerating command does today
    assert record["settings"] == json.loads(json.dumps(dataclasses.asdict(PretrainSettings())))
    assert record["model"] == MODEL
    state = torch.load(builtin.WEIGHTS_DIR / record["file"], map_location="cpu", weights_only=True)
    assert {value.dtype for value in state.values()} == {torch.float16}


def test_the_pretrained_model_is_the_demos_model():
    demo_model = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/_base_/models/mit_tiny.yaml"))["model"]
    assert {key: demo_model[key] for key in MODEL} == MODEL
    assert demo_model["pretrained"] is None  # the configs stay from scratch; `sats demo` adds the encoder


def test_builtin_name_loads_through_the_normal_loader_with_its_key_report(caplog):
    encoder = build_encoder(ModelConfig(**MODEL))
    report = load_encoder_weights(encoder, f"builtin:{NAME}")
    assert report.format == "mit" and not report.missing and not report.unexpected and not report.dropped
    assert len(report.loaded) == len(encoder.state_dict()) and report.path.startswith(f"builtin:{NAME} (")
    state = torch.load(pretrained_file(f"builtin:{NAME}"), map_location="cpu", weights_only=True)
    assert torch.equal(encoder.state_dict()["block1.0.attn.q.weight"], state["block1.0.attn.q.weight"].float())
    with caplog.at_level("INFO"):
        model = build_segmenter(ModelConfig(**MODEL, pretrained=f"builtin:{NAME}"), [16])
    assert f"from builtin:{NAME}" in caplog.text and "0 missing, 0 unexpected" in caplog.text
    assert torch.equal(model.encoder.state_dict()["norm4.weight"], state["norm4.weight"].float())


def test_a_wrong_builtin_name_lists_the_builtin_names():
    with pytest.raises(WeightsError, match=f"no builtin weights named builtin:mit-b0-imagenet; builtin weights: builtin:{NAME}"):
        load_encoder_weights(build_encoder(ModelConfig(**MODEL)), "builtin:mit-b0-imagenet")
    assert resolve_weights("weights/x.pth") == (Path("weights/x.pth"), "weights/x.pth")  # a path stays a path


def test_a_damaged_builtin_file_is_refused(tmp_path, monkeypatch):
    for path in builtin.WEIGHTS_DIR.iterdir():
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.setattr(builtin, "WEIGHTS_DIR", tmp_path)
    data = bytearray((tmp_path / f"{NAME}.pt").read_bytes())
    data[-100] ^= 1
    (tmp_path / f"{NAME}.pt").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="SHA-256 .*, its record says .*python -m sats.pretrain"):
        builtin_file(NAME)


def test_the_weights_are_package_data():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["sats"]
    assert {"weights/*.pt", "weights/*.json"} <= set(data)
    folder = resources.files("sats") / "weights"
    assert (folder / f"{NAME}.pt").is_file() and (folder / f"{NAME}.json").is_file()


def test_pretraining_is_deterministic(tmp_path):
    settings = PretrainSettings(num_train=16, num_val=4, size=(32, 32), crop_size=32, eval_size=32, batch_size=8,
                                epochs=1, warmup_iters=1)
    first, result = pretrain(settings, tmp_path / "world")
    second, _ = pretrain(settings, tmp_path / "world")
    assert first == second and 0.0 <= result["val_miou"] <= 1.0
    other, _ = pretrain(dataclasses.replace(settings, seed=1), tmp_path / "world")
    assert other != first
    encoder = build_encoder(ModelConfig(**MODEL))
    assert encoder_bytes(encoder) == encoder_bytes(encoder)  # the bytes do not depend on a file name
