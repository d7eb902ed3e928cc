"""Canonical Huffman coding of integer symbol streams (the "H" of Deep Compression's P+Q+H).

Deep Compression (Han, Mao & Dally, ICLR 2016) Huffman-codes both the cluster indices of the kept weights
and their relative positions: both streams are far from uniform (a few clusters and short gaps dominate),
which saves another 20-30% over fixed-width codes. This module is a small, self-contained codec for such
streams: ``huffman_encode(np.ndarray of ints) -> bytes`` and ``huffman_decode(bytes) -> np.ndarray``.

**Canonical codes.** Only the code *length* of each symbol is stored; the codes themselves follow from the
lengths (symbols sorted by ``(length, symbol)`` receive consecutive codes, each length starting at the
previous length's next code shifted left), as in DEFLATE. Lengths are limited to
:data:`MAX_CODE_LENGTH` bits (optimal Huffman lengths, then the JPEG Annex K.3 adjustment when a length
exceeds the limit; that only happens for extremely skewed counts), so a decoder window always fits in 32
bits.

**Blob layout** (bits are written most significant first, the usual order for prefix codes)::

    varint   count            number of symbols in the stream (LEB128, minimal length)
    varint   n                alphabet size = largest symbol + 1 (0 exactly when count is 0)
    -- only when n > 0:
    uint8    L                longest code length, 1..MAX_CODE_LENGTH
    n fields of L.bit_length() bits: the code length of symbols 0..n-1 (0 = symbol absent),
             zero-padded to a whole byte
    the code bit stream, zero-padded to a whole byte (no trailing byte)

A stream with a single distinct symbol stores that symbol with length 1 and an *empty* bit stream (the
count says how many copies: 0 bits per symbol). Otherwise the lengths must be exactly the ones
:func:`code_lengths` gives for the decoded symbols' counts (so they form a complete prefix code and every
symbol with a code occurs), and ``L`` must be the largest length: every valid stream has exactly one blob,
and anything else (truncation, bad or non-canonical lengths, more or fewer symbols than announced, nonzero
padding, trailing bytes, a count above ``max_count``) raises :class:`~lit_compress.zoo.errors.ZooFormatError`.

**Speed.** Encoding is vectorised. Decoding computes, for every bit position at once (numpy), the length
of the code that would start there (one ``searchsorted`` over the canonical limits); only the walk from
one code start to the next is a Python loop, one list lookup per symbol (~0.1 s per million symbols).
"""

from __future__ import annotations

import heapq

import numpy as np

__all__ = [
    "MAX_ALPHABET",
    "MAX_CODE_LENGTH",
    "MAX_SYMBOLS",
    "canonical_codes",
    "code_lengths",
    "huffman_decode",
    "huffman_encode",
    "huffman_nbytes",
]

MAX_CODE_LENGTH = 24
"""Longest code the encoder emits and the decoder accepts (bits); the decode window is 32 bits."""

MAX_ALPHABET = 1 << 20
"""Symbols must be below this (the code-length table has one entry per symbol up to the largest)."""

MAX_SYMBOLS = 1 << 26
"""Most symbols :func:`huffman_decode` returns when the caller gives no ``max_count``: a single-symbol
stream has no code bits, so only a bound keeps a corrupted count from allocating terabytes."""

_CHUNK = 1 << 18  # bit positions whose code lengths are computed per numpy pass while decoding


def _corrupt(message: str) -> Exception:
    # Imported here, not at module level: lit_compress.zoo imports the codecs (this package among them)
    # while it initialises, so a top-level import would be circular.
    from lit_compress.zoo.errors import ZooFormatError

    return ZooFormatError(f"huffman stream: {message}")


