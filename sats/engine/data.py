"""Per-experiment data: dataset files, task, per-step splits, datasets and loaders."""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from sats.config import ConfigError, DataConfig, ExperimentConfig, TrainConfig
from sats.data.classes import NUM_CLASSES
from sats.data.datasets import DataError, SegmentationFiles, StepDataset, build_files, check_dataset, format_problems
from sats.data.labels import memory_lut, test_lut, train_lut, val_lut
from sats.data.memory import (StepMemory, build_step_memory, load_memory, memory_classes, memory_path, per_class_quota,
                              round_robin_memory, save_memory)
from sats.data.saliency import FolderSaliency, ensure_saliency_from_masks, resolve_saliency_root
from sats.data.splits import StepSplit, class_presence, compute_splits, import_reference_splits
from sats.data.tasks import Task, get_task
from sats.data.transforms import eval_transform, train_transform
from sats.engine.distributed import DistInfo
from sats.io import digest
from sats.rng import item_seed, memory_seed, pass_seed, step_seed
from sats.engine.evaluator import ShardedEvalSampler
from sats.data.batch import Batch

log = logging.getLogger("sats")

#: ``images (B, 3, H, W) → (scores (B, H, W), channels (B, H, W))``: a model's confident prediction
Confidence = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


def resolve_files(cfg: DataConfig, split: str) -> SegmentationFiles:
    """The image list of one split; the synthetic dataset is generated on first use."""
    if cfg.dataset == "synthetic":
        from sats.data.synthetic import ensure_synthetic

        s = cfg.synthetic
        root = ensure_synthetic(cfg.root, num_train=s.num_train, num_val=s.num_val, size=(s.min_size, s.max_size),
                                seed=s.seed)
        return build_files("voc", root, split)
    return build_files(cfg.dataset, cfg.root, split)


def data_cache_dir(cfg: DataConfig) -> Path:
    """``<data.cache_dir>/data``: file fingerprints and the class-presence store (content-addressed)."""
    return Path(cfg.cache_dir) / "data"


