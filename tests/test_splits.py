"""Per-step image selection (docs/methods.md §1.4), its caches, and reference index import."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sats.data.splits as splits_module
from data_helpers import class_mask, save_mask, write_voc
from sats.data.classes import ADE_CLASSES, VOC_CLASSES
from sats.data.datasets import DataError, SegmentationFiles, build_files
from sats.data.splits import class_presence, compute_splits, import_reference_splits
from sats.data.tasks import get_task

SPEC_SPLITS = Path("/work/shared/spec/splits")

# classes per mask (255 borders added to some); expected selections worked out by hand below
TRAIN = {"t0": [0, 1], "t1": [0, 1, 3], "t2": [3], "t3": [0, 4, 5], "t4": [0], "t5": [2, 255],
         "t6": [5, 6], "t7": [0, 255, 1, 5]}
VAL = {"v0": [0, 1], "v1": [3], "v2": [5, 0], "v3": [0], "v4": [2, 4]}
STEPS = [[0, 1, 2], [3, 4], [5]]


def make_voc(root: Path, train: dict[str, list[int]], val: dict[str, list[int]]) -> Path:
    masks = {k: class_mask(v) for k, v in {**train, **val}.items()}
    return write_voc(root, masks, {"train": list(train), "val": list(val)})


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[SegmentationFiles, SegmentationFiles]:
    root = make_voc(tmp_path / "voc", TRAIN, VAL)
    return build_files("voc", root, "train"), build_files("voc", root, "val")


def as_lists(splits: list[splits_module.StepSplit], kind: str) -> list[list[int]]:
    return [getattr(s, kind).tolist() for s in splits]


def test_class_presence(tiny: tuple[SegmentationFiles, SegmentationFiles], tmp_path: Path) -> None:
    train, _ = tiny
    presence = class_presence(train, tmp_path / "cache", workers=2, progress=False)
    assert presence.shape == (8, 21) and presence.dtype == bool
    for i, classes in enumerate(TRAIN.values()):
        assert presence[i].nonzero()[0].tolist() == sorted(c for c in classes if c != 255)


def test_overlapped_and_disjoint_selection(tiny: tuple[SegmentationFiles, SegmentationFiles]) -> None:
    train, val = tiny
    task = get_task("voc", "toy", order=STEPS)
    overlapped = compute_splits(train, val, task, overlap=True, cache_dir=None, progress=False)
    assert as_lists(overlapped, "train") == [[0, 1, 5, 7], [1, 2, 3], [3, 6, 7]]
    disjoint = compute_splits(train, val, task, overlap=False, cache_dir=None, progress=False)
    # t1 (has future 3) leaves step 0; t3 (future 5) leaves step 1; t6 (6 is in no step) and
    # t7 (future 5 at step 0) are dropped where they hold a class outside C_old ∪ C_s ∪ {0}
    assert as_lists(disjoint, "train") == [[0, 5], [1, 2], [3, 7]]
    for result in (overlapped, disjoint):  # val / test use the overlapped rule in both settings
        assert as_lists(result, "val") == [[0, 4], [1, 4], [2]]
        assert as_lists(result, "test") == [[0, 4], [0, 1, 4], [0, 1, 2, 4]]
        assert all(s.train.dtype == np.int64 for s in result)


def _count_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = SegmentationFiles.mask_classes

    def counting(self: SegmentationFiles, i: int) -> np.ndarray:
        calls.append(i)
        return original(self, i)

    monkeypatch.setattr(SegmentationFiles, "mask_classes", counting)
    return calls


def test_presence_cache_is_keyed_by_mask_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cache = tmp_path / "cache"
    first = build_files("voc", make_voc(tmp_path / "d1", TRAIN, VAL), "train")
    calls = _count_scans(monkeypatch)
    presence = class_presence(first, cache, progress=False)
    assert len(calls) == 8
    np.testing.assert_array_equal(class_presence(build_files("voc", first.root, "train"), cache, progress=False),
                                  presence)
    assert len(calls) == 8  # served from the cache
    # other names, same mask bytes (reversed): the entries are found by content
    renamed = {f"x{k}": v for k, v in zip(range(8), reversed(list(TRAIN.values())))}
    second = build_files("voc", make_voc(tmp_path / "d2", renamed, VAL), "train")
    np.testing.assert_array_equal(class_presence(second, cache, progress=False), presence[::-1])
    assert len(calls) == 8
    # the same names with other contents: every mask is scanned again, with a line saying why
    masks = {k: class_mask(v, height=10 if k != "t7" else 12) for k, v in {**TRAIN, **VAL}.items()}
    third = build_files("voc", write_voc(tmp_path / "d3", masks, {"train": list(TRAIN), "val": list(VAL)}), "train")
    assert third.list_digest == first.list_digest
    with caplog.at_level("INFO", logger="sats"):
        got = class_presence(third, cache, progress=False)
    assert sorted(calls[8:]) == [0, 1, 2, 3, 4, 5, 6]  # t7 kept its content
    assert "7 of 8 masks are not in the cache" in caplog.text
    np.testing.assert_array_equal(got, presence)
    # a store of another format is not used
    [store] = cache.glob("presence_k21.npz")
    np.savez(store, hashes=np.asarray(["x"]), presence=np.zeros((1, 21), bool), version=np.asarray("old"))
    np.testing.assert_array_equal(class_presence(build_files("voc", first.root, "train"), cache, progress=False),
                                  presence)
    assert len(calls) == 7 + 8 + 8


def test_presence_reports_all_bad_masks(tmp_path: Path) -> None:
    root = make_voc(tmp_path / "voc", TRAIN, VAL)
    (root / "SegmentationClassAug" / "t2.png").unlink()
    (root / "SegmentationClassAug" / "t5.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="2 bad file") as info:
        class_presence(build_files("voc", root, "train"), None, progress=False)
    assert "t2.png: missing mask file" in str(info.value) and "t5.png: unreadable" in str(info.value)


def test_splits_follow_an_edited_mask(tiny: tuple[SegmentationFiles, SegmentationFiles], tmp_path: Path) -> None:
    """A mask edited in place changes the next start's splits (no stale split list)."""
    train, val = tiny
    task = get_task("voc", "toy", order=STEPS)
    cache = tmp_path / "cache"
    before = compute_splits(train, val, task, overlap=True, cache_dir=cache, progress=False)
    assert 2 not in as_lists(before, "train")[2]
    save_mask(train.mask_paths[2], class_mask([0, 5]))  # t2 now holds class 5 (step 2) instead of 3
    edited = build_files("voc", train.root, "train")
    after = compute_splits(edited, build_files("voc", val.root, "val"), task, overlap=True, cache_dir=cache,
                           progress=False)
    assert 2 in as_lists(after, "train")[2] and 2 not in as_lists(after, "train")[1]


