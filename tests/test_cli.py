"""The `sats` command: list, train with reference flags, test, data check."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sats.cli import main, parse_steps
from conftest import CONFIGS, tiny_overrides


def test_list_commands(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "ft" in out and "joint" in out
    assert main(["list", "tasks", "--dataset", "voc"]) == 0
    out = capsys.readouterr().out
    assert "15-1" in out and "6 steps" in out
    assert main(["list", "backbones"]) == 0
    assert "mit_b2" in capsys.readouterr().out


def test_parse_steps():
    assert parse_steps(None, 6) is None
    assert parse_steps("2", 6) == [2]
    assert parse_steps("2:4", 6) == [2, 3, 4]
    assert parse_steps("3:", 6) == [3, 4, 5]


def test_train_with_reference_flags_then_test(tiny_synthetic, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", str(CONFIGS / "demo/ft.yaml"), *tiny_overrides(tiny_synthetic, run_dir, tmp_path / "cache"),
            "--task", "15-5", "--overlap", "--lr", "0.002"]
    assert main(args) == 0
    assert "| step |" in capsys.readouterr().out
    saved = (run_dir / "config.yaml").read_text()
    assert "lr: 0.002" in saved
    assert main(["test", str(run_dir)]) == 0
    assert "reproduced" in capsys.readouterr().out


def test_config_error_exit_code(capsys):
    assert main(["train", str(CONFIGS / "demo/ft.yaml"), "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


def test_data_check_reports_every_bad_file(tmp_path, capsys):
    from data_helpers import write_voc

    masks = {f"im{i}": np.zeros((8, 8), np.uint8) for i in range(4)}
    masks["im1"][2:4, 2:4] = 30  # out of range for VOC
    root = tmp_path / "voc"
    write_voc(root, masks, {"train": ["im0", "im1", "im2"], "val": ["im3"]})
    (root / "JPEGImages" / "im2.jpg").unlink()
    assert main(["data", "check", "--dataset", "voc", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "im1.png" in out and "im2.jpg" in out and "train: 3 images, 2 bad" in out


@pytest.mark.slow
def test_quick_demo_runs_every_default_method(tmp_path, monkeypatch, capsys):
    from sats.demo import DEMO_METHODS

    monkeypatch.chdir(tmp_path)  # the demo's data and caches are relative to the working directory
    assert main(["demo", "--quick", "--output", "out", "train.threads=1", "log.progress=false"]) == 0
    out = capsys.readouterr().out
    for method in DEMO_METHODS:
        assert f"| demo-{method} | {method} |" in out
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert set(summary["methods"]) == set(DEMO_METHODS)
    assert (tmp_path / "out/miou_per_step.png").stat().st_size > 1000