def same_data(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two :meth:`ExperimentData.fingerprint` records describe the same files (the root may differ)."""
    return {k: v for k, v in a.items() if k != "root"} == {k: v for k, v in b.items() if k != "root"}


def task_dataset_name(cfg: DataConfig) -> str:
    """Task tables are defined per class set: the synthetic data uses the VOC classes."""
    return "voc" if cfg.dataset == "synthetic" else cfg.dataset


def joint_task(task: Task) -> Task:
    """All classes of ``task`` in one step, in the same channel order (the joint-training upper bound)."""
    return Task(dataset=task.dataset, name=f"{task.name}-joint", steps=(tuple(task.channel_classes),),
                num_classes=task.num_classes)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles ``positions`` with a generator seeded by (seed, step, epoch) and shards them over ranks.

    The order of an epoch depends only on its seed, so a run resumed at an epoch boundary sees
    exactly the batches an uninterrupted run would. Rank ``r`` takes items ``r, r + W, ...`` of
    the order (``W`` processes), so global batch ``j`` of ``W`` processes with ``B`` images each
    holds items ``jWB .. (j+1)WB - 1``: the images of batch ``j`` of one process with ``W·B``.
    Every rank gets ``len // W`` items (the remainder is dropped, like ``drop_last``), so ranks
    never disagree on iteration counts.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world_size
        self.epoch_seed = seed

    def set_epoch_seed(self, seed: int) -> None:
        self.epoch_seed = seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """``(index, epoch seed)`` pairs: the seed travels with the index, so data-loader workers that outlive
        an epoch (``persistent_workers``) still augment each item with its epoch's seed."""
        g = torch.Generator().manual_seed(self.epoch_seed)
        order = torch.randperm(self.size, generator=g)
        per_rank = self.size // self.world
        return ((k, self.epoch_seed) for k in order[self.rank:per_rank * self.world:self.world].tolist())

    def __len__(self) -> int:
        return self.size // self.world


class MemorySampler(Sampler[int]):
    """``num_samples`` exemplar-memory indices per rank and epoch, seeded like :class:`EpochShuffleSampler`.

    The memory (``size`` images) is usually smaller than what an epoch draws, so the stream is a
    sequence of seeded permutations of the memory; rank ``r`` takes ``perm[r::world]`` of each, so
    within a permutation the ranks see disjoint images. Depends only on the epoch seed (resume).
    """

    def __init__(self, size: int, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if size < world_size:
            raise DataError(f"the exemplar memory holds {size} image(s), fewer than the {world_size} processes")
        self.size, self.num_samples, self.rank, self.world = size, num_samples, rank, world_size
        self.epoch_seed = seed

    def set_epoch_seed(self, seed: int) -> None:
        self.epoch_seed = seed

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(memory_seed(self.epoch_seed))
        out: List[int] = []
        while len(out) < self.num_samples:
            out += torch.randperm(self.size, generator=g)[self.rank::self.world].tolist()
        return iter(out[:self.num_samples])

    def __len__(self) -> int:
        return self.num_samples


class SeededStepDataset(StepDataset):
    """A :class:`StepDataset` whose item ``k`` is augmented with its own RNG, seeded by (epoch seed, ``k``).

    An image's crop and flip then depend only on the epoch and its place in the step's list, not
    on the process count, batch size, data-loader workers or a resume point: one process with
    batch ``W·B`` and ``W`` processes with ``B`` see identical global batches.
    """

    def __init__(self, *args: Any, seed: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self.transform, "rng"):
            raise TypeError(f"SeededStepDataset needs a transform with an `rng` attribute, got {self.transform!r}")
        self.transform = copy.copy(self.transform)  # its own rng slot (the memory dataset shares the original)
        self.epoch_seed = seed

    def set_epoch_seed(self, seed: int) -> None:
        self.epoch_seed = seed

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """Item ``k`` (``key``), or ``(k, epoch seed)`` as :class:`EpochShuffleSampler` yields it."""
        k, seed = key if isinstance(key, tuple) else (key, self.epoch_seed)
        self.transform.rng = random.Random(item_seed(seed, k))
        return super().__getitem__(k)


class JoinedStepDataset(SeededStepDataset):
    """The step's images followed by the memory's (``memory.batching=concat``, docs/methods.md §3.14): item ``k``
    is ``(image, label[, saliency], is_memory)``, memory items ``k ≥ num_current`` labelled with ``memory_lut``,
    every item with its own seed (:class:`SeededStepDataset`)."""

    def __init__(self, files: SegmentationFiles, current: np.ndarray, memory: np.ndarray, lut: np.ndarray,
                 memory_lut: np.ndarray, transform: Any, saliency: Any, seed: int) -> None:
        super().__init__(files, np.concatenate([np.asarray(current), np.asarray(memory)]).astype(np.int64), lut,
                         transform, saliency=saliency, seed=seed)
        self.num_current = len(current)
        self.memory_lut = np.asarray(memory_lut, dtype=np.uint8)

    def lut_for(self, k: int) -> np.ndarray:
        return self.lut if k < self.num_current else self.memory_lut

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        k = key[0] if isinstance(key, tuple) else key
        return (*super().__getitem__(key), torch.tensor(k >= self.num_current))


#: batches each data-loader worker prepares ahead on CUDA (PyTorch's default is 2)
CUDA_PREFETCH = 4


def feeding(device: torch.device, workers: int, persistent: bool) -> Dict[str, Any]:
    """DataLoader options that keep a GPU fed: pinned memory, ``CUDA_PREFETCH`` batches ahead per worker, and
    (``persistent``: a loader whose items carry their seed) workers kept across epochs. Nothing on a CPU."""
    if device.type != "cuda":
        return {"pin_memory": False}
    extra = {"prefetch_factor": CUDA_PREFETCH, "persistent_workers": persistent} if workers > 0 else {}
    return {"pin_memory": True, **extra}


def _as_batch(item: Sequence[torch.Tensor], is_memory: Optional[torch.Tensor] = None) -> Batch:
    return Batch(images=item[0], labels=item[1], saliency=item[2] if len(item) > 2 else None, is_memory=is_memory)


class TrainBatches:
    """A step's training batches as :class:`~sats.methods.base.Batch` (CPU tensors).

    Without memory: the current-step loader. With memory (docs/methods.md §3.12): each batch is a
    current-step batch of ``B // 2`` images followed by a memory batch of ``B − B // 2`` images
    (``is_memory`` marks the latter); an epoch is one pass over the current-step images, so it has
    about twice the iterations of a memory-less epoch. With a :class:`JoinedStepDataset` (``memory.batching=
    concat``) the memory is part of the shuffled list and its flag comes with each item.
    """

    def __init__(self, current: DataLoader, memory: Optional[DataLoader] = None) -> None:
        self.current, self.memory = current, memory
        self.joined = isinstance(current.dataset, JoinedStepDataset)

    @property
    def dataset(self) -> Any:
        """The current-step dataset (memory items included when they are joined to it)."""
        return self.current.dataset

    @property
    def num_current(self) -> int:
        """Current-step images of an epoch (memory images excluded)."""
        return self.current.dataset.num_current if self.joined else len(self.current.dataset)

    def __len__(self) -> int:
        return len(self.current)

    def set_epoch_seed(self, seed: int) -> None:
        self.current.sampler.set_epoch_seed(seed)
        if isinstance(self.current.dataset, SeededStepDataset):
            self.current.dataset.set_epoch_seed(seed)
        if self.memory is not None:
            self.memory.sampler.set_epoch_seed(seed)

    def __iter__(self) -> Iterator[Batch]:
        if self.memory is None:
            for item in self.current:
                yield _as_batch(item[:-1], item[-1]) if self.joined else _as_batch(item)
            return
        for current, memory in zip(self.current, self.memory):
            merged = [torch.cat([a, b]) for a, b in zip(current, memory)]
            is_memory = torch.cat([torch.zeros(len(current[0]), dtype=torch.bool),
                                   torch.ones(len(memory[0]), dtype=torch.bool)])
            yield _as_batch(merged, is_memory)


@dataclass
class ExperimentData:
    """Everything data-related of one experiment, built once and shared by every step."""

    cfg: ExperimentConfig
    task: Task
    train_files: SegmentationFiles
    val_files: SegmentationFiles
    splits: List[StepSplit]
    skipped: Dict[str, int] = field(default_factory=dict)
    _presence: Optional[np.ndarray] = field(default=None, repr=False)  # (N, K) train-list class presence

    @classmethod
    def build(cls, cfg: ExperimentConfig, dist: DistInfo) -> "ExperimentData":
        """Resolve the task, the file lists (with their content fingerprints), check every file
        (``data.check``) and compute the splits; DataError / ConfigError before anything is trained."""
        d = cfg.data
        train_files, val_files = resolve_files(d, "train"), resolve_files(d, "val")
        table = task_dataset_name(d)
        try:  # the folder layout's class count comes from its classes.txt
            task = get_task(table, d.task, d.order, num_classes=None if table in NUM_CLASSES else train_files.num_classes)
        except ValueError as exc:
            raise ConfigError(f"data.task={d.task!r}: {exc}") from exc
        cache = data_cache_dir(d)
        for files in (train_files, val_files):
            files.fingerprint(cache, d.scan_workers)
        progress = cfg.log.progress and dist.is_main
        bad = _check_files(d, train_files, val_files, progress) if d.check else {"train": set(), "val": set()}
        if d.reference_splits:  # index files refer to the full lists
            splits = import_reference_splits(Path(d.reference_splits), train_files, val_files, task)
            splits = [StepSplit(train=_without(s.train, bad["train"]), val=_without(s.val, bad["val"]),
                                test=_without(s.test, bad["val"])) for s in splits]
        elif bad["train"] or bad["val"]:  # the splits of the lists without the bad entries, in full-list positions
            keep_train = np.setdiff1d(np.arange(len(train_files)), sorted(bad["train"]))
            keep_val = np.setdiff1d(np.arange(len(val_files)), sorted(bad["val"]))
            sub = compute_splits(_subset(train_files, keep_train), _subset(val_files, keep_val), task,
                                 overlap=d.overlap, cache_dir=cache, workers=d.scan_workers, progress=progress)
            splits = [StepSplit(train=keep_train[s.train], val=keep_val[s.val], test=keep_val[s.test]) for s in sub]
        else:
            splits = compute_splits(train_files, val_files, task, overlap=d.overlap, cache_dir=cache,
                                    workers=d.scan_workers, progress=progress)
        return cls(cfg, task, train_files, val_files, splits, skipped={k: len(v) for k, v in bad.items() if v})

    def fingerprint(self) -> Dict[str, Any]:
        """What data the run sees (``results.json``): the resolved root and both lists' names and contents."""
        return {"root": str(Path(self.train_files.root).resolve()),
                **{split: {"images": len(f), "list": f.list_digest, "content": f.content_digest}
                   for split, f in (("train", self.train_files), ("val", self.val_files))}}

    # -- per step ---------------------------------------------------------------------------------
    def step_task(self, joint: bool) -> Task:
        return joint_task(self.task) if joint else self.task

    def split_at(self, step: int, joint: bool) -> StepSplit:
        if not joint:
            return self.splits[step]
        last = self.splits[-1]
        train = np.unique(np.concatenate([s.train for s in self.splits]))
        val = np.unique(np.concatenate([s.val for s in self.splits]))
        return StepSplit(train=train, val=val, test=last.test)

    def step_digest(self, step: int, joint: bool) -> str:
        """Hash of the exact images of a step, by content, and its classes (cache keys: step 0, thresholds)."""
        s = self.split_at(step, joint)
        t = self.step_task(joint)
        return digest({
            "train": self.train_files.positions_digest(s.train),
            "test": self.val_files.positions_digest(s.test),
            "classes": list(t.steps[step]), "channels": list(t.channel_classes),
        })

    def train_loader(self, step: int, joint: bool, train_cfg: TrainConfig, dist: DistInfo,
                     sampler_seed: int, label_table: Optional[np.ndarray] = None,
                     memory: Optional[StepMemory] = None, saliency: bool = False) -> TrainBatches:
        """The step's training batches; ``label_table`` (256,) replaces the step's training table.

        ``memory``: mix every batch half and half with these exemplar images, or (``memory.batching=concat``) join
        them to the step's list; they are labelled with ``memory_lut`` (``memory.labels=seen``) or like the step's
        images (``current``); ``saliency``: batches carry the ``data.saliency_root`` maps.
        """
        d, m = self.cfg.data, self.cfg.memory
        task = self.step_task(joint)
        split = self.split_at(step, joint)
        lut = train_lut(task, step) if label_table is None else label_table
        transform = train_transform(d.crop_size, scale=(d.scale_min, d.scale_max))
        joined = memory is not None and m.batching == "concat"
        positions = split.train if not joined else np.concatenate([split.train, memory.positions])
        source = self.saliency_source(positions) if saliency else None
        batch = d.batch_size if memory is None or joined else d.batch_size // 2
        if batch < 1:
            raise DataError(f"data.batch_size={d.batch_size} cannot be split between current and memory images")
        mem_lut = train_lut(task, step) if m.labels == "current" else memory_lut(task, step)
        if joined:
            ds: SeededStepDataset = JoinedStepDataset(self.train_files, split.train, memory.positions, lut, mem_lut,
                                                      transform, source, sampler_seed)
        else:
            ds = SeededStepDataset(self.train_files, split.train, lut, transform, saliency=source, seed=sampler_seed)
        if len(ds) // dist.world_size < batch and train_cfg.drop_last:
            raise DataError(f"step {step}: {len(ds)} training images cannot fill one batch of {batch} "
                            f"per process on {dist.world_size} process(es) (drop_last is on)")
        sampler = EpochShuffleSampler(len(ds), sampler_seed, dist.rank, dist.world_size)
        current = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=d.workers,
                             drop_last=train_cfg.drop_last, **feeding(dist.device, d.workers, persistent=True))
        if memory is None or joined:
            return TrainBatches(current)
        memory_batch = d.batch_size - batch
        mem_ds = StepDataset(self.train_files, memory.positions, mem_lut, transform,
                             saliency=self.saliency_source(memory.positions) if saliency else None)
        mem_sampler = MemorySampler(len(mem_ds), len(current) * memory_batch, sampler_seed, dist.rank,
                                    dist.world_size)
        mem_loader = DataLoader(mem_ds, batch_size=memory_batch, sampler=mem_sampler, num_workers=d.workers,
                                drop_last=True, **feeding(dist.device, d.workers, persistent=False))
        return TrainBatches(current, mem_loader)

    def extra_passes(self, step: int, joint: bool, dist: DistInfo, device: torch.device,
                     saliency: bool) -> Callable[..., Iterator[Batch]]:
        """``ctx.train_loader``: ``loader(label_table=None, name=None)`` is one more pass over the step's current-step
        images (no memory; ``data.batch_size`` per process) on ``device``, shuffled afresh at every call (the first
        call's order is the step's own, so its results do not depend on how many passes a method makes). A named
        pass (``name="nest/pretune/3"``) has its order and crops from (seed, step, name) alone: the same whatever
        passes ran before it (a cached pass that is skipped on a rerun shifts nothing), and it leaves the count
        of the unnamed calls as it was."""
        calls = [0]

        def loader(label_table: Optional[np.ndarray] = None, name: Optional[str] = None) -> Iterator[Batch]:
            if name is not None:
                seed = pass_seed(self.cfg.train.seed, step, 0, f"train_loader/{name}")  # every rank: one order
            else:
                seed = step_seed(self.cfg.train.seed, step, -1 - calls[0])
                calls[0] += 1
            for batch in self.train_loader(step, joint, self.cfg.train, dist, seed, label_table=label_table,
                                           saliency=saliency):
                yield batch.to(device)

        return loader

    # -- saliency and exemplar memory -------------------------------------------------------------
    def saliency_source(self, positions: Optional[np.ndarray] = None) -> FolderSaliency:
        """The ``data.saliency_root`` maps (checked to exist for ``positions`` of the train list).

        The synthetic dataset's maps are derived from its masks on first use (`ensure_saliency_from_masks`).
        """
        d = self.cfg.data
        if not d.saliency_root:
            raise DataError("saliency maps are needed but data.saliency_root is not set")
        root = resolve_saliency_root(d.saliency_root, d.root)
        if d.dataset == "synthetic":
            ensure_saliency_from_masks(self.train_files, root, self.train_files.fingerprint())
        source = FolderSaliency(root)
        if positions is not None:
            source.check(self.train_files.ids[int(i)] for i in positions)
        return source

    def train_presence(self, positions: np.ndarray) -> np.ndarray:
        """``(len(positions), K)`` bool: classes present in those training masks (cached scan when available)."""
        d = self.cfg.data
        if self._presence is None and not d.reference_splits and not self.skipped:
            self._presence = class_presence(self.train_files, data_cache_dir(d), d.scan_workers, progress=False)
        if self._presence is not None:
            return self._presence[np.asarray(positions, dtype=np.int64)]
        rows = [self.train_files.mask_classes(int(i)) for i in positions]
        return np.stack(rows) if rows else np.zeros((0, self.train_files.num_classes), dtype=bool)

    def step_memory(self, step: int, run_dir: Path, write: bool,
                    confidence: Optional[Confidence] = None) -> Optional[StepMemory]:
        """The exemplar memory of ``step`` (None without memory or at step 0).

        Loaded from ``<run_dir>/memory/step{t}.json`` when present (ids validated against the
        training list), else selected from step ``t − 1``'s training list and the memory of
        step ``t − 1`` and, with ``write``, stored there. ``confidence`` (the step-``t − 1`` model's
        ``images → (scores, channels)``, :meth:`~sats.methods.base.Method.confidence`) gives the
        round-robin selection its pseudo-labelled old classes (``memory.pseudo_threshold``).
        """
        m = self.cfg.memory
        if not m.enabled or step < 1:
            return None
        path = memory_path(run_dir, step)
        round_robin = m.selection == "round_robin"
        k = 0 if round_robin else per_class_quota(len(memory_classes(self.task, step)), m.size, m.per_class)
        if path.exists():
            return load_memory(path, self.train_files, self.task, step, k)
        previous = self.step_memory(step - 1, run_dir, write)
        positions = self.splits[step - 1].train
        if round_robin:
            memory = self._round_robin_memory(step, positions, previous, confidence)
        else:
            memory = build_step_memory(self.task, step, positions, self.train_presence(positions), m.size,
                                       m.per_class, previous)
        if write:
            save_memory(memory, self.train_files, path)
        quota = f"{memory.per_class} per class" if not round_robin else f"{m.size} in total, one class at a time"
        log.info("step %d: exemplar memory of %d images (%s over %d old classes) selected from step %d",
                 step, len(memory), quota, len(memory.lists), step - 1)
        return memory

    def _round_robin_memory(self, step: int, positions: np.ndarray, previous: Optional[StepMemory],
                            confidence: Optional[Confidence]) -> StepMemory:
        """DKD's selection (:func:`sats.data.memory.round_robin_memory`): candidates = step ``t − 1``'s images with
        their classes of ``C^{t−1}`` (and the old classes ``confidence`` finds), and the previous memory."""
        m, task = self.cfg.memory, self.task
        step_classes = [c for c in task.steps[step - 1] if c != 0]
        presence = self.train_presence(positions)[:, step_classes]
        candidates: Dict[int, set] = {int(p): {c for c, held in zip(step_classes, row) if held}
                                      for p, row in zip(positions, presence)}
        if m.pseudo_threshold is not None and step >= 2:
            if confidence is None:
                log.warning("step %d: no step-%d model to pseudo-label the memory candidates with; their classes are "
                            "the ground truth of step %d only", step, step - 1, step - 1)
            else:
                for p, found in self._pseudo_classes(step - 1, positions, confidence, m.pseudo_threshold).items():
                    candidates[p] |= found
        if previous is not None:
            recorded = previous.classes_of or {p: [c for c, entries in previous.lists.items() if p in entries]
                                               for p in previous.positions.tolist()}
            for p, held in recorded.items():
                candidates.setdefault(int(p), set()).update(int(c) for c in held)
        classes = memory_classes(task, step)
        lists = round_robin_memory({p: sorted(c) for p, c in candidates.items()}, classes, m.size,
                                   memory_seed(step_seed(self.cfg.train.seed, step)))
        if not any(lists.values()):
            raise DataError(f"memory of step {step}: no candidate image holds an old class {list(classes)}")
        chosen = sorted(p for entries in lists.values() for p in entries)
        return StepMemory(step=step, per_class=0, lists=lists, classes_of={p: sorted(candidates[p]) for p in chosen})

    def _pseudo_classes(self, step: int, positions: np.ndarray, confidence: Confidence,
                        threshold: float) -> Dict[int, set]:
        """Classes that ``confidence`` predicts with a score ≥ ``threshold`` on pixels labelled 0 of the step's
        training images (evaluation transform, the step's label table): ``{position: {class id}}``."""
        d, task = self.cfg.data, self.task
        ds = StepDataset(self.train_files, positions, train_lut(task, step), eval_transform(d.eval_size, mode=d.eval_mode))
        loader = DataLoader(ds, batch_size=1 if d.eval_mode == "full" else d.eval_batch_size, num_workers=d.workers)
        channel_classes = np.asarray(task.channel_classes)
        found: Dict[int, set] = {}
        start = 0
        for images, labels in loader:
            scores, channels = confidence(images)
            labels = labels.to(channels.device)
            hit = (labels == 0) & (scores >= threshold) & (channels > 0)
            present = torch.zeros(len(images), task.num_outputs(step), dtype=torch.long, device=channels.device)
            present.scatter_add_(1, torch.where(hit, channels, 0).flatten(1), hit.flatten(1).long())
            for b, row in enumerate((present[:, 1:] > 0).cpu().numpy()):
                found[int(positions[start + b])] = {int(channel_classes[c + 1]) for c in np.flatnonzero(row)}
            start += len(images)
        return found

    def eval_loader(self, step: int, joint: bool, kind: str, dist: DistInfo) -> DataLoader:
        """``kind`` = "test" (end-of-step, C^{0:t} kept) or "val" (per-epoch, C^t only)."""
        d = self.cfg.data
        task = self.step_task(joint)
        split = self.split_at(step, joint)
        positions, lut = (split.test, test_lut(task, step)) if kind == "test" else (split.val, val_lut(task, step))
        ds = StepDataset(self.val_files, positions, lut, eval_transform(d.eval_size, mode=d.eval_mode))
        batch = 1 if d.eval_mode == "full" else d.eval_batch_size
        sampler = ShardedEvalSampler(len(ds), rank=dist.rank, world_size=dist.world_size)
        return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=d.workers,
                          **feeding(dist.device, d.workers, persistent=False))


