"""Continual-learning tasks: which raw class ids each step adds (docs/methods.md §1.3).

A task is a tuple of steps; step ``t`` adds the raw class ids ``C^t``. Step 0
starts with background (class 0). Output channels are the concatenation of the
step lists (``Task.channel_classes``), so channel ``k`` predicts raw class
``channel_classes[k]``; for the natural ascending orders channel = class id.

Names:

* ``"B-I"`` (any dataset): classes 0..B at step 0, then ``I`` classes per step
  until ``num_classes - 1``, e.g. VOC ``"15-1"`` = 0–15 | 16 | 17 | 18 | 19 | 20
  and VOC ``"15-5"`` = 0–15 | 16–20 (2 steps), consistent with the reference keys.
* ``"offline"``: every class at step 0; VOC ``"offline18-20"``: {0, 18, 19, 20}.
* Reference keys that differ from the paper names are aliases:
  VOC ``"15-5s"`` = ``"15-1"``, ADE ``"50"`` = ``"50-50"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sats.data.classes import NUM_CLASSES

Steps = tuple[tuple[int, ...], ...]

_BASE_INCREMENT = re.compile(r"^(\d+)-(\d+)$")

# Canonical (paper) names listed per dataset; every one is built by the parser
# except the special names handled in `_named_steps`.
_TASK_NAMES: dict[str, tuple[str, ...]] = {
    "voc": ("offline", "offline18-20", "19-1", "15-5", "15-1", "10-1", "5-3", "10-10"),
    "ade": ("offline", "100-50", "100-10", "100-5", "50-50", "50-10", "25-25", "10-10"),
}

TASK_ALIASES: dict[str, dict[str, str]] = {
    "voc": {"15-5s": "15-1"},
    "ade": {"50": "50-50"},
}
"""Reference task keys (``tasks.py`` of the reference code) → canonical name."""

REFERENCE_KEYS: dict[str, dict[str, str]] = {
    dataset: {canonical: key for key, canonical in aliases.items()}
    for dataset, aliases in TASK_ALIASES.items()
}
"""Canonical name → reference key, where they differ (used to find reference split folders)."""


@dataclass(frozen=True)
class Task:
    """Class schedule of one continual-learning experiment.

    Attributes:
        dataset: dataset name ("voc", "ade", or any other).
        name: task name ("15-1", "100-10", "offline", "custom", ...).
        steps: raw class ids added at each step; ``steps[0][0] == 0`` (background).
        num_classes: classes of the dataset including background (21 VOC, 151 ADE).
    """

    dataset: str
    name: str
    steps: Steps
    num_classes: int

    def __post_init__(self) -> None:
        steps = tuple(tuple(int(c) for c in step) for step in self.steps)
        object.__setattr__(self, "steps", steps)
        _validate_steps(steps, self.num_classes, f"task {self.dataset}/{self.name}")

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def channel_classes(self) -> tuple[int, ...]:
        """Raw class id of every output channel (concatenation of the steps)."""
        return tuple(c for step in self.steps for c in step)

    @property
    def is_natural_order(self) -> bool:
        """True when channel k predicts raw class k for every channel."""
        return self.channel_classes == tuple(range(len(self.channel_classes)))

    def _check_step(self, t: int) -> None:
        if not 0 <= t < self.num_steps:
            raise IndexError(f"step {t} out of range for task {self.dataset}/{self.name} "
                             f"with {self.num_steps} steps (0..{self.num_steps - 1})")

    def new_classes(self, t: int) -> tuple[int, ...]:
        """C^t: raw ids added at step t (step 0 includes background)."""
        self._check_step(t)
        return self.steps[t]

    def old_classes(self, t: int) -> tuple[int, ...]:
        """C^{0:t-1}: raw ids of the earlier steps, background included; () at t = 0."""
        self._check_step(t)
        return tuple(c for step in self.steps[:t] for c in step)

    def seen_classes(self, t: int) -> tuple[int, ...]:
        """C^{0:t}: raw ids of steps 0..t."""
        self._check_step(t)
        return tuple(c for step in self.steps[: t + 1] for c in step)

    def head_sizes(self, t: int) -> list[int]:
        """Output sizes of the heads after step t: [|C^0|, ..., |C^t|]."""
        self._check_step(t)
        return [len(step) for step in self.steps[: t + 1]]

    def num_outputs(self, t: int) -> int:
        """K_t: total output channels after step t."""
        return sum(self.head_sizes(t))

    def new_channels(self, t: int) -> range:
        """Channels of C^t: K_{t-1} .. K_t - 1."""
        end = self.num_outputs(t)
        return range(end - len(self.steps[t]), end)

    def old_channels(self, t: int) -> range:
        """Channels of C^{0:t-1}: 0 .. K_{t-1} - 1 (empty at t = 0)."""
        return range(0, self.num_outputs(t) - len(self.steps[t]))

    def groups(self, t: int) -> dict[str, list[int]]:
        """Report groups after step t (docs/methods.md §1.7), as channel lists.

        "old" = step-0 channels (background included), "new" = every channel
        added at steps 1..t (empty at t = 0), "all" = 0..K_t-1.
        """
        num_outputs = self.num_outputs(t)
        num_base = len(self.steps[0])
        return {
            "old": list(range(num_base)),
            "new": list(range(num_base, num_outputs)),
            "all": list(range(num_outputs)),
        }

    def describe(self) -> str:
        """Human-readable step list, e.g. ``"0-15 | 16 | 17"``."""
        return " | ".join(_format_ids(step) for step in self.steps)


def _format_ids(ids: Sequence[int]) -> str:
    if len(ids) > 1 and list(ids) == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(str(c) for c in ids)


def _validate_steps(steps: Steps, num_classes: int, what: str) -> None:
    """Raise ValueError naming the problem if ``steps`` is not a valid class schedule."""
    if num_classes < 1 or num_classes > 255:
        raise ValueError(f"{what}: num_classes must be in 1..255 (255 is the ignore value), "
                         f"got {num_classes}")
    if len(steps) == 0:
        raise ValueError(f"{what}: a task needs at least one step")
    for t, step in enumerate(steps):
        if len(step) == 0:
            raise ValueError(f"{what}: step {t} adds no class")
        out_of_range = [c for c in step if not 0 <= c < num_classes]
        if out_of_range:
            raise ValueError(f"{what}: step {t} has class ids {out_of_range} outside "
                             f"0..{num_classes - 1} (num_classes={num_classes})")
        if len(set(step)) != len(step):
            repeated = sorted({c for c in step if step.count(c) > 1})
            raise ValueError(f"{what}: step {t} lists class ids {repeated} more than once")
    if steps[0][0] != 0:
        where = [t for t, step in enumerate(steps) if 0 in step]
        detail = f"it is at step {where[0]}" if where else "it is missing"
        raise ValueError(f"{what}: step 0 must start with background class 0 ({detail}; "
                         f"step 0 = {list(steps[0])})")
    first_step: dict[int, int] = {}
    for t, step in enumerate(steps):
        for c in step:
            if c in first_step:
                raise ValueError(f"{what}: steps must be disjoint, class {c} is in step "
                                 f"{first_step[c]} and step {t}")
            first_step[c] = t


def parse_task_name(name: str, num_classes: int) -> Steps:
    """Steps of a ``"B-I"`` name: 0..B at step 0, then I classes per step up to num_classes-1.

    Also accepts ``"offline"`` (one step with every class).
    """
    if name == "offline":
        return (tuple(range(num_classes)),)
    match = _BASE_INCREMENT.match(name)
    if match is None:
        raise ValueError(f"task name {name!r} is not of the form 'B-I' (B base classes, then "
                         f"I classes per step) nor 'offline'")
    base, increment = int(match.group(1)), int(match.group(2))
    last = num_classes - 1
    if not 1 <= base <= last:
        raise ValueError(f"task {name!r}: base size B={base} must be in 1..{last} "
                         f"(num_classes={num_classes})")
    if increment < 1:
        raise ValueError(f"task {name!r}: increment I must be >= 1")
    remaining = last - base
    if remaining % increment != 0:
        raise ValueError(f"task {name!r}: the {remaining} classes after the base "
                         f"({base + 1}..{last}) do not split into steps of {increment}")
    steps = [tuple(range(0, base + 1))]
    steps += [tuple(range(start, start + increment))
              for start in range(base + 1, num_classes, increment)]
    return tuple(steps)


def _named_steps(dataset: str, name: str, num_classes: int) -> Steps:
    if dataset == "voc" and name == "offline18-20":
        return ((0, 18, 19, 20),)
    return parse_task_name(name, num_classes)


def _steps_from_permutation(permutation: Sequence[int], template: Steps, name: str) -> Steps:
    """Re-fill the step sizes of ``template`` with the foreground classes of ``permutation``."""
    perm = [int(c) for c in permutation]
    if perm and perm[0] == 0:
        perm = perm[1:]
    if 0 in perm:
        raise ValueError(f"class order for task {name!r}: background 0 may only come first, "
                         f"found at position {perm.index(0) + 1}")
    sizes = [len(template[0]) - 1] + [len(step) for step in template[1:]]
    if len(perm) != sum(sizes):
        raise ValueError(f"class order for task {name!r}: got {len(perm)} foreground classes, "
                         f"the task's step sizes {sizes} need {sum(sizes)}")
    steps: list[tuple[int, ...]] = []
    start = 0
    for t, size in enumerate(sizes):
        block = tuple(perm[start:start + size])
        steps.append((0, *block) if t == 0 else block)
        start += size
    return tuple(steps)


def _is_id_list(value: object) -> bool:
    """True for a list-like of ids (list, tuple, array, OmegaConf ListConfig), False for one id."""
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes))


def canonical_name(dataset: str, name: str) -> str:
    """Resolve an alias (reference key) to the canonical task name."""
    return TASK_ALIASES.get(dataset, {}).get(name, name)


def get_task(dataset: str, name: str, order: Sequence[Sequence[int]] | Sequence[int] | None = None,
             num_classes: int | None = None) -> Task:
    """Build a task.

    Args:
        dataset: "voc", "ade", or any dataset name (then ``num_classes`` is required).
        name: a listed task name, an alias, any ``"B-I"`` name, or (with an
            explicit ``order``) any label such as "custom".
        order: either an explicit list of steps (list of lists of raw ids; the
            name is then only a label), or a flat permutation of the foreground
            classes (optionally starting with 0) that re-fills the step sizes of
            the named task (e.g. ADE "order-b").
        num_classes: classes incl. background; defaults to 21 (VOC) / 151 (ADE).
    """
    if num_classes is None:
        if dataset not in NUM_CLASSES:
            raise ValueError(f"dataset {dataset!r} has no built-in class count; pass num_classes")
        num_classes = NUM_CLASSES[dataset]
    elif dataset in NUM_CLASSES and num_classes != NUM_CLASSES[dataset]:
        raise ValueError(f"dataset {dataset!r} has {NUM_CLASSES[dataset]} classes, "
                         f"got num_classes={num_classes}")
    name = canonical_name(dataset, name)
    if order is None:
        return Task(dataset, name, _named_steps(dataset, name, num_classes), num_classes)
    order_list = list(order)
    if not order_list:
        raise ValueError(f"class order for task {name!r} is empty; a task needs at least one step")
    nested = [_is_id_list(step) for step in order_list]
    if all(nested):
        steps = tuple(tuple(int(c) for c in step) for step in order_list)  # type: ignore[union-attr]
    elif not any(nested):
        template = _named_steps(dataset, name, num_classes)
        steps = _steps_from_permutation(order_list, template, name)  # type: ignore[arg-type]
    else:
        raise ValueError(f"class order for task {name!r} must be a list of steps (lists of ids) "
                         f"or a flat permutation of ids, not a mix")
    return Task(dataset, name, steps, num_classes)


def list_tasks(dataset: str) -> list[str]:
    """Canonical task names defined for a dataset (aliases in ``TASK_ALIASES``)."""
    if dataset not in _TASK_NAMES:
        raise ValueError(f"no task table for dataset {dataset!r}; known: {sorted(_TASK_NAMES)} "
                         f"(any 'B-I' name works with get_task(..., num_classes=K))")
    return list(_TASK_NAMES[dataset])


def reference_key(task: Task) -> str:
    """Task key of the reference code (folder names of its split lists), e.g. "15-1" → "15-5s"."""
    return REFERENCE_KEYS.get(task.dataset, {}).get(task.name, task.name)


def read_class_order(path: str | Path) -> list[int]:
    """Read a flat class permutation from a text file (whitespace/comma separated, brackets ok).

    Reads e.g. ``splits/ade/order-b.txt`` (a printed NumPy array).
    """
    text = Path(path).read_text()
    tokens = re.findall(r"-?\d+", text)
    if not tokens:
        raise ValueError(f"{path}: no class ids found")
    order = [int(tok) for tok in tokens]
    if len(set(order)) != len(order):
        raise ValueError(f"{path}: class order repeats ids")
    return order
