"""Relative indices with fillers and the ``deep-compression`` codec: exact round trips, sizes, refusals."""

import hashlib
import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch

from lit_compress.deep_compression import codec as dc
from lit_compress.deep_compression.huffman import huffman_encode
from lit_compress.deep_compression.relative_index import (
    best_index_bits,
    decode_positions,
    encode_positions,
    index_bits_costs,
    insert_fillers,
)
from lit_compress.zoo import ZooFormatError, get_codec

CODEC = get_codec("deep-compression")
PREAMBLE = struct.Struct("<8sHI32s")


def reference_entries(positions, bits):
    """Pure-Python relative index: (gap, is_filler) per entry, fillers every 2**bits positions."""
    entries, prev, span = [], -1, 2**bits
    for p in positions:
        while p - prev - 1 > span - 1:
            entries.append((span - 1, True))
            prev += span
        entries.append((p - prev - 1, False))
        prev = p
    return entries


def bit_pattern(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert bit_pattern(a) == bit_pattern(b)


def pruned_shared(shape, keep: float, k: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """A pruned (``keep`` kept) and weight-shared (``k`` centroids) weight; pruned entries are +0.0."""
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(k, generator=g, dtype=torch.float64)
    idx = torch.randint(0, k, shape, generator=g)
    mask = torch.rand(shape, generator=g) < keep
    return torch.where(mask, centroids[idx], torch.zeros((), dtype=torch.float64)).to(dtype)


# ---------------------------------------------------------------- relative indices


def test_relative_index_matches_the_paper_figure():
    # Han et al. Fig. 2 with 3-bit indices: kept weights at 1, 4 and 15; the jump 4 -> 15 exceeds 8, so a
    # filler zero sits at 4 + 8 = 12. Gaps count the zeros skipped (the figure's diff - 1).
    index = encode_positions(np.array([1, 4, 15]), 3)
    assert index.gaps.tolist() == [1, 2, 7, 2]
    assert index.is_filler.tolist() == [False, False, True, False]
    assert index.num_fillers == 1
    assert decode_positions(index.gaps, index.is_filler, 3, numel=16).tolist() == [1, 4, 15]
    assert insert_fillers(np.array([5, 6, 7]), index, 9).tolist() == [5, 6, 9, 7]


def test_relative_index_round_trip_with_long_gaps_against_reference():
    rng = np.random.default_rng(0)
    for trial in range(40):
        numel = int(rng.integers(1, 3000))
        keep = rng.choice([0.001, 0.01, 0.1, 0.5, 1.0])
        positions = np.flatnonzero(rng.random(numel) < keep)
        if trial % 7 == 0:
            positions = np.array([numel - 1])  # one weight at the very end: a long run of fillers
        for bits in (1, 2, 3, 5, 8, 16):
            index = encode_positions(positions, bits)
            ref = reference_entries(positions.tolist(), bits)
            assert index.gaps.tolist() == [g for g, _ in ref]
            assert index.is_filler.tolist() == [f for _, f in ref]
            assert index.num_fillers == sum(f for _, f in ref)
            assert int(index.gaps.max(initial=0)) < 2**bits
            back = decode_positions(index.gaps, index.is_filler, bits, numel=numel)
            assert np.array_equal(back, positions)
    assert encode_positions(np.array([100]), 2).num_fillers == 25  # 100 skipped zeros, 4 per filler


def test_index_bits_out_of_range_are_refused():
    for bad in (0, 17, -3):
        with pytest.raises(ValueError, match=rf"index bits must be in 1..16, got {bad}"):
            encode_positions(np.array([1, 2]), bad)
    for bad in (True, 2.0, "8"):
        with pytest.raises(ValueError, match=r"must be an int in 1..16"):
            encode_positions(np.array([1, 2]), bad)
    with pytest.raises(ValueError, match="strictly increasing"):
        encode_positions(np.array([3, 3]), 4)
    with pytest.raises(ValueError, match="must skip exactly 15 zeros"):
        decode_positions(np.array([3, 0]), np.array([True, False]), 4)
    with pytest.raises(ValueError, match="last entry is a filler"):
        decode_positions(np.array([0, 15]), np.array([False, True]), 4)
    with pytest.raises(ValueError, match="position 12 of a 10-element"):
        decode_positions(np.array([12]), np.array([False]), 4, numel=10)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        decode_positions(np.array([16]), np.array([False]), 4)


def test_best_index_bits_is_the_argmin_of_the_actual_huffman_sizes():
    rng = np.random.default_rng(3)
    positions = np.flatnonzero(rng.random(20000) < 0.03)
    codes = rng.integers(0, 32, positions.size)
    sizes = {}
    for b in range(1, 9):
        index = encode_positions(positions, b)
        sizes[b] = len(huffman_encode(index.gaps)) + len(huffman_encode(insert_fillers(codes, index, 32)))
    assert index_bits_costs(positions, range(1, 9), codes, 32) == sizes
    best = best_index_bits(positions, range(1, 9), codes, 32)
    assert sizes[best] == min(sizes.values())
    assert 4 <= best <= 7  # mean gap ~33: too few bits pays in fillers, too many in unused width


# ---------------------------------------------------------------- the codec: round trips


def mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    negzero = pruned_shared((12, 10), 0.3, 4, seed=5)
    negzero[0, :3] = -0.0  # a -0.0 is a kept weight (bit pattern != 0), with its own codebook entry
    special = pruned_shared((16, 16), 0.2, 3, seed=6)
    special[1, 1], special[2, 2], special[3, 3] = float("inf"), float("-inf"), float("nan")
    return {
        "fc1.weight": pruned_shared((300, 200), 0.08, 32, seed=1),
        "fc1.bias": torch.randn(300, generator=g),
        "fc2.weight": pruned_shared((64, 100), 0.1, 16, seed=2, dtype=torch.float16),
        "fc3.weight": pruned_shared((10, 64, 3), 0.2, 8, seed=3, dtype=torch.bfloat16),
        "fc4.weight": pruned_shared((30, 40), 0.1, 8, seed=4, dtype=torch.float64),
        "dense.weight": torch.randn(20, 30, generator=g),  # > 256 values: raw
        "tiny.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),  # shared would be larger: raw
        "zeros.weight": torch.zeros(30, 30),  # nothing kept: an empty codebook
        "negzero.weight": negzero,
        "special.weight": special,
        "bn.running_var": torch.rand(16, generator=g),
        "bn.num_batches_tracked": torch.tensor(7),
        "flags": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3),
    }


EXPECTED = {
    "fc1.weight": "s",
    "fc1.bias": "r",
    "fc2.weight": "s",
    "fc3.weight": "s",
    "fc4.weight": "s",
    "dense.weight": "r",
    "tiny.weight": "r",
    "zeros.weight": "s",
    "negzero.weight": "s",
    "special.weight": "s",
    "bn.running_var": "r",
    "bn.num_batches_tracked": "r",
    "flags": "r",
    "empty": "r",
}


def test_round_trip_is_bit_exact_and_keeps_order():
    state = mixed_state()
    blob = CODEC.encode(state, {"name": "mlp"})
    decoded = CODEC.decode(blob, source="mlp.dc.bin")
    assert list(decoded) == list(state)
    for name, t in state.items():
        assert_bit_identical(decoded[name], t)
    header = dc.read_header(blob)
    assert header["m"] == {"name": "mlp"}
    assert {e["n"]: e["e"] for e in header["t"]} == EXPECTED
    entries = {e["n"]: e for e in header["t"]}
    assert entries["fc1.weight"]["k"] == 32 and entries["zeros.weight"]["k"] == 0
    assert entries["special.weight"]["k"] == 6  # 3 centroids + inf, -inf, nan


def test_negative_zero_is_a_kept_weight_and_round_trips():
    w = torch.tensor([[0.0, -0.0, 0.5, 0.0], [-0.0, 0.0, 0.5, -1.0]])
    codec = dc.DeepCompressionCodec(share=["w"])
    blob = codec.encode({"w": w}, {})
    back = codec.decode(blob, "negzero")["w"]
    assert_bit_identical(back, w)
    assert torch.signbit(back).tolist() == [[False, True, False, False], [True, False, False, True]]
    row = dc.stream_report(blob)["tensors"][0]
    assert row["kept"] == 5 and row["codebook_size"] == 3  # -1.0, -0.0, 0.5; +0.0 is the pruned value
    entry = dc.read_header(blob)["t"][0]
    payload = blob[len(blob) - dc.read_header(blob)["p"] :]
    codebook = np.frombuffer(payload[: 4 * entry["k"]], dtype="<u4")
    assert codebook.tolist() == [0xBF800000, 0x80000000, 0x3F000000]  # sorted by value, exact bits


def test_hand_built_file_decodes_and_matches_the_encoder():
    # w: shape [2, 10], 0.5 at 0 and 19, -1.0 at 3; b = 2 -> skips 0, 2, 15 -> 15 = 3 fillers + gap 3.
    w = torch.zeros(2, 10)
    w[0, 0], w[0, 3], w[1, 9] = 0.5, -1.0, 0.5
    codebook = struct.pack("<2f", -1.0, 0.5)
    weights = huffman_encode(np.array([1, 0, 2, 2, 2, 1]))  # symbol 2 = k = the filler
    gaps = huffman_encode(np.array([0, 2, 3, 3, 3, 3]))
    entry = {"n": "w", "e": "s", "d": "float32", "s": [2, 10], "k": 2, "b": 2}
    blob = assemble([(entry, [codebook, weights, gaps])])
    assert_bit_identical(CODEC.decode(blob, "hand")["w"], w)
    encoded = dc.DeepCompressionCodec(index_bits={"w": 2}).encode({"w": w}, {})
    assert encoded == blob  # the layout in the module docstring is exactly what the encoder writes

    report = dc.stream_report(blob)
    row = report["tensors"][0]
    assert row["kept"] == 3 and row["fillers"] == 3 and row["entries"] == 6
    assert row["weight_bits"] == 2 and row["index_bits"] == 2  # 3 weight symbols incl. the filler
    assert row["weights_packed_bytes"] == 2 and row["indices_packed_bytes"] == 2  # ceil(6 * 2 / 8)
    assert row["weights_bytes"] == len(weights) and row["indices_bytes"] == len(gaps)
    assert row["codebook_bytes"] == 8 and row["bytes"] == 8 + len(weights) + len(gaps)
    assert row["kept_pct"] == pytest.approx(15.0) and row["dense_bytes"] == 80
    totals = report["totals"]
    assert totals["file_bytes"] == len(blob) and totals["header_bytes"] == len(blob) - row["bytes"]
    assert totals["compression"] == pytest.approx(80 / len(blob))


def lenet_300_100_state(keep=0.08, k=32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for i, (n_out, n_in) in enumerate([(300, 784), (100, 300), (10, 100)], start=1):
        state[f"fc{i}.weight"] = pruned_shared((n_out, n_in), keep, k, seed=i)
        state[f"fc{i}.bias"] = torch.randn(n_out, generator=g)
    return state


def test_file_is_within_the_fixed_width_bound_and_far_below_safetensors():
    from safetensors.torch import save

    state = lenet_300_100_state()
    blob = CODEC.encode(state, {"name": "lenet-300-100"})
    header = dc.read_header(blob)
    bound = 46 + 100 + 80 * len(state)  # preamble + compressed header allowance
    for entry in header["t"]:
        t = state[entry["n"]]
        if entry["e"] == "r":
            bound += t.numel() * 4
            continue
        b, k = entry["b"], entry["k"]
        positions = np.flatnonzero(t.reshape(-1).numpy())
        ref = reference_entries(positions.tolist(), b)
        fillers = sum(f for _, f in ref)
        w = math.ceil(math.log2(k + (fillers > 0)))
        tables = 2 * (3 + 3 + 1) + math.ceil((k + 1) * 5 / 8) + math.ceil(2**b * 5 / 8)
        # Huffman is never longer than a fixed-width code of the same alphabet (w, b bits per entry)
        bound += math.ceil(len(ref) * w / 8) + math.ceil(len(ref) * b / 8) + tables + 4 * k
    assert len(blob) <= bound
    dense = len(save(state))
    assert len(blob) * 30 < dense, f"{len(blob)} bytes vs {dense} for safetensors"
    report = dc.stream_report(state, {"name": "lenet-300-100"})
    assert report["totals"]["file_bytes"] == len(blob)
    parts = ("weights_bytes", "indices_bytes", "codebook_bytes", "raw_bytes", "header_bytes")
    assert sum(report["totals"][p] for p in parts) == len(blob)
    assert report["totals"]["kept"] == sum(int((state[f"fc{i}.weight"] != 0).sum()) for i in (1, 2, 3)) + 410


def test_index_bits_overrides_and_forced_sharing():
    state = lenet_300_100_state()
    codec = dc.DeepCompressionCodec(index_bits={"fc1.weight": 3, "fc3.*": 2, "fc*.weight": 5})
    blob = codec.encode(state, {})
    entries = {e["n"]: e for e in dc.read_header(blob)["t"]}
    assert entries["fc1.weight"]["b"] == 3 and entries["fc2.weight"]["b"] == 5
    assert entries["fc3.weight"]["b"] == 2  # first matching pattern wins
    assert entries["fc3.bias"]["e"] == "s"  # matched: forced shared (1-D, 10 values, larger than raw)
    assert entries["fc2.bias"]["e"] == "r"
    with pytest.raises(ValueError, match=r"'fc1.bias' was asked to be stored shared but has 300 distinct"):
        dc.DeepCompressionCodec(index_bits={"fc1.*": 3}).encode(state, {})  # 300 distinct fp32 biases
    rows = {r["name"]: r for r in dc.stream_report(blob)["tensors"]}
    positions = np.flatnonzero(state["fc1.weight"].reshape(-1).numpy())
    assert rows["fc1.weight"]["fillers"] == sum(f for _, f in reference_entries(positions.tolist(), 3))
    for name, t in CODEC.decode(blob, "x").items():
        assert_bit_identical(t, state[name])
    every = dc.DeepCompressionCodec(index_bits=8).encode(state, {})
    assert all(e["b"] == 8 for e in dc.read_header(every)["t"] if e["e"] == "s")


def test_bad_settings_and_input_are_refused():
    for bad in (0, 17):
        with pytest.raises(ValueError, match=rf"index_bits must be in 1..16, got {bad}"):
            dc.DeepCompressionCodec(index_bits=bad)
    with pytest.raises(ValueError, match=r"index_bits\['fc\*'\] must be in 1..16, got 20"):
        dc.DeepCompressionCodec(index_bits={"fc*": 20})
    with pytest.raises(ValueError, match="candidate_bits is empty"):
        dc.DeepCompressionCodec(candidate_bits=[])
    with pytest.raises(TypeError, match="list of tensor-name globs"):
        dc.DeepCompressionCodec(share="fc1.weight")
    state = {"dense.weight": torch.arange(600.0).view(20, 30) + 1, "n": torch.tensor(3)}
    with pytest.raises(ValueError, match=r"'dense.weight' .* has 600 distinct nonzero values.* at most 256"):
        dc.DeepCompressionCodec(share=["dense.*"]).encode(state, {})
    with pytest.raises(ValueError, match=r"'n' was asked to be stored shared but is a torch.int64"):
        dc.DeepCompressionCodec(share=["n"]).encode(state, {})
    with pytest.raises(
        ValueError, match=r"'s' was asked .* tensor of shape \[\]; only non-empty, at least 1-D"
    ):
        dc.DeepCompressionCodec(share=["s"]).encode({"s": torch.tensor(0.5)}, {})
    with pytest.raises(ValueError, match=r"'big' .* has at least 65536 distinct nonzero values"):
        dc.DeepCompressionCodec(share=["big"]).encode({"big": torch.arange(1.0, 70000.0)}, {})
    with pytest.raises(ValueError, match=r"share pattern 'dense.wieght' matches no tensor.*dense.weight"):
        dc.DeepCompressionCodec(share=["dense.wieght"]).encode(state, {})
    with pytest.raises(ValueError, match=r"complex64.*cannot store"):
        CODEC.encode({"z": torch.zeros(2, dtype=torch.complex64)}, {})
    with pytest.raises(TypeError, match="not a tensor"):
        CODEC.encode({"z": [1.0]}, {})
    with pytest.raises(TypeError, match="str -> str"):
        CODEC.encode({}, {"epoch": 3})


def test_encoding_a_lenet5_sized_state_round_trips():
    g = torch.Generator().manual_seed(0)
    shapes = {"conv1": (20, 1, 5, 5), "conv2": (50, 20, 5, 5), "fc1": (500, 800), "fc2": (10, 500)}
    state = {}
    for i, (name, shape) in enumerate(shapes.items()):
        state[f"{name}.weight"] = pruned_shared(shape, 0.08, 32, seed=i)
        state[f"{name}.bias"] = torch.randn(shape[0], generator=g)
    assert sum(t.numel() for t in state.values()) == 431_080
    blob = CODEC.encode(state, {})  # speed: benchmarks/deep_compression.py
    for name, t in CODEC.decode(blob, "lenet5").items():
        assert_bit_identical(t, state[name])


def test_codec_is_registered_with_the_zoo():
    assert isinstance(CODEC, dc.DeepCompressionCodec)
    assert (CODEC.name, CODEC.suffix) == ("deep-compression", ".dc.bin")


# ---------------------------------------------------------------- corrupted files


def small_state() -> dict[str, torch.Tensor]:
    return {
        "fc.weight": pruned_shared((24, 40), 0.1, 8, seed=0),
        "fc.bias": torch.linspace(-1, 1, 6),
        "conv.weight": pruned_shared((4, 2, 3, 3), 0.3, 4, seed=1, dtype=torch.float16),
        "steps": torch.tensor(7),
    }


def test_small_state_uses_both_encodings():
    entries = {e["n"]: e["e"] for e in dc.read_header(CODEC.encode(small_state(), {}))["t"]}
    assert entries == {"fc.weight": "s", "fc.bias": "r", "conv.weight": "s", "steps": "r"}


def test_every_truncation_is_a_format_error():
    blob = CODEC.encode(small_state(), {"name": "m"})
    for cut in range(len(blob)):
        with pytest.raises(ZooFormatError):
            CODEC.decode(blob[:cut], source="cut")
    with pytest.raises(ZooFormatError, match="trailing"):
        CODEC.decode(blob + b"\0", source="long")


def test_every_flipped_byte_is_a_format_error():
    blob = CODEC.encode(small_state(), {"name": "m"})
    for i in range(len(blob)):
        for mask in (0x01, 0x80):
            corrupt = bytearray(blob)
            corrupt[i] ^= mask
            with pytest.raises(ZooFormatError):
                CODEC.decode(bytes(corrupt), source="flip")
    corrupt = bytearray(blob)
    corrupt[-1] ^= 1  # the last tensor's raw bytes: its own hash catches it
    with pytest.raises(ZooFormatError, match="'steps': sha256 mismatch"):
        CODEC.decode(bytes(corrupt), source="flip")
    corrupt = bytearray(blob)
    corrupt[PREAMBLE.size + 3] ^= 1
    with pytest.raises(ZooFormatError, match="header sha256 mismatch"):
        CODEC.decode(bytes(corrupt), source="flip")


def split(blob: bytes) -> tuple[dict, bytes]:
    _, _, header_len, _ = PREAMBLE.unpack_from(blob)
    header = json.loads(zlib.decompress(blob[PREAMBLE.size : PREAMBLE.size + header_len]))
    return header, blob[PREAMBLE.size + header_len :]


def rebuild(header: dict, payload: bytes, version: int = 1, magic: bytes = dc.MAGIC) -> bytes:
    """A file whose header hash is consistent again: only the structural checks can object."""
    packed = zlib.compress(json.dumps(header).encode())
    return PREAMBLE.pack(magic, version, len(packed), hashlib.sha256(packed).digest()) + packed + payload


def assemble(tensors: list[tuple[dict, list[bytes]]], metadata: dict | None = None) -> bytes:
    """A file from hand-made entries and parts, every length and hash made consistent."""
    entries, payload = [], b""
    for entry, parts in tensors:
        entry = dict(entry, h=hashlib.sha256(b"".join(parts)).hexdigest())
        if entry["e"] == "s":
            entry.update(w=len(parts[1]), i=len(parts[2]))
        entries.append(entry)
        payload += b"".join(parts)
    header = {"m": metadata or {}, "p": len(payload), "t": entries}
    header = json.dumps(header, separators=(",", ":"), sort_keys=True)
    packed = zlib.compress(header.encode(), 9)
    return PREAMBLE.pack(dc.MAGIC, 1, len(packed), hashlib.sha256(packed).digest()) + packed + payload


def _entry(header: dict, name: str) -> dict:
    return next(e for e in header["t"] if e["n"] == name)


def _shift_streams(header, payload):
    entry = _entry(header, "fc.weight")
    entry["w"], entry["i"] = entry["w"] + 1, entry["i"] - 1  # same bytes, same hash, wrong split


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h, p: _entry(h, "fc.weight").update(k=9), "cover"),
        (lambda h, p: _entry(h, "fc.weight").update(k=300), "codebook size must be 0..256"),
        (lambda h, p: _entry(h, "fc.weight").update(b=17), "index bits must be 1..16"),
        (lambda h, p: _entry(h, "fc.weight").update(d="int32"), "must be a non-empty float tensor"),
        (lambda h, p: _entry(h, "fc.weight").update(d="complex32"), "unknown dtype"),
        (lambda h, p: _entry(h, "fc.weight").update(e="zstd"), "encoding"),
        (lambda h, p: _entry(h, "fc.weight").update(x=1), "exactly the keys"),
        (lambda h, p: _entry(h, "fc.bias").pop("h"), "exactly the keys"),
        (lambda h, p: _entry(h, "fc.bias").update(n="fc.weight"), "duplicate name"),
        (lambda h, p: _entry(h, "fc.bias").update(s=[-6]), "non-negative ints"),
        (lambda h, p: _entry(h, "fc.bias").update(s=[7]), "cover|header says"),
        (lambda h, p: _entry(h, "fc.bias").update(h="0" * 64), "'fc.bias': sha256 mismatch"),
        (lambda h, p: h.update(p=h["p"] + 1), "the header says"),
        (lambda h, p: h.update(t={}), "must be a list"),
        (lambda h, p: h["m"].update(n=3), "strings to strings"),
        (lambda h, p: h.update(v=1), "exactly the keys m, p, t"),
        (_shift_streams, "'fc.weight': inconsistent shared data"),
    ],
)
def test_consistent_but_wrong_header_is_refused(edit, message):
    header, payload = split(CODEC.encode(small_state(), {"name": "m"}))
    edit(header, payload)
    with pytest.raises(ZooFormatError, match=message):
        CODEC.decode(rebuild(header, payload), source="edited")


