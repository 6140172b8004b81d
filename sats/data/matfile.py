"""A small reader of MATLAB level-5 MAT-files (the format of SBD's ``cls/*.mat`` masks).

Reads numeric, logical, char, sparse, cell and struct arrays, in either byte order, with
compressed (MATLAB ≥ 7 default) or plain data elements; that covers SBD's files, each a 1×1
struct ``GTcls`` with ``Segmentation`` (uint8 H×W class ids), ``Boundaries`` (a cell of sparse
H×W maps) and ``CategoriesPresent``. MATLAB 7.3 files are HDF5 and are refused with a message.
The layout follows MathWorks' "MAT-File Format" document (level 5): a 128-byte header, then tagged
data elements (8-byte tag: type, byte count; a "small" element packs up to 4 bytes into the tag).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MatError", "SparseMatrix", "loadmat"]

_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8",
              16: "u1", 17: "u2", 18: "u4"}
_MI_MATRIX, _MI_COMPRESSED, _MI_UTF8 = 14, 15, 16
_CLASS_DTYPES = {6: "f8", 7: "f4", 8: "i1", 9: "u1", 10: "i2", 11: "u2", 12: "i4", 13: "u4", 14: "i8", 15: "u8"}
_CELL, _STRUCT, _OBJECT, _CHAR, _SPARSE = 1, 2, 3, 4, 5
_COMPLEX, _LOGICAL = 0x0800, 0x0200


class MatError(ValueError):
    """The bytes are not a level-5 MAT-file this reader understands; the message says what is wrong."""


@dataclass(frozen=True)
class SparseMatrix:
    """A MATLAB sparse matrix in compressed-column form (``rows`` per entry, ``colptr`` per column + 1)."""

    shape: tuple[int, int]
    rows: np.ndarray
    colptr: np.ndarray
    values: np.ndarray

    def toarray(self) -> np.ndarray:
        """The dense (H, W) array."""
        dense = np.zeros(self.shape, dtype=self.values.dtype)
        for col in range(self.shape[1]):
            start, end = int(self.colptr[col]), int(self.colptr[col + 1])
            dense[self.rows[start:end], col] = self.values[start:end]
        return dense


class _Reader:
    def __init__(self, endian: str) -> None:
        self.e = endian

    def element(self, buf: memoryview, pos: int) -> tuple[int, memoryview, int]:
        """(type, payload, position of the next element) of the element at ``pos``."""
        if pos + 8 > len(buf):
            raise MatError(f"truncated data element at byte {pos}")
        first = struct.unpack_from(self.e + "I", buf, pos)[0]
        if first >> 16:  # small data element: byte count in the upper half of the first word
            mtype, count = first & 0xFFFF, first >> 16
            if count > 4:
                raise MatError(f"small data element at byte {pos} claims {count} bytes")
            return mtype, buf[pos + 4:pos + 4 + count], pos + 8
        mtype, count = struct.unpack_from(self.e + "II", buf, pos)
        start, end = pos + 8, pos + 8 + count
        if end > len(buf):
            raise MatError(f"data element at byte {pos} needs {count} bytes, {len(buf) - start} left")
        following = end if mtype == _MI_COMPRESSED else start + (count + 7) // 8 * 8
        return mtype, buf[start:end], min(following, len(buf))

    def numbers(self, mtype: int, payload: memoryview) -> np.ndarray:
        if mtype not in _MI_DTYPES:
            raise MatError(f"data element type {mtype} is not numeric")
        return np.frombuffer(payload, dtype=self.e + _MI_DTYPES[mtype])

    def matrix(self, payload: memoryview) -> tuple[str, Any]:
        """(name, value) of a miMATRIX element's payload."""
        if not len(payload):
            return "", np.zeros((0, 0))
        _, flags, pos = self.element(payload, 0)
        word = int(self.numbers(6, flags[:4])[0])
        cls = word & 0xFF
        mtype, raw, pos = self.element(payload, pos)
        dims = tuple(int(d) for d in self.numbers(mtype, raw))
        _, raw, pos = self.element(payload, pos)
        name = bytes(raw).rstrip(b"\0").decode("ascii", "replace")
        count = int(np.prod(dims)) if dims else 0
        if cls in _CLASS_DTYPES:
            mtype, raw, pos = self.element(payload, pos)
            values = self.numbers(mtype, raw).astype(_CLASS_DTYPES[cls])
            if word & _COMPLEX:
                mtype, raw, pos = self.element(payload, pos)
                values = values + 1j * self.numbers(mtype, raw)
            if values.size != count:
                raise MatError(f"array {name!r}: {values.size} values for dimensions {dims}")
            array = values.reshape(dims, order="F")
            return name, array.astype(bool) if word & _LOGICAL else array
        if cls == _CHAR:
            mtype, raw, pos = self.element(payload, pos)
            if mtype == _MI_UTF8:
                return name, bytes(raw).decode("utf-8")
            return name, "".join(map(chr, self.numbers(mtype, raw)))
        if cls == _SPARSE:
            parts = []
            for _ in range(3):
                mtype, raw, pos = self.element(payload, pos)
                parts.append(self.numbers(mtype, raw))
            rows, colptr, values = parts
            if word & _LOGICAL:
                values = values.astype(bool)
            return name, SparseMatrix((dims[0], dims[1]), rows.astype(np.int64), colptr.astype(np.int64), values)
        if cls == _CELL:
            cells = np.empty(count, dtype=object)
            for i in range(count):
                mtype, raw, pos = self.element(payload, pos)
                cells[i] = self.matrix(raw)[1]
            return name, cells.reshape(dims, order="F")
        if cls in (_STRUCT, _OBJECT):
            if cls == _OBJECT:
                _, _, pos = self.element(payload, pos)  # the class name
            mtype, raw, pos = self.element(payload, pos)
            width = int(self.numbers(mtype, raw)[0])
            _, raw, pos = self.element(payload, pos)
            names_raw = bytes(raw)
            fields = [names_raw[i:i + width].rstrip(b"\0").decode("ascii", "replace")
                      for i in range(0, len(names_raw), width)] if width else []
            records = []
            for _ in range(count):
                record = {}
                for field_name in fields:
                    mtype, raw, pos = self.element(payload, pos)
                    if mtype != _MI_MATRIX:
                        raise MatError(f"struct {name!r} field {field_name!r}: element type {mtype}, expected a matrix")
                    record[field_name] = self.matrix(raw)[1]
                records.append(record)
            if count == 1:
                return name, records[0]
            array = np.empty(count, dtype=object)
            array[:] = records
            return name, array.reshape(dims, order="F")
        raise MatError(f"array {name!r}: MATLAB class {cls} is not supported")


