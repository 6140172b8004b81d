"""File lists (VOC / ADE20K / folder layouts), validated reading, check_dataset, StepDataset."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import class_mask, save_image, save_mask, truncate_file, write_ade, write_folder, write_voc
from sats.data.datasets import (DataError, SegmentationFiles, StepDataset, build_files, check_dataset,
                                format_problems)
from sats.data.labels import train_lut
from sats.data.tasks import get_task
from sats.data.transforms import eval_transform

MASKS = {
    "a": class_mask([0, 1], border=True),
    "b": class_mask([0, 16, 17]),
    "c": class_mask([20]),
}


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    return write_voc(tmp_path / "voc", MASKS, {"train": ["a", "b"], "val": ["c", "a"]})


def test_voc_files(voc_root: Path) -> None:
    train = build_files("voc", voc_root, "train")
    assert len(train) == 2 and train.ids == ["a", "b"]
    assert train.image_paths[1] == voc_root / "JPEGImages" / "b.jpg"
    assert train.mask_paths[0] == voc_root / "SegmentationClassAug" / "a.png"
    assert train.num_classes == 21 and train.class_names[15] == "person"
    assert train.palette.shape == (21, 3) and train.palette[1].tolist() == [128, 0, 0]
    image = train.read_image(0)
    assert image.mode == "RGB" and image.size == (16, 12)
    with Image.open(train.mask_paths[0]) as raw:
        assert raw.mode == "P"  # palette PNG read as indices
    np.testing.assert_array_equal(train.read_mask(0), MASKS["a"])
    assert train.mask_classes(1).nonzero()[0].tolist() == [0, 16, 17]
    val = build_files("voc", voc_root, "val")
    assert val.ids == ["c", "a"]


def test_list_digest(voc_root: Path, tmp_path: Path) -> None:
    train = build_files("voc", voc_root, "train")
    lines = "".join(f"{i}\tJPEGImages/{i}.jpg\tSegmentationClassAug/{i}.png\n" for i in "ab")
    assert train.list_digest == hashlib.sha1(lines.encode()).hexdigest()
    # same list written with leading slashes (DeepLab style) and moved root: same digest
    other = write_voc(tmp_path / "elsewhere", MASKS, {"train": ["a", "b"]}, leading_slash=True)
    assert build_files("voc", other, "train").list_digest == train.list_digest
    assert build_files("voc", other, "train").image_paths[0] == other / "JPEGImages" / "a.jpg"
    reordered = write_voc(tmp_path / "reordered", MASKS, {"train": ["b", "a"]})
    assert build_files("voc", reordered, "train").list_digest != train.list_digest


def test_voc_official_id_list_fallback(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "voc", MASKS, {})
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("c\nb\n")
    val = build_files("voc", root, "val")
    assert val.ids == ["c", "b"]
    np.testing.assert_array_equal(val.read_mask(1), MASKS["b"])
    with pytest.raises(DataError, match="no list file for VOC split 'test'"):
        build_files("voc", root, "test")


def test_voc_list_bad_line(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "voc", MASKS, {"val": ["a"]})
    (root / "splits" / "val.txt").write_text("JPEGImages/a.jpg SegmentationClassAug/a.png extra\n")
    with pytest.raises(DataError, match="val.txt: line 1 has 3 fields"):
        build_files("voc", root, "val")


def test_ade_files(tmp_path: Path) -> None:
    masks = {"train": {"ADE_train_2": class_mask([0, 150]), "ADE_train_1": class_mask([3])},
             "val": {"ADE_val_1": class_mask([7, 8])}}
    ade = write_ade(tmp_path, masks)
    (ade / "images" / "training" / ".DS_Store").write_bytes(b"junk")
    for root in (tmp_path, ade):  # parent folder or the ADEChallengeData2016 folder itself
        train = build_files("ade", root, "train")
        assert train.ids == ["ADE_train_1", "ADE_train_2"]  # sorted, hidden file skipped
        assert train.num_classes == 151 and train.class_names[150] == "flag"
    train = build_files("ade", tmp_path, "train")
    assert train.mask_paths[1] == ade / "annotations" / "training" / "ADE_train_2.png"
    np.testing.assert_array_equal(train.read_mask(1), masks["train"]["ADE_train_2"])
    assert build_files("ade", tmp_path, "val").ids == ["ADE_val_1"]
    with pytest.raises(DataError, match="unknown ADE20K split 'test'"):
        build_files("ade", tmp_path, "test")


def test_folder_files(tmp_path: Path) -> None:
    masks = {"train": {"x": class_mask([0, 2]), "y": class_mask([1, 255])}}
    root = write_folder(tmp_path / "mydata", ["background", "cat", "dog"], masks)
    files = build_files("folder", root, "train")
    assert files.ids == ["x", "y"] and files.num_classes == 3
    assert files.class_names == ["background", "cat", "dog"]
    np.testing.assert_array_equal(files.read_mask(1), masks["train"]["y"])
    (root / "classes.txt").unlink()
    with pytest.raises(DataError, match="classes.txt: missing class list"):
        build_files("folder", root, "train")
    with pytest.raises(ValueError, match="unknown dataset layout 'coco'"):
        build_files("coco", root, "train")


# ------------------------------------------------------------------------------ bad inputs

@pytest.fixture
def broken_voc(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """VOC root with one good pair and one pair per bad-input case; returns root and culprit files."""
    ids = ["good", "no_image", "no_mask", "truncated", "size", "value", "rgb", "truncated_mask", "both"]
    masks = {i: class_mask([0, 5]) for i in ids}
    root = write_voc(tmp_path / "voc", masks, {"train": ids})
    jpg = {i: root / "JPEGImages" / f"{i}.jpg" for i in ids}
    png = {i: root / "SegmentationClassAug" / f"{i}.png" for i in ids}
    jpg["no_image"].unlink()
    png["no_mask"].unlink()
    truncate_file(jpg["truncated"], keep=0.5)
    save_mask(png["size"], class_mask([0, 5], height=10))
    save_mask(png["value"], class_mask([0, 5, 21, 254]))
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(png["rgb"])
    truncate_file(png["truncated_mask"], keep=0.6)
    jpg["both"].unlink()  # one pair with two problems: both must be reported
    save_mask(png["both"], class_mask([0, 99]))
    culprits = {"no_image": jpg["no_image"], "no_mask": png["no_mask"], "truncated": jpg["truncated"],
                "size": png["size"], "value": png["value"], "rgb": png["rgb"],
                "truncated_mask": png["truncated_mask"], "both": jpg["both"], "both_mask": png["both"]}
    return root, culprits


CASES = [
    ("no_image", "missing image file"),
    ("no_mask", "missing mask file"),
    ("truncated", "unreadable image file"),
    ("size", "mask size 16x10 differs from image size 16x12"),
    ("value", r"mask values \[21, 254\] outside the classes 0..20"),
    ("rgb", "mask has PIL mode 'RGB'"),
    ("truncated_mask", "unreadable mask file"),
]


@pytest.mark.parametrize(("case", "message"), CASES)
def test_bad_input_raises_data_error_naming_the_file(broken_voc: tuple[Path, dict[str, Path]],
                                                     case: str, message: str) -> None:
    root, culprits = broken_voc
    files = build_files("voc", root, "train")
    i = files.ids.index(case)
    with pytest.raises(DataError, match=message) as info:
        files.read_pair(i)
    assert info.value.path == culprits[case]
    assert str(culprits[case]) in str(info.value)
    dataset = StepDataset(files, [i], train_lut(get_task("voc", "15-5"), 0), eval_transform(8))
    with pytest.raises(DataError, match=message):
        dataset[0]


def test_read_mask_alone_checks_size(broken_voc: tuple[Path, dict[str, Path]]) -> None:
    root, culprits = broken_voc
    files = build_files("voc", root, "train")
    with pytest.raises(DataError, match="differs from image size"):
        files.read_mask(files.ids.index("size"))
    assert files.read_mask(files.ids.index("size"), check_size=False).shape == (10, 16)


def test_check_dataset_reports_every_problem(broken_voc: tuple[Path, dict[str, Path]]) -> None:
    root, culprits = broken_voc
    files = build_files("voc", root, "train")
    problems = check_dataset(files, workers=2, progress=False)
    assert [p.path for p in problems] == list(culprits.values())
    for problem, (_, message) in zip(problems, CASES + [("", "missing image"), ("", r"values \[99\]")]):
        assert re.search(message, problem.problem)
    assert [p.position for p in problems] == [1, 2, 3, 4, 5, 6, 7, 8, 8]
    subset = check_dataset(files, progress=False, positions=[0, 6])
    assert [(p.path, p.position) for p in subset] == [(culprits["rgb"], 6)]
    text = format_problems(problems)
    assert text.startswith("9 bad file(s):") and str(culprits["rgb"]) in text
    assert "and 7 more" in format_problems(problems, limit=2)
    good = SegmentationFiles("voc", root, "train", files.ids[:1], files.image_paths[:1],
                             files.mask_paths[:1], 21, files.class_names)
    assert check_dataset(good, progress=False) == []
    assert format_problems([]) == "no problems found"


def test_data_error_forms() -> None:
    named = DataError(Path("/d/x.png"), "missing mask file")
    assert str(named) == "/d/x.png: missing mask file" and named.path == Path("/d/x.png")
    summary = DataError("3 bad files")
    assert str(summary) == "3 bad files" and summary.path is None and isinstance(summary, ValueError)


def test_step_dataset(voc_root: Path) -> None:
    files = build_files("voc", voc_root, "train")
    task = get_task("voc", "15-1")
    dataset = StepDataset(files, [1, 0], train_lut(task, 1), eval_transform(12, mode="full"))
    assert len(dataset) == 2
    image, mask = dataset[0]  # image "b": classes 0 | 16 | 17 in stripes of widths 6, 5, 5
    assert image.shape == (3, 12, 16) and image.dtype == torch.float32
    assert mask.shape == (12, 16) and mask.dtype == torch.int64
    expected = np.zeros((12, 16), dtype=np.int64)
    expected[:, 6:11] = 16  # C^1 = {16} kept; 17 (future) → 0
    np.testing.assert_array_equal(mask.numpy(), expected)
    _, mask_a = dataset[1]  # image "a": 1 is old at step 1 → 0; border row stays 255
    assert mask_a[0].tolist() == [255] * 16 and mask_a[1:].unique().tolist() == [0]
    with pytest.raises(IndexError, match="positions must lie in 0..1"):
        StepDataset(files, [2], train_lut(task, 1), eval_transform(12))


def test_grayscale_png_image_and_jpeg_variants(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "d", ["bg", "fg"], {"train": {"g": class_mask([0, 1])}})
    save_image(root / "images" / "train" / "g.png", np.full((12, 16, 3), 9, np.uint8))
    Image.open(root / "images" / "train" / "g.png").convert("L").save(root / "images" / "train" / "g.png")
    files = build_files("folder", root, "train")
    assert files.read_image(0).mode == "RGB"
    assert check_dataset(files, progress=False) == []
