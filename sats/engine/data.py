"""Per-experiment data: dataset files, task, per-step splits, datasets and loaders."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from sats.config import DataConfig, ExperimentConfig, TrainConfig, digest
from sats.data.datasets import DataError, SegmentationFiles, StepDataset, build_files, check_dataset, format_problems
from sats.data.labels import test_lut, train_lut, val_lut
from sats.data.splits import StepSplit, compute_splits, import_reference_splits
from sats.data.tasks import Task, get_task
from sats.data.transforms import eval_transform, train_transform
from sats.engine.distributed import DistInfo
from sats.engine.evaluator import ShardedEvalSampler

log = logging.getLogger("sats")


def resolve_files(cfg: DataConfig, split: str) -> SegmentationFiles:
    """The image list of one split; the synthetic dataset is generated on first use."""
    if cfg.dataset == "synthetic":
        from sats.data.synthetic import ensure_synthetic

        s = cfg.synthetic
        root = ensure_synthetic(cfg.root, num_train=s.num_train, num_val=s.num_val, size=(s.min_size, s.max_size),
                                seed=s.seed)
        return build_files("voc", root, split)
    return build_files(cfg.dataset, cfg.root, split)


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
    exactly the batches an uninterrupted run would. Every rank gets ``len // world`` items
    (the remainder is dropped, like ``drop_last``), so ranks never disagree on iteration counts.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world_size
        self.epoch_seed = seed

    def set_epoch_seed(self, seed: int) -> None:
        self.epoch_seed = seed

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.epoch_seed)
        order = torch.randperm(self.size, generator=g)
        per_rank = self.size // self.world
        return iter(order[self.rank * per_rank:(self.rank + 1) * per_rank].tolist())

    def __len__(self) -> int:
        return self.size // self.world


@dataclass
class ExperimentData:
    """Everything data-related of one experiment, built once and shared by every step."""

    cfg: ExperimentConfig
    task: Task
    train_files: SegmentationFiles
    val_files: SegmentationFiles
    splits: List[StepSplit]
    skipped: Dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, cfg: ExperimentConfig, dist: DistInfo) -> "ExperimentData":
        d = cfg.data
        task = get_task(task_dataset_name(d), d.task, d.order)
        train_files, val_files = resolve_files(d, "train"), resolve_files(d, "val")
        cache = Path(d.cache_dir)
        if d.reference_splits:
            splits = import_reference_splits(Path(d.reference_splits), train_files, val_files, task)
        else:
            splits = compute_splits(train_files, val_files, task, overlap=d.overlap, cache_dir=cache / "splits")
        data = cls(cfg, task, train_files, val_files, splits)
        if d.check:
            data._check_files()
        return data

    def _check_files(self) -> None:
        """Validate every file the run will read; raise with every problem, or drop bad files (on_error=skip)."""
        train_used = np.unique(np.concatenate([s.train for s in self.splits]))
        val_used = np.unique(np.concatenate([np.concatenate([s.val, s.test]) for s in self.splits]))
        bad: Dict[str, set] = {}
        for kind, files, used in (("train", self.train_files, train_used), ("val", self.val_files, val_used)):
            problems = check_dataset(files, positions=used.tolist(), workers=self.cfg.data.scan_workers)
            if problems:
                if self.cfg.data.on_error == "raise":
                    raise DataError(f"{len(problems)} bad file(s) in the {kind} list of {files.root}:\n"
                                    f"{format_problems(problems)}\n(set data.on_error=skip to train without them)")
                bad[kind] = {p.position for p in problems}
                log.warning("skipping %d bad %s file(s):\n%s", len(bad[kind]), kind, format_problems(problems))
        if bad:
            drop_train, drop_val = bad.get("train", set()), bad.get("val", set())
            self.splits = [StepSplit(train=_without(s.train, drop_train), val=_without(s.val, drop_val),
                                     test=_without(s.test, drop_val)) for s in self.splits]
            self.skipped = {k: len(v) for k, v in bad.items()}

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
        """Hash of the exact images and classes of a step (step-0 sharing key component)."""
        s = self.split_at(step, joint)
        t = self.step_task(joint)
        return digest({
            "train": [self.train_files.ids[i] for i in s.train],
            "test": [self.val_files.ids[i] for i in s.test],
            "classes": list(t.steps[step]), "channels": list(t.channel_classes),
            "train_list": self.train_files.list_digest, "val_list": self.val_files.list_digest,
        })

    def train_loader(self, step: int, joint: bool, train_cfg: TrainConfig, dist: DistInfo,
                     sampler_seed: int, label_table: Optional[np.ndarray] = None) -> DataLoader:
        """The step's training images; ``label_table`` (256,) replaces the step's training table."""
        d = self.cfg.data
        task = self.step_task(joint)
        split = self.split_at(step, joint)
        lut = train_lut(task, step) if label_table is None else label_table
        ds = StepDataset(self.train_files, split.train, lut,
                         train_transform(d.crop_size, scale=(d.scale_min, d.scale_max)))
        if len(ds) // dist.world_size < d.batch_size and train_cfg.drop_last:
            raise DataError(f"step {step}: {len(ds)} training images cannot fill one batch of {d.batch_size} "
                            f"per process on {dist.world_size} process(es) (drop_last is on)")
        sampler = EpochShuffleSampler(len(ds), sampler_seed, dist.rank, dist.world_size)
        return DataLoader(ds, batch_size=d.batch_size, sampler=sampler, num_workers=d.workers,
                          drop_last=train_cfg.drop_last, pin_memory=dist.device.type == "cuda",
                          persistent_workers=False)

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
                          pin_memory=dist.device.type == "cuda")


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
