"""Crash safety end to end: `sats train` in a subprocess, killed (SIGKILL) or stopped (SIGTERM/SIGINT) at
several points, then run again with the same command: the final results are bit-identical to an
uninterrupted run (deterministic mode, CPU, one thread).

Kill points that polling cannot hit reliably come from a small wrapper script (written below into
the test's folder, never part of the library) that patches one engine function and then runs the
normal CLI; the action is chosen with the wrapper's own environment variable ``KILL_TEST_ACTION``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from conftest import CONFIGS, tiny_overrides

pytestmark = pytest.mark.slow

WRAPPER = r'''
import os, signal, sys
from pathlib import Path

action = os.environ.get("KILL_TEST_ACTION", "")
kind, _, arg = action.partition(":")

if kind in ("kill-writing", "signal-writing"):  # arg: file name (signal-writing: SIGNAME/file name)
    import sats.engine.checkpoint as checkpoint
    import sats.io as io_module
    original = io_module.write_bytes_atomic
    sig_name, _, name = arg.partition("/") if kind == "signal-writing" else ("", "", arg)

    def patched(path, chunks, what="file"):
        if Path(path).name != name:
            return original(path, chunks, what)
        if kind == "signal-writing":  # the signal arrives while the checkpoint is being written
            os.kill(os.getpid(), getattr(signal, sig_name))
            return original(path, chunks, what)
        data = b"".join(bytes(c) for c in chunks)
        tmp = Path(path).with_name(f"{Path(path).name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:  # half of the file is on disk when the process dies
            f.write(data[: len(data) // 2])
            f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.write_bytes_atomic = io_module.write_bytes_atomic = patched
elif kind == "kill-eval":  # arg: number of channels of the evaluation to die in (16: step 0, 21: step 1)
    import sats.engine.evaluator as evaluator
    original_update = evaluator.ConfusionMatrix.update

    def update(self, pred, target):
        if self.num_classes == int(arg):
            os.kill(os.getpid(), signal.SIGKILL)
        return original_update(self, pred, target)

    evaluator.ConfusionMatrix.update = update
elif kind == "signal-at":  # arg: SIGNAME/n: the signal arrives during the n-th optimiser step of the run
    from sats.methods.base import Method
    sig_name, _, n = arg.partition("/")
    calls = {"n": 0}

    def after_optimizer_step(self, ctx):
        calls["n"] += 1
        if calls["n"] == int(n):
            os.kill(os.getpid(), getattr(signal, sig_name))

    Method.after_optimizer_step = after_optimizer_step
elif kind:
    sys.exit(f"unknown KILL_TEST_ACTION {action!r}")

from sats.cli import main
sys.exit(main(sys.argv[1:]))
'''


class Setup:
    def __init__(self, root: Path, data_root: Path) -> None:
        self.root, self.data_root = root, data_root
        self.wrapper = root / "run_sats.py"
        self.wrapper.write_text(WRAPPER)

    def command(self, name: str) -> List[str]:
        overrides = tiny_overrides(self.data_root, self.root / name, self.root / f"cache-{name}", **{
            "train.epochs": 3, "train.epochs_incremental": 2, "train.deterministic": True,
            "train.share_step0": False, "log.tensorboard": False, "model.drop_path": 0.1})
        return [sys.executable, str(self.wrapper), "train", str(CONFIGS / "demo/ft.yaml"), *overrides]

    def env(self, action: str = "") -> Dict[str, str]:
        return {**os.environ, "OMP_NUM_THREADS": "1", "KILL_TEST_ACTION": action}

    def run(self, name: str, action: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(self.command(name), capture_output=True, text=True, timeout=180, env=self.env(action),
                              cwd=self.root)

    def results(self, name: str) -> Dict:
        return json.loads((self.root / name / "results.json").read_text())


@pytest.fixture(scope="module")
def setup(tiny_synthetic, tmp_path_factory) -> Setup:
    s = Setup(tmp_path_factory.mktemp("kill"), tiny_synthetic)
    done = s.run("reference")
    assert done.returncode == 0, done.stderr[-3000:]
    log = (s.root / "reference/train.log").read_text()
    s.per_epoch = int(re.search(r"step 0: .* 3 epochs × (\d+) iterations", log).group(1))
    return s


def _same_results(actual: Dict, expected: Dict) -> None:
    keys = ("iou", "miou", "num_pixels", "iterations", "epoch_losses", "nonfinite_skipped")
    assert len(actual["steps"]) == len(expected["steps"]) == 2
    for a, e in zip(actual["steps"], expected["steps"]):
        assert {k: a[k] for k in keys} == {k: e[k] for k in keys}  # exact float equality: bit-identical


def _poll_kill(cmd: List[str], env: Dict[str, str], cwd: Path, until: Path, timeout: float = 120) -> int:
    """Start ``cmd``, SIGKILL it as soon as ``until`` exists; returns its exit status."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and not until.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"{until} did not appear within {timeout} s")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_killed_and_stopped_at_many_points_then_resumed_is_bit_identical(setup):
    """One run directory, interrupted eight times at different points; every interruption keeps a resumable
    state, and the run that finally completes has exactly the uninterrupted run's results."""
    from sats.engine.checkpoint import load_checkpoint

    run_dir = setup.root / "killed"
    ckpts = run_dir / "checkpoints"
    # 1. SIGKILL during step 0, epoch 2: as soon as the epoch-1 checkpoint is on disk
    assert _poll_kill(setup.command("killed"), setup.env(), setup.root, ckpts / "step0-epoch.ckpt") == -signal.SIGKILL
    epoch_done = load_checkpoint(ckpts / "step0-epoch.ckpt")["epoch"]
    assert epoch_done in (0, 1)
    # 2. SIGTERM in the middle of the next epoch: the state after its 2nd iteration is saved, exit status 143
    done = setup.run("killed", "signal-at:SIGTERM/2")
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-3000:]
    expected = (rf"interrupted by SIGTERM at step 0 epoch {epoch_done + 2} \(after iteration 2/{setup.per_epoch}\); "
                r"run the same command again to resume from \S*step0-epoch.ckpt")
    assert re.search(expected, done.stderr), done.stderr[-2000:]
    state = load_checkpoint(ckpts / "step0-epoch.ckpt")
    assert state["epoch"] == epoch_done and state["iteration"] == (epoch_done + 1) * setup.per_epoch + 2
    assert state["partial"]["batches_done"] == 2 and state["partial"]["world_size"] == 1
    # 3. SIGKILL while step 0's checkpoint is being written (after a mid-epoch resume): half a temp file is left
    done = setup.run("killed", "kill-writing:step0.ckpt")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert f"resuming after iteration 2/{setup.per_epoch} of epoch {epoch_done + 2}" in done.stderr
    stale = list(ckpts.glob("step0.ckpt.tmp-*"))
    assert len(stale) == 1 and stale[0].stat().st_size > 0 and not (ckpts / "step0.ckpt").exists()
    after = load_checkpoint(ckpts / "step0-epoch.ckpt")  # hash-verified: epoch 2 ended, or the mid-epoch one
    assert after["epoch"] == 1 and ("partial" in after) == (epoch_done == 1)
    # 4. SIGKILL during step 0's end-of-step test evaluation
    done = setup.run("killed", "kill-eval:16")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert not stale[0].exists()  # the dead process's temp file was cleaned up
    assert not (ckpts / "step0.ckpt").exists() and not (run_dir / "results.json").exists()
    # 5. SIGKILL while results.json is being written after step 0 (its checkpoint is complete)
    done = setup.run("killed", "kill-writing:results.json")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert load_checkpoint(ckpts / "step0.ckpt")["step"] == 0 and not (run_dir / "results.json").exists()
    # 6. SIGINT while step 1's epoch checkpoint is being written: the write is finished, then exit status 130
    #    (step 0 is not trained again: its results row, lost in 5, is recovered from its checkpoint)
    done = setup.run("killed", "signal-writing:SIGINT/step1-epoch.ckpt")
    assert done.returncode == 128 + signal.SIGINT, done.stderr[-3000:]
    assert "step 0 finished before the run stopped; its results row is taken from" in done.stderr
    assert "interrupted by SIGINT at step 1 after epoch 1; run the same command again to resume from" in done.stderr
    assert load_checkpoint(ckpts / "step1-epoch.ckpt")["epoch"] == 0
    assert [r["step"] for r in setup.results("killed")["steps"]] == [0]
    # 7. SIGKILL during step 1's test evaluation: step 0's results are complete JSON
    done = setup.run("killed", "kill-eval:21")
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert [r["step"] for r in setup.results("killed")["steps"]] == [0]
    # the same command again finishes the run, with the uninterrupted run's numbers
    done = setup.run("killed")
    assert done.returncode == 0, done.stderr[-3000:]
    _same_results(setup.results("killed"), setup.results("reference"))
    assert sorted(p.name for p in ckpts.iterdir()) == ["step0.ckpt", "step1.ckpt"]  # no temp or epoch files
