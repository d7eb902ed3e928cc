"""Hostile and broken files (issue 10, point 3): every decoder the zoo uses turns random, truncated,
bit-flipped or hand-crafted bytes into a clear error, never a hang, a crash, a low-level exception or a
silently wrong model; and no place that reads a checkpoint ever runs a pickle payload.

Each decoder is attacked with four strategies (property-based, hypothesis):

- random bytes (also behind a valid magic, so the fuzz reaches past the first check);
- a valid encoding of a tiny state_dict truncated at a random position (must always fail);
- a valid encoding with 1..4 random bit flips (must fail, or decode to exactly the original where the
  format carries checksums; for the checksum-less safetensors formats it must fail or decode to well-formed
  tensors: there the card's sha256, checked by the loader, is what catches the change);
- header fields (lengths, shapes, counts, dtypes, offsets, names) replaced by huge / negative / wrongly typed
  / inconsistent values inside an otherwise valid frame (header hash and length recomputed, as an attacker
  would), so that the decoder's validation rather than its checksum is what is tested.

"Clear error" means :class:`ZooFormatError` (a ``ZooError`` and a ``ValueError``) whose message names the
file, for the card parser :class:`CardValidationError`; any other exception type (``struct.error``,
``IndexError``, ``UnicodeDecodeError``, ``json.JSONDecodeError``, ``KeyError``, ``zlib.error``,
``SafetensorError``, ``MemoryError``, ``RecursionError``, ``RuntimeError`` ...) fails the test as it
propagates. Every hypothesis test has a deadline (a hang or a quadratic blow-up fails it) and a modest
number of examples, so the file runs in well under a minute on one loaded core.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lit_compress import zoo
from lit_compress.deep_compression import codec as dc_mod
from lit_compress.deep_compression.huffman import huffman_decode, huffman_encode
from lit_compress.models import create_model
from lit_compress.quantization import bitpacked_codec as bp_mod
from lit_compress.zoo.card import Card
from lit_compress.zoo.errors import CardValidationError, ZooError, ZooFormatError, ZooIntegrityError
from lit_compress.zoo.storage import get_codec

export_mod = importlib.import_module("lit_compress.zoo.export")

# The raw pickles below use every protocol (0..5); torch's weights-only unpickler warns about 3..5.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")

# Hypothesis budget: deadlines catch hangs and super-linear paths; no example database in the checkout.
# LIT_COMPRESS_FUZZ_SCALE=50 runs 50x the examples (a deeper, slower hunt, e.g. nightly).
SCALE = max(1, int(os.environ.get("LIT_COMPRESS_FUZZ_SCALE", "1")))
FUZZ = settings(
    max_examples=100 * SCALE,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FEW = settings(FUZZ, max_examples=40 * SCALE)

SOURCE = "/zoo/hostile-entry/model.weights"  # what the decoders must name in their messages
CODECS = ("safetensors", "sparse-safetensors", "bitpacked", "deep-compression")
CHECKSUMMED = {"bitpacked", "deep-compression"}  # formats that hash their own bytes


# ---------------------------------------------------------------------------------------------- fixtures


def _binary_rows(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(rows, 1, generator=g) + 0.1
    signs = torch.randint(0, 2, (rows, cols), generator=g) * 2 - 1
    return (signs * scales).float()


def _pruned_grid(rows: int, cols: int, levels: int, keep: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(-1.0, 1.0, levels)
    w = grid[torch.randint(0, levels, (rows, cols), generator=g)]
    w[w == 0] = 0.5
    return torch.where(torch.rand(rows, cols, generator=g) < keep, w, torch.zeros(()))


def _tiny_state() -> dict[str, torch.Tensor]:
    """Small enough to fuzz quickly; varied enough to exercise every encoding of every codec."""
    masked = _binary_rows(3, 16, 1)
    masked[:, ::3] = 0
    return {
        "bin.weight": _binary_rows(4, 16, 0),  # bitpacked: binary; deep-compression: shared
        "masked.weight": masked,  # bitpacked: binary_masked
        "grid.weight": _pruned_grid(6, 20, 7, 0.3, 2),  # sparse: mask + values; bitpacked: kbit; dc: shared
        "half.weight": _pruned_grid(4, 12, 3, 0.5, 3).half(),
        "fc.bias": torch.linspace(-1, 1, 5),  # raw everywhere
        "bn.num_batches_tracked": torch.tensor(7),  # integer scalar
    }


STATE = _tiny_state()
ENCODED = {name: get_codec(name).encode(STATE, {"note": "tiny"}) for name in CODECS}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    def bits(t: torch.Tensor) -> bytes:
        return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""

    return sorted(a) == sorted(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and bits(a[k]) == bits(b[k]) for k in a
    )


def _decode(codec: str, data: bytes) -> dict[str, torch.Tensor] | ZooFormatError:
    """The decoded state, or the ZooFormatError it raised, checked to name the file. Anything else
    (another exception type, a non-tensor result) propagates and fails the test."""
    try:
        out = get_codec(codec).decode(data, source=SOURCE)
    except ZooFormatError as err:
        assert SOURCE in str(err), f"error does not name the file: {err}"
        return err
    assert isinstance(out, dict)
    for name, t in out.items():
        assert isinstance(name, str) and isinstance(t, torch.Tensor)
        assert t.numel() == math.prod(t.shape)
    return out


def _flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for position, bit in flips:
        buf[position % len(buf)] ^= 1 << bit
    return bytes(buf)


flips_strategy = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 7)), min_size=1, max_size=4)


def test_fixtures_round_trip_and_use_every_encoding():
    """The fuzz starts from valid files that exercise each codec's interesting paths."""
    for name in CODECS:
        assert _same_state(get_codec(name).decode(ENCODED[name], source="ok"), STATE), name
    encodings = {t["name"]: t["encoding"] for t in bp_mod.read_index(ENCODED["bitpacked"])["tensors"]}
    assert set(encodings.values()) == {"binary", "binary_masked", "kbit", "raw"}, encodings
    shared = {t["n"] for t in dc_mod.read_header(ENCODED["deep-compression"])["t"] if t["e"] == "s"}
    assert {"bin.weight", "grid.weight", "half.weight"} <= shared
    sparse = json.loads(_safetensors_header(ENCODED["sparse-safetensors"])["__metadata__"]["sparse"])
    assert "grid.weight" in sparse


