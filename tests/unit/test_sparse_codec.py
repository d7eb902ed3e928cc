"""The sparse-safetensors codec: bit-exact round trips, real size reduction, corrupt files refused."""

import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from lit_compress.zoo import ZooFormatError, get_codec

CODEC = get_codec("sparse-safetensors")


def pruned_state(sparsity=0.9, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 32, generator=g)
    w[torch.rand(w.shape, generator=g) < sparsity] = 0.0
    return {
        "fc.weight": w,
        "fc.bias": torch.randn(64, generator=g),  # dense: stays dense
        "conv.weight": torch.zeros(8, 3, 3, 3).half(),  # all zero, fp16
        "steps": torch.tensor([3, 0, 7]),  # integer buffer: never sparse
    }


def test_round_trip_is_bit_exact_and_keeps_order():
    state = pruned_state()
    state["fc.weight"][0, 0] = -0.0  # a negative zero must survive as such
    state["fc.weight"][0, 1] = float("nan")
    decoded = CODEC.decode(CODEC.encode(state, {}), source="x")
    assert list(decoded) == list(state)
    for name, t in state.items():
        assert decoded[name].dtype == t.dtype and decoded[name].shape == t.shape
        assert decoded[name].numpy().tobytes() == t.numpy().tobytes(), name


def test_sparse_file_is_really_smaller():
    state = pruned_state(sparsity=0.92)
    dense = len(get_codec("safetensors").encode(state, {}))
    sparse = len(CODEC.encode(state, {}))
    nnz = int((state["fc.weight"] != 0).sum())
    expected_fc = 64 * 32 // 8 + 4 * nnz  # bitmask + values
    assert sparse < dense / 3
    stored = st_load(CODEC.encode(state, {}))
    assert stored["fc.weight::mask"].numel() + 4 * stored["fc.weight::values"].numel() == expected_fc
    assert "fc.bias" in stored  # a dense tensor is not inflated by a mask


def _tamper(blob: bytes, edit) -> bytes:
    header_len = int.from_bytes(blob[:8], "little")
    metadata = json.loads(blob[8 : 8 + header_len])["__metadata__"]
    tensors = st_load(blob)
    edit(tensors, metadata)
    return st_save(tensors, metadata=metadata)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, m: t.update({"fc.weight::values": t["fc.weight::values"][:-1]}), "ones for"),
        (lambda t, m: t.pop("fc.weight::mask"), "is incomplete"),
        (lambda t, m: t.update({"fc.weight::mask": t["fc.weight::mask"][:-1]}), "wrong size"),
        (lambda t, m: m.pop("sparse"), "no 'sparse' metadata"),
        (lambda t, m: m.update(sparse="{"), "not JSON"),
        (lambda t, m: m.update(sparse=json.dumps({})), "not described in the sparse metadata"),
        (
            lambda t, m: m.update(sparse=json.dumps({"fc.weight": {"shape": [64, 32], "dtype": "nonsense"}})),
            "is incomplete",
        ),
    ],
)
def test_corrupt_sparse_files_are_clear_errors(edit, message):
    blob = _tamper(CODEC.encode(pruned_state(), {}), edit)
    with pytest.raises(ZooFormatError, match=message):
        CODEC.decode(blob, source="bad")


def test_pickle_is_refused_by_the_sparse_codec_too():
    import pickle

    with pytest.raises(ZooFormatError, match="refusing a pickle"):
        CODEC.decode(pickle.dumps({"a": 1}), source="evil")
