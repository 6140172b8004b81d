"""`sats weights get|convert|check` (sats.models.zoo) with checkpoints served by a local HTTP server."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch

import sats.models.zoo as zoo
from archive_helpers import http_server, sha256
from conftest import CONFIGS
from sats.cli import main
from sats.models import detect_format, read_checkpoint
from sats.models.config import ModelConfig
from sats.models.segmenter import build_encoder
from sats.models.resnet import ResNetEncoder
from test_weights import to_hf_hub_names, to_iabn_names

HF_PATH = "/nvidia/mit-b0/resolve/main/pytorch_model.bin"


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def saved(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mit_b0() -> torch.nn.Module:
    torch.manual_seed(0)
    encoder = build_encoder(ModelConfig(backbone="mit_b0"))
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 0.2)
    return encoder


@pytest.fixture(scope="module")
def resnet50() -> torch.nn.Module:
    torch.manual_seed(0)
    return ResNetEncoder("resnet50")


def hf_checkpoint(encoder: torch.nn.Module) -> bytes:
    state = to_hf_hub_names(encoder.state_dict(), "segformer.")
    return saved({**state, "classifier.weight": torch.zeros(1000, 256), "classifier.bias": torch.zeros(1000)})


def test_get_mit_b0_converts_the_hub_file_to_the_official_layout(mit_b0, tmp_path, capsys):
    with http_server({HF_PATH: hf_checkpoint(mit_b0)}) as server:
        args = ["weights", "get", "mit_b0", "--url", server.url + HF_PATH, "--dir", str(tmp_path / "pretrained")]
        assert main(args) == 0
        out = capsys.readouterr().out
        assert "0 missing, 0 unexpected, 2 dropped" in out and "no published hash" in out
        target = tmp_path / "pretrained" / "mit_b0.pth"
        state = read_checkpoint(target)
        assert detect_format(state.keys()) == "mit" and not any(k.startswith("head") for k in state)
        for key, value in mit_b0.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
        record = json.loads((tmp_path / "pretrained" / "mit_b0.pth.json").read_text())
        assert record["sha256"] == sha256(target) and record["converted_from"] == "hf"
        requests = len(server.requests)
        assert main(args) == 0  # already there: checked, nothing downloaded
        assert "nothing to do" in capsys.readouterr().out and len(server.requests) == requests
    assert main(["weights", "check", "mit_b0", str(target)]) == 0
    assert "matches the SHA-256 recorded in mit_b0.pth.json" in capsys.readouterr().out


def test_get_refuses_a_checkpoint_that_does_not_fit(mit_b0, tmp_path, capsys):
    b1 = build_encoder(ModelConfig(backbone="mit_b1"))
    with http_server({HF_PATH: hf_checkpoint(b1)}) as server:
        assert main(["weights", "get", "mit_b0", "--url", server.url + HF_PATH, "--dir", str(tmp_path)]) == 4
    assert "shape mismatch" in capsys.readouterr().err and not (tmp_path / "mit_b0.pth").exists()


def test_convert_and_check_report_the_keys(mit_b0, tmp_path, capsys):
    official = tmp_path / "mit_b0_official.pth"
    official.write_bytes(saved({**mit_b0.state_dict(), "head.weight": torch.zeros(1000, 256),
                                "head.bias": torch.zeros(1000)}))
    out = tmp_path / "mit_b0.pth"
    assert main(["weights", "convert", "mit_b0", str(official), "-o", str(out)]) == 0
    assert "2 dropped" in capsys.readouterr().out and "head.weight" not in read_checkpoint(out)
    partial = tmp_path / "partial.pth"
    state = dict(mit_b0.state_dict())
    state.pop("norm4.weight")
    partial.write_bytes(saved(state))
    assert main(["weights", "check", "mit_b0", str(partial)]) == 1
    report = capsys.readouterr().out
    assert "1 missing" in report and "missing: norm4.weight" in report and "no published hash" in report
    assert main(["weights", "convert", "mit_b0", str(partial), "-o", str(tmp_path / "p.pth")]) == 4
    assert "norm4.weight" in capsys.readouterr().err
    other = build_encoder(ModelConfig(backbone="mit_b0"))
    (tmp_path / "other.pth").write_bytes(saved(other.state_dict()))
    assert main(["weights", "convert", "mit_b0", str(tmp_path / "other.pth"), "-o", str(out)]) == 4
    assert "holds other weights: pass --force" in capsys.readouterr().err
    assert main(["weights", "convert", "mit_b0", str(tmp_path / "other.pth"), "-o", str(out), "--force"]) == 0


def test_check_a_config_s_encoder(tmp_path, capsys):
    from sats.experiment import load_experiment

    config = str(CONFIGS / "demo" / "ft.yaml")
    encoder = build_encoder(load_experiment(config, ["model.pretrained=null"]).model)
    (tmp_path / "tiny.pth").write_bytes(saved(encoder.state_dict()))
    assert main(["weights", "check", config, f"model.pretrained={tmp_path / 'tiny.pth'}"]) == 0
    assert "0 missing, 0 unexpected" in capsys.readouterr().out


def test_resnet_iabn_file_is_kept_as_published_and_torchvision_hash_is_checked(resnet50, tmp_path, monkeypatch,
                                                                               capsys):
    entry = zoo.WEIGHTS["resnet101"]
    monkeypatch.setitem(zoo.WEIGHTS, "resnet101", dataclasses.replace(entry, model={"backbone": "resnet50"}))
    iabn = saved(to_iabn_names(resnet50.state_dict()))
    torchvision = saved(resnet50.state_dict())
    with http_server({"/r.pth.tar": iabn, "/tv.pth": torchvision}) as server:
        assert main(["weights", "get", "resnet101", "--url", server.url + "/r.pth.tar", "--dir", str(tmp_path)]) == 0
        assert (tmp_path / "resnet101_iabn_sync.pth.tar").read_bytes() == iabn
        assert "(format iabn); 0 missing, 0 unexpected" in capsys.readouterr().out
        assert main(["weights", "get", "resnet101", "--source", "torchvision", "--url", server.url + "/tv.pth",
                     "--dir", str(tmp_path)]) == 7
    err = capsys.readouterr().err
    assert "sha256" in err and "expected 63fe2227" in err and not (tmp_path / "resnet101-63fe2227.pth").exists()


def test_unknown_names_and_sources(capsys):
    assert main(["weights", "get", "vit_b16"]) == 4
    assert "no pretrained encoder named 'vit_b16'; known: mit_b0" in capsys.readouterr().err
    assert main(["weights", "get", "mit_b2", "--source", "official"]) == 4
    assert "no direct download" in capsys.readouterr().err
    assert main(["weights", "list"]) == 0
    assert "pretrained/resnet101_iabn_sync.pth.tar" in capsys.readouterr().out