# ------------------------------------------------------------------------------------------- byte-level fuzz


MAGICS = {
    "safetensors": b"",
    "sparse-safetensors": b"",
    "bitpacked": bp_mod.MAGIC + struct.pack("<I", bp_mod.FORMAT_VERSION),
    "deep-compression": dc_mod.MAGIC + struct.pack("<H", dc_mod.FORMAT_VERSION),
}


@pytest.mark.parametrize("codec", CODECS)
@FUZZ
@given(data=st.binary(max_size=600), with_magic=st.booleans())
def test_random_bytes_are_a_clear_error(codec, data, with_magic):
    blob = (MAGICS[codec] + data) if with_magic else data
    assert isinstance(_decode(codec, blob), ZooFormatError)


@pytest.mark.parametrize("codec", CODECS)
@FUZZ
@given(cut=st.integers(0, 1 << 20))
def test_truncated_files_are_a_clear_error(codec, cut):
    data = ENCODED[codec]
    result = _decode(codec, data[: cut % len(data)])
    assert isinstance(result, ZooFormatError)


@pytest.mark.parametrize("codec", CODECS)
def test_every_truncation_and_trailing_byte_is_refused(codec):
    """Exhaustive over the cut position (the files are a few KB): truncation is never silent."""
    data = ENCODED[codec]
    step = max(1, len(data) // 400)
    for cut in [*range(0, min(len(data), 200)), *range(200, len(data), step)]:
        assert isinstance(_decode(codec, data[:cut]), ZooFormatError), cut
    assert isinstance(_decode(codec, data + b"\x00"), ZooFormatError)


@pytest.mark.parametrize("codec", CODECS)
@FUZZ
@given(flips=flips_strategy)
def test_bit_flips_are_caught_or_harmless(codec, flips):
    result = _decode(codec, _flip(ENCODED[codec], flips))
    if isinstance(result, ZooFormatError) or codec not in CHECKSUMMED:
        return  # safetensors carries no checksum: the loader's sha256 is the guard (tested below)
    assert _same_state(result, STATE), "a corrupted file decoded to different tensors without an error"


@pytest.mark.parametrize("codec", sorted(CHECKSUMMED))
def test_every_single_bit_flip_is_detected_by_checksummed_codecs(codec):
    data = ENCODED[codec]
    for position in range(len(data)):
        for bit in (0, 7):
            result = _decode(codec, _flip(data, [(position, bit)]))
            assert isinstance(result, ZooFormatError), (position, bit)


# ---------------------------------------------------------------------------------------------- header fields

HOSTILE_VALUES = st.one_of(
    st.sampled_from(
        [
            None,
            True,
            False,
            -1,
            0,
            1,
            3,
            255,
            257,
            2**31,
            2**32 + 1,
            2**63,
            2**64 + 5,
            -(2**63),
            10**30,
            1.5,
            -0.0,
            float("nan"),
            float("inf"),
            "",
            "x",
            "float32",
            "F32",
            "int64",
            "s",
            "r",
            "kbit",
            "binary",
            "0" * 64,
            [],
            [0],
            [-1],
            [1, 2, 3],
            [10**12],
            [2**31, 2**31],
            [2**62, 2**62, 2**62],
            [0, 2**64],
            [2**40, 0],
            [1.5, 2],
            [[1]],
            {},
            {"a": 1},
            {"shape": [-8], "dtype": "float32"},
            {"shape": [10**12], "dtype": "float32"},
            {"shape": "12", "dtype": "nn"},
        ]
    ),
    st.integers(),
    st.text(max_size=8),
    st.lists(st.integers(-3, 2**33), max_size=4),
)


def _json_paths(obj, prefix=()):
    """Every path (tuple of keys / indices) to a value inside a JSON-like object, containers included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_paths(v, (*prefix, i))


@st.composite
def header_edits(draw, header):
    """A copy of ``header`` with one value replaced, one key deleted or one unknown key added."""
    paths = [p for p in _json_paths(header) if p]
    path = draw(st.sampled_from(paths))
    op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "add"]))
    edited = json.loads(json.dumps(header))
    parent = edited
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "replace":
        parent[last] = draw(HOSTILE_VALUES)
    elif op == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[draw(st.sampled_from(["extra", "__proto__", "sha256", "k", "shape"]))] = draw(HOSTILE_VALUES)
    else:
        parent.append(draw(HOSTILE_VALUES))
    return path, edited


def _bitpacked_frame(header: object, payload: bytes) -> bytes:
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    pre = struct.pack("<8sII32s", bp_mod.MAGIC, bp_mod.FORMAT_VERSION, len(raw), hashlib.sha256(raw).digest())
    return pre + raw + payload


def _dc_frame(header: object, payload: bytes) -> bytes:
    raw = zlib.compress(json.dumps(header, sort_keys=True, separators=(",", ":")).encode(), 9)
    pre = struct.pack("<8sHI32s", dc_mod.MAGIC, dc_mod.FORMAT_VERSION, len(raw), hashlib.sha256(raw).digest())
    return pre + raw + payload


def _safetensors_header(data: bytes) -> dict:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def _safetensors_frame(header: object, payload: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + payload


def _sparse_expand(header: dict) -> dict:
    """The safetensors header with the sparse codec's JSON-in-a-string metadata parsed, so edits reach it."""
    out = json.loads(json.dumps(header))
    meta = out.get("__metadata__", {})
    for key in ("sparse", "order"):
        meta[key] = json.loads(meta[key])
    return out


def _sparse_frame(header: object, payload: bytes) -> bytes:
    header = json.loads(json.dumps(header))
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if isinstance(meta, dict):
        for key in ("sparse", "order"):
            if key in meta and not isinstance(meta[key], str):
                meta[key] = json.dumps(meta[key])
    return _safetensors_frame(header, payload)


def _split(codec: str) -> tuple[object, bytes, object]:
    """(header as JSON data, payload bytes, framing function) of the valid encoding of ``codec``."""
    data = ENCODED[codec]
    if codec == "bitpacked":
        return bp_mod.read_index(data), data[48 + struct.unpack_from("<I", data, 12)[0] :], _bitpacked_frame
    if codec == "deep-compression":
        return dc_mod.read_header(data), data[46 + struct.unpack_from("<I", data, 10)[0] :], _dc_frame
    (n,) = struct.unpack("<Q", data[:8])
    header = _safetensors_header(data)
    if codec == "sparse-safetensors":
        return _sparse_expand(header), data[8 + n :], _sparse_frame
    return header, data[8 + n :], _safetensors_frame


SPLIT = {codec: _split(codec) for codec in CODECS}


def test_reframing_an_unchanged_header_gives_a_valid_file():
    """The header-edit test below re-frames edited headers; unedited, the frame must decode bit-exactly."""
    for codec in CODECS:
        header, payload, frame = SPLIT[codec]
        assert _same_state(get_codec(codec).decode(frame(header, payload), source="ok"), STATE), codec


@pytest.mark.parametrize("codec", CODECS)
@FUZZ
@given(data=st.data())
def test_hostile_header_fields_are_a_clear_error(codec, data):
    header, payload, frame = SPLIT[codec]
    path, edited = data.draw(header_edits(header))
    result = _decode(codec, frame(edited, payload))
    if isinstance(result, ZooFormatError):
        return
    # Accepted: the edit is one a valid file can have (metadata, a tensor's name or shape ...). A header is
    # not covered by the tensors' checksums, so the edited tensor may differ (the loader's strict
    # load_state_dict then refuses a wrong name or shape); every other tensor must be exactly the stored one.
    edited_name = _edited_tensor(codec, header, path)
    for name, t in STATE.items():
        if name != edited_name:
            assert name in result and _same_state({name: result[name]}, {name: t}), (path, name)


def _edited_tensor(codec: str, header, path: tuple) -> str | None:
    """Name of the tensor whose header entry ``path`` points into (None for file-level fields)."""
    if codec in ("bitpacked", "deep-compression"):
        key = "tensors" if codec == "bitpacked" else "t"
        if path[0] == key and len(path) > 1:
            return header[key][path[1]]["name" if codec == "bitpacked" else "n"]
        return None
    if path[0] == "__metadata__":
        return path[2] if len(path) > 2 and path[1] == "sparse" else None
    return path[0].split("::")[0]


@pytest.mark.parametrize(
    "codec, edit, message",
    [
        ("bitpacked", ("tensors", 0, "shape", [2**62, 2**62]), "implies|shape"),
        ("bitpacked", ("tensors", 0, "shape", [-4, 16]), "non-negative"),
        ("bitpacked", ("payload_bytes", 2**63), "payload"),
        ("bitpacked", ("tensors", 0, "parts", {"signs": [0, 2**60], "scales": [0, 16]}), "bytes"),
        ("deep-compression", ("t", 0, "s", [2**40]), "elements|at most"),
        ("deep-compression", ("t", 0, "s", [2**62, 2**62]), "elements|at most"),
        ("deep-compression", ("t", 0, "k", 2**31), "codebook size"),
        ("deep-compression", ("t", 0, "w", 2**62), "cover|payload"),
        ("deep-compression", ("p", -1), "payload"),
        ("sparse-safetensors", ("__metadata__", "sparse", "grid.weight", "shape", [-8]), "shape"),
        ("sparse-safetensors", ("__metadata__", "sparse", "grid.weight", "shape", [10**12]), "wrong size"),
        ("sparse-safetensors", ("__metadata__", "sparse", "grid.weight", "shape", "120"), "shape"),
        ("sparse-safetensors", ("__metadata__", "sparse", "grid.weight", "dtype", "nn"), "dtype"),
        ("sparse-safetensors", ("__metadata__", "order", {"a": 1}), "order"),
        ("sparse-safetensors", ("__metadata__", "order", [["fc.bias"]]), "order"),
        ("safetensors", ("fc.bias", "shape", [2**62, 2**62]), "malformed"),
        ("safetensors", ("fc.bias", "data_offsets", [0, 2**63]), "malformed"),
        ("safetensors", ("fc.bias", "dtype", "F64"), "malformed"),
    ],
)
def test_huge_negative_and_inconsistent_header_fields(codec, edit, message):
    """Hand-picked edits: validated before anything is allocated, with a message saying what is wrong."""
    header, payload, frame = SPLIT[codec]
    edited = json.loads(json.dumps(header))
    *path, key, value = edit
    parent = edited
    for k in path:
        parent = parent[k]
    parent[key] = value
    result = _decode(codec, frame(edited, payload))
    assert isinstance(result, ZooFormatError)
    assert any(m in str(result) for m in message.split("|")), str(result)


def test_deep_compression_sparse_metadata_json_bomb_and_nesting():
    """A deeply nested header (RecursionError in json) and a zlib bomb are format errors, not crashes."""
    nested = "[" * 100_000 + "]" * 100_000
    raw = zlib.compress(nested.encode(), 9)
    pre = struct.pack("<8sHI32s", dc_mod.MAGIC, 1, len(raw), hashlib.sha256(raw).digest())
    assert isinstance(_decode("deep-compression", pre + raw), ZooFormatError)
    bomb = zlib.compress(b" " * (1 << 27), 9)  # 128 MiB of spaces in ~130 KB
    pre = struct.pack("<8sHI32s", dc_mod.MAGIC, 1, len(bomb), hashlib.sha256(bomb).digest())
    assert "not exactly one complete zlib stream" in str(_decode("deep-compression", pre + bomb))
    raw = nested.encode()
    pre = struct.pack("<8sII32s", bp_mod.MAGIC, 1, len(raw), hashlib.sha256(raw).digest())
    assert isinstance(_decode("bitpacked", pre + raw), ZooFormatError)
    raw = ('{"__metadata__": ' + nested + "}").encode()
    assert isinstance(_decode("safetensors", struct.pack("<Q", len(raw)) + raw), ZooFormatError)


# ---------------------------------------------------------------------------------------------- Huffman


HUFFMAN_STREAMS = [
    huffman_encode(np.array([0, 1, 1, 2, 2, 2, 2, 3, 0, 5, 5, 5, 1, 2, 2])),
    huffman_encode(np.array([4] * 40)),  # single symbol: zero-bit stream
    huffman_encode(np.random.default_rng(0).geometric(0.3, 300) - 1),
]


def _huffman(blob: bytes, **kwargs) -> np.ndarray | ZooFormatError:
    try:
        out = huffman_decode(blob, **kwargs)
    except ZooFormatError as err:
        assert str(err).startswith("huffman stream: ")
        return err
    assert out.dtype == np.int64 and out.ndim == 1 and (out >= 0).all()
    # Canonical: every valid stream has exactly one blob, so whatever decodes re-encodes to the same bytes.
    assert huffman_encode(out) == bytes(blob)
    return out


@FUZZ
@given(blob=st.binary(max_size=300), max_count=st.one_of(st.none(), st.integers(0, 10_000)))
def test_huffman_random_bytes(blob, max_count):
    result = _huffman(blob, max_count=max_count)
    if max_count is not None and not isinstance(result, ZooFormatError):
        assert result.size <= max_count


@FUZZ
@given(which=st.integers(0, len(HUFFMAN_STREAMS) - 1), cut=st.integers(0, 1 << 16), flips=flips_strategy)
def test_huffman_truncated_and_flipped(which, cut, flips):
    blob = HUFFMAN_STREAMS[which]
    assert isinstance(_huffman(blob[: cut % len(blob)]), ZooFormatError)
    _huffman(_flip(blob, flips))


@pytest.mark.parametrize(
    "count_bytes",
    [
        bytes([0xFF] * 8 + [0x7F]),  # 2**63 - 1 symbols
        bytes([0x80] * 4 + [0x10]),  # 2**32 symbols
        bytes([0xFF] * 9 + [0x01]),  # does not fit in 64 bits
    ],
)
def test_huffman_huge_symbol_count_is_refused_without_allocating(count_bytes):
    """A zero-bit (single-symbol) stream announcing 2**63 symbols must not try to allocate them."""
    blob = count_bytes + bytes([5, 1, 0b00001000])  # alphabet 5, L = 1, lengths 0,0,0,0,1
    assert "announces" in str(_huffman(blob)) or "64 bits" in str(_huffman(blob))
    assert isinstance(_huffman(blob, max_count=1000), ZooFormatError)


def test_huffman_huge_alphabet_is_refused():
    blob = bytes([3]) + bytes([0xFF, 0xFF, 0xFF, 0x7F]) + bytes([2])  # alphabet 2**28 - 1
    assert "alphabet" in str(_huffman(blob))


# ---------------------------------------------------------------------------------------------- card parser


def _card_dict() -> dict:
    """A valid sealed card, as export writes it (built by hand: no model or dataset needed)."""
    data = {
        "name": "mlp-mnist.hostile",
        "architecture": {"name": "mlp", "kwargs": {"hidden": [8]}},
        "dataset": {"name": "mnist", "split": "test", "num_examples": 10000, "input_shape": [1, 28, 28]},
        "compression": {"methods": ["pruning"], "bits": 32, "layers": {"hidden.0": {"sparsity": 0.5}}},
        "metrics": {"top1": 0.9, "errors": 1000, "num_examples": 10000},
        "params": {"dense": 6370, "nonzero": 3234},
        "macs": {"dense": 6352, "effective": 3216},
        "bytes": {"fp32": 25480, "file": 25600},
        "recipe": {"path": "configs/x.yaml", "sha256": "0" * 64, "command": "lit-compress fit"},
        "versions": {"lit_compress": "0.1", "torch": "2", "lightning": "2", "python": "3.12"},
        "created": "2025-01-01T00:00:00Z",
        "files": [{"path": "model.safetensors", "format": "safetensors", "sha256": "a" * 64, "bytes": 25600}],
        "license": "Apache-2.0",
        "paper": "",
    }
    return Card.from_dict(data, check_seal=False).seal().to_dict()


CARD = _card_dict()
CARD_JSON = json.dumps(CARD, indent=2)
CARD_SOURCE = "/zoo/mlp-mnist.hostile/card.json"


def _parse_card(text: str | bytes, check_seal: bool = True) -> Card | CardValidationError:
    try:
        card = Card.from_json(text, source=CARD_SOURCE, check_seal=check_seal)
    except CardValidationError as err:
        assert CARD_SOURCE in str(err), str(err)
        return err
    assert isinstance(card, Card)
    card.to_json()  # an accepted card serialises and seals without error
    card.seal()
    return card


def test_card_fixture_is_valid():
    assert _parse_card(CARD_JSON).to_dict() == CARD


@FUZZ
@given(text=st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_card_random_text_is_a_clear_error(text):
    assert isinstance(_parse_card(text), CardValidationError)


@FUZZ
@given(cut=st.integers(0, 1 << 16), flips=flips_strategy)
def test_card_truncated_or_flipped_is_a_clear_error(cut, flips):
    raw = CARD_JSON.encode()
    assert isinstance(_parse_card(raw[: cut % len(raw)]), CardValidationError)
    flipped = _flip(raw, flips)
    assume(flipped != raw)
    result = _parse_card(flipped)
    # A flip in insignificant whitespace can leave the same card; anything else breaks the seal.
    assert isinstance(result, CardValidationError) or result.to_dict() == CARD


@FUZZ
@given(data=st.data(), check_seal=st.booleans())
def test_card_hostile_fields_are_a_clear_error(data, check_seal):
    _, edited = data.draw(header_edits(CARD))
    if not check_seal:  # an attacker who re-seals: only the schema validation stands in the way
        edited["card_sha256"] = ""
    result = _parse_card(json.dumps(edited), check_seal=check_seal)
    if isinstance(result, Card):
        assert not check_seal or result.to_dict() == CARD


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 50_000 + "]" * 50_000, "nested|JSON"),
        ('{"a": ' * 50_000 + "1" + "}" * 50_000, "nested|JSON|expected"),
        ("1" * 10_000, "JSON|digits|expected an object"),
        (b"\xff\xfe{}", "UTF-8"),
        ('"\\ud800"', "expected an object"),
    ],
)
def test_card_pathological_json(text, message):
    result = _parse_card(text)
    assert isinstance(result, CardValidationError)
    assert any(m in str(result) for m in message.split("|")), str(result)


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("metrics", "top1"), float("nan"), "finite"),
        (("metrics", "top1"), float("inf"), "finite"),
        (("architecture", "kwargs"), {"x": float("nan")}, "finite"),
        (("paper",), "\ud800", "UTF-8|surrogate"),
        (("files", 0, "path"), "../../../etc/passwd", "relative path inside the entry"),
        (("files", 0, "path"), "/etc/passwd", "relative path inside the entry"),
        (("files", 0, "path"), "", "relative path inside the entry"),
        (("files", 0, "sha256"), "xyz", "64 lowercase hex"),
        (("files", 0, "bytes"), -1, "non-negative"),
        (("architecture", "kwargs"), json.loads("[" * 900 + "]" * 900), "expected an object"),
    ],
)
def test_card_values_a_valid_schema_would_not_hold(path, value, message):
    edited = json.loads(json.dumps(CARD))
    parent = edited
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    for check_seal in (True, False):
        text = json.dumps(edited, ensure_ascii=True)
        result = _parse_card(text, check_seal=check_seal)
        assert isinstance(result, CardValidationError)
        if not check_seal:
            assert any(m in str(result) for m in message.split("|")), str(result)


