"""``deep-compression``: pruned + weight-shared layers stored as in Deep Compression, bit-exactly.

``import lit_compress.deep_compression.codec`` registers it (``get_codec("deep-compression")``).

Han, Mao & Dally (ICLR 2016) store a pruned layer whose kept weights share a small codebook as two streams
over its *entries* (kept weights in row-major order plus "filler" entries): each entry's cluster index
(``w`` bits) and its relative index (``b`` bits, see :mod:`~lit_compress.deep_compression.relative_index`
for the filler convention), then Huffman-code both streams
(:mod:`~lit_compress.deep_compression.huffman`). This codec does exactly that, per tensor:

- **shared** (``"e": "s"``): a floating tensor (float16/bfloat16/float32/float64) whose nonzero entries take
  at most 256 distinct bit patterns. Stored: the codebook (its distinct nonzero values, exact bits, sorted
  by value; NaNs last, in bit-pattern order), ``Huffman(weight symbols)`` where symbol ``i < k`` is
  codebook entry ``i`` and symbol ``k`` (the codebook size) is the filler, and ``Huffman(gaps)``.
  ``b`` is chosen per tensor among ``1..8`` by the actual Huffman-coded size (or given by the user).
- **raw** (``"e": "r"``): every other tensor (biases, BatchNorm statistics, integer buffers, dense
  full-precision layers) in its own dtype, little-endian.

By default a tensor is shared when it has >= 2 dims, at most 256 distinct nonzero values and the shared
form is smaller than raw; ``share=[...]`` / ``index_bits={...}`` force it (and fail loudly if impossible).

**What counts as nonzero: the bit pattern.** Only ``+0.0`` (all bits zero) is a pruned weight. ``-0.0``
is a kept weight whose codebook value is ``-0.0``: it costs an entry and a codebook slot but decodes
bit-exactly (the project's pruning writes ``+0.0`` for pruned weights, see ``pruning/masks.py``).

**File layout** (version 1; little-endian)::

    offset  size  field
    0       8     magic b"LCDEEPC\\x00"
    8       2     format version (uint16) = 1
    10      4     header length H (uint32)
    14      32    sha256 of the H header bytes
    46      H     header: zlib-compressed compact JSON (below)
    46 + H  ...   payload: each tensor's parts back to back, in header order (no gap, no trailing byte)

Header (short keys: the ratio counts the whole file, header included)::

    {"m": {...},                 # metadata, str -> str, as given to encode()
     "p": 21877,                 # payload length in bytes
     "t": [                      # tensors, in state_dict order
       {"n": "fc1.weight", "e": "s", "d": "float32", "s": [300, 784],
        "k": 32,                 # codebook size; the codebook part is k * itemsize bytes
        "b": 5,                  # relative-index bits, 1..16
        "w": 14133, "i": 7210,   # bytes of Huffman(weight symbols), Huffman(gaps)
        "h": "<sha256 hex of the tensor's parts, concatenated in order codebook, weights, indices>"},
       {"n": "fc1.bias", "e": "r", "d": "float32", "s": [300], "h": "<sha256 of the raw bytes>"},
       ...]}

**Decoding validates everything** before returning a tensor: magic, version, header length and sha256, zlib
stream (bounded size, no trailing data), JSON structure and exact key sets, names, dtypes, shapes (shared
tensors: at most :data:`MAX_SHARED_ELEMENTS` elements per file), part lengths against the payload, each
tensor's sha256 (before any stream is parsed), then the streams themselves: canonical Huffman blobs, weight
symbols ``<= k``, every codebook entry used, the codebook distinct, nonzero and in canonical order, as many
gaps as weight symbols, fillers only where required and no entry past the tensor's end.
Any failure raises :class:`~lit_compress.zoo.errors.ZooFormatError`.
Encoding decodes its own output once and refuses (RuntimeError) to write anything that does not read
back bit-identically.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import math
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lit_compress.deep_compression.huffman import huffman_decode, huffman_encode, huffman_nbytes
from lit_compress.deep_compression.relative_index import (
    DEFAULT_INDEX_BITS,
    check_index_bits,
    decode_positions,
    encode_positions,
    insert_fillers,
)
from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.storage import (
    RAW_DTYPE_NAMES,
    RAW_DTYPES,
    prepare_tensors,
    refuse_pickle,
    register_codec,
)

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CODEBOOK",
    "MAX_SHARED_ELEMENTS",
    "DeepCompressionCodec",
    "read_header",
    "stream_report",
]

MAGIC = b"LCDEEPC\x00"
FORMAT_VERSION = 1
MAX_CODEBOOK = 256
"""Most distinct nonzero values a shared tensor may have (8-bit cluster indices, as in the paper)."""

_PREAMBLE = struct.Struct("<8sHI32s")  # magic, version, header length, header sha256
_MAX_HEADER = 1 << 26  # decompressed header bytes accepted (a zlib bomb must not eat the memory)
MAX_SHARED_ELEMENTS = 1 << 28
"""Most elements the shared tensors of one file may have together (VGG-16 has 1.4e8). A shared tensor's
size is not bounded by its bytes (a pruned-away or constant tensor takes a few bytes whatever its shape),
so this bound is what keeps a hostile shape in a tiny file from allocating terabytes."""
_DTYPES, _DTYPE_NAMES = RAW_DTYPES, RAW_DTYPE_NAMES
# Floating dtypes that can be shared: the unsigned numpy view of their bit patterns.
_PATTERN = {
    torch.float16: (torch.int16, np.dtype("<u2")),
    torch.bfloat16: (torch.int16, np.dtype("<u2")),
    torch.float32: (torch.int32, np.dtype("<u4")),
    torch.float64: (torch.int64, np.dtype("<u8")),
}
_RAW_KEYS = {"n", "e", "d", "s", "h"}
_SHARED_KEYS = _RAW_KEYS | {"k", "b", "w", "i"}


def _fail(source: str, message: str) -> ZooFormatError:
    return ZooFormatError(f"{source}: {message}")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _raw_bytes(t: Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _patterns(t: Tensor) -> np.ndarray:
    """The flat bit patterns of a floating tensor as unsigned ints (numpy has no bfloat16)."""
    int_dtype, np_dtype = _PATTERN[t.dtype]
    return t.reshape(-1).view(int_dtype).numpy().view(np_dtype)


def _sort_key(patterns: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Float values of bit patterns, for ordering the codebook (bfloat16 widened exactly to float32)."""
    if dtype == torch.bfloat16:
        return (patterns.astype(np.uint32) << 16).view(np.float32)
    return patterns.view({2: np.float16, 4: np.float32, 8: np.float64}[patterns.itemsize])


