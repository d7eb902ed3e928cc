"""Bit packing, binary / k-bit storage and the ``bitpacked`` zoo codec: exact round trips, refusals."""

import hashlib
import json
import math
import struct

import pytest
import torch

from lit_compress.quantization import bitpacked_codec as bp
from lit_compress.quantization.packing import (
    binarize_for_storage,
    binarize_masked_for_storage,
    pack_bits,
    packed_nbytes,
    quantize_for_storage,
    restore_binary,
    restore_quantized,
    unpack_bits,
)
from lit_compress.zoo import ZooFormatError, get_codec

CODEC = get_codec("bitpacked")


def python_pack(codes: list[int], bits: int) -> bytes:
    """Reference packer: code i at bit i*bits of one little-endian integer."""
    big = sum(c << (i * bits) for i, c in enumerate(codes))
    return big.to_bytes((len(codes) * bits + 7) // 8, "little")


def bit_pattern(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert bit_pattern(a) == bit_pattern(b)


def binary_weight(out_f: int, in_f: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.randn(out_f, in_f, generator=g) >= 0, 1.0, -1.0)
    return (signs * (torch.rand(out_f, 1, generator=g) + 0.01)).to(dtype)


def dorefa_weight(shape, bits: int, seed: int = 0) -> torch.Tensor:
    """Weights on DoReFa's k-bit grid in [-1, 1], computed with DoReFa's own formula."""
    g = torch.Generator().manual_seed(seed)
    n = 2**bits - 1
    return 2 * (torch.round(torch.rand(shape, generator=g) * n) / n) - 1


# ---------------------------------------------------------------- pack_bits / unpack_bits


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_round_trip_every_width_matches_reference(bits):
    g = torch.Generator().manual_seed(bits)
    for numel in (0, 1, 7, 8, 9, 13, 64, 257):
        codes = torch.randint(0, 2**bits, (numel,), generator=g)
        packed = pack_bits(codes, bits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits)
        assert packed.numpy().tobytes() == python_pack(codes.tolist(), bits)
        assert torch.equal(unpack_bits(packed, bits, numel), codes.to(torch.uint8))
    for edge in (torch.zeros(11, dtype=torch.long), torch.full((11,), 2**bits - 1)):
        assert torch.equal(unpack_bits(pack_bits(edge, bits), bits, 11), edge.to(torch.uint8))


def test_pack_by_hand_lsb_first_and_straddling():
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [1, 1]
    assert pack_bits(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]
    # 3 bits: 5=101, 3=011, 7=111 -> stream 1,0,1, 1,1,0, 1,1,1: code 2 straddles bytes 0 and 1
    assert pack_bits(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b1]
    assert pack_bits(torch.tensor([31, 1]), 5).tolist() == [63, 0]
    assert pack_bits(torch.tensor([[1, 2], [3, 255]], dtype=torch.uint8), 8).tolist() == [1, 2, 3, 255]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 8\).*\[0, 8\]"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="found values in"):
        pack_bits(torch.tensor([-1]), 3)
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.tensor([0.5]), 3)
    for bad in (0, 9, True, 2.0):
        with pytest.raises(ValueError, match=r"bits must be an int in 1..8"):
            pack_bits(torch.tensor([0]), bad)
    with pytest.raises(ValueError, match="pack into 2 bytes, got 3"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 5)
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(torch.tensor([0, 0b100], dtype=torch.uint8), 3, 3)  # bit 10 is padding (9 used)
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(torch.tensor([0b10000000], dtype=torch.uint8), 1, 7)


# ---------------------------------------------------------------- binary storage


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_binary_round_trip_is_bit_exact(dtype):
    w = binary_weight(16, 37, dtype=dtype)
    w[3] = -0.0  # an all-zero (dead) channel, negative zeros included
    w[3, :5] = 0.0
    signs, scales = binarize_for_storage(w, name="fc.weight")
    assert signs.numel() == math.ceil(16 * 37 / 8) and scales.dtype == dtype and scales[3] == 0
    assert torch.equal(scales, w.abs().amax(dim=1))
    assert_bit_identical(restore_binary(signs, scales, w.shape), w)


def test_binary_conv_weight_and_sign_convention():
    w = binary_weight(4, 18).view(4, 2, 3, 3)
    signs, scales = binarize_for_storage(w)
    bits = unpack_bits(signs, 1, w.numel())
    assert torch.equal(bits.bool(), (w > 0).reshape(-1))  # 1 = +scale
    assert_bit_identical(restore_binary(signs, scales, list(w.shape)), w)