def test_card_with_deeply_nested_kwargs_is_a_clear_error_not_recursion():
    edited = json.loads(json.dumps(CARD))
    edited["architecture"]["kwargs"] = {"x": json.loads("[" * 950 + "]" * 950)}
    result = _parse_card(json.dumps(edited), check_seal=False)
    assert isinstance(result, CardValidationError) and "nested" in str(result), result


def test_registry_reports_invalid_utf8_card_as_a_card_error(tmp_path):
    entry = tmp_path / "mlp-mnist.hostile"
    entry.mkdir()
    (entry / "card.json").write_bytes(b'{"name": "\xff"}')
    with pytest.raises(CardValidationError, match=r"card\.json"):
        zoo.card("mlp-mnist.hostile", zoo=tmp_path)


# ---------------------------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def hostile_zoo(tmp_path_factory):
    """One entry per codec of a small MLP whose weights exercise every encoding (evaluation stubbed out)."""
    from lit_compress.zoo.card import Metrics

    root = tmp_path_factory.mktemp("hostile-zoo")
    torch.manual_seed(0)
    model = create_model("mlp", hidden=[8])
    with torch.no_grad():
        model.hidden[0].weight.copy_(_binary_rows(8, 784, 5))
        model.hidden[0].weight[:, ::4] = 0
        model.head.weight.copy_(_pruned_grid(10, 8, 5, 0.5, 6))
    entries = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            export_mod, "evaluate_on", lambda *a, **k: Metrics(top1=0.9, errors=1000, num_examples=10000)
        )
        for codec in CODECS:
            name = f"mlp-mnist.hostile-{codec}"
            card = zoo.export(
                model,
                name=name,
                architecture="mlp",
                architecture_kwargs={"hidden": [8]},
                dataset="mnist",
                recipe=None,
                codec=codec,
                zoo=root,
            )
            (weights,) = card.files
            path = root / name / weights.path
            entries[codec] = (card, path, path.read_bytes(), (root / name / "card.json").read_text())
    return root, model, entries