def _canonical(patterns: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Distinct patterns (sorted as unsigned ints) reordered by float value: the codebook's order."""
    return patterns[np.argsort(_sort_key(patterns, dtype), kind="stable")]


# ---------------------------------------------------------------------------------------------- planning


@dataclass
class _Shared:
    codebook: np.ndarray  # canonical order, unsigned patterns
    positions: np.ndarray  # flat positions of the kept (nonzero-pattern) weights
    codes: np.ndarray  # codebook index of each kept weight


def _analyse(t: Tensor) -> _Shared | str:
    """The codebook, positions and codes of ``t``; or, past 256 distinct nonzero values, how many."""
    pat = _patterns(t)
    positions = np.flatnonzero(pat)
    values = pat[positions]
    prefix = np.unique(values[: 1 << 16])  # cheap early refusal for a dense full-precision tensor
    if prefix.size > MAX_CODEBOOK:
        return str(prefix.size) if values.size <= 1 << 16 else f"at least {prefix.size}"
    uniq, inverse = np.unique(values, return_inverse=True)
    if uniq.size > MAX_CODEBOOK:
        return str(uniq.size)
    order = np.argsort(_sort_key(uniq, t.dtype), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return _Shared(codebook=uniq[order], positions=positions, codes=rank[inverse.reshape(-1)])


def _shared_parts(shared: _Shared, bits: int) -> list[bytes]:
    index = encode_positions(shared.positions, bits)
    k = shared.codebook.size
    return [
        shared.codebook.tobytes(),
        huffman_encode(insert_fillers(shared.codes, index, k)),
        huffman_encode(index.gaps),
    ]


def _best_bits(shared: _Shared, candidates: Sequence[int]) -> int:
    def cost(b: int) -> int:
        index = encode_positions(shared.positions, b)
        weights = insert_fillers(shared.codes, index, shared.codebook.size)
        return huffman_nbytes(weights) + huffman_nbytes(index.gaps)

    costs = {b: cost(b) for b in candidates}
    return min(costs, key=lambda b: (costs[b], b))


def _match(patterns: Iterable[str], names: list[str], what: str) -> None:
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.4)
            raise ValueError(
                f"{what} pattern {pattern!r} matches no tensor of this state_dict; "
                f"close names: {close or names[:5]}"
            )


# ---------------------------------------------------------------------------------------------- the codec


class DeepCompressionCodec:
    """Deep Compression storage (P+Q+H): see the module docstring for when a tensor is shared, and the layout.

    Args:
        index_bits: relative-index width ``b`` for shared tensors. ``None`` (default) picks, per tensor,
            the ``b`` in ``candidate_bits`` with the smallest Huffman-coded size; an int applies to every
            shared tensor; a mapping ``{glob: b}`` (``fnmatch`` on tensor names, first match wins) sets it
            for the tensors it matches and **forces** them to be shared; e.g. the paper's
            ``{"conv*": 8, "fc*": 5}``.
        share: glob patterns of tensors that must be stored shared even when that is not smaller (or has
            fewer than 2 dims); a matching tensor with more than 256 distinct nonzero values raises.
        candidate_bits: the widths tried when ``b`` is chosen automatically (default ``1..8``).

    The registered instance (``get_codec("deep-compression")``) uses the defaults; files made with any
    settings decode with it, since ``b`` is in the file.
    """

    name = "deep-compression"
    suffix = ".dc.bin"

    def __init__(
        self,
        index_bits: int | Mapping[str, int] | None = None,
        share: Iterable[str] = (),
        candidate_bits: Iterable[int] = DEFAULT_INDEX_BITS,
    ) -> None:
        if isinstance(index_bits, Mapping):
            for pattern, bits in index_bits.items():
                if not isinstance(pattern, str):
                    raise TypeError(f"index_bits keys must be tensor-name globs, got {pattern!r}")
                check_index_bits(bits, f"index_bits[{pattern!r}]")
            index_bits = dict(index_bits)
        elif index_bits is not None:
            index_bits = check_index_bits(index_bits, "index_bits")
        if isinstance(share, str) or not all(isinstance(p, str) for p in share):
            raise TypeError(f'share must be a list of tensor-name globs, e.g. ["fc*.weight"], got {share!r}')
        candidates = tuple(check_index_bits(b, "candidate_bits entry") for b in candidate_bits)
        if not candidates:
            raise ValueError("candidate_bits is empty; give at least one width, e.g. range(1, 9)")
        self.index_bits = index_bits
        self.share = tuple(share)
        self.candidate_bits = candidates

    def _bits_for(self, name: str) -> int | None:
        if isinstance(self.index_bits, dict):
            for pattern, bits in self.index_bits.items():
                if fnmatch.fnmatchcase(name, pattern):
                    return bits
            return None
        return self.index_bits

    def _forced(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.share) or (
            isinstance(self.index_bits, dict) and self._bits_for(name) is not None
        )

    def _plan(self, name: str, t: Tensor) -> tuple[dict[str, Any], list[bytes]]:
        """Header entry (without the hash) and parts of one tensor."""
        forced = self._forced(name)
        entry: dict[str, Any] = {"n": name, "e": "r", "d": _DTYPE_NAMES[t.dtype], "s": list(t.shape)}
        raw = [_raw_bytes(t)]
        if t.dtype not in _PATTERN or t.numel() == 0 or t.dim() == 0 or (t.dim() < 2 and not forced):
            if forced:
                raise ValueError(
                    f"{name!r} was asked to be stored shared but is a {t.dtype} tensor of shape "
                    f"{list(t.shape)}; only non-empty, at least 1-D float16/bfloat16/float32/float64 "
                    "tensors can be shared"
                )
            return entry, raw
        shared = _analyse(t)
        if isinstance(shared, str):
            if forced:
                raise ValueError(
                    f"{name!r} was asked to be stored shared but has {shared} distinct nonzero values; "
                    f"a codebook holds at most {MAX_CODEBOOK}: cluster it first (weight sharing) or leave it "
                    "out of share / index_bits"
                )
            return entry, raw
        bits = self._bits_for(name) or _best_bits(shared, self.candidate_bits)
        parts = _shared_parts(shared, bits)
        if not forced and sum(map(len, parts)) >= len(raw[0]):
            return entry, raw
        entry.update(e="s", k=int(shared.codebook.size), b=bits, w=len(parts[1]), i=len(parts[2]))
        back = _decode_shared(entry, parts, name)
        if _raw_bytes(back) != raw[0]:  # a bug, not bad input: never write what does not read back
            raise RuntimeError(f"deep-compression: {name!r} did not round-trip; please report this")
        return entry, parts

    def encode(self, tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise TypeError(f"metadata must be a dict of str -> str, got {metadata!r}")
        prepared = _prepare(tensors)
        names = list(prepared)
        _match(self.share, names, "share")
        if isinstance(self.index_bits, dict):
            _match(self.index_bits, names, "index_bits")
        entries, chunks, shared_numel = [], [], 0
        for name, t in prepared.items():
            entry, parts = self._plan(name, t)
            if entry["e"] == "s":
                shared_numel += t.numel()
                if shared_numel > MAX_SHARED_ELEMENTS:  # the decoder would refuse it: never write that
                    if self._forced(name):
                        raise ValueError(
                            f"{name!r}: the shared tensors would hold {shared_numel} elements, more than the "
                            f"{MAX_SHARED_ELEMENTS} a deep-compression file may; share fewer tensors"
                        )
                    shared_numel -= t.numel()
                    entry = {"n": name, "e": "r", "d": _DTYPE_NAMES[t.dtype], "s": list(t.shape)}
                    parts = [_raw_bytes(t)]
            entry["h"] = hashlib.sha256(b"".join(parts)).hexdigest()
            entries.append(entry)
            chunks.extend(parts)
        payload = b"".join(chunks)
        header_json = json.dumps(
            {"m": dict(metadata), "p": len(payload), "t": entries}, separators=(",", ":"), sort_keys=True
        )
        header = zlib.compress(header_json.encode("utf-8"), 9)
        preamble = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header), hashlib.sha256(header).digest())
        return preamble + header + payload

    def decode(self, data: bytes, source: str) -> dict[str, Tensor]:
        try:
            header, payload = _read(data, source)
            out, offset = {}, 0
            for entry in header["t"]:
                parts = _split_parts(entry, payload, offset)
                offset += sum(map(len, parts))
                if hashlib.sha256(b"".join(parts)).hexdigest() != entry["h"]:
                    raise _fail(source, f"{entry['n']!r}: sha256 mismatch, the tensor's bytes are corrupted")
                out[entry["n"]] = _decode_entry(entry, parts, source)
            return out
        except ZooFormatError:
            raise
        except Exception as err:  # the validation should leave nothing; never leak another type
            raise _fail(source, f"malformed deep-compression file ({type(err).__name__}: {err})") from err


