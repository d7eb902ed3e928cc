"""Strict reader for IDX files (the MNIST / Fashion-MNIST container format), gzipped or raw.

IDX layout: two zero bytes, a dtype code, the number of dimensions ``ndim``, then ``ndim``
big-endian uint32 sizes, then the payload in C order. Every inconsistency raises
:class:`IdxFormatError`; a partial array is never returned, because a silently truncated
training set would only show up later as a puzzling accuracy drop.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_DTYPES", "IdxFormatError", "read_idx"]

GZIP_MAGIC = b"\x1f\x8b"

# IDX dtype code -> numpy dtype (big-endian on disk, as the format specifies).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_REDOWNLOAD = "delete the file and download it again (or copy a verified copy over it)"


class IdxFormatError(ValueError):
    """An IDX file is malformed, truncated, or not an IDX file at all."""


def _read_bytes(path: Path) -> bytes:
    """Return the decompressed content of ``path`` (gzip detected by its magic, not by its name)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
            fh.seek(0)
            if head != GZIP_MAGIC:
                return fh.read()
            with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                return gz.read()
    except EOFError as exc:
        # gzip raises EOFError when the compressed stream stops before its end marker.
        raise IdxFormatError(
            f"{path}: the gzip stream ends early ({exc}); expected a complete gzip file, so the file "
            f"is truncated (an interrupted download or copy). Fix: {_REDOWNLOAD}."
        ) from exc
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise IdxFormatError(
            f"{path}: corrupt gzip data ({exc}); expected a valid gzip-compressed IDX file. "
            f"Fix: {_REDOWNLOAD}."
        ) from exc


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into a numpy array of its declared shape.

    uint8 data (code 0x08, the only type MNIST-like data uses) is returned as is; the other
    standard IDX types are returned converted to native byte order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IdxFormatError: bad magic, unknown dtype code, zero dimensions, a payload shorter or
            longer than the declared dimensions, or a truncated / corrupt gzip stream.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IdxFormatError(
            f"{path}: got {len(data)} bytes; expected at least a 4-byte IDX header, so the file is "
            f"truncated or not an IDX file. Fix: {_REDOWNLOAD}."
        )
    if data[0] != 0 or data[1] != 0:
        raise IdxFormatError(
            f"{path}: bad magic number {data[:4].hex()}; expected an IDX header starting with two zero "
            f"bytes (e.g. 00000803 for images). This is not an IDX file (a HTML error page saved by a "
            f"failed download?). Fix: {_REDOWNLOAD}."
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise IdxFormatError(
            f"{path}: unknown IDX dtype code 0x{code:02x}; expected one of {known} (0x08 = uint8 for "
            f"MNIST-like data). The file is corrupt or not an IDX file. Fix: {_REDOWNLOAD}."
        )
    if ndim == 0:
        raise IdxFormatError(
            f"{path}: header declares 0 dimensions; expected at least 1 (3 for images, 1 for labels). "
            f"Fix: {_REDOWNLOAD}."
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise IdxFormatError(
            f"{path}: expected a {header_len}-byte header for {ndim} dimensions, got {len(data)} bytes: "
            f"the file is truncated. Fix: {_REDOWNLOAD}."
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header_len
    if actual < expected:
        raise IdxFormatError(
            f"{path}: header declares shape {shape} ({dtype}), so expected {expected} payload bytes, got "
            f"{actual}: the file is truncated. Fix: {_REDOWNLOAD}."
        )
    if actual > expected:
        raise IdxFormatError(
            f"{path}: header declares shape {shape} ({dtype}), so expected {expected} payload bytes, got "
            f"{actual} ({actual - expected} trailing bytes): the file is corrupt. Fix: {_REDOWNLOAD}."
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    if dtype.byteorder == ">":
        array = array.astype(dtype.newbyteorder("="))
    elif not array.flags.writeable:
        # frombuffer over bytes is read-only; torch.from_numpy warns on read-only arrays.
        array = array.copy()
    return array
