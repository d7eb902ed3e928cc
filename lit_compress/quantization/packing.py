"""Bit packing for quantized weights: k-bit codes, per-channel binary signs and k-bit code books.

Pure tensor functions (no model, no file format): :mod:`lit_compress.quantization.bitpacked_codec` builds
the zoo file format on top of them and :mod:`lit_compress.quantization.binary_kernel` uses the same 1-bit
layout for its xnor + popcount inference.

**Bit order (little-endian, LSB first).** Code ``i`` occupies bits ``[i*k, (i+1)*k)`` of one bit stream;
bit ``j`` of the stream is bit ``j % 8`` (value ``1 << (j % 8)``) of byte ``j // 8``; the least significant
bit of a code comes first. So for ``k = 1`` byte 0 holds codes 0..7 with code 0 in its lowest bit, and for
``k = 3`` code 2 straddles bytes 0 and 1 (its low two bits are bits 6-7 of byte 0). The last byte is padded
with zero bits, and :func:`unpack_bits` refuses nonzero padding, so every code sequence has exactly one
packed form. Read as little-endian 64-bit words, a 1-bit stream puts code ``i`` in bit ``i % 64`` of word
``i // 64``: the layout :class:`~lit_compress.quantization.binary_kernel.BinaryLinear` computes on.

**Exactness.** Binary and k-bit storage work on the bit patterns of the floats (an integer view of the
same width), never on arithmetic: a restored weight is a copy of a stored scale / level with its sign bit
set or cleared, so the round trip is bit-exact (``-0.0``, subnormals and all) for float16, bfloat16, float32
and float64 tensors.

- **binary** (:func:`binarize_for_storage`): every weight of output channel ``c`` (dim 0) is ``+s_c`` or
  ``-s_c``: 1 sign bit per weight (1 = ``+s_c``, 0 = ``-s_c``; the sign bit of the float, so ``-0.0`` in an
  all-zero channel is kept) plus one scale per channel in the weight's own dtype (fp32 for fp32 weights).
- **pruned binary** (:func:`binarize_masked_for_storage`): a channel's weights are ``+s_c``, ``-s_c`` or
  exactly zero (a pruned binary net). Choice made here: store a second bitmask (1 = nonzero), so 2 bits per
  weight, rather than refuse; :func:`binarize_for_storage` itself refuses zeros mixed with ``+-s_c`` and its
  message points here.
- **k-bit** (:func:`quantize_for_storage`): a tensor with at most ``2**k`` distinct values (DoReFa weights
  on a uniform grid, k-means shared weights, ...): k-bit codes plus the table of the distinct values
  ("levels", sorted ascending, at most ``2**k`` entries in the weight's dtype). The levels table replaces
  the ``(scale, offset)`` pair of an affine grid because ``offset + code * scale`` does not in general
  reproduce the float values a quantizer computed with its own formula (``2 * round(x * n) / n - 1`` differs
  from ``-1 + i * (2 / n)`` in the last bit for some ``i``); storing the ``<= 2**k`` values costs
  ``2**k * 4`` bytes (64 bytes at 4 bits) and is exact for any grid, uniform or not.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "binarize_for_storage",
    "binarize_masked_for_storage",
    "code_bits",
    "pack_bits",
    "packed_nbytes",
    "quantize_for_storage",
    "restore_binary",
    "restore_quantized",
    "unpack_bits",
]

# Integer views of the same width: the storage functions work on float bit patterns.
INT_VIEW: dict[torch.dtype, torch.dtype] = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool)


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8 (bits per code), got {bits!r}")
    return bits


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits occupy once packed: ``ceil(numel * bits / 8)``."""
    return (numel * _check_bits(bits) + 7) // 8


