"""Shared fixtures: a tiny synthetic VOC-layout dataset and tiny-run config overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List

import pytest
import torch

torch.set_num_threads(1)  # tiny models gain nothing from more; 2 threads on a busy machine are ~50x slower
os.environ.setdefault("MPLBACKEND", "Agg")

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """40 train / 12 val synthetic images of 40–56 px (generated once per test session)."""
    from sats.data.synthetic import ensure_synthetic

    root = tmp_path_factory.mktemp("synthetic") / "voc"
    return ensure_synthetic(root, num_train=40, num_val=12, size=(40, 56), seed=0)


def tiny_overrides(data_root: Path, run_dir: Path, cache_dir: Path, **extra) -> List[str]:
    """Overrides that turn a demo config into a seconds-long run on the tiny synthetic dataset."""
    values = {
        "data.root": str(data_root), "data.synthetic.num_train": 40, "data.synthetic.num_val": 12,
        "data.synthetic.min_size": 40, "data.synthetic.max_size": 56,
        "data.crop_size": 32, "data.eval_size": 32, "data.batch_size": 4, "data.eval_batch_size": 8,
        "model.embed_dims": "[8,16,16,32]", "model.num_heads": "[1,2,2,4]", "model.decoder_dim": 16,
        "train.epochs": 2, "train.epochs_incremental": 1, "train.warmup_iters": 2, "train.threads": 1,
        "run_dir": str(run_dir), "data.cache_dir": str(cache_dir), "log.progress": False,
        "log.overlay_images": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture
def tiny_run(tiny_synthetic, tmp_path):
    """Factory: ``tiny_run(method="ft", **overrides) -> ExperimentConfig`` for a tiny 15-5 run."""
    from sats.experiment import load_experiment

    def make(method: str = "ft", config: str = "demo/ft.yaml", run_name: str = "run", **extra):
        overrides = tiny_overrides(tiny_synthetic, tmp_path / run_name, tmp_path / "cache", **extra)
        return load_experiment(CONFIGS / config, [*overrides, f"method.name={method}"])

    return make
