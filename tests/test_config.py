"""Config loading: _base_ chains, overrides, reference flags, and clear errors for bad keys/values."""

from pathlib import Path

import pytest
import torch

from sats.config import ConfigError, ExperimentConfig
from sats.experiment import load_experiment

from sats.reference_flags import parse_overrides

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_base_chain_and_overrides():
    cfg = load_experiment(CONFIGS / "demo/ft.yaml", ["data.task=15-1", "train.lr=0.5"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.data.dataset == "synthetic" and cfg.data.task == "15-1"  # from _base_/datasets + override
    assert cfg.model.backbone == "mit_custom" and cfg.model.embed_dims == [16, 32, 64, 128]
    assert cfg.train.optimizer == "adamw" and cfg.train.lr == 0.5
    assert cfg.method["name"] == "ft" and cfg.method["reduction"] == "all_pixels"


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ConfigError, match="lrr"):
        load_experiment(CONFIGS / "demo/ft.yaml", ["train.lrr=0.1"])


def test_bad_value_type_is_rejected():
    with pytest.raises(ConfigError, match="epochs"):
        load_experiment(CONFIGS / "demo/ft.yaml", ["train.epochs=many"])


@pytest.mark.parametrize("override, key", [("train.amp=fp8", "train.amp"), ("data.eval_mode=tiles", "data.eval_mode"),
                                           ("data.dataset=coco", "data.dataset"), ("model.backbone=vit", "backbone")])
def test_bad_choice_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_experiment(CONFIGS / "demo/ft.yaml", [override])


def test_unknown_method_and_method_key():
    with pytest.raises(ConfigError, match="unknown method"):
        load_experiment(CONFIGS / "demo/ft.yaml", ["method.name=nope"])
    with pytest.raises(ConfigError, match="lambda_kdd"):
        load_experiment(CONFIGS / "demo/ft.yaml", ["method.lambda_kdd=3"])


def test_reference_flags_map_to_keys():
    assert parse_overrides(["--task", "15-1", "--lr=0.001", "--overlap", "--method", "MiB", "train.seed=3"]) == [
        "data.task=15-1", "train.lr=0.001", "data.overlap=true", "method.name=mib", "train.seed=3"]
    with pytest.raises(ConfigError, match="--bogus"):
        parse_overrides(["--bogus", "1"])


def test_circular_base_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_experiment(tmp_path / "a.yaml")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_experiment(tmp_path / "bad.yaml")


def test_every_config_file_validates():
    files = [p for p in CONFIGS.rglob("*.yaml") if "_base_" not in p.parts and not p.name.startswith("_")]
    assert files
    for path in files:
        load_experiment(path)


def test_amp_modes_resolve_per_device():
    from sats.config import TrainConfig
    from sats.engine.optim import amp_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype(TrainConfig(amp="auto"), cpu) is None  # the paper configs run on a CPU in fp32
    assert amp_dtype(TrainConfig(amp="auto"), cuda) is torch.float16  # ... and with the reference's O1 on a GPU
    assert amp_dtype(TrainConfig(amp="bf16"), cpu) is torch.bfloat16
    assert amp_dtype(TrainConfig(amp="off"), cuda) is None
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        amp_dtype(TrainConfig(amp="fp16"), cpu)