# ---------------------------------------------------------------------------------------------- code lengths


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code length of each symbol (0 for a symbol with count 0), limited to ``max_length`` bits.

    ``counts[s]`` is how often symbol ``s`` occurs. A single used symbol gets length 1 (see the module
    docstring: it is then coded with 0 bits). When the optimal lengths exceed ``max_length`` they are
    adjusted as in JPEG (Annex K.3), which keeps the code complete; lengths are then handed out by
    decreasing count (ties: smaller symbol first), which keeps the result deterministic.
    """
    counts = np.asarray(counts)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise ValueError(f"counts must be a 1-D array of non-negative ints, got {counts!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= 32:
        raise ValueError(f"max_length must be an int in 1..32, got {max_length!r}")
    lengths = np.zeros(counts.size, dtype=np.int64)
    used = np.flatnonzero(counts)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used] = 1
        return lengths
    if used.size > 1 << max_length:
        raise ValueError(f"{used.size} symbols cannot be coded with codes of at most {max_length} bits")
    depth = _huffman_depths(counts[used].tolist())
    per_length = np.bincount(depth)
    if per_length.size - 1 > max_length:
        per_length = _limit_lengths(per_length.tolist(), max_length)
    # Most frequent symbols get the shortest codes.
    by_frequency = used[np.lexsort((used, -counts[used]))]
    lengths[by_frequency] = np.repeat(np.arange(len(per_length)), per_length)
    return lengths


def _huffman_depths(weights: list[int]) -> np.ndarray:
    """Leaf depths of a Huffman tree over ``weights`` (>= 2 leaves): merge the two lightest, repeat."""
    m = len(weights)
    heap = [(w, i) for i, w in enumerate(weights)]  # (weight, node id): ids make ties deterministic
    heapq.heapify(heap)
    parent = [0] * (2 * m - 1)
    next_id = m
    while len(heap) > 1:
        w1, a = heapq.heappop(heap)
        w2, b = heapq.heappop(heap)
        parent[a] = parent[b] = next_id
        heapq.heappush(heap, (w1 + w2, next_id))
        next_id += 1
    depth = [0] * (2 * m - 1)
    for node in range(2 * m - 3, -1, -1):  # parents have larger ids: the root (last id) has depth 0
        depth[node] = depth[parent[node]] + 1
    return np.asarray(depth[:m], dtype=np.int64)


def _limit_lengths(per_length: list[int], limit: int) -> list[int]:
    """JPEG Annex K.3: move leaves up until no code is longer than ``limit`` (the code stays complete)."""
    bits = per_length + [0] * 2
    for i in range(len(per_length) - 1, limit, -1):
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2  # two leaves at depth i ...
            bits[i - 1] += 1  # ... one moves up to replace their parent
            bits[j + 1] += 2  # ... the other hangs under a former leaf at depth j, itself moved down
            bits[j] -= 1
    return bits[: limit + 1]


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of each symbol from its length (symbols ordered by ``(length, symbol)``)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.size, dtype=np.int64)
    used = np.flatnonzero(lengths)
    if used.size == 0:
        return codes
    order = used[np.lexsort((used, lengths[used]))]
    first, _, _ = _canonical_tables(lengths, int(lengths.max()))
    sorted_lengths = lengths[order]
    group_start = np.searchsorted(sorted_lengths, sorted_lengths, side="left")
    codes[order] = first[sorted_lengths] + np.arange(order.size) - group_start
    return codes


def _canonical_tables(lengths: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per length l (index 0..max_len): first canonical code, number of codes, codes shorter than l."""
    count = np.bincount(lengths[lengths > 0], minlength=max_len + 1)
    count[0] = 0
    first = np.zeros(max_len + 1, dtype=np.int64)
    code = 0
    for length in range(1, max_len + 1):
        code = (code + int(count[length - 1])) << 1
        first[length] = code
    before = np.concatenate([[0], np.cumsum(count)[:-1]])
    return first, count.astype(np.int64), before.astype(np.int64)


# ---------------------------------------------------------------------------------------------- encoding


def _as_symbols(symbols: object) -> np.ndarray:
    arr = np.asarray(symbols)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(
            f"symbols must be a 1-D numpy array of non-negative ints, got {getattr(arr, 'dtype', '?')} "
            f"of shape {arr.shape}; flatten it and convert codes to an integer dtype first"
        )
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= MAX_ALPHABET):
        raise ValueError(
            f"symbols must lie in [0, {MAX_ALPHABET}), found values in [{int(arr.min())}, {int(arr.max())}]"
        )
    return arr


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _pack_msb(values: np.ndarray, width: int) -> bytes:
    """``values`` as ``width``-bit fields, most significant bit first, zero-padded to a byte."""
    bits = (values[:, None] >> np.arange(width - 1, -1, -1)) & 1
    return np.packbits(bits.astype(np.uint8).reshape(-1)).tobytes()


def _table(counts: np.ndarray) -> tuple[np.ndarray, bytes]:
    """(code lengths, serialized ``n, L, lengths`` part of the blob) for the symbol counts."""
    lengths = code_lengths(counts)
    max_len = int(lengths.max())
    table = _varint(counts.size) + bytes([max_len]) + _pack_msb(lengths, max_len.bit_length())
    return lengths, table


