"""``sparse-safetensors``: pruned weights stored as a bitmask plus their nonzero values.

Layout (a valid safetensors file; the header's ``__metadata__`` says which tensors are sparse):

- a tensor stored dense keeps its name;
- a tensor ``W`` stored sparse becomes ``W::mask`` (uint8, ``numpy.packbits`` of the flattened
  ``W != 0`` pattern, big-endian bit order, padded to a whole byte) and ``W::values`` (the nonzero entries
  in row-major order, W's dtype), with ``metadata["sparse"][W] = {"shape": [...], "dtype": "float32"}``.

"Nonzero" is decided on the bit pattern, so ``-0.0`` is kept as a value and decoding is bit-exact.
A tensor is stored sparse only when that is smaller: ``numel / 8 + nnz * itemsize < numel * itemsize``.
Bytes per pruned fp32 weight matrix: ``numel / 8 + 4 * nnz`` (e.g. LeNet-300-100 at 13x: ~0.1 MB vs 1.07 MB).
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.storage import SafetensorsCodec, register_codec

_MASK, _VALUES = "::mask", "::values"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _nonzero_bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_VIEW[t.element_size()]) != 0


class SparseSafetensorsCodec(SafetensorsCodec):
    name = "sparse-safetensors"
    suffix = ".sparse.safetensors"

    def encode(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
        out: dict[str, torch.Tensor] = {}
        sparse: dict[str, dict] = {}
        for name, t in tensors.items():
            t = t.detach().cpu().contiguous()
            if _MASK in name or _VALUES in name:
                raise ValueError(f"tensor name {name!r} collides with the sparse codec's suffixes")
            if t.is_floating_point() and t.element_size() in _INT_VIEW and t.numel():
                bits = _nonzero_bits(t).flatten()
                nnz = int(bits.sum())
                if t.numel() / 8 + nnz * t.element_size() < t.numel() * t.element_size():
                    packed = np.packbits(bits.numpy())
                    out[name + _MASK] = torch.from_numpy(packed)
                    out[name + _VALUES] = t.flatten()[bits].clone()
                    sparse[name] = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    continue
            out[name] = t
        extra = {"sparse": json.dumps(sparse, sort_keys=True), "order": json.dumps(list(tensors))}
        return super().encode(out, {**metadata, **extra})

    def decode(self, data: bytes, source: str) -> dict[str, torch.Tensor]:
        stored = super().decode(data, source)
        sparse = self._sparse_metadata(data, source)
        dense_part = {k: v for k, v in stored.items() if not k.endswith((_MASK, _VALUES))}
        out: dict[str, torch.Tensor] = {}
        for name, info in sparse.items():
            if name in dense_part:
                raise ZooFormatError(f"{source}: tensor {name!r} is stored both dense and sparse")
            if name + _MASK not in stored or name + _VALUES not in stored:
                raise ZooFormatError(
                    f"{source}: sparse tensor {name!r} is incomplete (needs {name + _MASK!r} and "
                    f"{name + _VALUES!r})"
                )
            packed, values = stored[name + _MASK], stored[name + _VALUES]
            shape, dtype = _sparse_info(info, name, source)
            numel = math.prod(shape)  # exact (Python ints): checked against the mask before allocating
            if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8 or values.dtype != dtype:
                raise ZooFormatError(
                    f"{source}: sparse tensor {name!r} has a mask or values of the wrong size/type"
                )
            bits = torch.from_numpy(np.unpackbits(packed.numpy(), count=numel).astype(bool))
            if int(bits.sum()) != values.numel():
                raise ZooFormatError(
                    f"{source}: sparse tensor {name!r}: mask has {int(bits.sum())} ones "
                    f"for {values.numel()} values"
                )
            dense = torch.zeros(numel, dtype=dtype)
            dense[bits] = values
            out[name] = dense.view(shape)
        orphans = {k for k in stored if k.endswith((_MASK, _VALUES))} - {
            n + s for n in sparse for s in (_MASK, _VALUES)
        }
        if orphans:
            raise ZooFormatError(
                f"{source}: tensors {sorted(orphans)} are not described in the sparse metadata"
            )
        merged = {**dense_part, **out}
        order = self._order(data, source)
        if order is None:  # files written before the order was recorded
            return merged
        if len(order) != len(merged) or set(order) != set(merged):
            raise ZooFormatError(
                f"{source}: the recorded tensor order {order[:5]}... does not list exactly the "
                f"{len(merged)} stored tensors"
            )
        return {k: merged[k] for k in order}

    @staticmethod
    def _metadata(data: bytes) -> dict[str, str]:
        header_len = int.from_bytes(data[:8], "little")  # validated by SafetensorsCodec.decode
        return json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}

    def _order(self, data: bytes, source: str) -> list[str] | None:
        raw = self._metadata(data).get("order")
        if raw is None:
            return None
        try:
            order = json.loads(raw)
        except (TypeError, ValueError, RecursionError) as err:
            raise ZooFormatError(f"{source}: 'order' metadata is not JSON ({err})") from err
        if not isinstance(order, list) or not all(isinstance(k, str) for k in order):
            raise ZooFormatError(
                f"{source}: 'order' metadata must be a list of tensor names, got {order!r:.80}"
            )
        return order

    def _sparse_metadata(self, data: bytes, source: str) -> dict[str, dict]:
        raw = self._metadata(data).get("sparse")
        if raw is None:
            raise ZooFormatError(
                f"{source}: no 'sparse' metadata: not written by the sparse-safetensors codec"
            )
        try:
            sparse = json.loads(raw)
        except (TypeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
            raise ZooFormatError(f"{source}: sparse metadata is not JSON ({err})") from err
        if not isinstance(sparse, dict):
            raise ZooFormatError(f"{source}: sparse metadata must be an object")
        return sparse


def _sparse_info(info: object, name: str, source: str) -> tuple[list[int], torch.dtype]:
    """``(shape, dtype)`` of a sparse tensor's metadata entry, validated (nothing is allocated yet)."""
    if not isinstance(info, dict) or set(info) != {"shape", "dtype"}:
        raise ZooFormatError(
            f"{source}: sparse tensor {name!r} is incomplete or invalid: its metadata must be "
            f"{{'shape': [...], 'dtype': ...}}, got {info!r:.80}"
        )
    shape, dtype_name = info["shape"], info["dtype"]
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise ZooFormatError(
            f"{source}: sparse tensor {name!r} is incomplete or invalid: its shape must be a list of "
            f"non-negative ints, got {shape!r:.80}"
        )
    dtype = getattr(torch, dtype_name, None) if isinstance(dtype_name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize not in _INT_VIEW:
        raise ZooFormatError(
            f"{source}: sparse tensor {name!r} is incomplete or invalid: dtype {dtype_name!r:.40} is not a "
            "floating dtype the sparse codec writes (e.g. 'float32')"
        )
    return shape, dtype


register_codec(SparseSafetensorsCodec())