def code_bits(num_values: int) -> int:
    """Smallest code width (>= 1 bit) that indexes ``num_values`` distinct values."""
    return max(1, math.ceil(math.log2(max(num_values, 1))))


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a flat uint8 tensor, ``bits`` bits each, LSB first.

    ``codes`` may have any shape (it is flattened in row-major order) and any integer or bool dtype. The
    result has :func:`packed_nbytes` ``(codes.numel(), bits)`` bytes; see the module docstring for the
    bit order.
    """
    bits = _check_bits(bits)
    if not isinstance(codes, Tensor) or codes.dtype not in _INTEGER_DTYPES:
        got = codes.dtype if isinstance(codes, Tensor) else type(codes).__name__
        raise TypeError(f"codes must be an integer (or bool) tensor, got {got}; round floats to codes first")
    flat = codes.detach().reshape(-1).cpu()
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= 1 << bits:
            raise ValueError(
                f"codes must lie in [0, {1 << bits}) for bits={bits}, found values in [{lo}, {hi}]; "
                "use more bits or clamp the codes"
            )
    flat = flat.to(torch.uint8)
    if bits == 8:
        return flat.clone()
    per_byte, rem = divmod(8, bits)
    if rem == 0:  # 1, 2, 4 bits: whole codes per byte
        pad = (-flat.numel()) % per_byte
        groups = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per_byte)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return (groups << shifts).sum(dim=1, dtype=torch.uint8)
    # 3, 5, 6, 7 bits: codes straddle bytes. Expand to a bit stream, then regroup it by 8.
    stream = ((flat[:, None] >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(-1)
    stream = torch.cat([stream, stream.new_zeros((-stream.numel()) % 8)]).view(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` codes of ``packed`` as a flat uint8 tensor.

    Raises ValueError when ``packed`` does not have exactly ``packed_nbytes(numel, bits)`` bytes or when
    its padding bits are not zero (not a canonical packing: a corrupted or foreign buffer).
    """
    bits = _check_bits(bits)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, Tensor) else type(packed).__name__
        raise TypeError(f"packed must be a uint8 tensor (from pack_bits), got {got}")
    packed = packed.detach().reshape(-1).cpu()
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(
            f"{numel} codes of {bits} bits pack into {expected} bytes, got {packed.numel()} bytes"
        )
    if bits == 8:
        return packed.clone()
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        codes = ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)
        if codes[numel:].any():
            raise ValueError(f"nonzero padding bits after the last of {numel} {bits}-bit codes")
        return codes[:numel].clone()
    stream = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
    if stream[numel * bits :].any():
        raise ValueError(f"nonzero padding bits after the last of {numel} {bits}-bit codes")
    stream = stream[: numel * bits].view(numel, bits)
    return (stream << torch.arange(bits, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def _float_view(w: object, name: str, what: str) -> tuple[Tensor, torch.dtype]:
    if not isinstance(w, Tensor) or w.dtype not in INT_VIEW:
        got = w.dtype if isinstance(w, Tensor) else type(w).__name__
        raise TypeError(
            f"{what} needs a float16/bfloat16/float32/float64 tensor for {name!r}, got {got}; "
            "integer and other tensors are stored raw"
        )
    if w.dim() < 1 or w.numel() == 0:
        raise ValueError(
            f"{what} needs a non-empty tensor with an output-channel dim 0 for {name!r}, "
            f"got shape {list(w.shape)}"
        )
    return w.detach().cpu().contiguous().view(INT_VIEW[w.dtype]), INT_VIEW[w.dtype]


def _channel_magnitudes(w: Tensor, name: str, what: str) -> tuple[Tensor, Tensor, Tensor]:
    """(bit patterns [C, per], magnitude patterns [C, per], largest magnitude pattern per channel [C, 1])."""
    bits, int_dtype = _float_view(w, name, what)
    bits = bits.reshape(w.shape[0], -1)
    mags = bits & torch.iinfo(int_dtype).max  # clear the sign bit
    # For non-negative floats the integer order of bit patterns is the float order (NaN above inf).
    return bits, mags, mags.amax(dim=1, keepdim=True)


def _not_binary(name: str, mags: Tensor, bad: Tensor, hint: str) -> ValueError:
    channel = int(bad.nonzero()[0, 0])
    distinct = int(torch.unique(mags[channel]).numel())
    zeros = bool((mags[channel] == 0).any())
    note = (
        " (one of them 0: pruned binary weights; " + hint + ")"
        if zeros and distinct == 2
        else "; expected every weight of an output channel to be +scale or -scale"
    )
    return ValueError(
        f"layer {name!r} is not binary: found {distinct} distinct magnitudes in channel {channel}{note}"
    )


def _check_finite(scales: Tensor, name: str) -> None:
    if not torch.isfinite(scales).all():
        channel = int((~torch.isfinite(scales)).nonzero()[0, 0])
        raise ValueError(
            f"layer {name!r} has a non-finite scale {float(scales[channel])} in channel {channel}"
        )


def binarize_for_storage(w: Tensor, name: str = "tensor") -> tuple[Tensor, Tensor]:
    """Pack a per-output-channel binary weight: ``(signs, scales)``.

    ``w[c]`` must hold only ``+s_c`` and ``-s_c`` (``s_c >= 0`` finite; an all-zero channel has ``s_c = 0``).
    ``signs`` is ``pack_bits`` of the row-major sign pattern (1 = positive), ``scales`` the ``C`` magnitudes
    in ``w``'s dtype. Raises ValueError naming the first channel that is not binary; weights that are
    binary except for exact zeros are refused too (use :func:`binarize_masked_for_storage`).
    """
    bits, mags, scale_bits = _channel_magnitudes(w, name, "binarize_for_storage")
    bad = (mags != scale_bits).any(dim=1)
    if bad.any():
        raise _not_binary(name, mags, bad, "store them with binarize_masked_for_storage, 2 bits per weight")
    scales = scale_bits.reshape(-1).clone().view(w.dtype)
    _check_finite(scales, name)
    return pack_bits(bits >= 0, 1), scales


def binarize_masked_for_storage(w: Tensor, name: str = "tensor") -> tuple[Tensor, Tensor, Tensor]:
    """Pack a pruned binary weight (``+s_c``, ``-s_c`` or zero per channel): ``(signs, nonzero, scales)``.

    ``signs`` and ``nonzero`` are 1-bit streams (``pack_bits``) of the sign bits (1 = positive, so a stored
    ``-0.0`` stays ``-0.0``) and of ``w != 0``; ``scales`` are the channels' nonzero magnitudes (0 for a
    channel with no nonzero weight). 2 bits per weight plus one scale per channel.
    """
    bits, mags, scale_bits = _channel_magnitudes(w, name, "binarize_masked_for_storage")
    nonzero = mags != 0
    bad = (nonzero & (mags != scale_bits)).any(dim=1)
    if bad.any():
        channel = int(bad.nonzero()[0, 0])
        distinct = int(torch.unique(mags[channel][nonzero[channel]]).numel())
        raise ValueError(
            f"layer {name!r} is not binary: found {distinct} distinct nonzero magnitudes in channel "
            f"{channel}; expected every weight of an output channel to be +scale, -scale or 0"
        )
    scales = scale_bits.reshape(-1).clone().view(w.dtype)
    _check_finite(scales, name)
    return pack_bits(bits >= 0, 1), pack_bits(nonzero, 1), scales


def _check_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple, torch.Size)) or not shape:
        raise ValueError(f"shape must be a non-empty list of dims, got {shape!r}")
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"shape must hold non-negative ints, got {list(shape)!r}")
    return tuple(shape)


