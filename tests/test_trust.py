"""Results you can trust: caches keyed by content, clean failed starts, verified checkpoints, one writer.

Each test reproduces a way a number could silently depend on something stale or half-done
(docs/reliability.md lists the guarantee each one holds).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CONFIGS, tiny_overrides
from data_helpers import save_mask
from sats.config import ConfigError
from sats.experiment import load_experiment
from sats.data.datasets import DataError
from sats.data.synthetic import ensure_synthetic
from sats.engine.data import ExperimentData
from sats.engine.distributed import DistInfo
from sats.engine.evaluation import retest_run
from sats.engine.results import markdown_table
from sats.engine.rundir import RunDir
from sats.engine.runner import NonFiniteLossError, RunError, Runner

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True, backend=None)


def _synthetic(root: Path, seed: int) -> Path:
    return ensure_synthetic(root, num_train=40, num_val=12, size=(40, 56), seed=seed)


def _cfg(data_root: Path, run_dir: Path, cache: Path, *extra: str, config: str = "demo/ft.yaml", **values):
    return load_experiment(CONFIGS / config, [*tiny_overrides(data_root, run_dir, cache, **values), *extra])


# ------------------------------------------------------------------------------- 1. content-keyed caches
def test_step0_is_not_shared_between_datasets_with_the_same_file_names(tmp_path):
    """Two synthetic datasets of different seeds have identical file names: neither may reuse the other's step 0."""
    cache = tmp_path / "cache"
    a, b = _synthetic(tmp_path / "a" / "voc", 0), _synthetic(tmp_path / "b" / "voc", 1)
    first = Runner(_cfg(a, tmp_path / "run-a", cache, "data.synthetic.seed=0")).run([0])
    second = Runner(_cfg(b, tmp_path / "run-b", cache, "data.synthetic.seed=1")).run([0])
    assert first[0]["shared_step0"] is None and second[0]["shared_step0"] is None
    assert first[0]["data"]["train"]["list"] == second[0]["data"]["train"]["list"]  # same names ...
    assert first[0]["data"]["train"]["content"] != second[0]["data"]["train"]["content"]  # ... other bytes
    assert retest_run(tmp_path / "run-b")


def test_a_moved_dataset_may_reuse_step0_and_a_replaced_file_must_not(tmp_path):
    cache = tmp_path / "cache"
    original = _synthetic(tmp_path / "orig" / "voc", 0)
    first = Runner(_cfg(original, tmp_path / "run-1", cache)).run([0])
    moved = tmp_path / "moved" / "voc"
    shutil.copytree(original, moved)  # new paths, new mtimes, the same bytes
    again = Runner(_cfg(moved, tmp_path / "run-2", cache)).run([0])
    assert again[0]["shared_step0"] is not None and again[0]["iou"] == first[0]["iou"]
    assert again[0]["data"]["root"] == str(moved.resolve())  # the row says which copy it ran on
    # replace one image that step 0 trains on: same name, same size, other pixels
    data = ExperimentData.build(_cfg(moved, tmp_path / "probe", cache), SINGLE)
    image_path = data.train_files.image_paths[int(data.splits[0].train[0])]
    pixels = np.asarray(Image.open(image_path)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(image_path, quality=95)
    changed = Runner(_cfg(moved, tmp_path / "run-3", cache)).run([0])
    assert changed[0]["shared_step0"] is None


def test_a_mask_edited_in_place_changes_the_next_start(tmp_path, caplog):
    """The reproduced case: masks edited in place, and step 1 trained on a stale image list."""
    cache = tmp_path / "cache"
    root = _synthetic(tmp_path / "d" / "voc", 0)
    cfg = _cfg(root, tmp_path / "run", cache)
    before = ExperimentData.build(cfg, SINGLE)
    step1 = set(before.splits[1].train.tolist())
    outside = [i for i in range(len(before.train_files)) if i not in step1]
    edited = outside[:3]
    for i in edited:  # put a step-1 class (16) into three masks that had none
        mask = np.array(Image.open(before.train_files.mask_paths[i]))
        mask[:4, :4] = 16
        save_mask(before.train_files.mask_paths[i], mask)
    with caplog.at_level(logging.INFO, logger="sats"):
        after = ExperimentData.build(cfg, SINGLE)
    assert set(after.splits[1].train.tolist()) == step1 | set(edited)
    assert "3 of 40 masks are not in the cache" in caplog.text
    assert after.step_digest(1, False) != before.step_digest(1, False)
    assert after.step_digest(0, False) != before.step_digest(0, False)  # those masks are step-0 images too


def test_results_record_the_data_the_run_saw(tiny_run):
    cfg = tiny_run()
    rows = Runner(cfg).run([0])
    results = json.loads((cfg.resolved_run_dir() / "results.json").read_text())
    for record in (results["data"], rows[0]["data"]):
        assert record["root"] == str(Path(cfg.data.root).resolve())
        assert record["train"]["images"] == 40 and record["val"]["images"] == 12
        assert len(record["train"]["content"]) == 40 and record["train"]["content"] != record["val"]["content"]


# ------------------------------------------------------------------------------- 2. failed starts
@pytest.mark.parametrize("override, message", [
    ("data.task=15-7", "data.task='15-7'"),
    ("train.lr=nan", "train.lr: must be a finite number"),
    ("train.lr_incremental=inf", "train.lr_incremental: must be a finite number"),
    ("method.lambda_kd=nan", "lambda_kd"),
])
def test_bad_values_fail_validation_naming_the_key(tiny_run, override, message):
    with pytest.raises(ConfigError) as info:
        tiny_run("mib", config="demo/mib.yaml", **dict([override.split("=", 1)]))
    assert message in str(info.value)


def test_a_failed_start_leaves_the_run_directory_usable(tmp_path, tiny_synthetic):
    """A data error, then the command its message suggests, in the same run directory."""
    root = tmp_path / "voc"
    shutil.copytree(tiny_synthetic, root)
    (root / "SegmentationClassAug" / sorted(os.listdir(root / "SegmentationClassAug"))[3]).write_bytes(b"broken")
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match="data.on_error=skip"):
        Runner(_cfg(root, run_dir, tmp_path / "cache", **{"data.dataset": "voc"}))
    assert not run_dir.exists()
    rows = Runner(_cfg(root, run_dir, tmp_path / "cache", **{"data.dataset": "voc", "data.on_error": "skip"})).run([0])
    assert rows[0]["miou"] is not None


