"""Checks on raw NIfTI bytes that ITK's reader does not make (seen with SimpleITK 2.5.7).

* A truncated ``.nii``/``.nii.gz`` is read as if whole, the missing voxels set to zero.
* NaN and infinite float voxels are read as zero.

Either would let a damaged scan be trained on or segmented as if it were fine. These checks
read the file once more, in chunks (constant memory). For integer images, the usual case for
CT and labels, a ``.nii.gz`` is checked in O(1) through the gzip trailer's size field; only
float images are streamed in full, because their voxels must be looked at anyway.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_CHUNK = 1 << 22
_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes for float32 / float64


@dataclass(frozen=True)
class NiftiHeader:
    byte_order: str  # "<" or ">"
    datatype: int
    vox_offset: int

    @property
    def float_dtype(self) -> np.dtype | None:
        code = _FLOAT_TYPES.get(self.datatype)
        return np.dtype(self.byte_order + code) if code else None


@dataclass(frozen=True)
class NiftiScan:
    complete: bool  # the compressed stream (if any) ended properly
    data_bytes: int  # bytes of voxel data present after the header
    nan: int = 0
    inf: int = 0


def parse_header(head: bytes) -> NiftiHeader:
    """Byte order, datatype and data offset from the first 540 bytes (NIfTI-1 or NIfTI-2)."""
    for order in "<>":
        if len(head) >= 112 and struct.unpack(order + "i", head[:4])[0] == 348:
            return NiftiHeader(order, struct.unpack(order + "h", head[70:72])[0],
                               int(struct.unpack(order + "f", head[108:112])[0]))
        if len(head) >= 176 and struct.unpack(order + "i", head[:4])[0] == 540:
            return NiftiHeader(order, struct.unpack(order + "h", head[12:14])[0],
                               int(struct.unpack(order + "q", head[168:176])[0]))
    raise OSError("not a NIfTI header")


def _chunks(path: Path, compressed: bool):
    """Yield decompressed chunks; the final item is a bool: did the stream end properly."""
    with open(path, "rb") as handle:
        if not compressed:
            while chunk := handle.read(_CHUNK):
                yield chunk
            yield True
            return
        decompressor = zlib.decompressobj(wbits=47)  # gzip or zlib header, detected
        try:
            while not decompressor.eof and (chunk := handle.read(_CHUNK)):
                data = decompressor.decompress(chunk)
                while decompressor.unconsumed_tail:
                    data += decompressor.decompress(decompressor.unconsumed_tail)
                yield data
        except zlib.error:
            yield False
            return
        yield decompressor.eof


class _NonFiniteCounter:
    """Counts NaN/Inf in a byte stream of floats fed in arbitrary pieces."""

    def __init__(self, dtype: np.dtype | None):
        self.dtype, self.tail, self.nan, self.inf = dtype, b"", 0, 0

    def feed(self, data: bytes) -> None:
        if self.dtype is None or not data:
            return
        buffer = self.tail + data
        usable = len(buffer) - len(buffer) % self.dtype.itemsize
        values = np.frombuffer(buffer[:usable], dtype=self.dtype)
        self.nan += int(np.count_nonzero(np.isnan(values)))
        self.inf += int(np.count_nonzero(np.isinf(values)))
        self.tail = buffer[usable:]


def scan(path: str | os.PathLike, count_nonfinite: bool) -> NiftiScan:
    """Stream a NIfTI file: how much voxel data it holds and, optionally, its NaN/Inf count."""
    path = Path(path)
    header, buffered, complete, position = None, b"", False, 0
    counter = _NonFiniteCounter(None)

    def consume(data: bytes) -> None:
        nonlocal position
        counter.feed(data[max(0, header.vox_offset - position):])
        position += len(data)

    for item in _chunks(path, str(path).lower().endswith(".gz")):
        if isinstance(item, bool):
            complete = item
            break
        if header is None:
            buffered += item
            if len(buffered) < 540:
                continue
            header = parse_header(buffered)
            counter = _NonFiniteCounter(header.float_dtype if count_nonfinite else None)
            item, buffered = buffered, b""
        consume(item)
    if header is None:  # the whole file is shorter than 540 bytes
        header = parse_header(buffered)
        counter = _NonFiniteCounter(header.float_dtype if count_nonfinite else None)
        consume(buffered)
    return NiftiScan(complete, max(0, position - header.vox_offset), counter.nan, counter.inf)


def gzip_size_matches(path: str | os.PathLike, expected_total: int) -> bool:
    """O(1) check: the gzip trailer records the uncompressed size (mod 2**32).

    A truncated file ends in arbitrary compressed bytes, which match the expected size with
    probability 2**-32; a mismatch (or a multi-member file) falls back to a full scan.
    """
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() < 18:
            return False
        handle.seek(-4, os.SEEK_END)
        return struct.unpack("<I", handle.read(4))[0] == expected_total % (1 << 32)


def read_nifti_header(path: str | os.PathLike) -> NiftiHeader:
    """Parse the header of a (possibly gzip-compressed) NIfTI file, reading only its start."""
    path = Path(path)
    with open(path, "rb") as handle:
        raw = handle.read(1 << 16)
    if str(path).lower().endswith(".gz"):
        try:
            raw = zlib.decompressobj(wbits=47).decompress(raw, 540)
        except zlib.error as exc:
            raise OSError(f"corrupt compressed data ({exc})") from exc
    return parse_header(raw)


def check_nifti(path: str | os.PathLike, expected_bytes: int, is_float: bool) -> NiftiScan:
    """Voxel-data completeness (and NaN/Inf count for float images) of a NIfTI file."""
    path = Path(path)
    if is_float:
        return scan(path, count_nonfinite=True)
    header = read_nifti_header(path)
    if str(path).lower().endswith(".gz"):
        if gzip_size_matches(path, header.vox_offset + expected_bytes):
            return NiftiScan(True, expected_bytes)
        return scan(path, count_nonfinite=False)
    return NiftiScan(True, max(0, path.stat().st_size - header.vox_offset))