def huffman_nbytes(symbols: np.ndarray) -> int:
    """Exact length of ``huffman_encode(symbols)`` in bytes, without building the bit stream."""
    sym = _as_symbols(symbols)
    if sym.size == 0:
        return 2
    counts = np.bincount(sym)
    lengths, table = _table(counts)
    head = len(_varint(sym.size)) + len(table)
    if np.count_nonzero(counts) == 1:
        return head
    return head + (int(np.dot(counts, lengths)) + 7) // 8


def huffman_encode(symbols: np.ndarray) -> bytes:
    """Canonical Huffman code of a 1-D stream of non-negative ints; see the module docstring for the layout.

    The code is built from the stream's own symbol counts, so the blob is self-contained.
    """
    sym = _as_symbols(symbols)
    if sym.size == 0:
        return _varint(0) + _varint(0)
    counts = np.bincount(sym)
    lengths, table = _table(counts)
    head = _varint(sym.size) + table
    if np.count_nonzero(counts) == 1:
        return head
    codes = canonical_codes(lengths)
    return head + _emit(codes[sym], lengths[sym])


def _emit(codes: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate variable-length codes (MSB first) into bytes, zero-padded."""
    ends = np.cumsum(lengths)
    total = int(ends[-1])
    bits = np.zeros(total, dtype=np.uint8)
    step = 1 << 20
    for lo in range(0, codes.size, step):  # bounded temporaries for very long streams
        c, n, e = codes[lo : lo + step], lengths[lo : lo + step], ends[lo : lo + step]
        start = e - n
        pos = np.arange(int(start[0]), int(e[-1]))
        which = np.repeat(np.arange(c.size), n)
        shift = e[which] - 1 - pos  # bit j of a code of length n is bit (n - 1 - j) of its value
        bits[pos] = (c[which] >> shift) & 1
    return np.packbits(bits).tobytes()


# ---------------------------------------------------------------------------------------------- decoding


def _read_varint(buf: bytes, pos: int, what: str) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise _corrupt(f"truncated inside the {what}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and shift:
                raise _corrupt(f"the {what} is not minimally encoded")
            return value, pos
        shift += 7
        if shift > 63:
            raise _corrupt(f"the {what} does not fit in 64 bits")


def _read_lengths(buf: bytes, pos: int, n: int) -> tuple[np.ndarray, int]:
    if n > MAX_ALPHABET:
        raise _corrupt(f"alphabet of {n} symbols, at most {MAX_ALPHABET} are allowed")
    if pos >= len(buf):
        raise _corrupt("truncated before the code-length table")
    max_len = buf[pos]
    pos += 1
    if not 1 <= max_len <= MAX_CODE_LENGTH:
        raise _corrupt(f"longest code length {max_len}, expected 1..{MAX_CODE_LENGTH}")
    width = max_len.bit_length()
    nbytes = (n * width + 7) // 8
    if pos + nbytes > len(buf):
        raise _corrupt(f"truncated: the code-length table needs {nbytes} bytes, {len(buf) - pos} remain")
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=pos))
    if bits[n * width :].any():
        raise _corrupt("nonzero padding bits after the code-length table")
    lengths = bits[: n * width].reshape(n, width).astype(np.int64) @ (1 << np.arange(width - 1, -1, -1))
    used = int(np.count_nonzero(lengths))
    if int(lengths.max()) != max_len or lengths[-1] == 0:
        raise _corrupt(
            f"code-length table does not match its header (longest {int(lengths.max())} vs {max_len}, "
            f"last symbol length {int(lengths[-1])})"
        )
    if used == 1:
        if max_len != 1:
            raise _corrupt(f"a single-symbol code must have length 1, got {max_len}")
    elif int(np.sum(1 << (max_len - lengths[lengths > 0]))) != 1 << max_len:
        raise _corrupt("code lengths do not form a complete prefix code (Kraft sum != 1)")
    return lengths, pos + nbytes


def huffman_decode(data: bytes, *, count: int | None = None, max_count: int | None = None) -> np.ndarray:
    """Inverse of :func:`huffman_encode`: the symbols as a 1-D int64 array.

    ``count``, when given, is the number of symbols the caller expects (a different announced count is an
    error); ``max_count`` bounds it (a corrupted count must not make a zero-bit stream allocate terabytes;
    without it, at most :data:`MAX_SYMBOLS` are accepted). Raises ZooFormatError on any malformed blob; see
    the module docstring.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    buf = bytes(data)
    n_sym, pos = _read_varint(buf, 0, "symbol count")
    n, pos = _read_varint(buf, pos, "alphabet size")
    if count is not None and n_sym != count:
        raise _corrupt(f"announces {n_sym} symbols, expected {count}")
    if max_count is not None and n_sym > max_count:
        raise _corrupt(f"announces {n_sym} symbols, at most {max_count} are possible here")
    if max_count is None and count is None and n_sym > MAX_SYMBOLS:
        raise _corrupt(
            f"announces {n_sym} symbols, more than the {MAX_SYMBOLS} accepted without a bound; "
            "pass max_count (or count) to decode a longer stream"
        )
    if n_sym == 0 or n == 0:
        if n_sym or n or pos != len(buf):
            raise _corrupt(f"an empty stream must be exactly two zero bytes ({n_sym} symbols, alphabet {n})")
        return np.zeros(0, dtype=np.int64)
    lengths, pos = _read_lengths(buf, pos, n)
    stream = buf[pos:]
    used = np.flatnonzero(lengths)
    if used.size == 1:
        if stream:
            raise _corrupt(f"a single-symbol stream has no code bits, found {len(stream)} trailing bytes")
        return np.full(n_sym, int(used[0]), dtype=np.int64)
    symbols = _decode_bits(stream, lengths, n_sym)
    present = np.bincount(symbols, minlength=n)
    if (present[used] == 0).any():
        missing = int(used[np.argmax(present[used] == 0)])
        raise _corrupt(f"symbol {missing} has a code but never occurs (not a canonical stream)")
    if not np.array_equal(code_lengths(present), lengths):
        raise _corrupt("the code lengths are not the Huffman lengths of the decoded symbols (not canonical)")
    return symbols


def _decode_bits(stream: bytes, lengths: np.ndarray, n_sym: int) -> np.ndarray:
    max_len = int(lengths.max())
    nbits = 8 * len(stream)
    if n_sym > nbits:
        raise _corrupt(f"truncated: {n_sym} symbols cannot fit in {nbits} bits")
    first, per_length, before = _canonical_tables(lengths, max_len)
    # Left-justified end of each length's code range: a window w holds a code of length l iff
    # limit[l-1] <= w < limit[l] (canonical codes of growing length occupy growing windows).
    limit = (first[1:] + per_length[1:]) << (max_len - np.arange(1, max_len + 1))
    used = np.flatnonzero(lengths)
    by_code = used[np.lexsort((used, lengths[used]))]
    raw = np.frombuffer(stream + bytes(4), dtype=np.uint8).astype(np.uint64)
    words = (raw[:-3] << 24) | (raw[1:-2] << 16) | (raw[2:-1] << 8) | raw[3:]  # 4 bytes from each byte
    mask32 = np.uint64(0xFFFFFFFF)
    drop = np.uint64(32 - max_len)

    def windows(pos: np.ndarray) -> np.ndarray:
        return (((words[pos >> 3] << (pos & 7).astype(np.uint64)) & mask32) >> drop).astype(np.int64)

    starts: list[int] = []
    append = starts.append
    p = 0
    while len(starts) < n_sym:
        if p >= nbits:
            raise _corrupt(f"truncated: {len(starts)} of {n_sym} symbols decoded when the bits ran out")
        base = p
        pos = np.arange(base, min(nbits, base + _CHUNK), dtype=np.int64)
        nxt = (pos + np.searchsorted(limit, windows(pos), side="right") + 1).tolist()
        try:
            for _ in range(n_sym - len(starts)):
                q = nxt[p - base]  # IndexError once p leaves this chunk
                append(p)
                p = q
        except IndexError:
            pass
    if p > nbits:
        raise _corrupt(f"truncated: the last code needs bit {p}, the stream has {nbits}")
    if (p + 7) // 8 != len(stream):
        raise _corrupt(f"{len(stream) - (p + 7) // 8} trailing bytes after the last of {n_sym} symbols")
    if p % 8 and stream[-1] & ((1 << (8 - p % 8)) - 1):
        raise _corrupt("nonzero padding bits after the last code")
    at = np.asarray(starts, dtype=np.int64)
    win = windows(at)
    length = np.searchsorted(limit, win, side="right") + 1
    rank = before[length] + (win >> (max_len - length)) - first[length]
    return by_code[rank].astype(np.int64)
