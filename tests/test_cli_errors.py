"""Expected errors of the `sats` command are one message and an exit code; -v adds the traceback."""

from __future__ import annotations

import logging
import shutil

import pytest

import sats.cli
from sats.cli import main
from conftest import CONFIGS, tiny_overrides

FT = str(CONFIGS / "demo/ft.yaml")


def _errors():
    from sats.config import ConfigError
    from sats.data.datasets import DataError
    from sats.engine.checkpoint import CheckpointError
    from sats.engine.runner import NonFiniteGradientError, NonFiniteLossError, RunError
    from sats.methods._importance import MissingImportanceError
    from sats.models.weights import WeightsError

    return [
        (ConfigError("train.lr: must be > 0"), 2),
        (DataError("/data/voc/SegmentationClassAug/x.png", "unreadable mask file"), 3),
        (RunError("runs/x holds a run with another config (train.lr: 0.01 → 0.02)"), 4),
        (CheckpointError("runs/x/checkpoints/step0.ckpt: truncated (12 of 40 bytes)"), 4),
        (WeightsError("weights.pth: no encoder keys"), 4),
        (MissingImportanceError("step 1 of ewc found no importance of step 0"), 4),
        (NonFiniteLossError("step 1 epoch 2 iteration 7: loss term 'kd' is nan"), 5),
        (NonFiniteGradientError("step 1 epoch 2 iteration 7: gradient of head.weight is inf"), 5),
        (FileNotFoundError(2, "No such file or directory", "data/voc/splits/val.txt"), 6),
        (PermissionError(13, "Permission denied", "runs/x"), 6),
    ]


def _raise(exc):
    def command(args, extra):
        raise exc
    return command


@pytest.mark.parametrize("index", range(10))
def test_expected_errors_are_one_message_and_an_exit_code(index, monkeypatch, capsys):
    exc, code = _errors()[index]
    monkeypatch.setattr(sats.cli, "cmd_train", _raise(exc))
    assert main(["train", FT]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("sats: error:") == 1 and err.startswith("sats: error: ")
    assert str(exc) in err.splitlines()[0]
    for argv in (["-v", "train", FT], ["train", FT, "-v"]):  # -v before or after the command
        assert main(argv) == code
        err = capsys.readouterr().err
        assert "Traceback" in err and type(exc).__name__ in err and err.count("sats: error:") == 1


def test_non_finite_gradient_is_a_non_finite_loss_error():
    from sats.engine.runner import NonFiniteGradientError, NonFiniteLossError

    assert issubclass(NonFiniteGradientError, NonFiniteLossError)


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    monkeypatch.setattr(sats.cli, "cmd_train", _raise(ZeroDivisionError("a bug")))
    with pytest.raises(ZeroDivisionError):
        main(["train", FT])


@pytest.fixture
def detach_file_logs():
    """A run leaves its train.log handler on the "sats" logger; close it after the test."""
    yield
    logger = logging.getLogger("sats")
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)
        handler.close()


def test_a_bad_mask_stops_training_with_one_message(tiny_synthetic, tmp_path, capsys, detach_file_logs):
    root = tmp_path / "voc"
    shutil.copytree(tiny_synthetic, root)  # a copy: the session's dataset stays intact
    bad = root / "SegmentationClassAug" / "train_00003.png"
    bad.write_bytes(b"not a png")
    args = ["train", FT, *tiny_overrides(root, tmp_path / "run", tmp_path / "cache"), "data.check=true"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "sats: error:" in x]  # printed once, not again by the log handler
    assert line.startswith("sats: error: ")
    assert err.count("nothing was trained") == 1 and str(bad) in err
    assert "sats: hint" not in err  # the message already says what to do
    assert main(["-v", *args]) == 3
    err = capsys.readouterr().err
    assert "Traceback" in err and "DataError" in err and err.count("sats: error:") == 1


def test_an_error_during_training_is_also_written_to_train_log(tiny_synthetic, tmp_path, capsys, detach_file_logs):
    run_dir = tmp_path / "run"
    args = ["train", FT, *tiny_overrides(tiny_synthetic, run_dir, tmp_path / "cache"), "train.lr=1e30"]
    assert main(args) == 5  # the weights blow up: NonFiniteLossError
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("non-finite loss") == 1 and err.count("sats: error:") == 1
    assert "sats: hint: lower train.lr" in err
    log_text = (run_dir / "train.log").read_text()
    assert "ERROR error: non-finite loss" in log_text and "Traceback" in log_text


def test_missing_dataset_and_run_dir_errors_name_the_path(tmp_path, capsys):
    assert main(["data", "check", "--dataset", "voc", "--root", str(tmp_path / "nope")]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(tmp_path / "nope") in err
    assert main(["train", FT, f"run_dir={tmp_path / 'never'}", "--test"]) == 4
    err = capsys.readouterr().err
    assert "Traceback" not in err and "train it first" in err
