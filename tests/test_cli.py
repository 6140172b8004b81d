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
    from sats.demo import DEMO_METHODS, DEMO_TASKS, TITLES

    monkeypatch.chdir(tmp_path)  # the demo's data and caches are relative to the working directory
    assert main(["demo", "--quick", "--output", "out", "train.threads=1", "log.progress=false"]) == 0
    out = capsys.readouterr().out
    assert DEMO_TASKS == ("15-5", "15-1") and "sats-noattn" in DEMO_METHODS
    assert "| method | 15-5 old | 15-5 new | 15-5 all | 15-1 old | 15-1 new | 15-1 all | time |" in out
    assert "encoder pretrained (builtin:mit-tiny-synthetic)" in out
    for method in DEMO_METHODS:
        assert f"| {TITLES[method]} | " in out
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["encoder"] == "builtin:mit-tiny-synthetic" and set(summary["tasks"]) == set(DEMO_TASKS)
    assert all(set(summary["tasks"][task]) == set(DEMO_METHODS) for task in DEMO_TASKS)
    assert len(summary["tasks"]["15-1"]["sats"]) == 6 and len(summary["tasks"]["15-1"]["joint"]) == 1
    assert len(summary["seconds"]) == 2 * len(DEMO_METHODS) - 1  # joint: one run for both tasks
    for task in DEMO_TASKS:
        assert (tmp_path / f"out/miou_per_step_{task}.png").stat().st_size > 1000
    config = (tmp_path / "out/15-1/sats-noattn/config.yaml").read_text()
    assert "pretrained: builtin:mit-tiny-synthetic" in config and "lambda_sat: 0.0" in config


def test_demo_from_scratch_keeps_the_random_init_encoder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--quick", "--from-scratch", "--tasks", "15-5", "--methods", "ft", "train.threads=1",
                 "log.progress=false"]) == 0
    assert "encoder trained from scratch" in capsys.readouterr().out
    summary = json.loads((tmp_path / "runs/demo-scratch-quick/summary.json").read_text())  # its own default folder
    assert summary["encoder"] == "scratch" and set(summary["tasks"]) == {"15-5"}
    assert "pretrained: null" in (tmp_path / "runs/demo-scratch-quick/15-5/ft/config.yaml").read_text()


def test_every_registered_method_has_a_demo_config():
    from sats.experiment import load_experiment
    from sats.methods import iter_methods

    for cls in iter_methods():
        if not cls.__module__.startswith("sats."):  # test-only methods registered by other test modules
            continue
        path = CONFIGS / "demo" / f"{cls.name}.yaml"
        assert path.is_file(), f"no demo config for method {cls.name!r}: {path}"
        assert load_experiment(path).method_name == cls.name


def test_list_tasks_and_data_check_of_the_synthetic_dataset(tiny_synthetic, capsys):
    assert main(["list", "tasks", "--dataset", "synthetic"]) == 0  # the VOC task table
    out = capsys.readouterr().out
    assert "15-1" in out and "6 steps" in out
    assert main(["data", "check", "--dataset", "synthetic", "--root", str(tiny_synthetic)]) == 0  # VOC layout
    out = capsys.readouterr().out
    assert "train: 40 images, 0 bad" in out and "val: 12 images, 0 bad" in out


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_generated_dataset_folders_have_the_usual_permissions(tmp_path, umask, mode):
    import os

    from sats.data.synthetic import generate_synthetic

    old = os.umask(umask)
    try:
        root = generate_synthetic(tmp_path / "syn", num_train=2, num_val=1, size=16)
    finally:
        os.umask(old)
    for folder in (root, root / "JPEGImages", root / "SegmentationClassAug", root / "splits"):
        assert folder.stat().st_mode & 0o777 == mode, folder


def test_ensure_synthetic_logs_when_it_generates(tmp_path, caplog, monkeypatch):
    import logging

    from sats.data.synthetic import ensure_synthetic

    logger = logging.getLogger("sats")  # propagate=False once `sats` set up its logging: listen on it directly
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="sats"):
            ensure_synthetic(tmp_path / "syn", num_train=3, num_val=2, size=16)
            generated = [r.getMessage() for r in caplog.records]
            levels = {r.levelno for r in caplog.records}
            caplog.clear()
            ensure_synthetic(tmp_path / "syn", num_train=3, num_val=2, size=16)  # reused: silent
            reused = [r.getMessage() for r in caplog.records]
    finally:
        logger.removeHandler(caplog.handler)
    assert generated[0] == f"generating the synthetic dataset (3 train / 2 val images) in {tmp_path / 'syn'} …"
    assert len(generated) == 2 and generated[1].startswith("synthetic dataset ready in") and " s)" in generated[1]
    assert levels == {logging.INFO} and reused == []