def test_compute_splits_class_count_mismatch(tiny: tuple[SegmentationFiles, SegmentationFiles]) -> None:
    train, val = tiny
    with pytest.raises(ValueError, match="has 21 classes but task ade/100-50 expects 151"):
        compute_splits(train, val, get_task("ade", "100-50"), overlap=True)


# ------------------------------------------------------------------------- reference import

def fake_files(split: str, n: int, dataset: str = "voc") -> SegmentationFiles:
    """A list of ``n`` entries whose files do not exist (only positions matter here)."""
    ids = [f"{split}{i:05d}" for i in range(n)]
    names = list(VOC_CLASSES) if dataset == "voc" else list(ADE_CLASSES)
    return SegmentationFiles(dataset, Path("/nonexistent"), split, ids,
                             [Path(f"/nonexistent/{i}.jpg") for i in ids],
                             [Path(f"/nonexistent/{i}.png") for i in ids], len(names), names)


def write_reference(folder: Path, steps: int, train_max: int = 9, val_max: int = 4) -> Path:
    folder.mkdir(parents=True)
    for s in range(steps):
        np.save(folder / f"train-{s}.npy", np.array([s, train_max], dtype=np.int64))
        np.save(folder / f"val-{s}.npy", np.array([s], dtype=np.int32))
        np.save(folder / f"test_on_val-{s}.npy", np.array([0, val_max], dtype=np.int64))
    return folder


def test_import_reference_splits(tmp_path: Path) -> None:
    train, val = fake_files("train", 10), fake_files("val", 5)
    task = get_task("voc", "19-1")
    splits = import_reference_splits(write_reference(tmp_path / "ok", 2), train, val, task)
    assert len(splits) == 2
    assert splits[1].train.tolist() == [1, 9] and splits[1].val.tolist() == [1]
    assert splits[1].test.tolist() == [0, 4]
    assert all(s.val.dtype == np.int64 for s in splits)


def test_import_reference_errors(tmp_path: Path) -> None:
    train, val = fake_files("train", 10), fake_files("val", 5)
    task = get_task("voc", "19-1")
    bad = write_reference(tmp_path / "bad", 2, val_max=5)
    with pytest.raises(DataError, match=r"test_on_val-0.npy: index out of range: min 0, max 5, "
                                        r"but the 'val' list has 5 images"):
        import_reference_splits(bad, train, val, task)
    with pytest.raises(DataError, match="missing index files .*train-2.npy, val-2.npy, test_on_val-2.npy"):
        import_reference_splits(write_reference(tmp_path / "short", 2), train, val,
                                get_task("voc", "10-10", order=[[0, 1], [2], [3]]))
    with pytest.raises(DataError, match="beyond task voc/offline .*train-1.npy"):
        import_reference_splits(write_reference(tmp_path / "long", 2), train, val,
                                get_task("voc", "offline"))
    with pytest.raises(DataError, match="reference split folder not found"):
        import_reference_splits(tmp_path / "absent", train, val, task)


needs_spec = pytest.mark.skipif(not SPEC_SPLITS.is_dir(),
                                reason="reference split lists /work/shared/spec/splits not present")


@needs_spec
def test_real_reference_voc_15_1() -> None:
    splits = import_reference_splits(SPEC_SPLITS / "voc" / "15-5s-ov", fake_files("train", 10582),
                                     fake_files("val", 1449), get_task("voc", "15-1"))
    assert [len(s.train) for s in splits] == [9568, 487, 299, 491, 500, 548]
    assert len(splits[-1].test) == 1449
    with pytest.raises(DataError, match=r"train-0.npy: index out of range: min 0, max 10581, but "
                                        r"the 'train' list has 10000 images"):
        import_reference_splits(SPEC_SPLITS / "voc" / "15-5s-ov", fake_files("train", 10000),
                                fake_files("val", 1449), get_task("voc", "15-1"))


@needs_spec
def test_real_reference_ade_100_50() -> None:
    splits = import_reference_splits(SPEC_SPLITS / "ade" / "100-50-ov",
                                     fake_files("train", 20210, "ade"), fake_files("val", 2000, "ade"),
                                     get_task("ade", "100-50"))
    assert [len(s.train) for s in splits] == [20192, 9390]
    assert len(splits[-1].test) == 2000