def _load_hostile(root: Path, codec: str, entries, blob: bytes, reseal: bool):
    """Write ``blob`` as the entry's weights (re-sealing the card with its hash when ``reseal``) and load."""
    card, path, original, card_text = entries[codec]
    path.write_bytes(blob)
    if reseal:
        data = card.to_dict()
        data["files"][0].update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob))
        (path.parent / "card.json").write_text(Card.from_dict(data, check_seal=False).seal().to_json())
    else:
        (path.parent / "card.json").write_text(card_text)
    try:
        return zoo.load(card.name, zoo=root)
    except ZooError as err:
        assert str(path) in str(err) or card.name in str(err), str(err)
        return err
    finally:
        path.write_bytes(original)
        (path.parent / "card.json").write_text(card_text)


def test_hostile_zoo_entries_load(hostile_zoo):
    root, model, entries = hostile_zoo
    for codec, (card, *_) in entries.items():
        loaded = zoo.load(card.name, zoo=root)
        assert _same_state(loaded.state_dict(), model.state_dict()), codec
    encodings = {t["encoding"] for t in bp_mod.read_index(entries["bitpacked"][2])["tensors"]}
    assert {"binary_masked", "kbit"} <= encodings


blob_strategy = st.one_of(
    st.tuples(st.just("random"), st.binary(max_size=400)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 20)),
    st.tuples(st.just("flip"), flips_strategy),
)