def test_non_binary_layer_is_refused_with_its_channel():
    w = binary_weight(5, 8)
    w[2, 0], w[2, 1] = 0.3, -0.7  # channel 2 now holds 3 distinct magnitudes
    with pytest.raises(
        ValueError, match=r"layer 'fc.weight' is not binary: found 3 distinct magnitudes in channel 2"
    ):
        binarize_for_storage(w, name="fc.weight")
    with pytest.raises(ValueError, match="channel 0"):
        binarize_for_storage(torch.randn(3, 4))


def test_pruned_binary_zeros_need_the_masked_form():
    w = binary_weight(6, 20)
    w[1, ::3] = 0.0
    w[4, 1] = -0.0
    with pytest.raises(ValueError, match=r"channel 1 .*one of them 0.*binarize_masked_for_storage"):
        binarize_for_storage(w, name="fc")
    signs, nonzero, scales = binarize_masked_for_storage(w, name="fc")
    assert torch.equal(unpack_bits(nonzero, 1, w.numel()).bool(), (w != 0).reshape(-1))
    assert_bit_identical(restore_binary(signs, scales, w.shape, nonzero=nonzero), w)
    w[0, 0] = 5.0
    with pytest.raises(ValueError, match="found 2 distinct nonzero magnitudes in channel 0"):
        binarize_masked_for_storage(w)


def test_binary_rejects_non_finite_empty_and_non_float():
    w = binary_weight(2, 4)
    w[1] = float("inf")
    with pytest.raises(ValueError, match="non-finite scale inf in channel 1"):
        binarize_for_storage(w)
    with pytest.raises(ValueError, match="non-empty"):
        binarize_for_storage(torch.empty(0, 4))
    with pytest.raises(TypeError, match="float16/bfloat16/float32/float64"):
        binarize_for_storage(torch.ones(2, 2, dtype=torch.int64))
    signs, scales = binarize_for_storage(binary_weight(2, 4))
    with pytest.raises(ValueError, match="one entry per output channel"):
        restore_binary(signs, scales, [4, 2])


# ---------------------------------------------------------------- k-bit storage


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_kbit_round_trip_on_dorefa_grid(bits):
    w = dorefa_weight((33, 17), bits, seed=bits)
    codes, levels = quantize_for_storage(w, bits, name="conv.weight")
    assert codes.numel() == packed_nbytes(w.numel(), bits)
    assert levels.numel() <= 2**bits and torch.equal(levels, torch.unique(w))  # sorted ascending
    assert_bit_identical(restore_quantized(codes, levels, bits, w.shape), w)


def test_kbit_levels_are_exact_where_an_affine_grid_would_not_be():
    n = 15
    grid = 2 * (torch.arange(16.0) / n) - 1  # DoReFa's values as its formula computes them
    affine = -1 + torch.arange(16.0) * (2 / n)  # offset + code * scale
    assert not torch.equal(grid, affine)  # why the codec stores the levels, not (scale, offset)
    codes, levels = quantize_for_storage(grid, 4)
    assert_bit_identical(restore_quantized(codes, levels, 4, [16]), grid)


def test_kbit_keeps_negative_zero_and_refuses_too_many_values():
    w = torch.tensor([[0.0, -0.0, 1.0, -0.0]])
    codes, levels = quantize_for_storage(w, 2)
    assert levels.numel() == 3
    assert_bit_identical(restore_quantized(codes, levels, 2, [1, 4]), w)
    with pytest.raises(ValueError, match=r"layer 'fc' is not on a 2-bit grid: found 5 distinct values"):
        quantize_for_storage(torch.arange(5.0).view(1, 5), 2, name="fc")
    with pytest.raises(ValueError, match="found 10000 distinct values"):
        quantize_for_storage(torch.arange(10000.0).view(100, 100), 8)
    with pytest.raises(ValueError, match="points past the 2 stored levels"):
        restore_quantized(pack_bits(torch.tensor([0, 3]), 2), torch.tensor([0.0, 1.0]), 2, [2])


# ---------------------------------------------------------------- the bitpacked codec


def mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pruned = binary_weight(8, 24, seed=seed)
    pruned[torch.rand(pruned.shape, generator=g) < 0.5] = 0.0
    return {
        "fc1.weight": torch.randn(16, 12, generator=g),  # first layer: raw
        "fc1.bias": torch.randn(16, generator=g),
        "fc2.weight": binary_weight(16, 40, seed=seed),  # binary, 1 bit
        "fc3.weight": dorefa_weight((10, 30), 3, seed=seed),  # 3-bit grid
        "fc4.weight": pruned,  # pruned binary, 2 bits
        "half.weight": binary_weight(4, 16, dtype=torch.float16),
        "bn.running_var": torch.rand(16, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3),
    }