def test_a_run_that_trained_nothing_takes_a_changed_config(tiny_run, caplog):
    cfg = tiny_run()
    run_dir = cfg.resolved_run_dir()
    Runner(cfg).close()  # a start that stopped before training
    assert (run_dir / "config.yaml").exists()
    with caplog.at_level(logging.INFO, logger="sats"):
        Runner(tiny_run(**{"train.lr": 0.002})).close()
    assert "has trained nothing yet: its config is replaced (train.lr: 0.003 → 0.002)" in caplog.text
    Runner(tiny_run(**{"train.lr": 0.002})).run([0])
    with pytest.raises(RunError, match="holds a run with another config"):
        Runner(tiny_run(**{"train.lr": 0.004}))


# ------------------------------------------------------------------------------- 3. verified checkpoints
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_rerun_verifies_the_checkpoints_it_skips(tiny_run):
    cfg = tiny_run()
    first = Runner(cfg).run()
    step0 = cfg.resolved_run_dir() / "checkpoints/step0.ckpt"
    _truncate(step0)
    with pytest.raises(RunError) as info:
        Runner(cfg).run()
    message = str(info.value)
    assert "step 0 finished earlier" in message and "truncated" in message and "--redo-step 0" in message
    runner = Runner(cfg)
    runner.redo_from(0)
    assert not step0.exists() and list((step0.parent).glob("discarded-*/step0.ckpt"))
    again = runner.run()
    assert [r["iou"] for r in again] == [r["iou"] for r in first]  # retrained identically (seeded)


def test_a_damaged_shared_step0_is_set_aside_and_retrained(tiny_run, caplog):
    first = Runner(tiny_run(run_name="a")).run([0])
    [shared] = (Path(tiny_run().data.cache_dir) / "step0").iterdir()
    _truncate(shared / "step0.ckpt")
    with caplog.at_level(logging.WARNING, logger="sats"):
        second = Runner(tiny_run(run_name="b")).run([0])
    assert "shared step-0 checkpoint is damaged" in caplog.text
    assert second[0]["shared_step0"] is None and second[0]["iou"] == first[0]["iou"]
    assert list(shared.parent.glob(f"{shared.name}.damaged-*"))
    third = Runner(tiny_run(run_name="c")).run([0])  # the retrained entry is shared again
    assert third[0]["shared_step0"] == shared.name


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_sats_test_only_reads_the_run_directory(tiny_run, capsys):
    cfg = tiny_run()
    Runner(cfg).run()
    run_dir = cfg.resolved_run_dir()
    before = _snapshot(run_dir)
    assert retest_run(run_dir)
    assert _snapshot(run_dir) == before  # no log, lock or config written (works on a read-only copy)
    assert "reproduced" in capsys.readouterr().out


def test_sats_test_names_a_missing_checkpoint_before_printing(tiny_run, capsys):
    cfg = tiny_run()
    Runner(cfg).run()
    (cfg.resolved_run_dir() / "checkpoints/step1.ckpt").unlink()
    with pytest.raises(RunError, match=r"step 1 is recorded in results.json but its checkpoint .*step1.ckpt is missing"):
        retest_run(cfg.resolved_run_dir())
    assert "| step |" not in capsys.readouterr().out


