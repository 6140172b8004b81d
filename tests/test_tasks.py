"""Task tables (docs/methods.md §1.3), the "B-I" parser, explicit orders and report groups."""

from __future__ import annotations

from pathlib import Path

import pytest

from sats.data.tasks import Task, get_task, list_tasks, parse_task_name, read_class_order, reference_key

SPEC_SPLITS = Path("/work/shared/spec/splits")


def r(a: int, b: int) -> tuple[int, ...]:
    """Inclusive id range a..b."""
    return tuple(range(a, b + 1))


@pytest.mark.parametrize(("name", "steps"), [
    ("offline", [r(0, 20)]),
    ("offline18-20", [(0, 18, 19, 20)]),
    ("19-1", [r(0, 19), (20,)]),
    ("15-5", [r(0, 15), r(16, 20)]),
    ("15-1", [r(0, 15), (16,), (17,), (18,), (19,), (20,)]),
    ("15-5s", [r(0, 15), (16,), (17,), (18,), (19,), (20,)]),
    ("5-3", [r(0, 5), r(6, 8), r(9, 11), r(12, 14), r(15, 17), r(18, 20)]),
    ("10-1", [r(0, 10)] + [(c,) for c in range(11, 21)]),
    ("10-10", [r(0, 10), r(11, 20)]),
    ("2-2", [r(0, 2)] + [r(c, c + 1) for c in range(3, 21, 2)]),
])
def test_voc_tasks(name: str, steps: list[tuple[int, ...]]) -> None:
    task = get_task("voc", name)
    assert task.steps == tuple(steps)
    assert task.num_classes == 21
    assert task.num_steps == len(steps)


def test_voc_15_1_details() -> None:
    task = get_task("voc", "15-1")
    assert task.name == "15-1" and get_task("voc", "15-5s") == task
    assert reference_key(task) == "15-5s"
    assert task.num_steps == 6
    assert task.head_sizes(0) == [16]
    assert task.head_sizes(5) == [16, 1, 1, 1, 1, 1]
    assert task.num_outputs(2) == 18
    assert task.new_classes(2) == (17,)
    assert task.old_classes(0) == ()
    assert task.old_classes(2) == r(0, 16)
    assert task.seen_classes(2) == r(0, 17)
    assert task.new_channels(2) == range(17, 18)
    assert task.old_channels(2) == range(0, 17)
    assert task.old_channels(0) == range(0, 0)
    assert task.channel_classes == r(0, 20)
    assert task.is_natural_order
    assert task.describe() == "0-15 | 16 | 17 | 18 | 19 | 20"
    with pytest.raises(IndexError, match="step 6 out of range"):
        task.new_classes(6)


@pytest.mark.parametrize(("name", "num_steps", "first_new"), [
    ("offline", 1, None), ("100-50", 2, r(101, 150)), ("100-10", 6, r(101, 110)),
    ("100-5", 11, r(101, 105)), ("50-50", 3, r(51, 100)), ("50", 3, r(51, 100)),
    ("50-10", 11, r(51, 60)), ("25-25", 6, r(26, 50)), ("10-10", 15, r(11, 20)),
])
def test_ade_tasks(name: str, num_steps: int, first_new: tuple[int, ...] | None) -> None:
    task = get_task("ade", name)
    assert task.num_classes == 151
    assert task.num_steps == num_steps
    assert task.channel_classes == r(0, 150)
    if first_new is not None:
        assert task.new_classes(1) == first_new
        assert task.steps[-1][-1] == 150


def test_ade_aliases_and_head_sizes() -> None:
    assert get_task("ade", "50").name == "50-50"
    assert reference_key(get_task("ade", "50-50")) == "50"
    task = get_task("ade", "100-10")
    assert task.head_sizes(5) == [101, 10, 10, 10, 10, 10]
    assert task.num_outputs(5) == 151
    assert task.new_channels(5) == range(141, 151)