def _check_files(d: DataConfig, train_files: SegmentationFiles, val_files: SegmentationFiles,
                 progress: bool = True) -> Dict[str, set]:
    """Decode every image and mask of both lists; raise listing every problem, or (``data.on_error=skip``)
    return the bad positions per list ("train", "val"), which the run then leaves out."""
    problems = {kind: check_dataset(files, workers=d.scan_workers, progress=progress)
                for kind, files in (("train", train_files), ("val", val_files))}
    if d.on_error == "raise" and any(problems.values()):
        report = "\n".join(f"{kind} list of {files.root}: {format_problems(problems[kind], limit=200)}"
                           for kind, files in (("train", train_files), ("val", val_files)) if problems[kind])
        raise DataError(f"{sum(map(len, problems.values()))} bad file(s); nothing was trained:\n{report}\n"
                        "(fix or remove them, or set data.on_error=skip to run without them)")
    bad = {kind: {p.position for p in found} for kind, found in problems.items()}
    for kind, found in problems.items():
        if found:
            log.warning("data.on_error=skip: leaving out %d %s image(s) with bad files:\n%s", len(bad[kind]), kind,
                        format_problems(found, limit=200))
    return bad


def _subset(files: SegmentationFiles, keep: np.ndarray) -> SegmentationFiles:
    """The entries ``keep`` (positions, in order) of ``files``, with their content fingerprints."""
    sub = SegmentationFiles(files.name, files.root, files.split, [files.ids[i] for i in keep],
                            [files.image_paths[i] for i in keep], [files.mask_paths[i] for i in keep],
                            files.num_classes, files.class_names, files.palette)
    if files.mask_hashes is not None and files.image_hashes is not None:
        sub.set_fingerprints([files.mask_hashes[i] for i in keep], [files.image_hashes[i] for i in keep])
    return sub


def _without(positions: np.ndarray, drop: set) -> np.ndarray:
    if not drop:
        return positions
    return positions[~np.isin(positions, np.fromiter(drop, dtype=np.int64))]


def first_batch_images(loader: DataLoader, n: int) -> Optional[tuple]:
    """The first ``n`` (image, label) pairs of an evaluation loader (for overlays)."""
    images, labels = [], []
    for x, y in loader:
        images.append(x)
        labels.append(y)
        if sum(len(i) for i in images) >= n:
            break
    if not images:
        return None
    if len({tuple(i.shape[-2:]) for i in images}) > 1:
        return images[0][:n], labels[0][:n]
    return torch.cat(images)[:n], torch.cat(labels)[:n]