def _prepare(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return prepare_tensors(tensors, "deep-compression")


# ---------------------------------------------------------------------------------------------- reading


def _read(data: bytes, source: str) -> tuple[dict[str, Any], bytes]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise _fail(source, f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    refuse_pickle(data, source)
    if len(data) < _PREAMBLE.size:
        raise _fail(
            source, f"truncated: {len(data)} bytes, a deep-compression file starts with {_PREAMBLE.size}"
        )
    magic, version, header_len, header_hash = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise _fail(source, f"not a deep-compression file (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise _fail(
            source,
            f"deep-compression format version {version}; this lit_compress reads version {FORMAT_VERSION}. "
            "Upgrade lit_compress if the file was written by a newer one.",
        )
    end = _PREAMBLE.size + header_len
    if end > len(data):
        raise _fail(source, f"truncated: the header needs {end} bytes, the file has {len(data)}")
    header = data[_PREAMBLE.size : end]
    if hashlib.sha256(header).digest() != header_hash:
        raise _fail(source, "header sha256 mismatch: the header is corrupted")
    inflate = zlib.decompressobj()
    try:
        text = inflate.decompress(header, _MAX_HEADER)
    except zlib.error as err:
        raise _fail(source, f"header is not a zlib stream ({err})") from err
    if not inflate.eof or inflate.unconsumed_tail or inflate.unused_data:
        raise _fail(
            source, "header is not exactly one complete zlib stream (truncated, too large or trailing)"
        )
    try:
        index = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(source, f"header is not UTF-8 JSON ({err})") from err
    payload = data[end:]
    _validate_header(index, len(payload), source)
    return index, payload


def read_header(data: bytes, source: str = "<bytes>") -> dict[str, Any]:
    """The validated header of a ``deep-compression`` file: ``{"m": metadata, "p": payload, "t": [...]}``."""
    try:
        return _read(data, source)[0]
    except ZooFormatError:
        raise
    except Exception as err:
        raise _fail(source, f"malformed deep-compression file ({type(err).__name__}: {err})") from err


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _validate_header(index: object, payload_len: int, source: str) -> None:
    if not isinstance(index, dict) or set(index) != {"m", "p", "t"}:
        raise _fail(source, "header must be an object with exactly the keys m, p, t")
    metadata, tensors = index["m"], index["t"]
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _fail(source, "header metadata must map strings to strings")
    if not _is_int(index["p"]) or index["p"] != payload_len:
        raise _fail(
            source,
            f"payload is {payload_len} bytes, the header says {index['p']!r} (truncated or trailing bytes)",
        )
    if not isinstance(tensors, list):
        raise _fail(source, "header 't' (tensors) must be a list")
    names: set[str] = set()
    total = shared_numel = 0
    for i, entry in enumerate(tensors):
        total += _validate_entry(entry, i, names, source)
        if entry["e"] == "s":
            shared_numel += math.prod(entry["s"])
            if shared_numel > MAX_SHARED_ELEMENTS:
                raise _fail(
                    source,
                    f"{entry['n']!r}: shared tensors of {shared_numel} elements (shape {entry['s']}), at "
                    f"most {MAX_SHARED_ELEMENTS} elements are accepted per file (a corrupted header?)",
                )
    if total != payload_len:
        raise _fail(source, f"the tensors' parts cover {total} of {payload_len} payload bytes")


def _part_lengths(entry: dict[str, Any]) -> list[int]:
    itemsize = _itemsize(_DTYPES[entry["d"]])
    if entry["e"] == "r":
        return [math.prod(entry["s"]) * itemsize]
    return [entry["k"] * itemsize, entry["w"], entry["i"]]


def _validate_entry(entry: object, i: int, names: set[str], source: str) -> int:
    if not isinstance(entry, dict) or entry.get("e") not in ("r", "s"):
        raise _fail(
            source, f"tensor entry {i} must be an object with encoding 'e' of 'r' (raw) or 's' (shared)"
        )
    keys = _RAW_KEYS if entry["e"] == "r" else _SHARED_KEYS
    if set(entry) != keys:
        raise _fail(source, f"tensor entry {i} ({entry['e']!r}) must have exactly the keys {sorted(keys)}")
    name = entry["n"]
    if not isinstance(name, str) or not name or name in names:
        raise _fail(source, f"tensor entry {i} has a missing or duplicate name {name!r}")
    names.add(name)
    if entry["d"] not in _DTYPES:
        raise _fail(source, f"{name!r}: unknown dtype {entry['d']!r} (known: {sorted(_DTYPES)})")
    shape = entry["s"]
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise _fail(source, f"{name!r}: shape must be a list of non-negative ints, got {shape!r}")
    digest = entry["h"]
    if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise _fail(source, f"{name!r}: sha256 must be 64 lowercase hex digits")
    if entry["e"] == "s":
        if _DTYPES[entry["d"]] not in _PATTERN or not shape or math.prod(shape) == 0:
            raise _fail(
                source,
                f"{name!r}: a shared tensor must be a non-empty float tensor, got {entry['d']} {shape}",
            )
        if not _is_int(entry["k"]) or entry["k"] > MAX_CODEBOOK:
            raise _fail(source, f"{name!r}: codebook size must be 0..{MAX_CODEBOOK}, got {entry['k']!r}")
        if not _is_int(entry["b"]) or not 1 <= entry["b"] <= 16:
            raise _fail(source, f"{name!r}: index bits must be 1..16, got {entry['b']!r}")
        if not _is_int(entry["w"]) or not _is_int(entry["i"]):
            raise _fail(source, f"{name!r}: stream lengths must be non-negative ints")
    return sum(_part_lengths(entry))


def _split_parts(entry: dict[str, Any], payload: bytes, offset: int) -> list[bytes]:
    parts = []
    for length in _part_lengths(entry):
        parts.append(payload[offset : offset + length])
        offset += length
    return parts


def _decode_entry(entry: dict[str, Any], parts: list[bytes], source: str) -> Tensor:
    dtype, shape = _DTYPES[entry["d"]], entry["s"]
    if entry["e"] == "r":
        if not parts[0]:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(bytearray(parts[0]), dtype=torch.uint8).view(dtype).reshape(shape)
    try:
        return _decode_shared(entry, parts, entry["n"])
    except (ValueError, TypeError) as err:  # ZooFormatError is a ValueError: keep its message
        message = str(err).removeprefix("huffman stream: ")
        raise _fail(source, f"{entry['n']!r}: inconsistent shared data ({message})") from err


def _decode_shared(entry: dict[str, Any], parts: list[bytes], name: str) -> Tensor:
    """Rebuild a shared tensor from its three parts; ValueError on anything non-canonical."""
    dtype, shape, k, bits = _DTYPES[entry["d"]], entry["s"], entry["k"], entry["b"]
    int_dtype, np_dtype = _PATTERN[dtype]
    numel = math.prod(shape)
    codebook = np.frombuffer(parts[0], dtype=np_dtype)
    if (codebook == 0).any():
        raise ValueError("the codebook holds +0.0, which is the pruned value")
    ordered = np.unique(codebook)
    if ordered.size != k or not np.array_equal(_canonical(ordered, dtype), codebook):
        raise ValueError("the codebook is not distinct values in canonical (sorted by value) order")
    weights = huffman_decode(parts[1], max_count=numel + (numel >> bits) + 1)
    gaps = huffman_decode(parts[2], count=weights.size)
    if weights.size and int(weights.max()) > k:
        raise ValueError(f"weight symbol {int(weights.max())} past the filler symbol {k}")
    is_filler = weights == k
    kept = weights[~is_filler]
    if (np.bincount(kept, minlength=k) == 0).any():
        raise ValueError("a codebook entry is never used (not a canonical file)")
    positions = decode_positions(gaps, is_filler, bits, numel)
    out = np.zeros(numel, dtype=np_dtype)
    out[positions] = codebook[kept]
    return (
        torch.from_numpy(out.view(np_dtype.str.replace("u", "i"))).view(int_dtype).view(dtype).reshape(shape)
    )


# ---------------------------------------------------------------------------------------------- report


def stream_report(
    tensors_or_file: dict[str, Tensor] | bytes,
    metadata: dict[str, str] | None = None,
    codec: DeepCompressionCodec | None = None,
) -> dict[str, Any]:
    """Bytes by stream of a ``deep-compression`` file, per tensor and in total (Deep Compression Tables 2-3).

    Give a state_dict (it is encoded with ``codec``, default settings if ``None``) or the bytes of a file;
    the numbers are read back from the encoded file, so they are what is stored. Returns
    ``{"tensors": [row, ...], "totals": {...}}``. Each row: ``name, encoding ("shared" | "raw"), dtype,
    shape, numel, kept`` (nonzero weights stored; all elements for raw), ``kept_pct, codebook_size,
    weight_bits`` (``w``: bits to index the codebook plus the filler symbol when there are fillers),
    ``index_bits`` (``b``), ``fillers, entries`` (kept + fillers), ``weights_packed_bytes`` and
    ``indices_packed_bytes`` (``ceil(entries * w / 8)``, ``ceil(entries * b / 8)``: before Huffman),
    ``weights_bytes`` and ``indices_bytes`` (after Huffman, code tables included),
    ``weight_bits_huffman`` and ``index_bits_huffman`` (bits per kept weight after Huffman),
    ``codebook_bytes, raw_bytes, bytes`` (all parts), ``dense_bytes`` (numel * itemsize).
    Totals sum the columns and add ``header_bytes`` (preamble + compressed header: names, shapes, hashes,
    metadata), ``file_bytes`` and ``compression`` (``dense_bytes / file_bytes``).
    """
    if isinstance(tensors_or_file, (bytes, bytearray, memoryview)):
        data = bytes(tensors_or_file)
    else:
        data = (codec or DeepCompressionCodec()).encode(tensors_or_file, metadata or {})
    header, payload = _read(data, "<report>")
    rows, offset = [], 0
    for entry in header["t"]:
        parts = _split_parts(entry, payload, offset)
        offset += sum(map(len, parts))
        if hashlib.sha256(b"".join(parts)).hexdigest() != entry["h"]:
            raise _fail("<report>", f"{entry['n']!r}: sha256 mismatch, the tensor's bytes are corrupted")
        rows.append(_row(entry, parts))
    totals: dict[str, Any] = {k: sum(r[k] for r in rows) for k in _TOTAL_KEYS}
    totals["file_bytes"] = len(data)
    totals["header_bytes"] = len(data) - len(payload)
    totals["compression"] = totals["dense_bytes"] / len(data)
    return {"tensors": rows, "totals": totals}


_TOTAL_KEYS = (
    "numel",
    "kept",
    "fillers",
    "entries",
    "weights_packed_bytes",
    "indices_packed_bytes",
    "weights_bytes",
    "indices_bytes",
    "codebook_bytes",
    "raw_bytes",
    "bytes",
    "dense_bytes",
)


def _row(entry: dict[str, Any], parts: list[bytes]) -> dict[str, Any]:
    dtype, numel = _DTYPES[entry["d"]], math.prod(entry["s"])
    itemsize = _itemsize(dtype)
    row: dict[str, Any] = {
        "name": entry["n"],
        "encoding": "raw" if entry["e"] == "r" else "shared",
        "dtype": entry["d"],
        "shape": entry["s"],
        "numel": numel,
    }
    if entry["e"] == "r":
        stats = dict(kept=numel, codebook_size=0, weight_bits=8 * itemsize, index_bits=0, fillers=0)
        stats.update(entries=numel, weights_packed_bytes=0, indices_packed_bytes=0, weights_bytes=0)
        stats.update(indices_bytes=0, codebook_bytes=0, raw_bytes=len(parts[0]))
    else:
        k, b = entry["k"], entry["b"]
        weights = huffman_decode(parts[1], max_count=numel + (numel >> b) + 1)
        fillers = int(np.count_nonzero(weights == k))
        entries = int(weights.size)
        w = max(1, math.ceil(math.log2(k + (fillers > 0)))) if entries else 0
        stats = dict(kept=entries - fillers, codebook_size=k, weight_bits=w, index_bits=b, fillers=fillers)
        stats.update(entries=entries, weights_packed_bytes=(entries * w + 7) // 8)
        stats.update(indices_packed_bytes=(entries * b + 7) // 8, weights_bytes=len(parts[1]))
        stats.update(indices_bytes=len(parts[2]), codebook_bytes=len(parts[0]), raw_bytes=0)
    row.update(stats)
    kept = row["kept"]
    row["kept_pct"] = 100.0 * kept / numel if numel else 0.0
    row["weight_bits_huffman"] = (
        8 * row["weights_bytes"] / kept if kept and row["encoding"] == "shared" else 0.0
    )
    row["index_bits_huffman"] = (
        8 * row["indices_bytes"] / kept if kept and row["encoding"] == "shared" else 0.0
    )
    row["bytes"] = sum(map(len, parts))
    row["dense_bytes"] = numel * itemsize
    return row


register_codec(DeepCompressionCodec())
