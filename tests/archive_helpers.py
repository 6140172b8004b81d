"""Tiny archives in the real formats (VOC tar, SegmentationClassAug.zip, SBD benchmark.tgz with MAT-5
masks, ADEChallengeData2016.zip) and a local HTTP server with Range support, for the download and
preparation tests. Nothing here touches the network: the server listens on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from data_helpers import PALETTE, class_mask, picture_of

# ------------------------------------------------------------------------------------ MAT-5 writer


def _element(mtype: int, payload: bytes, e: str, small: bool = True) -> bytes:
    if small and len(payload) <= 4:  # small data element: count and type in one word
        return struct.pack(e + "I", (len(payload) << 16) | mtype) + payload.ljust(4, b"\0")
    return struct.pack(e + "II", mtype, len(payload)) + payload + b"\0" * (-len(payload) % 8)


def _matrix(value, e: str, name: str = "") -> bytes:
    """A miMATRIX element for a dict (1x1 struct), list (cell column), (rows, cols, values) sparse
    tuple, or a NumPy uint8 / float64 array (floats of whole numbers stored as miUINT8, as MATLAB does)."""
    def header(cls: int, dims: Sequence[int], flags: int = 0, nzmax: int = 0) -> bytes:
        return (_element(6, struct.pack(e + "II", cls | flags, nzmax), e, small=False)
                + _element(5, struct.pack(e + f"{len(dims)}i", *dims), e)
                + _element(1, name.encode(), e))

    if isinstance(value, dict):
        width = 32
        names = b"".join(k.encode().ljust(width, b"\0") for k in value)
        body = header(2, (1, 1)) + _element(5, struct.pack(e + "i", width), e) + _element(1, names, e)
        body += b"".join(_matrix(v, e) for v in value.values())
    elif isinstance(value, list):
        body = header(1, (len(value), 1)) + b"".join(_matrix(v, e) for v in value)
    elif isinstance(value, tuple):  # sparse logical: (shape, dense bool array)
        shape, dense = value
        rows, cols = np.nonzero(dense.T)[1], np.nonzero(dense.T)[0]
        colptr = np.searchsorted(cols, np.arange(shape[1] + 1))
        body = (header(5, shape, flags=0x0200, nzmax=max(1, len(rows)))
                + _element(5, rows.astype(e + "i4").tobytes(), e)
                + _element(5, colptr.astype(e + "i4").tobytes(), e)
                + _element(2, np.ones(len(rows), np.uint8).tobytes(), e))
    else:
        array = np.asarray(value)
        cls = {np.dtype(np.uint8): 9, np.dtype(np.float64): 6}[array.dtype]
        data = array.astype(np.uint8 if cls == 9 or np.all(array == np.round(array)) else e + "f8")
        mtype = 2 if data.dtype == np.uint8 else 9
        body = header(cls, array.shape) + _element(mtype, data.tobytes(order="F"), e, small=False)
    return struct.pack(e + "II", 14, len(body)) + body


def mat_file(variables: Mapping[str, object], compressed: bool = True, big_endian: bool = False) -> bytes:
    """A level-5 MAT-file with ``variables`` (see `_matrix` for the value kinds)."""
    e = ">" if big_endian else "<"
    text = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: Thu Jan  1 00:00:00 2009".ljust(116, b" ")
    out = text + b"\0" * 8 + struct.pack(e + "H", 0x0100) + (b"MI" if big_endian else b"IM")
    for name, value in variables.items():
        element = _matrix(value, e, name)
        if compressed:
            packed = zlib.compress(element)
            element = struct.pack(e + "II", 15, len(packed)) + packed
        out += element
    return out


def sbd_mat(segmentation: np.ndarray, compressed: bool = True, big_endian: bool = False) -> bytes:
    """An SBD ``cls/<id>.mat``: struct GTcls with Boundaries (20 sparse maps), Segmentation, CategoriesPresent."""
    seg = np.asarray(segmentation, np.uint8)
    present = [c for c in np.unique(seg).tolist() if 0 < c <= 20]
    boundaries = []
    for c in range(1, 21):
        region = seg == c
        edge = region & ~np.roll(region, 1, axis=0)
        boundaries.append((seg.shape, edge))
    gt = {"Boundaries": boundaries, "Segmentation": seg,
          "CategoriesPresent": np.asarray(present, np.float64).reshape(-1, 1)}
    return mat_file({"GTcls": gt}, compressed, big_endian)


# ------------------------------------------------------------------------------------------ archives

def _png(mask: np.ndarray, palette: bool = True) -> bytes:
    image = Image.fromarray(np.asarray(mask, np.uint8), mode="L")
    if palette:
        image.putpalette(PALETTE.reshape(-1).tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture_of(mask)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _tar(path: Path, members: Mapping[str, bytes], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, members: Mapping[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@dataclass
class TinyVoc:
    """A miniature VOC 2012 + SBD world whose train_aug / val lists are known."""

    voc_train: list[str] = field(default_factory=lambda: ["2007_000032", "2007_000039"])
    voc_val: list[str] = field(default_factory=lambda: ["2007_000033", "2008_000010"])
    sbd_train: list[str] = field(default_factory=lambda: ["2008_000003", "2008_000002", "2007_000039", "2008_000010"])
    sbd_val: list[str] = field(default_factory=lambda: ["2008_000005"])
    unlabelled: list[str] = field(default_factory=lambda: ["2008_000099"])

    @property
    def train_aug(self) -> list[str]:  # (SBD train ∪ SBD val ∪ VOC train) − VOC val, ascending
        return sorted((set(self.sbd_train) | set(self.sbd_val) | set(self.voc_train)) - set(self.voc_val))

    def voc_mask(self, image_id: str) -> np.ndarray:  # VOC's own masks have a 255 border
        seed = int(image_id[-3:])
        return class_mask([0, 1 + seed % 20, 1 + (seed * 7) % 20], height=10, width=12, border=True)

    def sbd_mask(self, image_id: str) -> np.ndarray:  # SBD's: no border, other classes
        seed = int(image_id[-3:])
        return class_mask([2 + seed % 19, 0], height=10, width=12)

    def aug_mask(self, image_id: str) -> np.ndarray:  # what SegmentationClassAug holds: VOC's mask where VOC has one
        return self.voc_mask(image_id) if image_id in {*self.voc_train, *self.voc_val} else self.sbd_mask(image_id)

    def voc_tar(self, path: Path) -> Path:
        root = "VOCdevkit/VOC2012"
        members: dict[str, bytes] = {}
        every = sorted({*self.voc_train, *self.voc_val, *self.sbd_train, *self.sbd_val, *self.unlabelled})
        for image_id in every:
            members[f"{root}/JPEGImages/{image_id}.jpg"] = _jpeg(self.aug_mask(image_id))
        for image_id in sorted({*self.voc_train, *self.voc_val}):
            members[f"{root}/SegmentationClass/{image_id}.png"] = _png(self.voc_mask(image_id))
            members[f"{root}/SegmentationObject/{image_id}.png"] = _png(self.voc_mask(image_id))
        members[f"{root}/Annotations/{every[0]}.xml"] = b"<annotation/>"
        for split, ids in (("train", self.voc_train), ("val", self.voc_val),
                           ("trainval", sorted(self.voc_train + self.voc_val))):
            members[f"{root}/ImageSets/Segmentation/{split}.txt"] = "".join(f"{i}\n" for i in ids).encode()
        return _tar(path, members)

    def aug_zip(self, path: Path, override: Mapping[str, np.ndarray] | None = None) -> Path:
        ids = sorted(set(self.train_aug) | set(self.voc_val))
        masks = {i: (override or {}).get(i, self.aug_mask(i)) for i in ids}
        members = {f"SegmentationClassAug/{i}.png": _png(m, palette=False) for i, m in masks.items()}
        members["__MACOSX/SegmentationClassAug/._2007_000032.png"] = b"\0junk"
        return _zip(path, members)

    def benchmark_tgz(self, path: Path, compressed: bool = True) -> Path:
        base = "benchmark_RELEASE/dataset"
        members: dict[str, bytes] = {}
        for k, image_id in enumerate(sorted({*self.sbd_train, *self.sbd_val})):
            members[f"{base}/cls/{image_id}.mat"] = sbd_mat(self.sbd_mask(image_id), compressed, big_endian=k == 1)
            members[f"{base}/img/{image_id}.jpg"] = _jpeg(self.sbd_mask(image_id))
        members[f"{base}/train.txt"] = "".join(f"{i}\n" for i in self.sbd_train).encode()
        members[f"{base}/val.txt"] = "".join(f"{i}\n" for i in self.sbd_val).encode()
        return _tar(path, members, "w:gz")


def ade_zip(path: Path, train: int = 3, val: int = 2) -> Path:
    """ADEChallengeData2016.zip with ``train`` / ``val`` images (grayscale masks, values 0..150)."""
    members: dict[str, bytes] = {}
    for folder, count, offset in (("training", train, 1), ("validation", val, 1)):
        for k in range(count):
            stem = f"ADE_{folder[:5]}_{k + offset:08d}"
            mask = class_mask([0, 37 + k, 150], height=9, width=11)
            members[f"ADEChallengeData2016/images/{folder}/{stem}.jpg"] = _jpeg(mask)
            members[f"ADEChallengeData2016/annotations/{folder}/{stem}.png"] = _png(mask, palette=False)
    members["ADEChallengeData2016/objectInfo150.txt"] = b"Idx\tRatio\tTrain\tVal\tName\n"
    return _zip(path, members)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------- HTTP server

class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.requests: list[tuple[str, str | None]] = []
        self.cut_once: dict[str, int] = {}  # path → bytes sent before the connection drops (once)
        self.ignore_range: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        srv = self.server
        wanted = self.headers.get("Range")
        srv.requests.append((self.path, wanted))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404, "not here")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if match and self.path not in srv.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        cut = srv.cut_once.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def http_server(files: Mapping[str, bytes]) -> Iterator[_Server]:
    """Serve ``{"/path": bytes}`` on 127.0.0.1 (a free port) in a thread for the ``with`` block."""
    server = _Server(dict(files))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
