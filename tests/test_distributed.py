"""torchrun helpers: single-process behaviour and a real 2-process gloo job."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from sats.engine.distributed import (
    DistInfo,
    all_reduce_mean_,
    all_reduce_sum_,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    is_main,
    set_deterministic,
    unwrap,
)
from sats.engine.evaluator import ConfusionMatrix, ShardedEvalSampler
from sats.rng import seed_everything

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)


def test_single_process_mode(no_torchrun_env: None) -> None:
    info = init_distributed(backend="gloo")
    assert info == DistInfo(0, 1, 0, torch.device("cpu"), True, None)
    assert is_main()
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum_(t) is t and t.tolist() == [1.0, 2.0]
    assert all_reduce_mean_(t).tolist() == [1.0, 2.0]
    with pytest.raises(TypeError, match="int64"):
        all_reduce_mean_(torch.tensor([1]))
    obj = {"a": [1, 2]}
    assert broadcast_object(obj) is obj
    barrier()
    cleanup()


def test_env_errors(no_torchrun_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="backend"):
        init_distributed(backend="mpi")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="WORLD_SIZE"):
        init_distributed(backend="gloo")
    monkeypatch.setenv("WORLD_SIZE", "two")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        init_distributed(backend="gloo")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        init_distributed(backend="gloo")


def test_unwrap_strips_wrappers() -> None:
    inner = nn.Linear(2, 2)
    assert unwrap(inner) is inner
    assert unwrap(nn.DataParallel(nn.DataParallel(inner))) is inner


def test_seed_everything_is_reproducible_and_rank_dependent() -> None:
    def draw(gen: torch.Generator) -> tuple[float, float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(1)), float(torch.rand(1, generator=gen))

    first = draw(seed_everything(7))
    assert draw(seed_everything(7)) == first
    other_rank = draw(seed_everything(7, rank=1))
    assert all(a != b for a, b in zip(first, other_rank))
    assert draw(seed_everything(8)) == other_rank  # seed + rank
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)


def test_set_deterministic_toggles_flags() -> None:
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    benchmark_before = torch.backends.cudnn.benchmark
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.deterministic
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = benchmark_before


# ---- real 2-process job ------------------------------------------------------------------

K, N_IMAGES = 5, 5  # 5 images over 2 ranks: shards of 3 and 2 (DistributedSampler would pad to 6)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    target = torch.randint(0, K + 1, (N_IMAGES, 6, 7), generator=g)
    target[target == K] = 255
    pred = torch.randint(0, K, (N_IMAGES, 6, 7), generator=g)
    return pred, target


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # forked child: do not reuse the parent's OpenMP pool
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    info = init_distributed(backend="gloo", timeout_s=30)
    try:
        pred, target = _data()
        cm = ConfusionMatrix(K, info.device)
        sampler = ShardedEvalSampler(N_IMAGES)  # rank / world size from the process group
        for i in sampler:
            cm.update(pred[i : i + 1], target[i : i + 1])
        cm.all_reduce_()
        total = all_reduce_sum_(torch.tensor([rank + 1]))
        mean = all_reduce_mean_(torch.tensor([float(rank + 1)]))
        obj = broadcast_object({"from": rank, "list": [rank]}, src=0)
        inner = nn.Linear(2, 2)
        unwrapped = unwrap(nn.parallel.DistributedDataParallel(inner)) is inner
        again = init_distributed(backend="gloo")  # already initialised: describes the group
        barrier()
        torch.save(
            {
                "info": (info.rank, info.world_size, info.local_rank, info.is_main, info.backend),
                "again": (again.rank, again.world_size, again.backend),
                "shard": list(sampler),
                "matrix": cm.matrix.clone(),
                "sum": int(total), "mean": float(mean), "obj": obj, "unwrapped": unwrapped,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        cleanup()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_process_gloo_confusion_all_reduce(tmp_path: Path) -> None:
    # fork: the children reuse the imported modules (spawn would re-import torch: ~9 s on 2 cores)
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    pred, target = _data()
    single = ConfusionMatrix(K, "cpu")
    single.update(pred, target)
    shards = []
    for rank in range(2):
        res = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert res["info"] == (rank, 2, rank, rank == 0, "gloo")
        assert res["again"] == (rank, 2, "gloo")
        assert torch.equal(res["matrix"], single.matrix)  # summed over ranks == single process, no duplicates
        assert res["sum"] == 3 and res["mean"] == pytest.approx(1.5)
        assert res["obj"] == {"from": 0, "list": [0]}
        assert res["unwrapped"]
        shards.append(res["shard"])
    assert shards == [[0, 2, 4], [1, 3]]
