"""A tiny two-step run under torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import CONFIGS, tiny_overrides


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(config: str, run_dir, tmp_path, tiny_synthetic) -> subprocess.CompletedProcess:
    overrides = tiny_overrides(tiny_synthetic, run_dir, tmp_path / "cache", **{"data.batch_size": 2})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "sats.cli", "train", str(CONFIGS / config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


@pytest.mark.slow
def test_torchrun_fuses_identically_on_every_process_with_ewf(tiny_synthetic, tmp_path):
    """MiB+EWF under 2 processes: every rank fuses in memory; the saved (rank-0) model is the tested one."""
    from sats.engine.evaluation import retest_run

    run_dir = tmp_path / "ddp-ewf"
    proc = _torchrun("demo/mib_ewf.yaml", run_dir, tmp_path, tiny_synthetic)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert retest_run(run_dir)  # one process re-evaluates rank 0's fused checkpoint: the recorded numbers


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tiny_synthetic, tmp_path):
    run_dir = tmp_path / "ddp"
    proc = _torchrun("demo/ft.yaml", run_dir, tmp_path, tiny_synthetic)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["step"] for r in results["steps"]] == [0, 1]
    assert all(0 <= r["miou"] <= 1 for r in results["steps"])
    assert (run_dir / "checkpoints/step1.ckpt").exists()
    # evaluation is sharded without padding: every test pixel is counted exactly once, as in one process
    from sats.experiment import load_experiment
    from sats.engine.runner import Runner

    single = Runner(load_experiment(CONFIGS / "demo/ft.yaml", tiny_overrides(
        tiny_synthetic, tmp_path / "single", tmp_path / "cache1", **{"data.batch_size": 4}))).run()
    assert [r["num_pixels"] for r in results["steps"]] == [r["num_pixels"] for r in single]
