"""Relative indices with filler entries: where the kept weights of a pruned layer are, in b bits each.

Deep Compression stores a sparse layer as a list of *entries* in row-major (flattened) order. Each entry
records how far it is from the previous one in ``b`` bits instead of its absolute position; when a gap
does not fit, "filler" entries (a stored zero weight) are inserted, so every gap fits in ``b`` bits.

**Convention used here.** An entry stores ``gap = position - previous_position - 1``, the number of zero
weights skipped, in ``[0, 2**b - 1]``; the first entry's previous position is ``-1`` (so position 0 has
gap 0). When ``2**b`` or more zeros would be skipped, a filler entry is placed at
``previous_position + 2**b`` with the largest gap ``2**b - 1`` and becomes the new previous position;
this repeats until the remaining gap fits. A real entry skipping ``s`` zeros therefore follows exactly
``s // 2**b`` fillers and stores ``s % 2**b``. This is the figure of Han et al. (ICLR 2016, Fig. 2) with
``diff = gap + 1``: with ``b = 3`` a jump of more than 8 positions gets a filler 8 positions on. Trailing
zeros after the last kept weight need no entry, so a stream never ends with a filler.

Which entries are fillers is not visible in the gaps (a real entry may also skip ``2**b - 1`` zeros): the
weight stream says it (the codec gives fillers their own weight symbol).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lit_compress.deep_compression.huffman import huffman_nbytes

__all__ = [
    "DEFAULT_INDEX_BITS",
    "MAX_INDEX_BITS",
    "MIN_INDEX_BITS",
    "RelativeIndex",
    "best_index_bits",
    "check_index_bits",
    "decode_positions",
    "encode_positions",
    "index_bits_costs",
    "insert_fillers",
]

MIN_INDEX_BITS, MAX_INDEX_BITS = 1, 16
DEFAULT_INDEX_BITS = tuple(range(1, 9))
"""Widths tried by :func:`best_index_bits` (the paper uses 8 for conv and 5 for fc layers)."""


def check_index_bits(bits: object, what: str = "index bits") -> int:
    """``bits`` if it is an int in ``MIN_INDEX_BITS..MAX_INDEX_BITS``, else ValueError saying so."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise ValueError(
            f"{what} must be an int in {MIN_INDEX_BITS}..{MAX_INDEX_BITS}, got {bits!r} "
            f"({type(bits).__name__})"
        )
    if not MIN_INDEX_BITS <= bits <= MAX_INDEX_BITS:
        raise ValueError(
            f"{what} must be in {MIN_INDEX_BITS}..{MAX_INDEX_BITS}, got {bits}; the paper uses 8 for conv "
            "and 5 for fc layers"
        )
    return int(bits)


@dataclass(frozen=True)
class RelativeIndex:
    """Entries of a relative index: ``gaps[i]`` zeros skipped before entry ``i``; fillers marked."""

    gaps: np.ndarray
    """int64, each in ``[0, 2**bits)``."""
    is_filler: np.ndarray
    """bool, True where entry ``i`` is a filler (a stored zero, not a kept weight)."""
    bits: int
    num_fillers: int


def _positions(positions: object) -> np.ndarray:
    arr = np.asarray(positions)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(
            f"positions must be a 1-D integer array (e.g. np.flatnonzero(mask)), got {arr.dtype} "
            f"of shape {arr.shape}"
        )
    arr = arr.astype(np.int64, copy=False)
    if arr.size and (arr[0] < 0 or (np.diff(arr) <= 0).any()):
        raise ValueError("positions must be non-negative and strictly increasing (flattened row-major order)")
    return arr


def _skips(positions: np.ndarray) -> np.ndarray:
    return np.diff(positions, prepend=-1) - 1


def encode_positions(positions: np.ndarray, bits: int) -> RelativeIndex:
    """Relative index of the kept positions (strictly increasing flat indices) with ``bits``-bit gaps."""
    bits = check_index_bits(bits)
    skips = _skips(_positions(positions))
    span = 1 << bits
    fillers = skips >> bits  # fillers before each real entry
    per_entry = fillers + 1
    total = int(per_entry.sum())
    gaps = np.full(total, span - 1, dtype=np.int64)
    is_filler = np.ones(total, dtype=bool)
    real = np.cumsum(per_entry) - 1
    gaps[real] = skips & (span - 1)
    is_filler[real] = False
    return RelativeIndex(gaps=gaps, is_filler=is_filler, bits=bits, num_fillers=total - skips.size)


