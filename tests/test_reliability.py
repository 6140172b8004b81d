"""Failure cases made boring: bad data, bad checkpoints and configs, non-finite gradients, a full disk,
SIGINT/SIGTERM in process, and (slow) distributed equivalence and dead or frozen ranks.

The crash/kill tests of a real `sats train` process are in test_kill_resume.py, the label fuzzing in
test_label_fuzz.py; docs/reliability.md states the guarantees these tests check.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from conftest import CONFIGS, tiny_overrides
from data_helpers import class_mask, save_mask, truncate_file, write_voc
from sats.config import ConfigError
from sats.experiment import load_experiment
from sats.data.datasets import DataError
from sats import io as io_module
from sats.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sats.io import FileError
from sats.engine.checkpoint import load_state_strict as _load_strict
from sats.engine.runner import NonFiniteGradientError, RunError, Runner
from sats.engine.signals import RunInterrupted, StopRequest, StoppableFetch
from sats.losses.ce import cross_entropy
from sats.methods.base import Method, register_method
from sats.models.segmenter import build_segmenter


def _rows(run_dir: Path) -> List[Dict]:
    return json.loads((run_dir / "results.json").read_text())["steps"]


def _numbers(rows: List[Dict]) -> List[Dict]:
    keys = ("iou", "miou", "num_pixels", "iterations", "epoch_losses", "nonfinite_skipped")
    return [{k: r[k] for k in keys} for r in rows]


# ------------------------------------------------------------------------------------------ bad data
GOOD_TRAIN = {f"s0_{i}": [0, 1 + i % 15, 1 + (i + 5) % 15] for i in range(8)}  # step-0 classes
GOOD_TRAIN.update({f"s1_{i}": [0, 16 + i % 5, 1 + i] for i in range(6)})  # new classes (+ an old one)
GOOD_VAL = {f"v{i}": [0, 1 + 3 * i, 16 + i % 5] for i in range(5)}
BAD_TRAIN = ["bad_jpeg", "bad_size", "bad_value", "missing_image"]


def _voc(root: Path, with_bad: bool) -> Path:
    """A 40x32 VOC-layout dataset for 15-5; ``with_bad`` adds one bad file of each kind to the lists."""
    masks = {i: class_mask(c, height=32, width=40, border=True) for i, c in {**GOOD_TRAIN, **GOOD_VAL}.items()}
    train, val = list(GOOD_TRAIN), list(GOOD_VAL)
    if with_bad:
        masks.update({i: class_mask([0, 3, 7], height=32, width=40) for i in [*BAD_TRAIN, "v_truncated"]})
        train[3:3], val[2:2] = BAD_TRAIN, ["v_truncated"]  # in the middle of the lists
    write_voc(root, masks, {"train": train, "val": val})
    if with_bad:
        truncate_file(root / "JPEGImages/bad_jpeg.jpg", keep=0.5)
        truncate_file(root / "JPEGImages/v_truncated.jpg", keep=0.4)
        save_mask(root / "SegmentationClassAug/bad_size.png", class_mask([0, 3], height=30, width=40))
        save_mask(root / "SegmentationClassAug/bad_value.png", class_mask([0, 3, 30], height=32, width=40))
        (root / "JPEGImages/missing_image.jpg").unlink()
        with open(root / "splits/train_aug.txt", "a") as f:  # a list entry whose paths lead nowhere
            f.write("JPEGImages/nowhere.jpg SegmentationClassAug/nowhere.png\n")
    return root


def _voc_run(tmp_path: Path, root: Path, name: str, **extra):
    values = {"data.dataset": "voc", "train.share_step0": False, "log.tensorboard": False, **extra}
    return load_experiment(CONFIGS / "demo/ft.yaml", tiny_overrides(root, tmp_path / name, tmp_path / f"cache-{name}",
                                                                  **values))


def test_bad_files_stop_the_run_before_training_with_every_file_named(tmp_path):
    root = _voc(tmp_path / "dirty", with_bad=True)
    cfg = _voc_run(tmp_path, root, "raise")
    with pytest.raises(DataError) as info:
        Runner(cfg)
    message = str(info.value)
    assert message.startswith("7 bad file(s); nothing was trained")
    for name, problem in [("JPEGImages/bad_jpeg.jpg", "unreadable image file"),
                          ("SegmentationClassAug/bad_size.png", "mask size 40x30 differs from image size 40x32"),
                          ("SegmentationClassAug/bad_value.png", r"mask values [30] outside the classes 0..20"),
                          ("JPEGImages/missing_image.jpg", "missing image file"),
                          ("JPEGImages/nowhere.jpg", "missing image file"),
                          ("SegmentationClassAug/nowhere.png", "missing mask file"),
                          ("JPEGImages/v_truncated.jpg", "unreadable image file")]:
        assert f"{root / name}: {problem}" in message, name
    assert "data.on_error=skip" in message
    assert not cfg.resolved_run_dir().exists()  # a failed start leaves no run directory behind


def test_on_error_skip_leaves_out_bad_files_and_changes_nothing_else(tmp_path, caplog):
    dirty = _voc_run(tmp_path, _voc(tmp_path / "dirty", with_bad=True), "skip", **{"data.on_error": "skip"})
    with caplog.at_level(logging.WARNING, logger="sats"):
        rows = Runner(dirty).run()
    results = json.loads((dirty.resolved_run_dir() / "results.json").read_text())
    assert results["skipped_bad_files"] == {"train": 5, "val": 1}
    assert "leaving out 5 train image(s) with bad files" in caplog.text
    assert "leaving out 1 val image(s) with bad files" in caplog.text
    assert "leaving out" in (dirty.resolved_run_dir() / "train.log").read_text()
    # the same run on a dataset whose lists never had the bad entries: identical numbers
    clean = _voc_run(tmp_path, _voc(tmp_path / "clean", with_bad=False), "clean")
    reference = Runner(clean).run()
    assert _numbers(rows) == _numbers(reference)
    assert json.loads((clean.resolved_run_dir() / "results.json").read_text())["skipped_bad_files"] == {}


# ----------------------------------------------------------------------------- checkpoints and configs
def test_checkpoint_of_another_task_is_refused(tiny_run, tmp_path):
    first = tiny_run("ft", run_name="a", **{"train.share_step0": False})
    Runner(first).run(steps=[0])
    # same head sizes (16 + 5) but two step-0 classes swapped with step-1 ones
    order = "[[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,20],[16,17,18,19,15]]"
    other = tiny_run("ft", run_name="b", **{"data.task": "custom", "data.order": order, "train.share_step0": False})
    runner = Runner(other)
    (other.resolved_run_dir() / "checkpoints").mkdir(parents=True, exist_ok=True)
    (other.resolved_run_dir() / "checkpoints/step0.ckpt").write_bytes(
        (first.resolved_run_dir() / "checkpoints/step0.ckpt").read_bytes())
    with pytest.raises(RunError, match=r"step0\.ckpt: checkpoint of task voc/15-5 with classes .* this run's task "
                                       r"voc/custom has \[\[0, 1, .*, 14, 20\]\]"):
        runner.run(steps=[1])


def test_weights_of_another_model_are_refused_and_nothing_is_loaded(tiny_run, tmp_path):
    cfg = tiny_run("ft")
    model = build_segmenter(cfg.model, [16])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v for k, v in before.items()}
    wrong = next(k for k, v in state.items() if v.ndim == 2)
    state[wrong] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=rf"x\.ckpt: weights do not fit the model \(nothing was loaded\).*"
                                              rf"{wrong} \(3, 3\) vs"):
        _load_strict(model, state, tmp_path / "x.ckpt")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not half-loaded
    state[wrong] = before[wrong]
    del state[next(iter(state))]
    with pytest.raises(CheckpointError, match="missing"):
        _load_strict(model, state, tmp_path / "x.ckpt")


class _Interrupt(Exception):
    pass


def _interrupted_in_epoch_2(cfg, monkeypatch) -> Path:
    """Run step 0 until the loss of its epoch 2 is asked for; returns the epoch checkpoint left."""
    runner = Runner(cfg)
    original = runner.method.loss

    def loss(batch, out, old_out, ctx):
        if ctx.epoch == 1:
            raise _Interrupt()
        return original(batch, out, old_out, ctx)

    monkeypatch.setattr(runner.method, "loss", loss)
    with pytest.raises(_Interrupt):
        runner.run()
    monkeypatch.undo()
    return cfg.resolved_run_dir() / "checkpoints/step0-epoch.ckpt"


def test_truncated_or_foreign_epoch_checkpoint_is_an_error_not_a_restart(tiny_run, monkeypatch):
    cfg = tiny_run("ft", **{"train.share_step0": False})
    path = _interrupted_in_epoch_2(cfg, monkeypatch)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) - 100])
    with pytest.raises(CheckpointError, match=r"step0-epoch\.ckpt is truncated"):
        Runner(cfg).run()
    path.write_bytes(good)
    state = load_checkpoint(path)
    state["per_epoch"] += 1  # as if the training list had changed since
    save_checkpoint(state, path)
    with pytest.raises(RunError, match=r"step0-epoch\.ckpt was written with \d+ iterations per epoch"):
        Runner(cfg).run()


def test_config_values_are_checked_with_the_key_named():
    with pytest.raises(ConfigError, match="train.dist_timeout_s: must be > 0"):
        load_experiment(CONFIGS / "demo/ft.yaml", ["train.dist_timeout_s=0"])
    with pytest.raises(ConfigError, match="train.on_nonfinite"):
        load_experiment(CONFIGS / "demo/ft.yaml", ["train.on_nonfinite=ignore"])
    with pytest.raises(ConfigError, match="data.on_error"):
        load_experiment(CONFIGS / "demo/ft.yaml", ["data.on_error=warn"])


# ------------------------------------------------------------------------------------ non-finite grads
class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@dataclass
class _GradFailParams:
    fail_at: int = 3  # iteration (1-based, within the step) whose gradient is NaN
    fail_step: int = 0


@register_method
class _NaNGradientAtIteration(Method):
    """Test-only: CE whose gradient (not value) is NaN at one iteration of one step."""

    name = "test-nan-grad"
    Params = _GradFailParams
    step0 = None
    calls = 0

    def loss(self, batch, out, old_out, ctx):
        ce = cross_entropy(out.logits, batch.labels)
        self.calls = self.calls + 1 if ctx.step == self.params.fail_step else 0
        return {"ce": _NaNGradient.apply(ce) if self.calls == self.params.fail_at else ce}


def test_nonfinite_gradient_stops_with_step_epoch_iteration_and_parameters(tiny_run):
    cfg = tiny_run("test-nan-grad", **{"method.fail_at": 3, "method.fail_step": 1})
    with pytest.raises(NonFiniteGradientError, match=r"non-finite gradient at step 1, epoch 1, iteration 3 \(every "
                                                     r"loss term finite\), in \d+ parameter\(s\) \['encoder\.") as info:
        Runner(cfg).run()
    step0 = cfg.resolved_run_dir() / "checkpoints/step0.ckpt"
    assert f"rerunning restarts it from the step 0 checkpoint {step0}" in str(info.value) and "ce=" in str(info.value)
    assert step0.exists()


def test_nonfinite_gradient_skip_counts_the_batch_and_keeps_weights_finite(tiny_run):
    cfg = tiny_run("test-nan-grad", **{"method.fail_at": 2, "train.on_nonfinite": "skip",
                                       "train.share_step0": False})
    rows = Runner(cfg).run()
    clean = Runner(tiny_run("ft", run_name="clean", **{"train.share_step0": False})).run()
    assert rows[0]["nonfinite_skipped"] == 1 and rows[1]["nonfinite_skipped"] == 0
    assert rows[0]["iterations"] == clean[0]["iterations"] - 1  # no optimiser or scheduler step for it
    weights = load_checkpoint(cfg.resolved_run_dir() / "checkpoints/step0.ckpt")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert "skipping a batch: non-finite gradient at step 0, epoch 1, iteration 2" in \
        (cfg.resolved_run_dir() / "train.log").read_text()


# ----------------------------------------------------------------------------------------- full disk
class _FullDisk:
    """A binary file whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.f.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


