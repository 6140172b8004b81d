"""Property tests of the mask/label pipeline: random class orders and random label maps.

Whatever the order of the classes and the raw values of a mask, a step's lookup table maps every
pixel to a channel of that step (train/val: background or a new channel; test/memory: a seen
channel) or to 255, exactly as a slow per-pixel reference does, and the training transform
(crop, nearest resize, flip, 255 padding) never creates a value that was not in the mask.
"""

from __future__ import annotations

import random
from typing import List, Sequence

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sats.data.labels import apply_lut, memory_lut, test_lut, train_lut, val_lut
from sats.data.tasks import Task, get_task
from sats.data.transforms import train_transform

IGNORE = 255
TABLES = {"train": train_lut, "val": val_lut, "test": test_lut, "memory": memory_lut}


@st.composite
def tasks(draw) -> Task:
    """A valid explicit class order: a random subset of the foreground classes, shuffled, cut into steps."""
    num_classes = draw(st.integers(2, 12))
    foreground = draw(st.permutations(list(range(1, num_classes))))
    used = foreground[: draw(st.integers(1, len(foreground)))]  # classes in no step stay background
    cuts = sorted(draw(st.sets(st.integers(1, len(used)), max_size=3)) | {len(used)})
    first = draw(st.integers(0, cuts[0]))  # step 0: background + the first `first` classes
    steps: List[List[int]] = [[0, *used[:first]]]
    start = first
    for cut in cuts:
        if cut > start:
            steps.append(list(used[start:cut]))
            start = cut
    return get_task("fuzz", "custom", order=steps, num_classes=num_classes)


def masks(task: Task):
    """(H, W) uint8 masks of dataset values (classes and 255) plus, rarely, values outside the classes."""
    values = st.one_of(st.integers(0, task.num_classes - 1), st.just(IGNORE), st.integers(task.num_classes, 254))
    return st.tuples(st.integers(1, 9), st.integers(1, 9)).flatmap(
        lambda hw: st.lists(values, min_size=hw[0] * hw[1], max_size=hw[0] * hw[1]).map(
            lambda v: np.asarray(v, dtype=np.uint8).reshape(hw)))


def reference_label(task: Task, step: int, table: str, value: int) -> int:
    """The rule of docs/methods.md §1.5 for one pixel, written out."""
    if value == IGNORE or value >= task.num_classes:
        return IGNORE
    kept: Sequence[int] = task.new_classes(step) if table in ("train", "val") else task.seen_classes(step)
    return list(task.channel_classes).index(value) if value in kept else 0


def allowed_channels(task: Task, step: int, table: str) -> set:
    if table in ("train", "val"):
        return {0, *task.new_channels(step)}
    return set(range(task.num_outputs(step)))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_tables_keep_labels_inside_the_steps_channels(data) -> None:
    task = data.draw(tasks(), label="task")
    mask = data.draw(masks(task), label="mask")
    for step in range(task.num_steps):
        for table, make in TABLES.items():
            lut = make(task, step)
            out = apply_lut(lut, mask)
            assert out.shape == mask.shape and out.dtype == np.uint8
            assert set(np.unique(out).tolist()) <= allowed_channels(task, step, table) | {IGNORE}, (step, table)
            expected = [[reference_label(task, step, table, int(v)) for v in row] for row in mask]
            assert out.tolist() == expected, (task.steps, step, table)
            # the tensor path (used on the device) agrees with the numpy path
            assert apply_lut(torch.from_numpy(lut), torch.from_numpy(mask.astype(np.int64))).tolist() == expected


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_training_transform_creates_no_label(data) -> None:
    task = data.draw(tasks(), label="task")
    mask = data.draw(masks(task), label="mask")
    step = data.draw(st.integers(0, task.num_steps - 1), label="step")
    crop = data.draw(st.integers(2, 12), label="crop")
    labels = apply_lut(train_lut(task, step), mask)
    image = Image.fromarray(np.zeros((*mask.shape, 3), dtype=np.uint8))
    transform = train_transform(crop, scale=(0.3, 2.0), rng=random.Random(data.draw(st.integers(0, 2**16))))
    _, out = transform(image, labels)
    assert out.shape == (crop, crop)
    assert set(out.unique().tolist()) <= set(labels.flatten().tolist()) | {IGNORE}
    assert set(out.unique().tolist()) <= allowed_channels(task, step, "train") | {IGNORE}


def test_strategy_reaches_multi_step_orders() -> None:
    """The generator is not degenerate: the first examples include tasks of several steps and classes."""
    seen = []

    @settings(max_examples=60, deadline=None, database=None)
    @given(tasks())
    def collect(task: Task) -> None:
        seen.append(task)

    collect()
    assert max(t.num_steps for t in seen) >= 3
    assert any(not t.is_natural_order for t in seen)
    assert any(len(t.channel_classes) < t.num_classes for t in seen)  # classes outside every step