def decode_positions(
    gaps: np.ndarray, is_filler: np.ndarray, bits: int, numel: int | None = None
) -> np.ndarray:
    """Flat positions of the real (non-filler) entries; the inverse of :func:`encode_positions`.

    Raises ValueError when the entries are not what :func:`encode_positions` writes: a gap outside
    ``[0, 2**bits)``, a filler whose gap is not ``2**bits - 1``, a trailing filler, or (with ``numel``) a
    position past the end of the tensor.
    """
    bits = check_index_bits(bits)
    gaps = np.asarray(gaps, dtype=np.int64)
    is_filler = np.asarray(is_filler, dtype=bool)
    if gaps.ndim != 1 or gaps.shape != is_filler.shape:
        raise ValueError(f"gaps {gaps.shape} and is_filler {is_filler.shape} must be 1-D of equal length")
    span = 1 << bits
    if gaps.size and (int(gaps.min()) < 0 or int(gaps.max()) >= span):
        raise ValueError(f"gaps must lie in [0, {span}) for {bits}-bit indices")
    if (gaps[is_filler] != span - 1).any():
        raise ValueError(f"a filler entry must skip exactly {span - 1} zeros (gap 2**{bits} - 1)")
    if is_filler.size and is_filler[-1]:
        raise ValueError("the last entry is a filler: fillers only precede a kept weight")
    positions = np.cumsum(gaps + 1) - 1
    if numel is not None and positions.size and int(positions[-1]) >= numel:
        raise ValueError(f"an entry lands at position {int(positions[-1])} of a {numel}-element tensor")
    return positions[~is_filler]


def insert_fillers(values: np.ndarray, index: RelativeIndex, filler: int) -> np.ndarray:
    """One value per entry: ``values`` (one per kept weight) in order, ``filler`` at the filler entries."""
    values = np.asarray(values)
    if values.ndim != 1 or values.size != index.is_filler.size - index.num_fillers:
        raise ValueError(
            f"{values.size} values for {index.is_filler.size - index.num_fillers} kept entries; "
            "pass one value per kept position"
        )
    out = np.full(
        index.is_filler.size, filler, dtype=np.result_type(values.dtype, np.min_scalar_type(filler))
    )
    out[~index.is_filler] = values
    return out


def index_bits_costs(
    positions: np.ndarray,
    candidates: Iterable[int] = DEFAULT_INDEX_BITS,
    weight_codes: np.ndarray | None = None,
    filler_symbol: int | None = None,
) -> dict[int, int]:
    """Huffman-coded bytes of the layer for each candidate ``b``.

    Counts the index stream, plus the weight stream (``weight_codes`` with ``filler_symbol`` at the
    fillers) when ``weight_codes`` is given, since fillers cost a weight symbol too.
    """
    positions = _positions(positions)
    if (weight_codes is None) != (filler_symbol is None):
        raise ValueError("pass weight_codes and filler_symbol together (or neither)")
    costs = {}
    for b in candidates:
        index = encode_positions(positions, check_index_bits(b, "candidate index bits"))
        cost = huffman_nbytes(index.gaps)
        if weight_codes is not None:
            cost += huffman_nbytes(insert_fillers(weight_codes, index, filler_symbol))
        costs[int(b)] = cost
    if not costs:
        raise ValueError("candidates is empty: give at least one index width, e.g. range(1, 9)")
    return costs


def best_index_bits(
    positions: np.ndarray,
    candidates: Iterable[int] = DEFAULT_INDEX_BITS,
    weight_codes: np.ndarray | None = None,
    filler_symbol: int | None = None,
) -> int:
    """The ``b`` among ``candidates`` with the smallest Huffman-coded size (ties: the smaller ``b``)."""
    costs = index_bits_costs(positions, candidates, weight_codes, filler_symbol)
    return min(costs, key=lambda b: (costs[b], b))
