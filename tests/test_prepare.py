"""`sats data prepare`: VOC (+ SegmentationClassAug.zip or SBD benchmark.tgz) and ADE20K from tiny archives in
the real formats; the MAT-5 reader; counts, mask checks, stamps, reruns and interrupted runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sats.data.prepare as prep
from archive_helpers import TinyVoc, ade_zip, mat_file, sbd_mat, sha256
from sats.cli import main
from sats.data.datasets import DataError, build_files
from sats.data.matfile import MatError, SparseMatrix, loadmat
from sats.data.prepare import STAMP, DatasetSpec, prepare, sbd_segmentation, verify_prepared
from sats.download import ChecksumError, Remote

TINY_VOC = DatasetSpec("voc", {"train": 5, "val": 2}, 21, "tiny VOC")
TINY_ADE = DatasetSpec("ade", {"train": 3, "val": 2}, 151, "tiny ADE")


def own_hashes(monkeypatch, folder: Path) -> None:
    """The archives in ``folder`` replace the real ones' hashes (their SHA-256, size unknown)."""
    table = dict(prep.ARCHIVES)
    for path in folder.iterdir():
        if path.name in table:
            table[path.name] = Remote(path.name, table[path.name].urls, hashes={"sha256": sha256(path)})
    monkeypatch.setattr(prep, "ARCHIVES", table)


@pytest.fixture
def voc_world(tmp_path, monkeypatch):
    world = TinyVoc()
    archives = tmp_path / "archives"
    archives.mkdir()
    world.voc_tar(archives / "VOCtrainval_11-May-2012.tar")
    world.aug_zip(archives / "SegmentationClassAug.zip")
    world.benchmark_tgz(archives / "benchmark.tgz")
    own_hashes(monkeypatch, archives)
    return world, archives


def masks_of(root: Path, split: str) -> dict[str, np.ndarray]:
    files = build_files("voc", root, split)
    return {i: files.read_mask(k) for k, i in enumerate(files.ids)}


# --------------------------------------------------------------------------------------------- MAT-5

@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("big_endian", [False, True])
def test_mat_reader_reads_an_sbd_struct(compressed, big_endian):
    seg = np.arange(6 * 7, dtype=np.uint8).reshape(6, 7) % 21
    seg[0, 0] = 255
    mat = loadmat(sbd_mat(seg, compressed, big_endian))
    gt = mat["GTcls"]
    assert set(gt) == {"Boundaries", "Segmentation", "CategoriesPresent"}
    np.testing.assert_array_equal(gt["Segmentation"], seg)
    assert gt["Segmentation"].dtype == np.uint8 and gt["CategoriesPresent"].shape == (20, 1)
    first = gt["Boundaries"][0, 0]
    assert isinstance(first, SparseMatrix) and first.shape == (6, 7)
    region = seg == 1
    np.testing.assert_array_equal(first.toarray(), region & ~np.roll(region, 1, axis=0))


def test_sbd_mask_conversion_gives_the_segmentationclassaug_values(tmp_path):
    """A hand-made cls/*.mat: the PNG written for it holds exactly the class ids (the SegmentationClassAug values)."""
    seg = np.zeros((5, 8), np.uint8)
    seg[1:4, 2:5] = 15  # person
    seg[2:5, 6:8] = 20  # tv/monitor
    mask = sbd_segmentation(sbd_mat(seg), "x.mat")
    np.testing.assert_array_equal(mask, seg)
    prep._save_palette_png(tmp_path / "x.png", mask)
    with Image.open(tmp_path / "x.png") as img:
        assert img.mode == "P"
        np.testing.assert_array_equal(np.array(img), seg)
        assert img.getpalette()[15 * 3:15 * 3 + 3] == [192, 128, 128]  # VOC's colour of class 15


