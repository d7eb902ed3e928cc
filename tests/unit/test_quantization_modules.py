"""QuantLinear / QuantConv2d: same parameters and state_dict keys; forward on quantized weight and input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.quantization import (
    IdentityQuantizer,
    QuantConv2d,
    QuantLinear,
    apply_quantization_spec,
    bake_quantized_weights,
    get_quantizer,
    is_quantized,
    quantization_spec,
    quantize_module,
)


def test_from_float_shares_parameters_and_keeps_keys():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    keys = list(linear.state_dict())
    q = QuantLinear.from_float(linear, "binary", "sign")
    assert isinstance(q, nn.Linear) and is_quantized(q)
    assert q.weight is linear.weight and q.bias is linear.bias
    assert list(q.state_dict()) == keys
    assert "weight_quantizer" not in dict(q.named_parameters()) and len(list(q.parameters())) == 2
    back = q.to_float()
    assert type(back) is nn.Linear and back.weight is linear.weight
    assert not hasattr(back, "weight_quantizer")


def test_linear_forward_uses_quantized_weight_and_input():
    torch.manual_seed(0)
    linear = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    q = quantize_module(linear, "binary", "sign")
    expected = F.linear(
        torch.where(x >= 0, 1.0, -1.0), torch.where(linear.weight >= 0, 1.0, -1.0), linear.bias
    )
    torch.testing.assert_close(q(x), expected)
    assert torch.equal(q.quantized_weight(), torch.where(linear.weight >= 0, 1.0, -1.0))


def test_grouped_strided_conv_matches_reference():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, padding_mode="reflect")
    x = torch.randn(2, 4, 7, 7)
    q = QuantConv2d.from_float(conv, "xnor_weight", {"name": "dorefa_activation", "args": {"bits": 2}})
    w = conv.weight.detach()
    alpha = w.abs().mean(dim=(1, 2, 3), keepdim=True)
    wq = torch.where(w >= 0, 1.0, -1.0) * alpha
    xq = torch.round(x.clamp(0, 1) * 3) / 3
    expected = F.conv2d(F.pad(xq, (1, 1, 1, 1), mode="reflect"), wq, conv.bias, stride=2, groups=2)
    torch.testing.assert_close(q(x), expected)


def test_optimizer_created_before_the_swap_updates_the_quantized_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model[0] = quantize_module(model[0], "binary")
    before = model[0].weight.detach().clone()
    x = torch.randn(4, 5)
    y = model(x)
    y.pow(2).sum().backward()
    optimizer.step()
    # The optimizer's params are the layer's params, and with the identity STE the latent weight moved by
    # exactly -lr * dL/dw_b, dL/dw_b = 2 y^T x.
    torch.testing.assert_close(model[0].weight.detach(), before - 0.1 * 2 * y.detach().T @ x)


def test_hooks_registered_before_the_swap_still_fire():
    linear = nn.Linear(3, 2)
    seen = []
    handle = linear.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    q = quantize_module(linear, "binary")
    q(torch.randn(1, 3))
    assert seen == [torch.Size([1, 2])]
    handle.remove()
    q(torch.randn(1, 3))
    assert len(seen) == 1


def test_train_and_eval_modes_for_stochastic_weights():
    torch.manual_seed(0)
    linear = nn.Linear(64, 64)
    q = quantize_module(linear, {"name": "binary", "args": {"mode": "stochastic", "seed": 1}})
    x = torch.randn(2, 64)
    q.eval()
    torch.testing.assert_close(q(x), F.linear(x, torch.where(linear.weight >= 0, 1.0, -1.0), linear.bias))
    q.train()
    assert not torch.allclose(q(x), q(x))  # a fresh draw per forward while training


@pytest.mark.parametrize(
    "module",
    [nn.Conv1d(2, 2, 3), nn.ConvTranspose2d(2, 2, 3), nn.Conv3d(2, 2, 3), nn.Bilinear(2, 2, 2)],
)
def test_unsupported_layers_are_refused_by_type_name(module):
    with pytest.raises(
        TypeError, match=rf"cannot quantize a {type(module).__name__}.*nn.Linear and nn.Conv2d"
    ):
        quantize_module(module, "binary")


def test_subclasses_with_their_own_forward_and_double_quantization_are_refused():
    class MyConv(nn.Conv2d):
        pass

    with pytest.raises(TypeError, match="cannot quantize a MyConv"):
        quantize_module(MyConv(1, 1, 1), "binary")
    with pytest.raises(TypeError, match="expects exactly Linear, got Conv2d"):
        QuantLinear.from_float(nn.Conv2d(1, 1, 1))
    q = quantize_module(nn.Linear(2, 2), "binary")
    with pytest.raises(TypeError, match="already quantized"):
        quantize_module(q, "sign")


def test_spec_round_trip_rebuilds_the_same_quantized_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    net[0] = quantize_module(net[0], {"name": "dorefa_weight", "args": {"bits": 3}})
    net[3] = quantize_module(net[3], "xnor_weight", "xnor_activation")
    spec = json.loads(json.dumps(quantization_spec(net)))  # plain JSON data
    assert set(spec) == {"0", "3"}
    rebuilt = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    rebuilt.load_state_dict(net.state_dict())
    apply_quantization_spec(rebuilt, spec)
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(rebuilt(x), net(x))
    assert rebuilt[3].weight_quantizer == get_quantizer("xnor_weight")
    with pytest.raises(ValueError, match="names layer 'fc'"):
        apply_quantization_spec(rebuilt, {"fc": {"weight": "binary"}})


def test_bake_quantized_weights_keeps_output_and_makes_weight_only_layers_plain():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    net[0] = quantize_module(net[0], "binary")
    net[2] = quantize_module(net[2], "xnor_weight", "xnor_activation")
    net.eval()
    x = torch.randn(5, 8)
    expected = net(x)
    baked = bake_quantized_weights(net)
    assert type(baked[0]) is nn.Linear  # weight-only: plain layer holding +-1
    assert set(baked[0].weight.unique().tolist()) == {-1.0, 1.0}
    assert isinstance(baked[2], QuantLinear) and isinstance(baked[2].weight_quantizer, IdentityQuantizer)
    torch.testing.assert_close(baked(x), expected)
    plain = bake_quantized_weights(baked, keep_input_quantizers=False)
    assert not any(is_quantized(m) for m in plain.modules())
