"""Canonical Huffman coding: round trips, optimality against a reference, hand-computed blobs, refusals."""

import heapq

import numpy as np
import pytest

from lit_compress.deep_compression.huffman import (
    MAX_CODE_LENGTH,
    canonical_codes,
    code_lengths,
    huffman_decode,
    huffman_encode,
    huffman_nbytes,
)
from lit_compress.zoo.errors import ZooFormatError


def optimal_bits(counts) -> int:
    """Reference: an optimal prefix code's total length is the sum of the Huffman merges' weights."""
    heap = [int(c) for c in counts if c]
    if len(heap) <= 1:
        return 0
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


def kraft(lengths) -> float:
    return sum(2.0 ** -int(n) for n in lengths if n)


def streams():
    """Seeded streams of varied sizes and shapes of distribution."""
    rng = np.random.default_rng(0)
    for size in (1, 2, 3, 10, 257, 5000):
        yield rng.integers(0, 4, size)  # near uniform, small alphabet
        yield rng.geometric(0.3, size) - 1  # skewed, like relative-index gaps
        yield np.minimum(rng.zipf(1.5, size), 300) - 1  # heavy tail over a large alphabet
        probs = rng.dirichlet(np.full(33, 0.2))
        yield rng.choice(33, size=size, p=probs)  # 32 clusters + filler, very uneven
    yield rng.integers(0, 1 << 16, 3000)  # 16-bit gaps: alphabet of 65536
    yield np.array([0, 1] * 50 + [5])  # sparse alphabet with unused symbols in between


def test_round_trip_varied_streams_with_optimal_length():
    for sym in streams():
        blob = huffman_encode(sym)
        assert len(blob) == huffman_nbytes(sym)
        out = huffman_decode(blob, count=sym.size)
        assert out.dtype == np.int64 and np.array_equal(out, sym)
        counts = np.bincount(sym)
        lengths = code_lengths(counts)
        if np.count_nonzero(counts) > 1:
            assert int(lengths.max()) <= MAX_CODE_LENGTH
            assert kraft(lengths) == 1.0  # complete code
            assert int(np.dot(counts, lengths)) == optimal_bits(counts)  # no length limit was needed


def test_hand_computed_blob():
    # counts 5,1,1,2: merges 1+1, 2+2, 4+5 -> lengths 1,3,3,2; canonical codes by (length, symbol):
    # sym0 "0", sym3 "10", sym1 "110", sym2 "111".
    lengths = code_lengths(np.array([5, 1, 1, 2]))
    assert lengths.tolist() == [1, 3, 3, 2]
    assert canonical_codes(lengths).tolist() == [0b0, 0b110, 0b111, 0b10]
    sym = np.array([0, 3, 1, 2, 0, 0, 0, 0, 3])
    # count 9, alphabet 4, L=3, lengths in 2-bit fields 01 11 11 10 = 0x7E,
    # bits 0 10 110 111 0 0 0 0 10 = 01011011 10000101 (+ 0 padding bits)
    blob = huffman_encode(sym)
    assert blob == bytes([9, 4, 3, 0x7E, 0b01011011, 0b10000100])
    assert huffman_decode(blob).tolist() == sym.tolist()


def test_empty_and_single_symbol_streams():
    assert huffman_encode(np.zeros(0, dtype=np.uint8)) == b"\x00\x00"
    assert huffman_decode(b"\x00\x00").size == 0
    sym = np.full(1000, 7, dtype=np.uint16)
    blob = huffman_encode(sym)
    # varint 1000 = e8 07, alphabet 8, L=1, eight 1-bit lengths 00000001, and no code bits at all
    assert blob == bytes([0xE8, 0x07, 8, 1, 0b00000001])
    assert np.array_equal(huffman_decode(blob), sym)
    assert huffman_nbytes(sym) == len(blob)
    assert code_lengths(np.array([0, 0, 3])).tolist() == [0, 0, 1]
    assert code_lengths(np.array([0, 0])).tolist() == [0, 0]


def test_code_length_limit_is_respected():
    fib = [1, 1]
    while len(fib) < 40:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)  # optimal Huffman depth is 39 here
    assert optimal_bits(counts) < int(np.dot(counts, code_lengths(counts, max_length=32)))
    lengths = code_lengths(counts)
    assert int(lengths.max()) == MAX_CODE_LENGTH and kraft(lengths) == 1.0
    assert int(np.dot(counts, lengths)) >= optimal_bits(counts)
    # frequent symbols keep short codes: lengths never increase with the count
    assert all(np.diff(lengths[np.argsort(-counts, kind="stable")]) >= 0)
    sym = np.repeat(np.arange(40), np.minimum(fib, 50))  # every symbol present, decodable
    assert np.array_equal(huffman_decode(huffman_encode(sym)), sym)
    small = code_lengths(np.arange(1, 17), max_length=4)
    assert small.tolist() == [4] * 16
    with pytest.raises(ValueError, match="17 symbols cannot be coded with codes of at most 4 bits"):
        code_lengths(np.arange(1, 18), max_length=4)


