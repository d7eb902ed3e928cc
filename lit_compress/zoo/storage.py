"""Weight codecs behind one interface, sha256 helpers and atomic writes.

A codec turns a state_dict into bytes and back, bit-exactly. Only ``safetensors`` exists today;
compressed codecs (sparse, bit-packed, Huffman) register themselves with :func:`register_codec`.
Nothing in the zoo is ever unpickled: pickle and ``torch.save`` files are refused before decoding.
"""

from __future__ import annotations

import json
import struct
from typing import Protocol, runtime_checkable

import torch

from lit_compress._io import atomic_write_bytes, atomic_write_text, sha256_bytes, sha256_file
from lit_compress.zoo.errors import ZooFormatError

__all__ = [
    "Codec",
    "SafetensorsCodec",
    "atomic_write_bytes",
    "atomic_write_text",
    "get_codec",
    "refuse_pickle",
    "register_codec",
    "sha256_bytes",
    "sha256_file",
]


@runtime_checkable
class Codec(Protocol):
    """Encodes a flat ``{name: tensor}`` mapping to bytes and decodes it back bit-exactly."""

    name: str
    suffix: str

    def encode(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes: ...

    def decode(self, data: bytes, source: str) -> dict[str, torch.Tensor]: ...


_CODECS: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    if not isinstance(codec, Codec):
        raise TypeError(f"{codec!r} does not implement the Codec protocol (name, suffix, encode, decode)")
    _CODECS[codec.name] = codec
    return codec


def get_codec(name: str) -> Codec:
    try:
        return _CODECS[name]
    except KeyError:
        raise ZooFormatError(
            f"unknown weight format {name!r}; this lit_compress reads {sorted(_CODECS)}. "
            "Upgrade lit_compress if the entry was made by a newer version."
        ) from None


_PICKLE_PROTOCOL_MARK = b"\x80"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default container (a zip holding a pickle)


def refuse_pickle(data: bytes, source: str) -> None:
    """Raise before any decoding when ``data`` looks like a pickle or a torch.save archive."""
    if data[:1] == _PICKLE_PROTOCOL_MARK or data[:4] == _ZIP_MAGIC:
        raise ZooFormatError(
            f"{source}: refusing a pickle / torch.save file; the zoo only reads safetensors and "
            "lit_compress's own codecs, never pickled data (which can execute code). Re-save the weights "
            "with safetensors.torch.save_file(model.state_dict(), path)."
        )


class SafetensorsCodec:
    """Plain safetensors: every tensor stored in its own dtype."""

    name = "safetensors"
    suffix = ".safetensors"

    def encode(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
        from safetensors.torch import save

        return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)

    def decode(self, data: bytes, source: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        refuse_pickle(data, source)
        if len(data) < 8:
            raise ZooFormatError(f"{source}: {len(data)} bytes is too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", data[:8])
        if header_len > len(data) - 8 or data[8:9] != b"{":
            raise ZooFormatError(
                f"{source}: not a safetensors file (header length {header_len} for a {len(data)}-byte file)"
            )
        try:
            json.loads(data[8 : 8 + header_len])
            return load(data)
        except Exception as err:  # safetensors raises its own SafetensorError on truncation etc.
            raise ZooFormatError(f"{source}: malformed safetensors file ({err})") from err


# Dtypes the compressed codecs (bitpacked, deep-compression) store raw, by their names in the file headers.
RAW_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
RAW_DTYPE_NAMES = {v: k for k, v in RAW_DTYPES.items()}


def prepare_tensors(tensors: dict[str, torch.Tensor], codec: str) -> dict[str, torch.Tensor]:
    """Validate a state_dict for a compressed codec: non-empty string names, tensors of a storable dtype;
    returns detached, contiguous CPU copies (views where possible) in the same order."""
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict name -> tensor (a state_dict), got {type(tensors).__name__}")
    out = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(t).__name__}, not a tensor")
        if t.dtype not in RAW_DTYPE_NAMES:
            raise ValueError(
                f"{name!r} has dtype {t.dtype}, which the {codec} codec cannot store; "
                f"supported: {sorted(RAW_DTYPES)}"
            )
        out[name] = t.detach().cpu().contiguous()
    return out


register_codec(SafetensorsCodec())

# Registered here so that every codec is known as soon as the zoo's storage layer is imported.
from lit_compress.deep_compression import codec as _deep_compression_codec  # noqa: E402, F401
from lit_compress.quantization import bitpacked_codec as _bitpacked_codec  # noqa: E402, F401
from lit_compress.zoo import sparse_codec as _sparse_codec  # noqa: E402, F401