def _fill_disk_when_writing(monkeypatch, target: str, room: int = 1000) -> None:
    """Writes of ``target`` (via the atomic writer) fail with ENOSPC after ``room`` bytes."""
    def full_open(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        return _FullDisk(f, room) if "w" in mode and Path(file).name.startswith(f"{target}.tmp-") else f

    monkeypatch.setattr(io_module, "open", full_open, raising=False)


def test_disk_full_names_the_path_and_keeps_previous_files(tiny_run, monkeypatch):
    cfg = tiny_run("ft", **{"train.share_step0": False})
    run_dir = cfg.resolved_run_dir()
    Runner(cfg).run(steps=[0])
    before = {p: (run_dir / p).read_bytes() for p in ("results.json", "results.md", "checkpoints/step0.ckpt")}

    _fill_disk_when_writing(monkeypatch, "step1.ckpt")
    with pytest.raises(CheckpointError, match=rf"cannot write checkpoint {run_dir}/checkpoints/step1\.ckpt: "
                                              r"No space left on device \(errno 28\)"):
        Runner(cfg).run()
    assert {p: (run_dir / p).read_bytes() for p in before} == before
    assert not (run_dir / "checkpoints/step1.ckpt").exists() and not list(run_dir.rglob("*.tmp-*"))

    monkeypatch.undo()
    _fill_disk_when_writing(monkeypatch, "results.json")
    with pytest.raises(FileError, match=rf"cannot write file {run_dir}/results\.json: No space left on device"):
        Runner(cfg).run()
    assert (run_dir / "results.json").read_bytes() == before["results.json"]  # complete, with step 0 only
    assert not list(run_dir.rglob("*.tmp-*"))

    monkeypatch.undo()  # space again: step 1's row is recovered from its checkpoint, not retrained
    rows = Runner(cfg).run()
    assert [r["step"] for r in rows] == [0, 1] and [r["step"] for r in _rows(run_dir)] == [0, 1]
    assert "step 1 finished before the run stopped" in (run_dir / "train.log").read_text()


# ------------------------------------------------------------------------------------ SIGINT / SIGTERM
@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler for the test, whatever the launching shell left (CI may ignore SIGINT)."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_stop_request_first_signal_sets_a_flag_second_stops_at_once(python_sigint_handler):
    previous = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and stop.name == "SIGTERM" and stop.agreed(torch.device("cpu"))
        with pytest.raises(KeyboardInterrupt):  # the second one: Python's default SIGINT handler
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is previous and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert RunInterrupted("x", signal.SIGTERM).exit_code == 143


def test_second_sigint_raises_keyboard_interrupt_when_sigint_was_ignored():
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert stop.requested
            with pytest.raises(KeyboardInterrupt):  # not a process killed by its own signal
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_failed_fetch_after_a_stop_request_ends_the_epoch_quietly():
    def loader():
        yield 1
        yield 2
        raise RuntimeError("DataLoader worker (pid 123) exited unexpectedly")

    stop = StopRequest()
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        list(StoppableFetch(loader(), stop))
    stop.signum = signal.SIGINT
    fetch = StoppableFetch(loader(), stop)
    assert list(fetch) == [1, 2] and "exited unexpectedly" in str(fetch.failed)


def test_sigterm_mid_epoch_in_process_then_resume_matches(tiny_run, monkeypatch):
    extra = {"train.share_step0": False, "model.drop_path": 0.1, "log.tensorboard": False}
    reference = Runner(tiny_run("ft", run_name="reference", **extra)).run()
    cfg = tiny_run("ft", run_name="stopped", **extra)
    calls = {"n": 0}

    def after_optimizer_step(self, ctx):  # SIGTERM arrives during the 2nd optimiser step of step 1
        calls["n"] += ctx.step == 1
        if ctx.step == 1 and calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(Method, "after_optimizer_step", after_optimizer_step)
    with pytest.raises(RunInterrupted, match=r"interrupted by SIGTERM at step 1 epoch 1 \(after iteration 2/4\); "
                                             r"run the same command again to resume from .*step1-epoch\.ckpt") as info:
        Runner(cfg).run()
    assert info.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.undo()
    assert load_checkpoint(cfg.resolved_run_dir() / "checkpoints/step1-epoch.ckpt")["partial"]["batches_done"] == 2
    assert _numbers(Runner(cfg).run()) == _numbers(reference)


# --------------------------------------------------------------------------------------- distributed
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_one_process_and_two_gloo_processes_agree(tiny_synthetic, tmp_path):
    """Global batch 4: one process with 4 images vs two with 2 each (same images, same augmentation)."""
    extra = {"train.epochs": 4, "train.epochs_incremental": 2, "train.share_step0": False, "log.tensorboard": False}
    single = Runner(load_experiment(CONFIGS / "demo/ft.yaml", tiny_overrides(
        tiny_synthetic, tmp_path / "one", tmp_path / "cache1", **{"data.batch_size": 4, **extra}))).run()
    overrides = tiny_overrides(tiny_synthetic, tmp_path / "two", tmp_path / "cache2", **{"data.batch_size": 2, **extra})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "sats.cli", "train", str(CONFIGS / "demo/ft.yaml"), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    double = _rows(tmp_path / "two")
    for one, two in zip(single, double, strict=True):
        assert one["iterations"] == two["iterations"] and one["num_pixels"] == two["num_pixels"]
        # stated tolerances (docs/reliability.md): 0.5 IoU points per class, 1e-4 on the epoch losses,
        # 1e-3 on every weight; measured: identical IoU, losses within 1e-6, weights within 2e-5
        assert max(abs((a or 0) - (b or 0)) for a, b in zip(one["iou"], two["iou"])) <= 0.005
        for k, losses in one["epoch_losses"].items():
            assert np.allclose(losses, two["epoch_losses"][k], rtol=0, atol=1e-4), (k, losses, two["epoch_losses"])
        w1 = load_checkpoint(tmp_path / f"one/checkpoints/step{one['step']}.ckpt")["model"]
        w2 = load_checkpoint(tmp_path / f"two/checkpoints/step{one['step']}.ckpt")["model"]
        assert max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1) <= 1e-3


