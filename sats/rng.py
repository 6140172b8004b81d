"""Every seed and random-number-generator state of a run, in one place.

A run is reproducible and resumable because each random stream is seeded from a formula of
(``train.seed``, step, epoch, rank, item) and never from "whatever ran before":

* :func:`step_seed` — the seed of a step (``epoch = -1``) or of one epoch of a step;
* :func:`seed_everything` — python, numpy and torch seeded with ``seed + rank``;
* :func:`item_seed` — the augmentation of one training image (its crop and flip depend only on
  the epoch and its place in the step's list, not on workers, batch size or process count);
* :func:`memory_seed` — the exemplar-memory sampler's stream of an epoch;
* :func:`pass_seed` — a method's own extra pass over the data (e.g. the pseudo-label thresholds),
  run under :func:`isolated_rng` so that the training streams are left exactly as they were;
* :func:`capture_rng` / :func:`restore_rng` — the states stored in a mid-epoch checkpoint.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from typing import Any, Dict, Iterator

import numpy as np
import torch

_MOD = 2**31 - 1


def step_seed(seed: int, step: int, epoch: int = -1) -> int:
    """Seed of a step (``epoch = -1``) or of one epoch of a step; independent of resumption."""
    return (seed * 1_000_003 + step * 10_007 + (epoch + 1) * 101) % _MOD


def item_seed(epoch_seed: int, item: int) -> int:
    """Seed of training item ``item`` (its place in the step's list) in the epoch seeded ``epoch_seed``."""
    return epoch_seed * 1_000_003 + int(item)


def memory_seed(epoch_seed: int) -> int:
    """Seed of the exemplar-memory sampler in the epoch seeded ``epoch_seed`` (its own stream)."""
    return (epoch_seed * 2_654_435_761 + 97) % (2**63 - 1)


def pass_seed(seed: int, step: int, rank: int, name: str = "") -> int:
    """Seed of a method's extra pass named ``name`` over step ``step``'s data on rank ``rank``.

    The unnamed pass keeps the formula the pseudo-label thresholds have always used, so cached
    thresholds and recorded runs stay valid; a named pass gets its own stream."""
    base = (int(seed) * 1_000_003 + step * 7_919) % _MOD + rank
    return base if not name else (base + zlib.crc32(name.encode())) % _MOD


def seed_everything(seed: int, rank: int = 0) -> torch.Generator:
    """Seed python, numpy and torch (all devices) with ``seed + rank``; return a CPU generator seeded alike."""
    if seed < 0 or rank < 0:
        raise ValueError(f"seed_everything: seed and rank must be >= 0, got seed={seed}, rank={rank}")
    value = int(seed) + int(rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
    generator = torch.Generator()
    generator.manual_seed(value)
    return generator


@contextlib.contextmanager
def isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with python, numpy and torch seeded with ``seed``; restore the previous states after."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def capture_rng() -> Dict[str, Any]:
    """This process's python / numpy / torch (CPU and CUDA) RNG states, storable with ``weights_only`` loading."""
    version, keys, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "python": [version, torch.tensor(keys, dtype=torch.int64), gauss],
        "numpy": [torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(int(k) for k in keys.tolist()), gauss))
    np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state(("MT19937", np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