def test_mat_reader_and_sbd_conversion_refuse_what_they_cannot_read():
    with pytest.raises(MatError, match="7.3"):
        loadmat(b"MATLAB 7.3 MAT-file".ljust(116) + b"\0" * 8 + b"\x00\x02IM")
    with pytest.raises(MatError, match="not a MATLAB"):
        loadmat(b"\0" * 200)
    with pytest.raises(MatError, match="truncated|needs"):
        loadmat(sbd_mat(np.zeros((4, 4), np.uint8), compressed=False)[:300])
    with pytest.raises(DataError, match="cls/a.mat: unreadable MAT-file"):
        sbd_segmentation(b"garbage", "cls/a.mat")
    with pytest.raises(DataError, match="no struct GTcls"):
        sbd_segmentation(mat_file({"GTinst": {"Segmentation": np.zeros((2, 2), np.uint8)}}), "inst/a.mat")
    with pytest.raises(DataError, match=r"values \[21\] outside 0..20"):
        sbd_segmentation(sbd_mat(np.full((3, 3), 21, np.uint8)), "cls/b.mat")


# ----------------------------------------------------------------------------------------------- VOC

def test_prepare_voc_from_segmentationclassaug(voc_world, tmp_path):
    world, archives = voc_world
    target = tmp_path / "data" / "voc"
    stamp = prepare("voc", target, archives, spec=TINY_VOC, progress=False)
    assert stamp["counts"] == {"train": 5, "val": 2} and stamp["sbd"] == "SegmentationClassAug.zip"
    lines = (target / "splits" / "train_aug.txt").read_text().splitlines()
    assert lines == [f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png" for i in world.train_aug]  # DeepLab order
    assert world.train_aug == sorted(world.train_aug) and "2008_000010" not in world.train_aug  # VOC val excluded
    assert [line.split()[0] for line in (target / "splits" / "val.txt").read_text().splitlines()] == \
        [f"/JPEGImages/{i}.jpg" for i in world.voc_val]
    for split in ("train", "val"):
        for image_id, mask in masks_of(target, split).items():
            np.testing.assert_array_equal(mask, world.aug_mask(image_id))
    assert not (target / "Annotations").exists() and (target / "SegmentationClass").is_dir()
    assert json.loads((target / STAMP).read_text())["archives"]["VOCtrainval_11-May-2012.tar"]["verified"] == ["sha256"]
    assert [p.name for p in target.parent.iterdir()] == ["voc"]  # no partial folder left


def test_prepare_voc_from_sbd_benchmark_gives_the_same_dataset(voc_world, tmp_path):
    world, archives = voc_world
    prepare("voc", tmp_path / "aug", archives, sbd="aug", spec=TINY_VOC, progress=False)
    stamp = prepare("voc", tmp_path / "sbd", archives, sbd="benchmark", spec=TINY_VOC, progress=False)
    assert stamp["sbd"] == "benchmark.tgz"
    for name in ("train_aug.txt", "val.txt"):
        assert (tmp_path / "sbd" / "splits" / name).read_bytes() == (tmp_path / "aug" / "splits" / name).read_bytes()
    for split in ("train", "val"):
        from_mat, from_zip = masks_of(tmp_path / "sbd", split), masks_of(tmp_path / "aug", split)
        assert from_mat.keys() == from_zip.keys()
        for image_id in from_zip:  # 2007_000039 is in SBD too: VOC's own mask (with its border) is kept
            np.testing.assert_array_equal(from_mat[image_id], from_zip[image_id], err_msg=image_id)
    with Image.open(tmp_path / "sbd" / "SegmentationClassAug" / "2008_000002.png") as img:
        assert img.mode == "P"


def test_rerun_verifies_and_does_nothing(voc_world, tmp_path, caplog):
    world, archives = voc_world
    target = tmp_path / "voc"
    first = prepare("voc", target, archives, spec=TINY_VOC, progress=False)
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    for archive in archives.iterdir():
        archive.unlink()  # a verified rerun needs no archive
    with caplog.at_level("INFO", logger="sats.data.prepare"):
        assert prepare("voc", target, archives, spec=TINY_VOC, progress=False) == first
    assert "already prepared" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == before
    (target / "SegmentationClassAug" / f"{world.train_aug[2]}.png").unlink()
    with pytest.raises(DataError, match=f"{world.train_aug[2]}.png: missing"):
        verify_prepared(target, TINY_VOC)
    (target / "splits" / "val.txt").write_text("/JPEGImages/x.jpg /SegmentationClassAug/x.png\n")
    with pytest.raises(DataError, match="val.txt: changed since it was prepared"):
        prepare("voc", target, archives, spec=TINY_VOC, progress=False)


def test_counts_of_the_real_dataset_are_checked(voc_world, tmp_path):
    _, archives = voc_world
    target = tmp_path / "voc"
    with pytest.raises(DataError, match=r"found 5 train images, expected 10,582 \(Pascal VOC 2012 \+ SBD\)"):
        prepare("voc", target, archives, progress=False)
    assert not target.exists() and not list(tmp_path.glob(".voc.partial-*"))


def test_a_bad_mask_is_named_and_nothing_is_left(tmp_path, monkeypatch):
    world = TinyVoc()
    archives = tmp_path / "archives"
    archives.mkdir()
    world.voc_tar(archives / "VOCtrainval_11-May-2012.tar")
    bad = world.aug_mask("2008_000003").copy()
    bad[2, 2] = 33
    world.aug_zip(archives / "SegmentationClassAug.zip", override={"2008_000003": bad})
    own_hashes(monkeypatch, archives)
    with pytest.raises(DataError, match=r"1 bad train masks .*2008_000003.png: mask values \[33\]"):
        prepare("voc", tmp_path / "voc", archives, spec=TINY_VOC, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["archives"]


def test_an_interrupted_run_leaves_no_layout_and_the_next_cleans_up(voc_world, tmp_path, monkeypatch):
    _, archives = voc_world
    target = tmp_path / "voc"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_check_layout", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare("voc", target, archives, spec=TINY_VOC, progress=False)
    assert not target.exists() and not list(tmp_path.glob(".voc.partial-*"))
    monkeypatch.undo()
    own_hashes(monkeypatch, archives)
    stale = tmp_path / ".voc.partial-999999999"  # a killed run's folder (no such process)
    (stale / "JPEGImages").mkdir(parents=True)
    prepare("voc", target, archives, spec=TINY_VOC, progress=False)
    assert not stale.exists() and (target / STAMP).is_file()


def test_refusals_name_the_file(voc_world, tmp_path):
    _, archives = voc_world
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="busy: exists and is not a prepared dataset"):
        prepare("voc", busy, archives, spec=TINY_VOC, progress=False)
    with pytest.raises(DataError, match=r"nowhere/VOCtrainval_11-May-2012.tar: archive not found.*--download"):
        prepare("voc", tmp_path / "v2", tmp_path / "nowhere", spec=TINY_VOC, progress=False)


def test_a_different_archive_fails_its_published_size(tmp_path):
    archives = tmp_path / "archives"
    archives.mkdir()
    TinyVoc().voc_tar(archives / "VOCtrainval_11-May-2012.tar")
    TinyVoc().aug_zip(archives / "SegmentationClassAug.zip")
    with pytest.raises(ChecksumError, match=r"VOCtrainval_11-May-2012.tar: [\d,]+ bytes, expected 1,999,639,040"):
        prepare("voc", tmp_path / "voc", archives, progress=False)


# ----------------------------------------------------------------------------------------------- ADE

def test_prepare_ade(tmp_path, monkeypatch, capsys):
    archives = tmp_path / "archives"
    archives.mkdir()
    ade_zip(archives / "ADEChallengeData2016.zip")
    own_hashes(monkeypatch, archives)
    monkeypatch.setitem(prep.SPECS, "ade", TINY_ADE)
    target = tmp_path / "ADEChallengeData2016"
    assert main(["data", "prepare", "ade", str(target), "--archives", str(archives)]) == 0
    assert "ade ready (train 3, val 2" in capsys.readouterr().out
    assert len(build_files("ade", target, "train")) == 3 and len(build_files("ade", tmp_path, "val")) == 2
    assert (target / "objectInfo150.txt").is_file()
    assert main(["data", "prepare", "ade", str(target)]) == 0  # verified, nothing to do (no archive needed)
    os.remove(target / "images" / "validation" / "ADE_valid_00000001.jpg")
    assert main(["data", "prepare", "ade", str(target)]) == 3
    assert "images/validation: changed since it was prepared" in capsys.readouterr().err


def test_cli_prepare_usage_errors(tmp_path, capsys):
    assert main(["data", "prepare", "coco", str(tmp_path / "x")]) == 2
    assert "usage: sats data prepare voc|ade DIR" in capsys.readouterr().err
    assert main(["data", "prepare", "voc", str(tmp_path / "x"), "--url", "nope.tar=http://x"]) == 2
    assert "expected FILE=URL with FILE one of" in capsys.readouterr().err
