"""``bitpacked``: a zoo codec that stores binary and k-bit weights at 1..8 bits per weight, bit-exactly.

``import lit_compress.quantization.bitpacked_codec`` registers it (``get_codec("bitpacked")``).

**File layout** (version 1; all integers little-endian)::

    offset  size  field
    0       8     magic b"LCBITPK\\x00"
    8       4     format version (uint32) = 1
    12      4     header length H in bytes (uint32)
    16      32    sha256 of the header bytes
    48      H     header: UTF-8 JSON (below)
    48 + H  ...   payload: the tensors' parts, back to back, in header order

Header::

    {"metadata": {"name": "...", ...},            # str -> str, as given to encode()
     "payload_bytes": 135232,                     # exact payload length (no trailing bytes allowed)
     "tensors": [
       {"name": "fc2.weight", "encoding": "binary", "dtype": "float32", "shape": [1024, 1024],
        "bits": 1,                                # bits per element of the main code stream
        "parts": {"signs": [0, 131072], "scales": [131072, 4096]},   # [offset in payload, length]
        "sha256": "..."},                         # of the tensor's parts, concatenated in the order below
       ...]}

Encodings and their parts (see :mod:`lit_compress.quantization.packing` for the bit order):

- ``binary``: ``signs`` (1 bit per weight, 1 = ``+scale``), ``scales`` (one per output channel, dim 0, in
  the tensor's dtype). Every weight of channel ``c`` is ``+-scale_c``. ``numel/8 + 4*C`` bytes for fp32.
- ``binary_masked``: ``signs``, ``nonzero`` (1 bit each), ``scales``: pruned binary weights, 2 bits/weight.
- ``kbit``: ``codes`` (``bits`` = 1..8 bits per weight) and ``levels``: the tensor's distinct values, sorted,
  at most ``2**bits`` of them, in its dtype (exact for any grid; see the packing module for why not
  ``(scale, offset)``).
- ``raw``: ``data``: the tensor's bytes in its own dtype (float32/64, float16, bfloat16, int8..int64,
  uint8, bool).

Each tensor gets the smallest encoding that reproduces it bit-exactly: a binary MLP's hidden layers come
out at 1/32 of fp32 plus one fp32 scale per row; DoReFa k-bit weights at k bits plus a 2**k-entry table;
first/last layers, biases, BatchNorm statistics and integer buffers stay raw (they would not shrink).
Encoding decodes its own output once and falls back to raw (with a warning) if that ever differed.

**Decoding validates everything** before returning a tensor: magic, version, header length, header hash,
JSON structure, names, dtypes, shapes, encodings, part names, part lengths against shape/dtype/bits, part
offsets (must tile the payload exactly, no gap, no overlap, no trailing byte), each tensor's sha256,
canonical packing (zero padding bits, codes within the levels). Any failure raises
:class:`~lit_compress.zoo.errors.ZooFormatError` saying what was wrong; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import warnings
from typing import Any

import torch
from torch import Tensor

from lit_compress.quantization.packing import (
    INT_VIEW,
    binarize_for_storage,
    binarize_masked_for_storage,
    code_bits,
    pack_bits,
    packed_nbytes,
    quantize_for_storage,
    restore_binary,
    restore_quantized,
)
from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.storage import (
    RAW_DTYPE_NAMES,
    RAW_DTYPES,
    prepare_tensors,
    refuse_pickle,
    register_codec,
)

__all__ = ["FORMAT_VERSION", "MAGIC", "BitpackedCodec", "bytes_report", "read_index"]

MAGIC = b"LCBITPK\x00"
FORMAT_VERSION = 1
_PREAMBLE = struct.Struct("<8sII32s")  # magic, version, header length, header sha256
_DTYPES, _DTYPE_NAMES = RAW_DTYPES, RAW_DTYPE_NAMES
_PARTS = {
    "raw": ("data",),
    "binary": ("signs", "scales"),
    "binary_masked": ("signs", "nonzero", "scales"),
    "kbit": ("codes", "levels"),
}
_ENTRY_KEYS = {"name", "encoding", "dtype", "shape", "bits", "parts", "sha256"}


def _to_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype, shape: list[int]) -> Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _to_bytes(a) == _to_bytes(b)


def _candidates(name: str, t: Tensor) -> list[tuple[str, int, dict[str, bytes]]]:
    """Every encoding that represents ``t`` exactly: ``(encoding, bits, parts)``, raw first."""
    out = [("raw", 8 * t.element_size(), {"data": _to_bytes(t)})]
    if t.dtype not in INT_VIEW or t.numel() == 0 or t.dim() == 0:
        return out
    if t.dim() >= 2:
        try:
            signs, scales = binarize_for_storage(t, name=name)
            out.append(("binary", 1, {"signs": _to_bytes(signs), "scales": _to_bytes(scales)}))
        except ValueError:
            try:
                signs, nonzero, scales = binarize_masked_for_storage(t, name=name)
                parts = {
                    "signs": _to_bytes(signs),
                    "nonzero": _to_bytes(nonzero),
                    "scales": _to_bytes(scales),
                }
                out.append(("binary_masked", 2, parts))
            except ValueError:
                pass
    try:
        codes, levels = quantize_for_storage(t, 8, name=name)
    except ValueError:
        return out
    bits = code_bits(levels.numel())
    if bits < 8:
        codes = pack_bits(codes, bits)
    out.append(("kbit", bits, {"codes": _to_bytes(codes), "levels": _to_bytes(levels)}))
    return out


def _decode_parts(encoding: str, dtype: torch.dtype, shape: list[int], bits: int, parts: dict[str, bytes]):
    """Rebuild one tensor from its parts (raises ValueError/TypeError on inconsistent parts)."""
    if encoding == "raw":
        return _from_bytes(parts["data"], dtype, shape)

    def u8(key: str) -> Tensor:
        return _from_bytes(parts[key], torch.uint8, [len(parts[key])])

    if encoding == "kbit":
        levels = _from_bytes(parts["levels"], dtype, [len(parts["levels"]) // _itemsize(dtype)])
        return restore_quantized(u8("codes"), levels, bits, shape)
    scales = _from_bytes(parts["scales"], dtype, [shape[0]])
    nonzero = u8("nonzero") if encoding == "binary_masked" else None
    return restore_binary(u8("signs"), scales, shape, nonzero=nonzero)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _plan(name: str, t: Tensor) -> tuple[str, int, dict[str, bytes]]:
    """The smallest exact encoding of ``t`` (ties go to the simpler one), verified by decoding it."""
    candidates = _candidates(name, t)
    encoding, bits, parts = min(candidates, key=lambda c: sum(len(p) for p in c[2].values()))
    if encoding != "raw":
        try:
            back = _decode_parts(encoding, t.dtype, list(t.shape), bits, parts)
            exact = _same_bits(back, t)
        except (ValueError, TypeError):
            exact = False
        if not exact:  # a bug, not bad input: never store what does not read back identically
            warnings.warn(
                f"bitpacked: {encoding} encoding of {name!r} did not round-trip; stored raw instead",
                RuntimeWarning,
                stacklevel=3,
            )
            encoding, bits, parts = candidates[0]
    return encoding, bits, parts


def _prepare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return prepare_tensors(tensors, "bitpacked")


def bytes_report(state_dict: dict[str, Tensor]) -> list[dict[str, Any]]:
    """Per tensor: ``{name, encoding, bits, bytes, fp32_bytes}`` as the ``bitpacked`` codec stores it.

    ``bytes`` counts the tensor's payload (codes + scales / levels), not the shared header; ``bits`` is
    the width of its main code stream (32 for a raw fp32 tensor); ``fp32_bytes`` is ``4 * numel``.
    """
    rows = []
    for name, t in _prepare(state_dict).items():
        encoding, bits, parts = _plan(name, t)
        rows.append(
            {
                "name": name,
                "encoding": encoding,
                "bits": bits,
                "bytes": sum(len(p) for p in parts.values()),
                "fp32_bytes": 4 * t.numel(),
            }
        )
    return rows


class BitpackedCodec:
    """Binary / k-bit / raw per tensor, chosen automatically; see the module docstring for the layout."""

    name = "bitpacked"
    suffix = ".bitpacked"

    def encode(self, tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise TypeError(f"metadata must be a dict of str -> str, got {metadata!r}")
        entries, chunks, offset = [], [], 0
        for name, t in _prepare(tensors).items():
            encoding, bits, parts = _plan(name, t)
            digest = hashlib.sha256()
            spans = {}
            for key in _PARTS[encoding]:
                blob = parts[key]
                spans[key] = [offset, len(blob)]
                digest.update(blob)
                chunks.append(blob)
                offset += len(blob)
            entries.append(
                {
                    "name": name,
                    "encoding": encoding,
                    "dtype": _DTYPE_NAMES[t.dtype],
                    "shape": list(t.shape),
                    "bits": bits,
                    "parts": spans,
                    "sha256": digest.hexdigest(),
                }
            )
        header = json.dumps(
            {"metadata": dict(metadata), "payload_bytes": offset, "tensors": entries},
            sort_keys=True,
            separators=(",", ":"),
        ).encode("utf-8")
        preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), hashlib.sha256(header).digest())
        return b"".join([preamble, header, *chunks])

    def decode(self, data: bytes, source: str) -> dict[str, Tensor]:
        try:
            index, payload = _read(data, source)
            return {entry["name"]: _decode_entry(entry, payload, source) for entry in index["tensors"]}
        except ZooFormatError:
            raise
        except Exception as err:  # the validation above should leave nothing; never leak another type
            raise ZooFormatError(f"{source}: malformed bitpacked file ({type(err).__name__}: {err})") from err


def read_index(data: bytes, source: str = "<bytes>") -> dict[str, Any]:
    """The validated header of a ``bitpacked`` file: ``{"metadata", "payload_bytes", "tensors"}``."""
    try:
        return _read(data, source)[0]
    except ZooFormatError:
        raise
    except Exception as err:
        raise ZooFormatError(f"{source}: malformed bitpacked file ({type(err).__name__}: {err})") from err


def _fail(source: str, message: str) -> ZooFormatError:
    return ZooFormatError(f"{source}: {message}")


def _read(data: bytes, source: str) -> tuple[dict[str, Any], bytes]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _fail(source, f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    refuse_pickle(data, source)
    if len(data) < _PREAMBLE.size:
        raise _fail(source, f"truncated: {len(data)} bytes, a bitpacked file starts with {_PREAMBLE.size}")
    magic, version, header_len, header_hash = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise _fail(source, f"not a bitpacked file (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise _fail(
            source,
            f"bitpacked format version {version}; this lit_compress reads version {FORMAT_VERSION}. "
            "Upgrade lit_compress if the file was written by a newer one.",
        )
    end = _PREAMBLE.size + header_len
    if end > len(data):
        raise _fail(source, f"truncated: the header needs {end} bytes, the file has {len(data)}")
    header = data[_PREAMBLE.size : end]
    if hashlib.sha256(header).digest() != header_hash:
        raise _fail(source, "header sha256 mismatch: the header is corrupted")
    try:
        index = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(source, f"header is not UTF-8 JSON ({err})") from err
    payload = data[end:]
    _validate_index(index, len(payload), source)
    return index, payload


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _validate_index(index: object, payload_len: int, source: str) -> None:
    if not isinstance(index, dict) or set(index) != {"metadata", "payload_bytes", "tensors"}:
        raise _fail(source, "header must be an object with metadata, payload_bytes and tensors")
    metadata, tensors = index["metadata"], index["tensors"]
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(source, "header metadata must map strings to strings")
    if not _is_int(index["payload_bytes"]) or index["payload_bytes"] != payload_len:
        raise _fail(
            source,
            f"payload is {payload_len} bytes, the header says {index['payload_bytes']!r} "
            "(truncated file or trailing bytes)",
        )
    if not isinstance(tensors, list):
        raise _fail(source, "header 'tensors' must be a list")
    names, spans = set(), []
    for i, entry in enumerate(tensors):
        spans.extend(_validate_entry(entry, i, names, source))
    position = 0
    for offset, length, where in sorted(spans):
        if offset != position:
            raise _fail(
                source, f"{where} starts at payload byte {offset}, expected {position} (gap or overlap)"
            )
        position += length
    if position != payload_len:
        raise _fail(source, f"the parts cover {position} of {payload_len} payload bytes")


def _validate_entry(entry: object, i: int, names: set[str], source: str) -> list[tuple[int, int, str]]:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise _fail(source, f"tensor entry {i} must have exactly the keys {sorted(_ENTRY_KEYS)}")
    name = entry["name"]
    if not isinstance(name, str) or not name or name in names:
        raise _fail(source, f"tensor entry {i} has a missing or duplicate name {name!r}")
    names.add(name)
    encoding, dtype_name, shape, bits = entry["encoding"], entry["dtype"], entry["shape"], entry["bits"]
    if encoding not in _PARTS:
        raise _fail(source, f"{name!r}: unknown encoding {encoding!r} (known: {sorted(_PARTS)})")
    if dtype_name not in _DTYPES:
        raise _fail(source, f"{name!r}: unknown dtype {dtype_name!r}")
    dtype = _DTYPES[dtype_name]
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise _fail(source, f"{name!r}: shape must be a list of non-negative ints, got {shape!r}")
    if not isinstance(entry["sha256"], str) or len(entry["sha256"]) != 64:
        raise _fail(source, f"{name!r}: sha256 must be 64 hex digits")
    numel, itemsize = math.prod(shape), _itemsize(dtype)
    if encoding == "raw":
        if bits != 8 * itemsize:
            raise _fail(source, f"{name!r}: raw {dtype_name} has {8 * itemsize} bits, header says {bits!r}")
        expected = {"data": numel * itemsize}
    else:
        if (
            dtype not in INT_VIEW
            or not shape
            or numel == 0
            or (encoding.startswith("binary") and len(shape) < 2)
        ):
            raise _fail(
                source, f"{name!r}: {encoding} needs a non-empty float tensor, got {dtype_name} {shape}"
            )
        if encoding == "kbit":
            if not _is_int(bits) or not 1 <= bits <= 8:
                raise _fail(source, f"{name!r}: kbit bits must be 1..8, got {bits!r}")
            levels = entry["parts"].get("levels") if isinstance(entry["parts"], dict) else None
            n_levels = levels[1] // itemsize if isinstance(levels, list) and len(levels) == 2 else -1
            if not 1 <= n_levels <= 1 << bits or levels[1] % itemsize:
                raise _fail(source, f"{name!r}: levels must hold 1..{1 << bits} {dtype_name} values")
            expected = {"codes": packed_nbytes(numel, bits), "levels": n_levels * itemsize}
        else:
            if bits != (1 if encoding == "binary" else 2):
                raise _fail(source, f"{name!r}: {encoding} bits must be {1 if encoding == 'binary' else 2}")
            expected = {"signs": packed_nbytes(numel, 1), "scales": shape[0] * itemsize}
            if encoding == "binary_masked":
                expected["nonzero"] = packed_nbytes(numel, 1)
    parts = entry["parts"]
    if not isinstance(parts, dict) or set(parts) != set(_PARTS[encoding]):
        raise _fail(source, f"{name!r}: {encoding} parts must be {list(_PARTS[encoding])}, got {parts!r}")
    spans = []
    for key, span in parts.items():
        if not isinstance(span, list) or len(span) != 2 or not all(_is_int(v) for v in span):
            raise _fail(source, f"{name!r}: part {key!r} must be [offset, length], got {span!r}")
        if span[1] != expected[key]:
            raise _fail(
                source, f"{name!r}: part {key!r} is {span[1]} bytes, its shape implies {expected[key]}"
            )
        spans.append((span[0], span[1], f"{name!r} part {key!r}"))
    return spans


def _decode_entry(entry: dict[str, Any], payload: bytes, source: str) -> Tensor:
    name, encoding = entry["name"], entry["encoding"]
    parts, digest = {}, hashlib.sha256()
    for key in _PARTS[encoding]:
        offset, length = entry["parts"][key]
        parts[key] = payload[offset : offset + length]
        digest.update(parts[key])
    if digest.hexdigest() != entry["sha256"]:
        raise _fail(source, f"{name!r}: sha256 mismatch, the tensor's bytes are corrupted")
    try:
        return _decode_parts(encoding, _DTYPES[entry["dtype"]], entry["shape"], entry["bits"], parts)
    except (ValueError, TypeError) as err:
        raise _fail(source, f"{name!r}: inconsistent {encoding} data ({err})") from err


register_codec(BitpackedCodec())
