"""Exemplar memory, the "-M" variants (docs/methods.md §3.12): selection, storage, batching, runs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONFIGS
from sats.config import ConfigError
from sats.experiment import load_experiment
from sats.data.datasets import DataError
from sats.data.memory import build_step_memory, load_memory, memory_classes, per_class_quota, save_memory, select_memory
from sats.data.tasks import Task, get_task
from sats.engine.data import ExperimentData, MemorySampler
from sats.engine.distributed import DistInfo
from sats.engine.runner import Runner
from sats.rng import step_seed


class _Interrupt(Exception):
    pass


def _dist(rank: int = 0, world: int = 1) -> DistInfo:
    return DistInfo(rank, world, rank, torch.device("cpu"), rank == 0, None)


def test_selection_is_class_balanced_in_list_order_with_shared_images():
    positions = np.array([10, 11, 12, 13, 14, 15])
    presence = np.zeros((6, 4), dtype=bool)  # classes 0..3
    presence[[0, 2, 3, 5], 1] = True  # class 1 in images 10, 12, 13, 15
    presence[[1, 2, 4], 2] = True  # class 2 in images 11, 12, 14
    presence[:, 0] = True  # background everywhere (never a memory class)
    lists = select_memory(positions, presence, classes=[1, 2], k=2)
    assert lists == {1: [10, 12], 2: [11, 12]}  # image 12 serves both classes
    # earlier lists are truncated to the new k, then filled in walking order without duplicates
    lists = select_memory(positions, presence, classes=[1, 2, 3], k=2, previous={1: [15, 13, 10], 2: [12]})
    assert lists == {1: [15, 13], 2: [12, 11], 3: []}
    # deterministic
    assert select_memory(positions, presence, [1, 2], 2) == select_memory(positions, presence, [1, 2], 2)


def test_per_class_quota():
    assert per_class_quota(15, 100) == 7  # VOC 15-1 at step 1: ceil(100 / 15)
    assert per_class_quota(15, 300) == 20  # the reference's list size, what SATS loaded on VOC
    assert per_class_quota(100, 300) == 3  # ADE 100-10 at step 1
    assert per_class_quota(10, 100, per_class=7) == 7  # the released code's VOC loading
    assert memory_classes(get_task("voc", "15-1"), 2) == tuple(range(1, 17))
    with pytest.raises(ConfigError, match="memory.size"):
        load_experiment(None, ["memory.size=0"])


def test_step_memory_accumulates_over_steps_and_round_trips_by_id(tiny_synthetic, tmp_path):
    from sats.data.datasets import build_files

    files = build_files("voc", tiny_synthetic, "train")
    task = Task(dataset="voc", name="2-1-1", steps=((0, 1, 2), (3,), (4,)), num_classes=21)
    presence = np.stack([files.mask_classes(i) for i in range(len(files))])
    everything = np.arange(len(files))
    m1 = build_step_memory(task, 1, everything, presence, size=4)  # k = 2 for classes 1, 2
    assert m1.per_class == 2 and set(m1.lists) == {1, 2}
    for c, entries in m1.lists.items():
        assert entries == [int(p) for p in np.flatnonzero(presence[:, c])[:2]]
    m2 = build_step_memory(task, 2, everything[::-1], presence[::-1], size=3, previous=m1)  # k = 1 for 1, 2, 3
    assert m2.lists[1] == m1.lists[1][:1] and m2.lists[2] == m1.lists[2][:1]
    assert m2.lists[3] == [int(np.flatnonzero(presence[:, 3])[-1])]  # walked in the given (reversed) order
    path = tmp_path / "memory" / "step2.json"
    save_memory(m2, files, path)
    stored = json.loads(path.read_text())
    assert stored["classes"]["3"] == [files.ids[p] for p in m2.lists[3]]  # image ids, not only positions
    assert load_memory(path, files, task, 2, per_class=1).lists == m2.lists
    stored["classes"]["3"] = ["no_such_image"]
    path.write_text(json.dumps(stored))
    with pytest.raises(DataError, match="no_such_image"):
        load_memory(path, files, task, 2, per_class=1)
    with pytest.raises(DataError, match="expects classes"):
        load_memory(path, files, task, 2, per_class=5)


def test_memory_sampler_shards_ranks_and_is_seeded_per_epoch():
    ranks = [list(MemorySampler(10, 15, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [15, 15]
    # each permutation of the 10 images is split between the ranks: disjoint within a round, complete over it
    assert set(ranks[0][:5]).isdisjoint(ranks[1][:5]) and set(ranks[0][:5] + ranks[1][:5]) == set(range(10))
    assert set(ranks[0][5:10] + ranks[1][5:10]) == set(range(10))
    again = MemorySampler(10, 15, seed=3, rank=0, world_size=2)
    assert list(again) == ranks[0]
    again.set_epoch_seed(4)
    assert list(again) != ranks[0]
    with pytest.raises(DataError, match="fewer than the 2 processes"):
        MemorySampler(1, 4, seed=0, world_size=2)


def test_batches_mix_current_and_memory_images(tiny_run, tmp_path):
    cfg = tiny_run("mib", config="demo/mib.yaml", **{"memory.enabled": True, "memory.size": 30})
    data = ExperimentData.build(cfg, _dist())
    memory = data.step_memory(1, tmp_path, write=True)
    assert (tmp_path / "memory/step1.json").is_file() and len(memory) > 2
    per_rank = []
    for rank in (0, 1):
        loader = data.train_loader(1, False, cfg.train, _dist(rank, 2), step_seed(42, 1), memory=memory)
        loader.set_epoch_seed(step_seed(42, 1, 0))
        assert len(loader) == data.splits[1].train.size // 2 // 2  # 2 ranks, 2 current images per batch
        batches = list(loader)
        assert len(batches) == len(loader)
        old_in_memory = False
        for batch in batches:
            assert batch.images.shape[0] == 4 and batch.is_memory.tolist() == [False, False, True, True]
            current, mem = batch.labels[:2], batch.labels[2:]
            assert not ((current >= 1) & (current <= 15)).any()  # old classes are background for current images
            old_in_memory |= bool(((mem >= 1) & (mem <= 15)).any())  # memory keeps old ground truth
        assert old_in_memory
        per_rank.append(list(loader.memory.sampler))
    # the memory dataset is the stored memory; every rank draws its own share of it
    assert np.array_equal(loader.memory.dataset.positions, memory.positions)
    first_round = len(memory) // 2
    assert set(per_rank[0][:first_round]).isdisjoint(per_rank[1][:first_round])


def test_two_step_mib_m_run_stores_and_reloads_the_memory(tiny_run):
    cfg = tiny_run("mib", config="demo/mib.yaml", **{"memory.enabled": True})
    plain = Runner(tiny_run("mib", config="demo/mib.yaml", run_name="plain")).run()
    rows = Runner(cfg).run()
    assert rows[1]["iterations"] == 2 * plain[1]["iterations"]  # batches are half memory
    stored = json.loads((cfg.resolved_run_dir() / "memory/step1.json").read_text())
    assert stored["per_class"] == 7 and len(stored["classes"]) == 15  # ceil(100 / 15) for 15-5
    counts = Counter(len(v) for v in stored["classes"].values())
    assert max(counts) <= 7
    # resume of step 1 reloads and validates the stored ids
    stored["classes"]["1"][0] = "lost_image"
    (cfg.resolved_run_dir() / "memory/step1.json").write_text(json.dumps(stored))
    (cfg.resolved_run_dir() / "checkpoints/step1.ckpt").unlink()
    with pytest.raises(DataError, match="lost_image"):
        Runner(cfg).run()


def test_resume_with_memory_matches_uninterrupted(tiny_run, monkeypatch):
    extra = {"memory.enabled": True, "train.epochs_incremental": 2, "train.deterministic": True}
    reference = Runner(tiny_run("mib", config="demo/mib.yaml", run_name="whole", **extra)).run()
    cfg = tiny_run("mib", config="demo/mib.yaml", run_name="cut", **extra)
    runner = Runner(cfg)
    original = runner.method.loss

    def flaky(batch, out, old_out, ctx):  # dies in epoch 2 of step 1
        if ctx.step == 1 and ctx.epoch == 1:
            raise _Interrupt()
        return original(batch, out, old_out, ctx)

    monkeypatch.setattr(runner.method, "loss", flaky)
    with pytest.raises(_Interrupt):
        runner.run()
    monkeypatch.undo()
    assert (cfg.resolved_run_dir() / "checkpoints/step1-epoch.ckpt").exists()
    resumed = Runner(cfg).run()
    assert [r["iou"] for r in resumed] == [r["iou"] for r in reference]


def test_sats_m_two_step_run(tiny_run):
    cfg = tiny_run("sats", config="demo/sats-m.yaml", **{"train.epochs": 1})
    assert cfg.memory.enabled and cfg.memory.size == 100
    rows = Runner(cfg).run()
    assert len(rows) == 2 and all(0.0 <= r["miou"] <= 1.0 for r in rows)
    assert (cfg.resolved_run_dir() / "memory/step1.json").is_file()


MINE = sorted({*Path(CONFIGS, "voc").glob("ssul*_*.yaml"), *Path(CONFIGS, "voc").glob("*-m_*.yaml"),
               CONFIGS / "demo/ssul.yaml", CONFIGS / "demo/sats-m.yaml"}
              - {*Path(CONFIGS, "voc").glob("dkd-m_*.yaml"), *Path(CONFIGS, "voc").glob("star-m_*.yaml")})
# (DKD-M / STAR-M are generated with their own memory rule: tests/test_configs.py, tests/test_engine_options.py)


@pytest.mark.parametrize("path", MINE, ids=[p.stem for p in MINE])
def test_ssul_and_memory_configs_load(path):
    cfg = load_experiment(path)
    token = path.stem.split("_")[0]
    assert cfg.memory.enabled == token.endswith("-m")
    if path.parent.name == "voc":
        assert cfg.name == path.stem and cfg.data.task == path.stem.rsplit("voc-", 1)[1]
        assert cfg.method_name == token.removesuffix("-m") and cfg.memory.size == 100
        assert cfg.train.epochs == (50 if cfg.method_name == "ssul" else 30)
    if cfg.method_name == "ssul":
        assert cfg.data.saliency_root == "saliency_map"


def test_memory_config_files():
    voc, ade = (load_experiment(CONFIGS / f"_base_/memory/{d}.yaml").memory for d in ("voc", "ade"))
    assert (voc.enabled, voc.size, ade.enabled, ade.size) == (True, 100, True, 300)
    assert len(MINE) == 34  # 8 VOC rows × 4 tasks + 2 demo files


@pytest.mark.slow
def test_memory_under_torchrun_two_cpu_processes(tiny_synthetic, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import tiny_overrides
    from test_distributed_run import _free_port

    run_dir = tmp_path / "ddp"
    overrides = tiny_overrides(tiny_synthetic, run_dir, tmp_path / "cache", **{"memory.enabled": True})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "sats.cli", "train", str(CONFIGS / "demo/mib.yaml"), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads((run_dir / "results.json").read_text())["steps"]
    data = ExperimentData.build(load_experiment(CONFIGS / "demo/mib.yaml", overrides), _dist())
    # each rank: its half of the step-1 images, 2 current + 2 memory images per batch
    assert steps[1]["iterations"] == data.splits[1].train.size // 2 // 2
    assert steps[1]["train_images_per_s"] > 0 and (run_dir / "memory/step1.json").is_file()
