"""The embedded synthetic dataset: determinism, VOC layout, class coverage, statistics, ensure/atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sats.data import synthetic
from sats.data.synthetic import (CLASS_SHAPE_TEXTURE, SYNTHETIC_VERSION, dataset_statistics, ensure_synthetic,
                                 generate_synthetic, render_sample)

TINY = {"num_train": 12, "num_val": 6, "size": (48, 64)}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _list_pairs(root: Path, list_name: str) -> list[tuple[str, str]]:
    return [tuple(line.split(" ")) for line in (root / "splits" / list_name).read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("syn") / "voc", seed=3, **TINY)


def test_same_arguments_give_identical_bytes_for_any_workers_and_other_seed_differs(tiny_root, tmp_path):
    again = generate_synthetic(tmp_path / "again", seed=3, workers=2, **TINY)
    other = generate_synthetic(tmp_path / "other", seed=4, **TINY)
    first, second, third = _files(tiny_root), _files(again), _files(other)
    assert len(first) == 2 * (12 + 6) + 3  # images + masks + 2 lists + synthetic.json
    assert first == second
    assert first.keys() == third.keys()
    masks = [name for name in first if name.startswith("SegmentationClassAug/")]
    assert sum(first[name] != third[name] for name in masks) >= len(masks) - 1


def test_voc_layout_lists_palette_masks_and_sizes(tiny_root):
    for list_name, split, count in (("train_aug.txt", "train", 12), ("val.txt", "val", 6)):
        pairs = _list_pairs(tiny_root, list_name)
        assert len(pairs) == count
        for index, (image_rel, mask_rel) in enumerate(pairs):
            assert (image_rel, mask_rel) == (f"JPEGImages/{split}_{index:05d}.jpg",
                                             f"SegmentationClassAug/{split}_{index:05d}.png")
            with Image.open(tiny_root / image_rel) as image, Image.open(tiny_root / mask_rel) as mask:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert mask.format == "PNG" and mask.mode == "P"
                assert image.size == mask.size and all(48 <= side <= 64 for side in image.size)
                palette = np.array(mask.getpalette()[: 256 * 3]).reshape(256, 3)
                values = np.unique(np.asarray(mask))
            assert palette[0].tolist() == [0, 0, 0] and palette[1].tolist() == [128, 0, 0]
            assert palette[15].tolist() == [192, 128, 128] and palette[255].tolist() == [224, 224, 192]
            assert set(values.tolist()) <= set(range(21)) | {255}
            assert 0 in values and values.max() == 255 and len(values) >= 3  # background, border, >= 1 object
    info = json.loads((tiny_root / "synthetic.json").read_text())
    assert (info["version"], info["num_train"], info["num_val"], info["size"], info["seed"]) == (
        SYNTHETIC_VERSION, 12, 6, [48, 64], 3)


def test_classes_need_shape_and_texture():
    assert len(set(CLASS_SHAPE_TEXTURE)) == 20
    shapes = [shape for shape, _ in CLASS_SHAPE_TEXTURE]
    textures = [texture for _, texture in CLASS_SHAPE_TEXTURE]
    assert all(shapes.count(s) == 4 for s in set(shapes)) and all(textures.count(t) == 5 for t in set(textures))
    assert CLASS_SHAPE_TEXTURE[0] == ("disc", "hstripes") and CLASS_SHAPE_TEXTURE[19] == ("ring", "solid")


@pytest.mark.parametrize(("shape", "inside", "outside"), [
    ("disc", [(0, 0), (0.99, 0), (0.7, -0.7)], [(1.01, 0), (0.75, 0.75)]),
    ("square", [(0.95, 0.95), (-0.99, 0.5)], [(1.05, 0), (0, -1.05)]),
    ("triangle", [(0, -0.9), (0.9, 0.7), (-0.9, 0.7)], [(0.3, -0.9), (0, 0.8), (1.1, 0.7)]),
    ("cross", [(0.9, 0), (0, -0.9), (0.3, 0.3)], [(0.9, 0.9), (0.5, 0.5), (1.05, 0)]),
    ("ring", [(0.7, 0), (0, -0.95)], [(0, 0), (0.3, 0.2), (1.01, 0)]),
])
def test_shape_inside_tests(shape, inside, outside):
    points = np.array(inside + outside, dtype=np.float64)
    result = synthetic._shape_mask(shape, points[:, 0], points[:, 1])
    assert result.tolist() == [True] * len(inside) + [False] * len(outside)


def test_textures_run_along_the_named_axis():
    ys, xs = np.arange(24.0)[:, None] + 0.5, np.arange(24.0)[None, :] + 0.5
    phase = np.zeros(2)
    rows = synthetic._texture_pattern("hstripes", ys, xs, 8.0, phase)
    cols = synthetic._texture_pattern("vstripes", ys, xs, 8.0, phase)
    checker = synthetic._texture_pattern("checker", ys, xs, 8.0, phase)
    stripe = [True] * 4 + [False] * 4  # sin(2 pi (y + 0.5) / 8) > 0 for y = 0..3
    assert rows[:, 5].tolist() == stripe * 3 and (rows == rows[:, :1]).all()
    assert cols[5, :].tolist() == stripe * 3 and (cols == cols[:1, :]).all()
    assert (checker == (rows ^ cols)).all()
    assert not synthetic._texture_pattern("solid", ys, xs, 8.0, phase).any()


def _neighbour_stack(mask: np.ndarray) -> np.ndarray:
    """(9, H, W): the 3x3 neighbourhood values of every pixel (255 outside the image)."""
    height, width = mask.shape
    padded = np.pad(mask, 1, constant_values=255)
    return np.stack([padded[1 + dy: 1 + dy + height, 1 + dx: 1 + dx + width] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


@pytest.mark.parametrize("side", [64, 96])
def test_object_regions_never_touch_background_or_each_other_directly(side):
    image, mask = render_sample(np.random.default_rng(7), side, side + 8, [3, 14, 20])
    assert image.shape == (side, side + 8, 3) and image.dtype == np.uint8 and mask.shape == (side, side + 8)
    neighbours = _neighbour_stack(mask)
    for class_id in (3, 14, 20):
        region = mask == class_id
        assert region.sum() > 20, class_id
        assert not (region & ((neighbours != class_id) & (neighbours != 255)).any(axis=0)).any()
    assert set(np.unique(mask).tolist()) == {0, 3, 14, 20, 255}


@pytest.mark.parametrize(("side", "band_px"), [(64, 1), (80, 1), (81, 2), (96, 2)])
def test_border_band_is_one_px_up_to_80_px_and_two_px_above(side, band_px):
    _, mask = render_sample(np.random.default_rng(0), side, side, [1])
    neighbours = _neighbour_stack(mask)
    band = mask == 255
    touches_both = band & (neighbours == 0).any(axis=0) & (neighbours == 1).any(axis=0)
    # A 1 px band lies between object and background; in a 2 px band each pixel sees only one side.
    assert touches_both.any() == (band_px == 1)
    assert band.any() and (band & (neighbours == 1).any(axis=0)).any()


def test_every_class_in_a_moderate_generation_and_statistics_add_up(tmp_path):
    root = generate_synthetic(tmp_path / "voc", num_train=60, num_val=20, size=(40, 48), seed=1)
    stats = dataset_statistics(root)
    train, val = stats["train"], stats["val"]
    assert train["num_images"] == 60 and val["num_images"] == 20
    assert min(train["images_per_class"][1:]) >= 4 and max(train["images_per_class"][1:]) <= 6
    assert train["images_per_class"][0] == 60  # every image has background
    assert sum(train["classes_per_image"]) == 60 and train["classes_per_image"][4:] == [0] * 17
    assert sum(k * n for k, n in enumerate(train["classes_per_image"])) == sum(train["images_per_class"][1:])
    for split_stats in (train, val):
        assert sum(split_stats["pixels_per_class"]) + split_stats["ignore_pixels"] == split_stats["total_pixels"]
        assert split_stats["other_values"] == []
    sizes = [Image.open(root / image).size for image, _ in _list_pairs(root, "train_aug.txt")]
    assert train["total_pixels"] == sum(w * h for w, h in sizes)


def test_statistics_match_hand_counts(tmp_path):
    (tmp_path / "SegmentationClassAug").mkdir()
    (tmp_path / "splits").mkdir()
    masks = {"a": np.array([[0, 0, 5], [255, 5, 5]], np.uint8), "b": np.array([[0, 7], [7, 7]], np.uint8),
             "c": np.array([[1, 1, 255]], np.uint8)}
    for name, mask in masks.items():
        Image.fromarray(mask).save(tmp_path / "SegmentationClassAug" / f"{name}.png")
    (tmp_path / "splits" / "train_aug.txt").write_text(
        "JPEGImages/a.jpg SegmentationClassAug/a.png\nJPEGImages/b.jpg SegmentationClassAug/b.png\n")
    (tmp_path / "splits" / "val.txt").write_text("JPEGImages/c.jpg SegmentationClassAug/c.png\n")
    stats = dataset_statistics(tmp_path)
    train = stats["train"]
    assert train["pixels_per_class"][:8] == [3, 0, 0, 0, 0, 3, 0, 3] and sum(train["pixels_per_class"]) == 9
    assert train["images_per_class"][:8] == [2, 0, 0, 0, 0, 1, 0, 1] and train["ignore_pixels"] == 1
    assert train["classes_per_image"][:3] == [0, 2, 0] and train["total_pixels"] == 10
    assert stats["val"]["images_per_class"][:2] == [0, 1] and stats["val"]["pixels_per_class"][1] == 2


def test_ensure_synthetic_generates_only_when_missing_or_different(tmp_path, monkeypatch):
    root = tmp_path / "voc"
    calls = []
    real_generate = synthetic.generate_synthetic

    def counting_generate(*args, **kwargs):
        calls.append(kwargs)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_synthetic", counting_generate)
    assert ensure_synthetic(root, seed=0, **TINY) == root and len(calls) == 1
    before = _files(root)
    ensure_synthetic(root, seed=0, num_train=12, num_val=6, size=[48, 64])  # same arguments, list spelling
    assert len(calls) == 1 and _files(root) == before

    ensure_synthetic(root, seed=0, num_train=12, num_val=5, size=(48, 64))
    assert len(calls) == 2 and len(_list_pairs(root, "val.txt")) == 5

    (root / "JPEGImages" / "train_00003.jpg").unlink()  # a listed file went missing
    ensure_synthetic(root, seed=0, num_train=12, num_val=5, size=(48, 64))
    assert len(calls) == 3 and (root / "JPEGImages" / "train_00003.jpg").is_file()

    info = json.loads((root / "synthetic.json").read_text())
    (root / "synthetic.json").write_text(json.dumps({**info, "version": SYNTHETIC_VERSION - 1}))
    ensure_synthetic(root, seed=0, num_train=12, num_val=5, size=(48, 64))
    assert len(calls) == 4 and json.loads((root / "synthetic.json").read_text())["version"] == SYNTHETIC_VERSION
    assert not [p for p in tmp_path.iterdir() if p.name != "voc"]  # no temporary folders left behind


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "voc").mkdir()
    (tmp_path / "voc" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="synthetic.json"):
        ensure_synthetic(tmp_path / "voc", **TINY)
    assert [p.name for p in (tmp_path / "voc").iterdir()] == ["notes.txt"]


def test_interrupted_generation_keeps_the_previous_dataset(tmp_path, monkeypatch):
    root = generate_synthetic(tmp_path / "voc", seed=0, **TINY)
    before = _files(root)
    real_write = synthetic._write_sample
    written = []

    def failing_write(job):
        if len(written) == 5:
            raise KeyboardInterrupt
        written.append(job)
        real_write(job)

    monkeypatch.setattr(synthetic, "_write_sample", failing_write)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic(root, seed=1, **TINY)
    assert _files(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_train": 0}, "num_train"), ({"size": (64, 48)}, "size"), ({"size": 8}, "size"),
    ({"seed": -1}, "seed"), ({"workers": 0}, "workers"),
])
def test_invalid_arguments_name_the_value(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_synthetic(tmp_path / "voc", **{**TINY, **kwargs})
    assert not (tmp_path / "voc").exists()


def test_readable_through_the_voc_reader(tiny_root):
    datasets = pytest.importorskip("sats.data.datasets")
    train = datasets.build_files("voc", tiny_root, "train")
    val = datasets.build_files("voc", tiny_root, "val")
    assert (len(train), len(val), train.num_classes) == (12, 6, 21)
    assert train.ids[:2] == ["train_00000", "train_00001"]
    for files in (train, val):
        for i in range(len(files)):
            mask = files.read_mask(i)
            with Image.open(files.mask_paths[i]) as expected:
                assert np.array_equal(mask, np.asarray(expected))
            assert files.read_image(i).size == mask.shape[::-1]
    assert datasets.check_dataset(train, workers=1, progress=False) == []


# --------------------------------------------------------------------------- the pretraining world


def test_pretrain_world_shares_no_class_with_the_demo():
    from sats.data.synthetic import PRETRAIN_CLASS_SHAPE_TEXTURE, PRETRAIN_SHAPES, SHAPES, TEXTURES, world_classes

    assert world_classes("voc") == CLASS_SHAPE_TEXTURE and world_classes("pretrain") == PRETRAIN_CLASS_SHAPE_TEXTURE
    assert len(set(PRETRAIN_CLASS_SHAPE_TEXTURE)) == 20
    assert not set(PRETRAIN_CLASS_SHAPE_TEXTURE) & set(CLASS_SHAPE_TEXTURE)  # no (shape, texture) class in common
    assert not set(PRETRAIN_SHAPES) & set(SHAPES)  # not even a shape
    assert {texture for _, texture in PRETRAIN_CLASS_SHAPE_TEXTURE} == set(TEXTURES)  # the textures are shared
    with pytest.raises(ValueError, match="unknown synthetic world 'imagenet'"):
        world_classes("imagenet")


@pytest.mark.parametrize(("shape", "inside", "outside"), [
    ("diamond", [(0, 0), (0.45, 0.45), (0, -0.95)], [(0.6, 0.6), (1.05, 0)]),
    ("star", [(0, 0), (0, -0.95), (0.3, 0.1)], [(0, 0.6), (0.5, -0.5), (0, -1.05)]),
    ("crescent", [(-0.9, 0), (0, 0.9)], [(0, 0), (0.5, 0), (1.05, 0)]),
    ("halfdisc", [(0, 0.5), (0.9, 0.1)], [(0, -0.5), (0.9, 0.9)]),
    ("frame", [(0.8, 0.8), (-0.9, 0)], [(0, 0), (0.3, 0.3), (1.05, 0)]),
])
def test_pretrain_shape_inside_tests(shape, inside, outside):
    test_shape_inside_tests(shape, inside, outside)


def test_pretrain_world_is_deterministic_and_other_than_the_demo(tmp_path, tiny_root):
    first = generate_synthetic(tmp_path / "a", seed=3, world="pretrain", **TINY)
    again = generate_synthetic(tmp_path / "b", seed=3, world="pretrain", workers=2, **TINY)
    files, demo = _files(first), _files(tiny_root)  # tiny_root: the voc world, same seed and sizes
    assert files == _files(again)
    images = [name for name in files if name.startswith("JPEGImages/")]
    assert all(files[name] != demo[name] for name in images)
    info = json.loads((first / "synthetic.json").read_text())
    assert info["world"] == "pretrain" and info["classes"]["1"] == "diamond/hstripes"
    assert json.loads((tiny_root / "synthetic.json").read_text())["world"] == "voc"
    image, mask = render_sample(np.random.default_rng(0), 48, 48, [7], world="pretrain")
    assert set(np.unique(mask).tolist()) == {0, 7, 255} and image.shape == (48, 48, 3)


def test_ensure_synthetic_tells_the_worlds_apart(tmp_path, monkeypatch):
    root = ensure_synthetic(tmp_path / "d", seed=0, **TINY)
    calls = []
    real_generate = synthetic.generate_synthetic
    monkeypatch.setattr(synthetic, "generate_synthetic", lambda *a, **k: calls.append(k) or real_generate(*a, **k))
    info = json.loads((root / "synthetic.json").read_text())
    del info["world"]  # a folder written before worlds existed holds the voc world
    (root / "synthetic.json").write_text(json.dumps(info))
    ensure_synthetic(root, seed=0, **TINY)
    assert calls == []
    ensure_synthetic(root, seed=0, world="pretrain", **TINY)
    assert len(calls) == 1 and json.loads((root / "synthetic.json").read_text())["world"] == "pretrain"