def _hostile_blob(original: bytes, how: tuple) -> bytes:
    kind, arg = how
    if kind == "random":
        return arg
    if kind == "cut":
        return original[: arg % len(original)]
    return _flip(original, arg)


@pytest.mark.parametrize("codec", CODECS)
@FEW
@given(how=blob_strategy)
def test_loader_refuses_replaced_weights_by_sha256(hostile_zoo, codec, how):
    root, _, entries = hostile_zoo
    blob = _hostile_blob(entries[codec][2], how)
    assume(blob != entries[codec][2])
    result = _load_hostile(root, codec, entries, blob, reseal=False)
    assert isinstance(result, ZooIntegrityError)
    assert "sha256 mismatch" in str(result) and str(entries[codec][1]) in str(result)


@pytest.mark.parametrize("codec", CODECS)
@FEW
@given(how=blob_strategy)
def test_loader_with_resealed_card_relies_on_a_robust_decoder(hostile_zoo, codec, how):
    """The card's hash updated to match the hostile bytes: the decoder and the strict load alone must
    refuse them, or (only for checksum-less safetensors) load tensors of the right names and shapes."""
    root, model, entries = hostile_zoo
    blob = _hostile_blob(entries[codec][2], how)
    assume(blob != entries[codec][2])
    result = _load_hostile(root, codec, entries, blob, reseal=True)
    if isinstance(result, ZooError):
        assert isinstance(result, ZooFormatError), type(result)
        return
    if codec in CHECKSUMMED:
        assert _same_state(result.state_dict(), model.state_dict())
    else:  # a flipped data byte of a safetensors file: only the (here re-sealed) card hash could tell
        assert how[0] == "flip"
        assert {k: v.shape for k, v in result.state_dict().items()} == {
            k: v.shape for k, v in model.state_dict().items()
        }