def test_swapped_tensor_bytes_fail_the_tensor_hash():
    state = {"a": torch.ones(4), "b": torch.full((4,), 2.0)}
    header, payload = split(CODEC.encode(state, {}))
    payload = payload[16:] + payload[:16]
    with pytest.raises(ZooFormatError, match=r"'a': sha256 mismatch"):
        CODEC.decode(rebuild(header, payload), source="swapped")


SHARED = {"n": "w", "e": "s", "d": "float32", "s": [2, 5], "k": 1, "b": 4}
HALF = struct.pack("<f", 0.5)


@pytest.mark.parametrize(
    "entry, parts, message",
    [
        (dict(SHARED, k=2), [struct.pack("<2f", 0.5, -1.0), [0, 1], [0, 0]], "canonical"),
        (dict(SHARED, k=2), [struct.pack("<2f", 0.5, 0.5), [0, 1], [0, 0]], "canonical"),
        (dict(SHARED, k=2), [struct.pack("<2f", 0.0, 0.5), [0, 1], [0, 0]], r"\+0.0"),
        (dict(SHARED, k=2), [struct.pack("<2f", -1.0, 0.5), [1, 1], [0, 0]], "never used"),
        (SHARED, [HALF, [0, 1], [0, 15]], "last entry is a filler"),
        (SHARED, [HALF, [1, 0], [3, 0]], "must skip exactly 15"),
        (SHARED, [HALF, [0, 2], [0, 0]], "past the filler symbol 1"),
        (SHARED, [HALF, [0, 0], [0]], "announces 1 symbols, expected 2"),
        (SHARED, [HALF, [0], [12]], "position 12 of a 10-element"),
        (dict(SHARED, b=2), [HALF, [0], [4]], r"\[0, 4\)"),
    ],
)
def test_non_canonical_streams_with_matching_hashes_are_refused(entry, parts, message):
    codebook, weights, gaps = parts
    blob = assemble([(entry, [codebook, huffman_encode(np.array(weights)), huffman_encode(np.array(gaps))])])
    with pytest.raises(ZooFormatError, match=message):
        CODEC.decode(blob, source="crafted")


def test_wrong_magic_version_and_pickle_are_refused(monkeypatch):
    header, payload = split(CODEC.encode(small_state(), {}))
    with pytest.raises(ZooFormatError, match="version 2; this lit_compress reads version 1"):
        CODEC.decode(rebuild(header, payload, version=2), source="v2")
    with pytest.raises(ZooFormatError, match="not a deep-compression file"):
        CODEC.decode(rebuild(header, payload, magic=b"LCBITPK\x00"), source="magic")
    with pytest.raises(ZooFormatError, match="refusing a pickle"):
        CODEC.decode(b"\x80\x04" + bytes(100), source="model.pt")
    with pytest.raises(ZooFormatError, match="truncated: 3 bytes"):
        CODEC.decode(b"LCD", source="tiny")
    monkeypatch.setattr(dc, "_MAX_HEADER", 1000)  # a header inflating past the limit is refused
    bomb = zlib.compress(b" " * 1001)
    blob = PREAMBLE.pack(dc.MAGIC, 1, len(bomb), hashlib.sha256(bomb).digest()) + bomb
    with pytest.raises(ZooFormatError, match="not exactly one complete zlib stream"):
        CODEC.decode(blob, source="bomb")