def test_visualize_refuses_to_drop_a_step_without_checkpoint(tiny_run):
    from sats.report.visualize import open_run, predict_grid

    cfg = tiny_run()
    Runner(cfg).run()
    (cfg.resolved_run_dir() / "checkpoints/step0.ckpt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step\(s\) \[0\]"):
        predict_grid(open_run(cfg.resolved_run_dir(), "cpu"), num_images=1)


# ------------------------------------------------------------------------------- 4. one writer
_HOLDER = textwrap.dedent("""
    import sys, time
    from sats.engine.rundir import RunDir
    RunDir(sys.argv[1]).lock()
    print("locked", flush=True)
    time.sleep(120)
""")


def test_one_run_directory_has_one_writer(tiny_run):
    cfg = tiny_run()
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(cfg.resolved_run_dir())], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=rf"is in use by another sats process \(PID {holder.pid} "):
            Runner(cfg)
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed holder never leaves a stale lock
        holder.wait()
    assert Runner(cfg).run([0])[0]["miou"] is not None


def test_the_lock_is_released_after_run_and_taken_again(tiny_run):
    cfg = tiny_run()
    runner = Runner(cfg)
    runner.run([0])
    other = RunDir(cfg.resolved_run_dir())
    other.lock()  # free after run() ...
    with pytest.raises(RunError, match="in use"):
        runner.run([1])  # ... and a held lock stops a second run() too
    other.unlock()
    assert len(runner.run([1])) == 2


# ------------------------------------------------------------------------------- 5. non-finite policy
def test_too_many_skipped_iterations_fail_the_step(tiny_run):
    import test_engine  # noqa: F401  (registers the test-nan method)

    cfg = tiny_run("test-nan", **{"method.fail_at": 2, "train.on_nonfinite": "skip", "train.max_skipped_fraction": 0.0,
                                  "train.share_step0": False})
    with pytest.raises(NonFiniteLossError, match=r"step 0: 1 of \d+ iterations .* more than "
                                                 r"train.max_skipped_fraction=0; the step is not saved"):
        Runner(cfg).run()
    assert not (cfg.resolved_run_dir() / "checkpoints/step0.ckpt").exists()


def test_the_table_shows_skipped_iterations():
    rows = [{"step": 0, "old": 0.5, "new": None, "all": 0.5, "miou": 0.5, "pixel_acc": 0.9, "train_time_s": 1.0,
             "train_images_per_s": 3.0, "nonfinite_skipped": 2, "class_ids": [0], "class_names": ["bg"], "iou": [0.5]}]
    table = markdown_table({"name": "x"}, rows)
    assert "| skipped |" in table and "| 2 |" in table
    rows[0]["nonfinite_skipped"] = 0
    assert "skipped" not in markdown_table({"name": "x"}, rows)


def test_redo_step_from_the_command_line(tiny_synthetic, tmp_path, capsys):
    from sats.cli import main

    args = ["train", str(CONFIGS / "demo/ft.yaml"), *tiny_overrides(tiny_synthetic, tmp_path / "run", tmp_path / "c")]
    assert main(args) == 0
    _truncate(tmp_path / "run/checkpoints/step1.ckpt")
    capsys.readouterr()
    assert main(args) == 4
    err = capsys.readouterr().err
    assert "step 1 finished earlier" in err and "--redo-step 1" in err and "Traceback" not in err
    assert main([*args, "--redo-step", "1"]) == 0
    assert [p.name for p in (tmp_path / "run/checkpoints").glob("discarded-*/*")] == ["step1.ckpt"]


def test_no_progress_bar_records_when_stderr_is_not_a_terminal(tiny_synthetic, tmp_path, capsys, monkeypatch):
    from sats import progress
    from sats.cli import main

    args = ["train", str(CONFIGS / "demo/ft.yaml"),
            *tiny_overrides(tiny_synthetic, tmp_path / "run", tmp_path / "c", **{"log.progress": True}), "--steps", "0"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "epoch 2/2" in err  # one log line per epoch instead of bar records
    monkeypatch.setattr(progress, "interactive", lambda: True)  # on a terminal the bars are drawn
    assert main([*args[:-1], "1"]) == 0
    assert "\r" in capsys.readouterr().err


def test_identical_runs_share_the_threshold_cache(tiny_run, caplog):
    """The old model is keyed by its weights, not by its checkpoint file (which holds timings)."""
    for name in ("a", "b"):
        with caplog.at_level(logging.INFO, logger="sats"):
            caplog.clear()
            Runner(tiny_run("plop", config="demo/plop.yaml", run_name=name, **{"train.share_step0": False})).run()
    assert "pseudo-label thresholds taken from the cache" in caplog.text