def test_list_tasks() -> None:
    assert set(list_tasks("voc")) >= {"offline", "19-1", "15-5", "15-1", "10-1", "5-3", "10-10",
                                      "offline18-20"}
    assert set(list_tasks("ade")) >= {"offline", "100-50", "100-10", "100-5", "50-50", "50-10",
                                      "25-25", "10-10"}
    for dataset in ("voc", "ade"):
        for name in list_tasks(dataset):
            assert get_task(dataset, name).name == name
    with pytest.raises(ValueError, match="no task table for dataset 'cityscapes'"):
        list_tasks("cityscapes")


def test_groups() -> None:
    task = get_task("voc", "15-1")
    assert task.groups(0) == {"old": list(range(16)), "new": [], "all": list(range(16))}
    assert task.groups(2) == {"old": list(range(16)), "new": [16, 17], "all": list(range(18))}
    assert task.groups(5)["new"] == [16, 17, 18, 19, 20]
    ade = get_task("ade", "100-50").groups(1)
    assert len(ade["old"]) == 101 and ade["new"] == list(range(101, 151))


def test_parser() -> None:
    assert parse_task_name("3-2", 8) == (r(0, 3), (4, 5), (6, 7))
    assert parse_task_name("offline", 4) == (r(0, 3),)
    custom = get_task("mydata", "3-2", num_classes=8)
    assert custom.num_steps == 3 and custom.num_classes == 8
    with pytest.raises(ValueError, match="do not split into steps of 3"):
        parse_task_name("15-3", 21)
    with pytest.raises(ValueError, match="base size B=21"):
        parse_task_name("21-1", 21)
    with pytest.raises(ValueError, match="not of the form 'B-I'"):
        get_task("voc", "fifteen")
    with pytest.raises(ValueError, match="pass num_classes"):
        get_task("mydata", "3-2")
    with pytest.raises(ValueError, match="has 21 classes"):
        get_task("voc", "15-1", num_classes=30)


def test_explicit_order() -> None:
    order = [[0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11], [17], [3], [6], [18], [10]]
    task = get_task("voc", "15-1_b", order=order)
    assert task.steps[1] == (17,)
    assert task.channel_classes[:3] == (0, 12, 9)
    assert task.channel_classes[16:] == (17, 3, 6, 18, 10)
    assert not task.is_natural_order
    assert task.new_channels(3) == range(18, 19)


@pytest.mark.parametrize(("order", "message"), [
    ([[0, 1, 2], [2, 3]], "class 2 is in step 0 and step 1"),
    ([[1, 2], [0, 3]], "step 0 must start with background class 0 \\(it is at step 1"),
    ([[1, 2], [3]], "it is missing"),
    ([[0, 1], [21]], "step 1 has class ids \\[21\\] outside 0..20"),
    ([[0, 1], []], "step 1 adds no class"),
    ([[0, 1, 1]], "step 0 lists class ids \\[1\\] more than once"),
    ([], "at least one step"),
    ([[0, 1], 2], "not a mix"),
])
def test_explicit_order_errors(order: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_task("voc", "custom", order=order)


def test_flat_permutation_order() -> None:
    perm = list(range(150, 0, -1))
    task = get_task("ade", "100-50", order=perm)
    assert task.steps[0] == (0, *range(150, 50, -1))
    assert task.steps[1] == r(1, 50)[::-1]
    assert get_task("ade", "100-50", order=[0, *perm]) == task
    with pytest.raises(ValueError, match="got 149 foreground classes"):
        get_task("ade", "100-50", order=perm[:-1])
    with pytest.raises(ValueError, match="background 0 may only come first"):
        get_task("ade", "100-50", order=[*perm[:-1], 0])


def test_task_is_hashable_and_normalised() -> None:
    task = Task("voc", "x", [[0, 1], [2]], 21)  # type: ignore[arg-type]
    assert task.steps == ((0, 1), (2,))
    assert hash(task) == hash(Task("voc", "x", ((0, 1), (2,)), 21))


@pytest.mark.skipif(not (SPEC_SPLITS / "ade" / "order-b.txt").is_file(),
                    reason="reference split folder /work/shared/spec/splits not present")
def test_read_order_b() -> None:
    order = read_class_order(SPEC_SPLITS / "ade" / "order-b.txt")
    assert sorted(order) == list(range(1, 151))
    task = get_task("ade", "100-10", order=order)
    assert task.steps[0][:3] == (0, 74, 19) and task.num_steps == 6