EXPECTED_ENCODING = {
    "fc1.weight": ("raw", 32),
    "fc1.bias": ("raw", 32),
    "fc2.weight": ("binary", 1),
    "fc3.weight": ("kbit", 3),
    "fc4.weight": ("binary_masked", 2),
    "half.weight": ("binary", 1),
    "bn.running_var": ("raw", 32),
    "bn.num_batches_tracked": ("raw", 64),
    "flags": ("raw", 8),
    "empty": ("raw", 32),
}


def test_codec_round_trip_is_bit_exact_and_keeps_order():
    state = mixed_state()
    state["fc1.weight"][0, 0] = -0.0
    state["fc1.weight"][0, 1] = float("nan")
    blob = CODEC.encode(state, {"name": "mlp"})
    decoded = CODEC.decode(blob, source="mlp.bitpacked")
    assert list(decoded) == list(state)
    for name, t in state.items():
        assert_bit_identical(decoded[name], t)
    index = bp.read_index(blob)
    assert index["metadata"] == {"name": "mlp"}
    got = {e["name"]: (e["encoding"], e["bits"]) for e in index["tensors"]}
    assert got == EXPECTED_ENCODING


def test_bytes_report_and_binary_layer_is_one_32nd_of_fp32():
    rows = {r["name"]: r for r in bp.bytes_report(mixed_state())}
    assert {n: (r["encoding"], r["bits"]) for n, r in rows.items()} == EXPECTED_ENCODING
    assert rows["fc2.weight"]["bytes"] == 16 * 40 // 8 + 4 * 16
    assert rows["fc3.weight"]["bytes"] == math.ceil(300 * 3 / 8) + 4 * 8  # codes + 8 levels
    assert rows["fc4.weight"]["bytes"] == 2 * (8 * 24 // 8) + 4 * 8
    assert rows["fc1.weight"]["bytes"] == rows["fc1.weight"]["fp32_bytes"] == 4 * 16 * 12

    layer = {"fc.weight": binary_weight(1024, 1024)}
    blob = CODEC.encode(layer, {})
    fp32 = 4 * 1024 * 1024
    assert bp.bytes_report(layer)[0]["bytes"] == fp32 // 32 + 4 * 1024
    assert len(blob) <= fp32 // 32 + 4 * 1024 + 512  # + a small header
    assert_bit_identical(CODEC.decode(blob, "x")["fc.weight"], layer["fc.weight"])


def test_codec_is_registered_with_the_zoo():
    assert isinstance(CODEC, bp.BitpackedCodec) and CODEC.name == "bitpacked"


def test_every_truncation_is_a_format_error():
    blob = CODEC.encode(mixed_state(), {"name": "m"})
    for cut in range(len(blob)):
        with pytest.raises(ZooFormatError):
            CODEC.decode(blob[:cut], source="cut")
    with pytest.raises(ZooFormatError, match="trailing"):
        CODEC.decode(blob + b"\0", source="long")


def test_every_flipped_byte_is_a_format_error():
    blob = CODEC.encode(mixed_state(), {"name": "m"})
    for i in range(len(blob)):
        corrupt = bytearray(blob)
        corrupt[i] ^= 0x40
        with pytest.raises(ZooFormatError):
            CODEC.decode(bytes(corrupt), source="flip")
    corrupt = bytearray(blob)
    corrupt[-1] ^= 1  # last payload byte: a tensor's own hash catches it
    with pytest.raises(ZooFormatError, match="sha256 mismatch, the tensor's bytes"):
        CODEC.decode(bytes(corrupt), source="flip")
    corrupt = bytearray(blob)
    corrupt[60] ^= 1
    with pytest.raises(ZooFormatError, match="header sha256 mismatch"):
        CODEC.decode(bytes(corrupt), source="flip")


def _split(blob: bytes) -> tuple[dict, bytes]:
    _, _, header_len, _ = struct.unpack_from("<8sII32s", blob)
    return json.loads(blob[48 : 48 + header_len]), blob[48 + header_len :]


def _rebuild(index: dict, payload: bytes, version: int = 1, magic: bytes = bp.MAGIC) -> bytes:
    """A file whose header hash is consistent again: only the structural checks can object."""
    header = json.dumps(index).encode()
    return (
        struct.pack("<8sII32s", magic, version, len(header), hashlib.sha256(header).digest())
        + header
        + payload
    )


def _entry(index: dict, name: str) -> dict:
    return next(e for e in index["tensors"] if e["name"] == name)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda ix, p: _entry(ix, "fc2.weight").update(shape=[16, 41]), "its shape implies"),
        (lambda ix, p: _entry(ix, "fc2.weight").update(dtype="complex32"), "unknown dtype"),
        (lambda ix, p: _entry(ix, "fc2.weight").update(encoding="zstd"), "unknown encoding"),
        (lambda ix, p: _entry(ix, "fc2.weight").update(bits=2), "binary bits must be 1"),
        (lambda ix, p: _entry(ix, "fc3.weight").update(bits=9), "kbit bits must be 1..8"),
        (lambda ix, p: _entry(ix, "fc1.bias").update(name="fc1.weight"), "duplicate name"),
        (lambda ix, p: _entry(ix, "fc1.bias").update(shape=[-16]), "non-negative ints"),
        (lambda ix, p: _entry(ix, "fc1.bias").pop("sha256"), "exactly the keys"),
        (lambda ix, p: _entry(ix, "fc2.weight")["parts"].pop("scales"), "parts must be"),
        (lambda ix, p: _entry(ix, "fc2.weight")["parts"]["signs"].__setitem__(0, 0), "gap or overlap"),
        (lambda ix, p: ix.update(payload_bytes=ix["payload_bytes"] + 1), "the header says"),
        (lambda ix, p: ix.update(tensors={}), "must be a list"),
        (lambda ix, p: ix["metadata"].update(n=3), "strings to strings"),
    ],
)
def test_consistent_but_wrong_header_is_refused(edit, message):
    index, payload = _split(CODEC.encode(mixed_state(), {"name": "m"}))
    edit(index, payload)
    with pytest.raises(ZooFormatError, match=message):
        CODEC.decode(_rebuild(index, payload), source="edited")


