"""BinaryLinear (xnor + popcount) against the float computation, both backends, and its helpers."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.quantization import binary_kernel as bk
from lit_compress.quantization.binary_kernel import (
    BinaryLinear,
    native_available,
    pack_rows,
    popcount_lut,
    popcount_swar,
    sign_bits,
    xnor_popcount_matmul,
)
from lit_compress.quantization.packing import binarize_for_storage, pack_bits

BACKENDS = [
    "torch",
    pytest.param(
        "native",
        marks=pytest.mark.skipif(not native_available(), reason="no C compiler: native kernel not built"),
    ),
]


def pm1(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0)


def binary_linear(in_f: int, out_f: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(pm1(torch.randn(out_f, in_f, generator=g)) * torch.rand(out_f, 1, generator=g))
        if bias:
            layer.bias.copy_(torch.randn(out_f, generator=g))
    return layer


def reference(x: torch.Tensor, layer: nn.Linear, alpha: torch.Tensor) -> torch.Tensor:
    """The float computation: (sign(x) @ sign(W).T) * alpha + bias (sums of +-1: exact in fp32)."""
    out = (pm1(x) @ pm1(layer.weight.detach()).T) * alpha
    return out + layer.bias.detach() if layer.bias is not None else out


def unpack_rows(words: torch.Tensor, n: int) -> torch.Tensor:
    """+-1 rows from packed words (LSB first), by plain shifting: an independent reading of the layout."""
    shifts = torch.arange(64)
    bits = (words[:, :, None] >> shifts) & 1
    return bits.reshape(words.shape[0], -1)[:, :n].float() * 2 - 1


def test_popcounts_match_python():
    g = torch.Generator().manual_seed(0)
    words = torch.cat(
        [
            torch.randint(-(2**63), 2**63 - 1, (500,), generator=g),
            torch.tensor([0, -1, 1, -(2**63), 2**63 - 1, 0x5555555555555555, -0x5555555555555556]),
        ]
    )
    expected = torch.tensor([bin(int(w) & (2**64 - 1)).count("1") for w in words])
    assert torch.equal(popcount_swar(words), expected)
    assert torch.equal(popcount_lut(words), expected)
    assert torch.equal(popcount_swar(words.view(3, -1)), expected.view(3, -1))


def test_pack_rows_is_the_storage_bit_order_with_zero_padding():
    g = torch.Generator().manual_seed(1)
    bits = torch.rand(3, 130, generator=g) > 0.5
    words = pack_rows(bits)
    assert words.shape == (3, 3) and words.dtype == torch.int64
    for r in range(3):
        row = pack_bits(bits[r], 1)  # 17 bytes, then zero padding up to 24
        assert torch.equal(words[r].view(torch.uint8)[:17], row)
        assert not words[r].view(torch.uint8)[17:].any()
    assert torch.equal(pack_rows(bits, words=5)[:, :3], words) and not pack_rows(bits, words=5)[:, 3:].any()
    with pytest.raises(ValueError, match="need 3 words"):
        pack_rows(bits, words=2)


def test_sign_convention_zero_is_plus_nan_is_minus():
    x = torch.tensor([0.0, -0.0, float("nan"), -1e-30, 2.0])
    assert sign_bits(x).tolist() == [True, True, False, False, True]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_f", [1, 63, 64, 100, 784])
@pytest.mark.parametrize("batch", [1, 7, 256])
def test_binary_linear_equals_float_reference_exactly(backend, in_f, batch):
    layer = binary_linear(in_f, 37, seed=in_f)
    module = BinaryLinear.from_linear(layer, backend=backend)
    alpha = layer.weight.detach().abs().amax(dim=1)
    assert torch.equal(module.scale, alpha)
    x = torch.randn(batch, in_f, generator=torch.Generator().manual_seed(batch))
    x[0, 0] = 0.0  # sign(0) = +1 on both sides
    with torch.inference_mode():
        out = module(x)
    assert out.dtype == torch.float32 and out.shape == (batch, 37)
    assert torch.equal(out, reference(x, layer, alpha))
    # and it is the binary Linear's own output, up to float summation order
    expected = F.linear(pm1(x), layer.weight.detach(), layer.bias.detach())
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-4)  # (assert_close's first call imports for 1 s)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_bits_do_not_count(backend):
    # every input and weight bit is 0 (all -1): a counted padding bit would move the result off 65
    layer = nn.Linear(65, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(-0.5)
    module = BinaryLinear.from_linear(layer, backend=backend)
    out = module(-torch.ones(3, 65))
    assert torch.equal(out, torch.full((3, 2), 65 * 0.5))
    assert torch.equal(module(torch.ones(1, 65)), torch.full((1, 2), -65 * 0.5))


@pytest.mark.skipif(not native_available(), reason="no C compiler: native kernel not built")
def test_native_and_torch_backends_agree_on_raw_words():
    g = torch.Generator().manual_seed(3)
    for batch, out_f, words in [(1, 5, 1), (5, 3, 7), (9, 4, 40), (6, 2, 64)]:
        n = 64 * words - 11
        x = pack_rows(torch.rand(batch, n, generator=g) > 0.5)
        w = pack_rows(torch.rand(out_f, n, generator=g) > 0.5)
        a = xnor_popcount_matmul(x, w, n, backend="native")
        b = xnor_popcount_matmul(x, w, n, backend="torch")
        assert torch.equal(a, b)
        assert torch.equal(a, (unpack_rows(x, n) @ unpack_rows(w, n).T).long())


def test_auto_falls_back_to_torch_and_native_says_why(monkeypatch):
    monkeypatch.setattr(bk, "_native_lib", False)  # as if no compiler were found
    layer = binary_linear(70, 4)
    module = BinaryLinear.from_linear(layer)  # auto
    x = torch.randn(2, 70)
    assert torch.equal(module(x), reference(x, layer, module.scale))
    with pytest.raises(RuntimeError, match="needs a C compiler"):
        BinaryLinear.from_linear(layer, backend="native")(x)


def test_from_linear_with_latent_weights_and_given_scales():
    g = torch.Generator().manual_seed(4)
    layer = nn.Linear(50, 6)
    alpha = layer.weight.detach().abs().mean(dim=1)  # XNOR-Net's alpha
    module = BinaryLinear.from_linear(layer, scales=alpha)
    x = torch.randn(5, 50, generator=g)
    assert torch.equal(module(x), reference(x, layer, alpha))
    assert torch.equal(module.dequantized_weight(), pm1(layer.weight.detach()) * alpha[:, None])
    shared = BinaryLinear.from_linear(layer, scales=0.25)
    assert torch.equal(shared.scale, torch.full((6,), 0.25))
    with pytest.raises(ValueError, match="is not binary"):
        BinaryLinear.from_linear(layer)  # real-valued weights and no scales
    with pytest.raises(ValueError, match="6 finite floats"):
        BinaryLinear.from_linear(layer, scales=torch.ones(5))


def test_from_packed_storage_matches_from_linear_and_state_dict_round_trips():
    layer = binary_linear(100, 9, seed=5)
    signs, scales = binarize_for_storage(layer.weight.detach(), name="fc")
    packed = BinaryLinear.from_packed(signs, scales, 100, bias=layer.bias)
    direct = BinaryLinear.from_linear(layer)
    assert torch.equal(packed.weight_words, direct.weight_words)
    x = torch.randn(2, 3, 100)  # leading dims are kept
    assert torch.equal(packed(x), direct(x)) and packed(x).shape == (2, 3, 9)
    fresh = BinaryLinear(100, 9)
    fresh.load_state_dict(direct.state_dict())
    assert torch.equal(fresh(x), direct(x))
    assert torch.equal(direct.weight_signs(), pm1(layer.weight.detach()))


def test_no_bias_and_bad_input():
    layer = binary_linear(20, 3, bias=False)
    module = BinaryLinear.from_linear(layer)
    x = torch.randn(4, 20)
    assert module.bias is None and torch.equal(module(x), reference(x, layer, module.scale))
    with pytest.raises(ValueError, match=r"expected input \[..., 20\]"):
        module(torch.randn(4, 21))
    with pytest.raises(ValueError, match="backend must be one of"):
        BinaryLinear(20, 3, backend="cuda")
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        BinaryLinear(0, 3)