RANK_FAILS = r'''
import os, signal, sys
from dataclasses import dataclass
import torch.distributed as dist
from sats.losses.ce import cross_entropy
from sats.methods.base import Method, register_method

@dataclass
class _Params:
    at: int = 3
    how: str = "exit"  # exit: the process dies; stop: it freezes (SIGSTOP) with its sockets open

@register_method
class _RankFails(Method):
    """Test-only: CE; rank 1 dies or freezes in its `at`-th iteration."""
    name = "test-rank-fails"
    Params = _Params
    step0 = None
    calls = 0

    def loss(self, batch, out, old_out, ctx):
        self.calls += 1
        if dist.get_rank() == 1 and self.calls == self.params.at:
            if self.params.how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGSTOP)
        return {"ce": cross_entropy(out.logits, batch.labels)}

from sats.cli import main
sys.exit(main(sys.argv[1:]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "stop"])
def test_a_dead_or_frozen_rank_makes_the_other_fail_not_hang(tiny_synthetic, tmp_path, how):
    """Two processes launched by hand (no torchrun agent to clean up): rank 0 must end with an error."""
    script = tmp_path / "rank_fails.py"
    script.write_text(RANK_FAILS)
    overrides = tiny_overrides(tiny_synthetic, tmp_path / "run", tmp_path / "cache", **{
        "data.batch_size": 2, "method.name": "test-rank-fails", "method.how": how, "train.dist_timeout_s": 5,
        "log.tensorboard": False})
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, str(script), "train", str(CONFIGS / "demo/ft.yaml"), *overrides],
                                      env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    try:
        _, err = procs[0].communicate(timeout=120)  # start-up (~10 s here) + 3 iterations + the 5 s timeout
        assert procs[0].returncode not in (0, None), err[-2000:]
        expected = "Connection" if how == "exit" else "Timed out"  # gloo: peer gone / dist_timeout_s reached
        assert expected in err, err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    if how == "exit":
        assert procs[1].returncode == 3