def restore_binary(
    signs: Tensor, scales: Tensor, shape: list[int] | tuple[int, ...], nonzero: Tensor | None = None
) -> Tensor:
    """Inverse of :func:`binarize_for_storage` (or, with ``nonzero``, :func:`binarize_masked_for_storage`).

    Returns a tensor of ``shape`` in ``scales``' dtype, bit-identical to the weight that was packed.
    """
    shape = _check_shape(shape)
    if not isinstance(scales, Tensor) or scales.dtype not in INT_VIEW:
        got = scales.dtype if isinstance(scales, Tensor) else type(scales).__name__
        raise TypeError(f"scales must be a float tensor (from binarize_for_storage), got {got}")
    channels, numel = shape[0], math.prod(shape)
    if scales.dim() != 1 or scales.numel() != channels or channels == 0 or numel == 0:
        raise ValueError(
            f"scales must have one entry per output channel of a non-empty shape: shape {list(shape)}, "
            f"scales of shape {list(scales.shape)}"
        )
    int_dtype = INT_VIEW[scales.dtype]
    scale_bits = scales.detach().cpu().contiguous().view(int_dtype)
    if (scale_bits < 0).any():
        raise ValueError("scales must be non-negative magnitudes (the signs are in the bit stream)")
    mags = scale_bits.reshape(channels, 1).expand(channels, numel // channels)
    if nonzero is not None:
        mask = unpack_bits(nonzero, 1, numel).view(channels, -1).bool()
        mags = torch.where(mask, mags, torch.zeros((), dtype=int_dtype))
    positive = unpack_bits(signs, 1, numel).view(channels, -1).bool()
    out = torch.where(positive, mags, mags | torch.iinfo(int_dtype).min)
    return out.view(scales.dtype).reshape(shape)


def quantize_for_storage(w: Tensor, bits: int, name: str = "tensor") -> tuple[Tensor, Tensor]:
    """Pack a tensor that takes at most ``2**bits`` distinct values: ``(codes, levels)``.

    ``levels`` are the distinct values sorted ascending (by float value; compared bit-exactly, so ``-0.0``
    and ``0.0`` are two levels), in ``w``'s dtype; ``codes`` are ``pack_bits`` of each weight's index into
    ``levels``. Raises ValueError when ``w`` has more distinct values than ``bits`` can index.
    """
    bits = _check_bits(bits)
    flat, _ = _float_view(w, name, "quantize_for_storage")
    flat = flat.reshape(-1)
    limit = 1 << bits
    # Cheap early refusal for a full-precision tensor: a prefix already has too many values.
    prefix = flat[: 1 << 16]
    seen = torch.unique(prefix).numel()
    if seen > limit:
        raise _too_many(name, str(seen) if prefix.numel() == flat.numel() else f"at least {seen}", bits)
    uniq, inverse = torch.unique(flat, return_inverse=True)
    if uniq.numel() > limit:
        raise _too_many(name, str(uniq.numel()), bits)
    values = uniq.view(w.dtype)
    order = torch.sort(values if values.dtype == torch.float64 else values.float(), stable=True)
    rank = torch.empty_like(order.indices)
    rank[order.indices] = torch.arange(uniq.numel())
    levels = uniq[order.indices].view(w.dtype).clone()
    return pack_bits(rank[inverse], bits), levels


def _too_many(name: str, count: str, bits: int) -> ValueError:
    return ValueError(
        f"layer {name!r} is not on a {bits}-bit grid: found {count} distinct values, a {bits}-bit code "
        f"indexes at most {1 << bits}; quantize it first (e.g. DoReFa weights) or store it raw"
    )


def restore_quantized(codes: Tensor, levels: Tensor, bits: int, shape: list[int] | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`quantize_for_storage`: ``levels[codes]`` reshaped to ``shape``, bit-exact."""
    shape = _check_shape(shape)
    if not isinstance(levels, Tensor) or levels.dim() != 1 or not levels.is_floating_point():
        raise TypeError(f"levels must be a 1-D float tensor (from quantize_for_storage), got {levels!r}")
    if not 1 <= levels.numel() <= 1 << _check_bits(bits):
        raise ValueError(f"{levels.numel()} levels cannot be indexed by {bits}-bit codes (1..{1 << bits})")
    idx = unpack_bits(codes, bits, math.prod(shape)).long()
    if idx.numel() and int(idx.max()) >= levels.numel():
        raise ValueError(f"a code ({int(idx.max())}) points past the {levels.numel()} stored levels")
    return levels.detach().cpu()[idx].reshape(shape)
