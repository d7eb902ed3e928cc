"""Straight-through estimators and quantizers against hand-written forward and gradient formulas."""

from __future__ import annotations

import pytest
import torch

from lit_compress.quantization import get_quantizer, list_quantizers
from lit_compress.quantization.quantizers import (
    BinaryQuantizer,
    DoReFaActivationQuantizer,
    DoReFaWeightQuantizer,
    Quantizer,
    register_quantizer,
)
from lit_compress.quantization.ste import (
    BinaryConnectDeterministic,
    BinaryConnectStochastic,
    RoundSTE,
    SignSTE,
    XnorWeightSTE,
    dorefa_activation,
    dorefa_weight,
)

X = torch.tensor([-2.0, -1.0, -0.5, -0.0, 0.0, 0.3, 1.0, 1.5])
G = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])  # distinct upstream gradients


def forward_backward(fn, x, grad=None):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(G[: y.numel()].view_as(y) if grad is None else grad)
    return y.detach(), x.grad


def test_sign_ste_forward_and_hardtanh_gradient():
    y, g = forward_backward(SignSTE.apply, X)
    assert torch.equal(y, torch.tensor([-1.0, -1, -1, 1, 1, 1, 1, 1]))  # sign(0) = sign(-0) = +1
    assert SignSTE.apply(torch.tensor([float("nan")])).item() == -1  # as the xnor/popcount kernel
    # dL/dx = dL/dy * 1{|x| <= 1}: cancelled at -2 and 1.5, kept at the boundary |x| = 1.
    assert torch.equal(g, torch.tensor([0.0, 2, 3, 4, 5, 6, 7, 0]))


def test_binaryconnect_deterministic_identity_gradient():
    y, g = forward_backward(BinaryConnectDeterministic.apply, X)
    assert torch.equal(y, torch.tensor([-1.0, -1, -1, 1, 1, 1, 1, 1]))
    assert torch.equal(g, G)