# ---------------------------------------------------------------------------------------------- pickles


class _Payload:
    """Unpickling this creates the folder ``marker``: proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _evil_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Checkpoints and weight files that carry the payload, in every container torch / pickle writes."""
    marker = tmp_path / "payload-ran"
    payload = _Payload(marker)
    state = {"weight": torch.zeros(2), "evil": payload}
    ckpt = {
        "state_dict": {"net.hidden.0.weight": torch.zeros(8, 784), "evil": payload},
        "hyper_parameters": {"model": "mlp", "model_kwargs": {"hidden": [8]}, "evil": payload},
    }
    files = []
    for name, obj, kwargs in [
        ("zip.pt", state, {}),
        ("legacy.pt", state, {"_use_new_zipfile_serialization": False}),
        ("lightning.ckpt", ckpt, {}),
        ("legacy.ckpt", ckpt, {"_use_new_zipfile_serialization": False}),
        ("zip.pth", payload, {}),
    ]:
        torch.save(obj, tmp_path / name, **kwargs)
        files.append(tmp_path / name)
    for protocol, name in enumerate(
        ("raw.pkl", "raw.ckpt", "pickle.safetensors", "raw.bin", "raw.pt", "r.pth")
    ):
        (tmp_path / name).write_bytes(pickle.dumps(ckpt if "ckpt" in name else state, protocol=protocol))
        files.append(tmp_path / name)
    (tmp_path / "zip.safetensors").write_bytes((tmp_path / "zip.pt").read_bytes())
    files.append(tmp_path / "zip.safetensors")
    assert not marker.exists()
    return marker, files