def loadmat(data: bytes) -> dict[str, Any]:
    """``{variable name: value}`` of a level-5 MAT-file's bytes.

    Values: numeric/logical arrays as NumPy arrays with MATLAB's shape (column-major data), char
    arrays as ``str``, sparse matrices as `SparseMatrix`, cell arrays as object arrays, a 1×1 struct
    as a ``dict`` (a struct array as an object array of dicts). `MatError` for anything else.
    """
    buf = memoryview(data)
    if len(buf) < 128:
        raise MatError(f"{len(buf)} bytes: too short for a MAT-file header (128 bytes)")
    header = bytes(buf[:128])
    if header.startswith(b"MATLAB 7.3") or header[124:126] in (b"\x00\x02", b"\x02\x00"):
        raise MatError("a MATLAB 7.3 (HDF5) file; only level-5 MAT-files (MATLAB 5 to 7.2, SBD's format) are read")
    endian = {b"IM": "<", b"MI": ">"}.get(header[126:128])
    if endian is None or not header.startswith(b"MATLAB"):
        raise MatError("not a MATLAB level-5 MAT-file (no 'MATLAB' header with an IM/MI byte-order mark)")
    reader = _Reader(endian)
    variables: dict[str, Any] = {}
    pos = 128
    while pos < len(buf):
        mtype, payload, pos = reader.element(buf, pos)
        if mtype == _MI_COMPRESSED:
            try:
                inner = memoryview(zlib.decompress(payload))
            except zlib.error as error:
                raise MatError(f"damaged compressed element ({error})") from error
            mtype, payload, _ = reader.element(inner, 0)
        if mtype == _MI_MATRIX:
            name, value = reader.matrix(payload)
            variables[name] = value
    return variables
