"""The generated DKD / STAR (and NeST) experiment files train every step on tiny datasets in the real on-disk
layouts (VOC, ADE20K), with a tiny model in place of the paper's (docs/methods.md §3.14, §3.15, §3.18)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import CONFIGS
from data_helpers import class_mask, write_ade, write_voc
from sats.engine.runner import Runner
from sats.experiment import load_experiment

TINY_MIT = {"model.backbone": "mit_custom", "model.embed_dims": "[8,16,16,32]", "model.depths": "[1,1,1,1]",
            "model.num_heads": "[1,2,2,4]", "model.sr_ratios": "[8,4,2,1]", "model.decoder_dim": 16,
            "model.pretrained": None}


def _run(config: Path, root: Path, tmp_path: Path, **extra) -> list:
    values = {"data.root": str(root), "data.crop_size": 32, "data.eval_size": 32, "data.batch_size": 2,
              "data.eval_batch_size": 4, "data.workers": 0, "data.scan_workers": 1, "train.epochs": 1,
              "train.epochs_incremental": 1, "train.amp": "auto", "train.threads": 1, "device": "cpu",
              "run_dir": str(tmp_path / config.stem), "data.cache_dir": str(tmp_path / "cache"),
              "log.progress": False, "log.tensorboard": False, "log.overlay_images": 0, **extra}
    cfg = load_experiment(config, [f"{k}={'null' if v is None else v}" for k, v in values.items()])
    return Runner(cfg).run()


@pytest.fixture(scope="module")
def voc_fixture(tmp_path_factory) -> Path:
    """VOC layout: step-0 images with classes 1-15, three images per class 16-20, a val image per class pair."""
    masks, train, val = {}, [], []
    for i in range(8):
        masks[f"base{i}"] = class_mask([0, 1 + 2 * i % 15, 1 + (2 * i + 1) % 15], 40, 48, border=True)
        train.append(f"base{i}")
    for c in range(16, 21):
        for j in range(3):
            masks[f"new{c}_{j}"] = class_mask([0, c, 1 + (c + j) % 15], 40, 48)
            train.append(f"new{c}_{j}")
    for c in range(1, 21, 2):
        masks[f"val{c}"] = class_mask([0, c, c + 1], 40, 48)
        val.append(f"val{c}")
    return write_voc(tmp_path_factory.mktemp("voc") / "voc", masks, {"train": train, "val": val})


@pytest.fixture(scope="module")
def ade_fixture(tmp_path_factory) -> Path:
    """ADE20K layout: images with classes of 1-100 and of 101-150."""
    rng = np.random.default_rng(0)
    train = {f"ADE_train_{i:08d}": class_mask([0, *rng.choice(np.arange(1, 101), 2, replace=False)], 40, 48)
             for i in range(6)}
    train.update({f"ADE_train_{i:08d}": class_mask([0, 7, 101 + 5 * (i - 6)], 40, 48) for i in range(6, 12)})
    val = {f"ADE_val_{i:08d}": class_mask([0, 3 + i, 110 + i], 40, 48) for i in range(4)}
    return write_ade(tmp_path_factory.mktemp("ade"), {"train": train, "val": val})


@pytest.mark.parametrize("name", ["dkd_mit-b2_voc-15-1", "star-m_mit-b2_voc-15-1", "dkd-m_mit-b2_voc-15-5_disjoint"])
def test_voc_files_run_every_step(name, voc_fixture, tmp_path):
    rows = _run(CONFIGS / "voc" / f"{name}.yaml", voc_fixture, tmp_path, **TINY_MIT)
    assert [r["step"] for r in rows] == list(range(6 if "15-1" in name else 2))
    assert all(np.isfinite(v).all() for r in rows for v in r["epoch_losses"].values())


@pytest.mark.parametrize("name", ["star_mit-b2_ade-100-50", "dkd-m_mit-b2_ade-100-50"])
def test_ade_files_run_every_step(name, ade_fixture, tmp_path):
    rows = _run(CONFIGS / "ade" / f"{name}.yaml", ade_fixture, tmp_path, **TINY_MIT)
    assert len(rows) == 2 and rows[1]["iterations"] > 0


@pytest.mark.parametrize("name, extra", [
    ("voc/mib+nest_mit-b2_voc-15-5", {}),
    # 44 of ADE 100-50's 50 new classes have no image here: they start from the background row (the default raises)
    ("ade/plop+nest_mit-b2_ade-100-50", {"method.nest.empty_class": "background"}),
])
def test_nest_files_pretune_and_run_every_step(name, extra, voc_fixture, ade_fixture, tmp_path):
    """The NeST files (docs/methods.md §3.18) on the same layouts: pre-tuning, then the base method's terms."""
    root = voc_fixture if name.startswith("voc/") else ade_fixture
    rows = _run(CONFIGS / f"{name}.yaml", root, tmp_path, **TINY_MIT, **extra)
    assert len(rows) == 2 and rows[1]["iterations"] > 0
    assert set(rows[1]["epoch_losses"]) == ({"unce", "unkd"} if "mib+" in name else {"ce", "pod"})


@pytest.mark.slow
def test_the_torchvision_deeplab_file_runs_two_steps(voc_fixture, tmp_path):
    """configs/voc/dkd_r101_voc-15-5.yaml without the ImageNet weights (ResNet-101, 32 px). A random ResNet's
    BN statistics need more than the official momentum 0.01 to settle in the few step-0 iterations here (at step 1
    they are frozen): momentum 1 keeps the last batch's."""
    rows = _run(CONFIGS / "voc" / "dkd_r101_voc-15-5.yaml", voc_fixture, tmp_path, **{
        "model.pretrained": None, "model.norm": "bn", "model.encoder_bn_momentum": 1.0, "data.batch_size": 6})
    assert len(rows) == 2 and set(rows[1]["epoch_losses"]) == {"mbce", "kd", "dkd_pos", "dkd_neg", "ac"}