def test_the_payload_really_runs_when_unpickled_unsafely(tmp_path):
    """Control: the test files are dangerous, so the refusals below mean something."""
    marker, files = _evil_files(tmp_path)
    torch.load(files[0], weights_only=False)
    assert marker.exists()


def test_local_weights_files_never_unpickle(tmp_path):
    from lit_compress.models.weights import load_state_dict_file

    marker, files = _evil_files(tmp_path)
    for path in files:
        with pytest.raises(ValueError, match=str(path.name)) as info:
            load_state_dict_file(path)
        assert "safetensors" in str(info.value)
    assert not marker.exists()


def test_model_registry_weights_argument_never_unpickles(tmp_path):
    marker, files = _evil_files(tmp_path)
    for path in files:
        with pytest.raises(ValueError):
            create_model("mlp", hidden=[8], weights=str(path))
    assert not marker.exists()


def test_init_from_never_unpickles(tmp_path):
    from lit_compress.models import ImageClassifier

    marker, files = _evil_files(tmp_path)
    for path in files:
        with pytest.raises(ValueError, match=path.name):
            ImageClassifier(model="mlp", model_kwargs={"hidden": [8]}, init_from=str(path))
    assert not marker.exists()


def test_lightning_checkpoint_readers_never_unpickle(tmp_path):
    from lit_compress.zoo.from_lightning import network_state_from_checkpoint

    marker, files = _evil_files(tmp_path)
    for path in files:
        with pytest.raises(ValueError, match="weights_only"):
            network_state_from_checkpoint(path)
    assert not marker.exists()