def test_round_trip_of_100k_symbols_over_a_257_symbol_alphabet():
    # A LeNet-scale stream (codec speed is measured by benchmarks/deep_compression.py, not asserted here).
    rng = np.random.default_rng(1)
    sym = rng.choice(257, size=100_000, p=rng.dirichlet(np.full(257, 0.5)))
    assert np.array_equal(huffman_decode(huffman_encode(sym)), sym)


def test_bad_symbols_are_refused():
    with pytest.raises(ValueError, match=r"found values in \[-1, 2\]"):
        huffman_encode(np.array([-1, 2]))
    with pytest.raises(TypeError, match="1-D numpy array of non-negative ints"):
        huffman_encode(np.array([0.5]))
    with pytest.raises(TypeError, match="1-D"):
        huffman_encode(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="non-negative ints"):
        code_lengths(np.array([1, -1]))


def sample_blob() -> bytes:
    rng = np.random.default_rng(2)
    return huffman_encode(rng.geometric(0.4, 300) - 1)


def test_every_truncation_and_trailing_byte_is_refused():
    blob = sample_blob()
    for cut in range(len(blob)):
        with pytest.raises(ZooFormatError, match="huffman stream"):
            huffman_decode(blob[:cut])
    with pytest.raises(ZooFormatError, match="trailing"):
        huffman_decode(blob + b"\x00")
    single = huffman_encode(np.full(10, 3))
    with pytest.raises(ZooFormatError, match="single-symbol stream has no code bits"):
        huffman_decode(single + b"\x00")


def test_announced_count_must_match():
    sym = np.array([0, 3, 1, 2, 0, 0, 0, 0, 3])
    blob = huffman_encode(sym)
    with pytest.raises(ZooFormatError, match="announces 9 symbols, expected 8"):
        huffman_decode(blob, count=8)
    with pytest.raises(ZooFormatError, match="at most 5 are possible"):
        huffman_decode(blob, max_count=5)
    # more symbols announced than coded: the one zero padding bit reads as a 10th symbol ("0"), then the
    # bits run out
    with pytest.raises(ZooFormatError, match="truncated"):
        huffman_decode(bytes([11]) + blob[1:])
    # fewer: the last codes' bits are left over as (nonzero) padding
    with pytest.raises(ZooFormatError, match="nonzero padding bits after the last code"):
        huffman_decode(bytes([7]) + blob[1:])
    with pytest.raises(ZooFormatError, match="padding"):
        huffman_decode(blob[:-1] + bytes([blob[-1] | 1]))


def test_invalid_code_tables_are_refused():
    # lengths 1,1,1 (Kraft 1.5): L=1, so 1-bit fields 1 1 1
    with pytest.raises(ZooFormatError, match="Kraft"):
        huffman_decode(bytes([3, 3, 1, 0b11100000, 0]))
    # lengths 2,2 (Kraft 0.5, an incomplete code): L=2, so 2-bit fields 10 10
    with pytest.raises(ZooFormatError, match="Kraft"):
        huffman_decode(bytes([2, 2, 2, 0b10100000, 0]))
    with pytest.raises(ZooFormatError, match="longest code length 25"):
        huffman_decode(bytes([2, 2, 25]) + bytes(8))
    with pytest.raises(ZooFormatError, match="does not match its header"):
        huffman_decode(bytes([2, 2, 3, 0b01010000, 0]))  # L says 3, lengths are 1,1
    with pytest.raises(ZooFormatError, match="last symbol length 0"):
        huffman_decode(bytes([2, 3, 1, 0b11000000, 0]))  # alphabet 3 but symbol 2 unused
    with pytest.raises(ZooFormatError, match="single-symbol code must have length 1"):
        huffman_decode(bytes([2, 1, 2, 0b10000000]))
    # lengths 1,2,2 but symbol 2 ("11") never occurs in the bits 0 10 0 -> not canonical
    with pytest.raises(ZooFormatError, match="symbol 2 has a code but never occurs"):
        huffman_decode(bytes([3, 3, 2, 0b01101000, 0b01000000]))
    with pytest.raises(ZooFormatError, match="not minimally encoded"):
        huffman_decode(bytes([0x80, 0x00, 0]))
    with pytest.raises(ZooFormatError, match="empty stream must be exactly two zero bytes"):
        huffman_decode(bytes([0, 3]))
    with pytest.raises(ZooFormatError, match="padding bits after the code-length table"):
        huffman_decode(bytes([2, 2, 1, 0b11000001, 0b01000000]))