def test_binaryconnect_stochastic_frequency_matches_hard_sigmoid_and_is_seeded():
    w = torch.tensor([-1.5, -1.0, -0.6, 0.0, 0.2, 0.9, 1.0, 3.0])
    generator = torch.Generator().manual_seed(123)
    draws = torch.stack([BinaryConnectStochastic.apply(w, generator) for _ in range(4000)])
    assert set(draws.unique().tolist()) == {-1.0, 1.0}
    frequency = (draws == 1).float().mean(0)
    expected = ((w + 1) / 2).clamp(0, 1)  # hard_sigmoid
    torch.testing.assert_close(frequency, expected, atol=0.03, rtol=0)
    assert frequency[0] == 0 and frequency[1] == 0 and frequency[-2] == 1 and frequency[-1] == 1
    # The same generator state gives the same draws; the gradient is the identity.
    a = BinaryConnectStochastic.apply(w.repeat(50), torch.Generator().manual_seed(7))
    b = BinaryConnectStochastic.apply(w.repeat(50), torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    _, g = forward_backward(lambda x: BinaryConnectStochastic.apply(x, generator), X)
    assert torch.equal(g, G)


def test_round_ste():
    y, g = forward_backward(RoundSTE.apply, torch.tensor([0.4, 0.5, 1.5, 2.6, -0.6]))
    assert torch.equal(y, torch.tensor([0.0, 0.0, 2.0, 3.0, -1.0]))  # half to even
    assert torch.equal(g, G[:5])


def test_xnor_weight_forward_and_paper_gradient():
    w = torch.tensor([[0.5, -1.5, 0.25, -0.75], [2.0, 0.0, -1.0, 0.5]])
    grad = torch.arange(1.0, 9.0).view(2, 4)
    y, g = forward_backward(lambda x: XnorWeightSTE.apply(x, False), w, grad)
    alpha = torch.tensor([[3.0 / 4], [3.5 / 4]])  # mean |W| per output channel
    sign = torch.tensor([[1.0, -1, 1, -1], [1, 1, -1, 1]])
    assert torch.equal(y, sign * alpha)
    expected = grad * (1 / 4 + alpha * (w.abs() <= 1).float())  # (1/n + alpha 1{|W|<=1}) * grad
    torch.testing.assert_close(g, expected)


def test_xnor_weight_keep_zeros_scales_over_nonzero_weights():
    w = torch.tensor([[0.5, 0.0, -1.0, 0.0]])
    grad = torch.ones(1, 4)
    y, g = forward_backward(lambda x: XnorWeightSTE.apply(x, True), w, grad)
    assert torch.equal(y, torch.tensor([[0.75, 0.0, -0.75, 0.0]]))  # alpha = 1.5 / 2 kept weights
    torch.testing.assert_close(g, torch.tensor([[0.5 + 0.75, 0.0, 0.5 + 0.75, 0.0]]))
    with pytest.raises(ValueError, match=r"output-channel dim.*shape \(4,\)"):
        XnorWeightSTE.apply(torch.ones(4), True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dorefa_weight_forward_and_gradient(bits):
    torch.manual_seed(bits)
    w = torch.randn(5, 7)
    grad = torch.randn(5, 7)
    y, g = forward_backward(lambda x: dorefa_weight(x, bits), w, grad)
    n = 2**bits - 1
    t = torch.tanh(w)
    m = t.abs().max()
    assert torch.equal(y, 2 * torch.round((t / (2 * m) + 0.5) * n) / n - 1)
    levels = torch.round((y + 1) / 2 * n)
    torch.testing.assert_close((y + 1) / 2 * n, levels)  # on the k-bit grid
    assert y.abs().max() == 1  # the largest |tanh w| reaches an end of the grid
    # d w_q / d w_i = (1 - tanh^2 w_i) / M, plus the max's term at its argmax:
    # -sign(t_k)(1 - tanh^2 w_k) * sum_j g_j t_j / M^2 (round is straight-through).
    expected = grad * (1 - t**2) / m
    k = t.abs().argmax()
    flat = expected.view(-1)
    flat[k] -= torch.sign(t.view(-1)[k]) * (1 - t.view(-1)[k] ** 2) * (grad * t).sum() / m**2
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_dorefa_activation_forward_and_clip_gradient(bits):
    a = torch.tensor([-0.5, 0.0, 0.1, 0.33, 0.5, 0.9, 1.0, 1.7])
    y, g = forward_backward(lambda x: dorefa_activation(x, bits), a)
    n = 2**bits - 1
    assert torch.equal(y, torch.round(a.clamp(0, 1) * n) / n)
    inside = ((a >= 0) & (a <= 1)).float()
    assert torch.equal(g, G * inside)


def test_dorefa_one_bit_weight_is_scaled_sign_with_identity_gradient():
    w = torch.tensor([[0.2, -0.6], [0.0, 1.4]])
    q = DoReFaWeightQuantizer(bits=1, keep_zeros=False)
    y, g = forward_backward(q, w, torch.ones(2, 2))
    e = w.abs().mean()
    assert torch.equal(y, torch.tensor([[1.0, -1], [1, 1]]) * e)
    assert torch.equal(g, torch.ones(2, 2))
    assert q.sign_binary and q.bits == 1


def test_binary_quantizers_keep_pruned_zeros_and_clip_ranges():
    w = torch.tensor([[0.3, 0.0, -0.2], [0.0, -0.0, 0.9]])
    nonzero = w != 0
    for spec in ("binary", {"name": "sign", "args": {"keep_zeros": True}}, "xnor_weight"):
        q = get_quantizer(spec)
        out = q(w)
        assert torch.all(out[~nonzero] == 0) and torch.all(out[nonzero] != 0), spec
    assert torch.equal(get_quantizer("sign")(w), torch.tensor([[1.0, 1, -1], [1, 1, 1]]))  # activations
    assert get_quantizer("binary").clip_latent == (-1.0, 1.0) and get_quantizer("sign").clip_latent == (-1, 1)
    assert get_quantizer("xnor_weight").clip_latent is None and get_quantizer("identity").clip_latent is None


def test_stochastic_quantizer_samples_only_in_training():
    q = BinaryQuantizer(mode="stochastic", seed=3)
    w = torch.full((1000,), 0.5)  # P(+1) = 0.75
    eval_out = q(w, training=False)
    assert torch.equal(eval_out, torch.ones(1000))  # deterministic sign in eval
    train_out = q(w, training=True)
    assert 0.7 < (train_out == 1).float().mean() < 0.8
    again = BinaryQuantizer(mode="stochastic", seed=3)(w, training=True)
    assert torch.equal(train_out, again)  # the seed fixes the draws


@pytest.mark.parametrize(
    "name, bits",
    [("identity", 32), ("binary", 1), ("sign", 1), ("xnor_weight", 1), ("xnor_activation", 1)],
)
def test_bits_and_spec_round_trip(name, bits):
    q = get_quantizer(name)
    assert q.bits == bits and q.name == name
    assert get_quantizer(q.to_spec()) == q
    assert get_quantizer(q.to_spec()).to_spec() == q.to_spec()


def test_dorefa_specs_round_trip_and_yaml_style_dicts():
    q = get_quantizer({"class_path": "dorefa_activation", "init_args": {"bits": 3}})
    assert isinstance(q, DoReFaActivationQuantizer) and q.bits == 3
    assert q.to_spec() == {"name": "dorefa_activation", "args": {"bits": 3}}
    path = get_quantizer("lit_compress.quantization.quantizers.DoReFaWeightQuantizer", bits=5)
    assert path == DoReFaWeightQuantizer(bits=5)


@pytest.mark.parametrize("name", ["dorefa_weight", "dorefa_activation"])
@pytest.mark.parametrize("bits", [0, 9, 16, 2.5, True])
def test_bits_out_of_range_name_value_and_range(name, bits):
    if name == "dorefa_weight" and bits is True:
        bits = -1  # bool True would read as 1 (binary DoReFa) in a range message; test another value
    with pytest.raises(ValueError, match=rf"{name}: bits must be an int in 2\.\.8.*got {bits!r}"):
        get_quantizer(name, bits=bits)
    if name == "dorefa_activation":
        with pytest.raises(ValueError, match=r"in 2\.\.8, got 1"):
            get_quantizer(name, bits=1)


def test_registry_errors_and_custom_quantizer():
    with pytest.raises(ValueError, match=r"unknown quantizer 'dorefa'.*Did you mean 'dorefa_weight'"):
        get_quantizer("dorefa")
    with pytest.raises(ValueError, match="mode must be one of"):
        get_quantizer("binary", mode="random")
    with pytest.raises(TypeError, match=r"quantizer 'sign'.*its arguments are \['keep_zeros'\]"):
        get_quantizer("sign", bits=2)
    with pytest.raises(ValueError, match="needs 'name'"):
        get_quantizer({"bits": 2})
    with pytest.raises(ValueError, match="ready quantizer instance"):
        get_quantizer(BinaryQuantizer(), mode="stochastic")

    @register_quantizer("test_halve")
    class Halve(Quantizer):
        def __call__(self, x, training=False):
            return x / 2

    assert "test_halve" in list_quantizers()
    assert torch.equal(get_quantizer("test_halve")(torch.ones(2)), torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="already registered"):
        register_quantizer("test_halve")(BinaryQuantizer)


def test_stochastic_quantizer_pickles_with_its_generator_state():
    import pickle

    q = BinaryQuantizer(mode="stochastic", seed=11)
    w = torch.zeros(64) + 0.1
    q(w, training=True)  # advance the generator
    clone = pickle.loads(pickle.dumps(q))
    assert clone == q and clone.generator is not q.generator
    assert torch.equal(clone(w, training=True), q(w, training=True))  # continues the same stream