def test_lightning_checkpoint_that_is_not_a_mapping_is_a_clear_error(tmp_path):
    from lit_compress.zoo.from_lightning import network_state_from_checkpoint

    torch.save([torch.zeros(2)], tmp_path / "list.ckpt")  # loads fine with weights_only=True
    with pytest.raises(ValueError, match=r"list\.ckpt"):
        network_state_from_checkpoint(tmp_path / "list.ckpt")


def test_zoo_cli_export_never_unpickles(tmp_path, capsys):
    from lit_compress.zoo.cli import main

    marker, files = _evil_files(tmp_path)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed_everything: 0\n")
    for path in files:
        argv = ["--zoo", str(tmp_path / "zoo"), "export", "--checkpoint", str(path), "--config", str(recipe)]
        assert main([*argv, "--name", "mlp-mnist.evil", "--dataset", "mnist"]) == 2
        assert "weights_only" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "zoo" / "mlp-mnist.evil").exists()


def test_teacher_loader_never_unpickles(tmp_path):
    from lit_compress.distillation.teacher import TeacherLoadError, load_teacher

    marker, files = _evil_files(tmp_path)
    for path in files:
        with pytest.raises(TeacherLoadError):
            load_teacher(str(path))
        with pytest.raises(TeacherLoadError):
            load_teacher({"model": "mlp", "model_kwargs": {"hidden": [8]}, "weights": str(path)})
    assert not marker.exists()


def test_lightning_resume_loader_never_unpickles(tmp_path):
    """``Trainer.fit(ckpt_path=...)`` reads local files through this function with its default
    ``weights_only=None``, which torch >= 2.6 treats as True."""
    from lightning.fabric.utilities.cloud_io import _load

    marker, files = _evil_files(tmp_path)
    for path in files:
        with pytest.raises(Exception, match=r"weights_only|Weights only|invalid load key|Unsupported"):
            _load(path)
    assert not marker.exists()


@pytest.mark.parametrize("codec", CODECS)
def test_zoo_codecs_refuse_pickles_before_decoding(tmp_path, codec):
    marker, files = _evil_files(tmp_path)
    for path in files:
        result = _decode(codec, path.read_bytes())
        assert isinstance(result, ZooFormatError)
    assert not marker.exists()


def test_zoo_load_of_a_resealed_pickle_never_unpickles(hostile_zoo, tmp_path):
    root, _, entries = hostile_zoo
    marker, files = _evil_files(tmp_path)
    for codec in CODECS:
        for path in files:
            result = _load_hostile(root, codec, entries, path.read_bytes(), reseal=True)
            assert isinstance(result, ZooFormatError)
    assert not marker.exists()