def test_swapped_tensor_bytes_fail_the_tensor_hash():
    index, payload = _split(CODEC.encode(mixed_state(), {}))
    a, b = _entry(index, "fc1.bias"), _entry(index, "bn.running_var")  # same size: swap their offsets
    a["parts"]["data"], b["parts"]["data"] = b["parts"]["data"], a["parts"]["data"]
    with pytest.raises(ZooFormatError, match=r"'fc1.bias': sha256 mismatch"):
        CODEC.decode(_rebuild(index, payload), source="swapped")


def test_non_canonical_padding_with_a_matching_hash_is_refused():
    state = {"w": binary_weight(3, 5)}  # 15 sign bits: 1 padding bit in the second byte
    index, payload = _split(CODEC.encode(state, {}))
    entry = _entry(index, "w")
    offset, length = entry["parts"]["signs"]
    payload = bytearray(payload)
    payload[offset + length - 1] |= 0x80
    parts = [payload[o : o + n] for o, n in (entry["parts"]["signs"], entry["parts"]["scales"])]
    entry["sha256"] = hashlib.sha256(b"".join(parts)).hexdigest()
    with pytest.raises(ZooFormatError, match=r"'w': inconsistent binary data .*padding"):
        CODEC.decode(_rebuild(index, bytes(payload)), source="padded")


def test_wrong_magic_version_and_pickle_are_refused():
    index, payload = _split(CODEC.encode(mixed_state(), {}))
    with pytest.raises(ZooFormatError, match="version 2; this lit_compress reads version 1"):
        CODEC.decode(_rebuild(index, payload, version=2), source="v2")
    with pytest.raises(ZooFormatError, match="not a bitpacked file"):
        CODEC.decode(_rebuild(index, payload, magic=b"NOTMAGIC"), source="magic")
    with pytest.raises(ZooFormatError, match="refusing a pickle"):
        CODEC.decode(b"\x80\x04" + bytes(100), source="model.pt")
    with pytest.raises(ZooFormatError, match="truncated: 3 bytes"):
        CODEC.decode(b"LCB", source="tiny")


def test_encode_rejects_unsupported_input():
    with pytest.raises(ValueError, match=r"complex64.*cannot store"):
        CODEC.encode({"z": torch.zeros(2, dtype=torch.complex64)}, {})
    with pytest.raises(TypeError, match="not a tensor"):
        CODEC.encode({"z": [1.0]}, {})
    with pytest.raises(TypeError, match="str -> str"):
        CODEC.encode({}, {"epoch": 3})
