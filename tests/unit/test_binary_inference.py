"""to_binary_inference: trained BNN layers run with xnor + popcount, same outputs as the fake-quantized."""

import pytest
import torch
from torch import nn

from lit_compress.quantization import (
    BinaryConv2d,
    BinaryLinear,
    QuantConv2d,
    QuantLinear,
    binary_inference_plan,
    quantize_module,
    to_binary_inference,
)
from lit_compress.quantization.quantizers import SignQuantizer


def _bnn(padding: int = 0, groups: int = 1) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 8, 3),  # real input: stays float
        nn.BatchNorm2d(8),
        nn.Hardtanh(),
        nn.Conv2d(8, 16, 3, stride=2, padding=padding, groups=groups),
        nn.BatchNorm2d(16),
        nn.Hardtanh(),
        nn.Flatten(),
        nn.LazyLinear(12),
        nn.BatchNorm1d(12),
        nn.Hardtanh(),
        nn.Linear(12, 5),
    )
    net(torch.randn(2, 2, 11, 11))  # materialise the lazy layer
    for i in (3, 7):  # the materialised LazyLinear is a plain nn.Linear now
        net[i] = quantize_module(net[i], SignQuantizer(keep_zeros=True), SignQuantizer())
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_bnn_runs_binary_and_matches_the_fake_quantized_net(backend):
    from lit_compress.quantization.binary_kernel import native_available

    if backend == "native" and not native_available():
        pytest.skip("no C compiler here")
    net = _bnn()
    x = torch.randn(6, 2, 11, 11)
    with torch.no_grad():
        expected = net(x)
    plan = binary_inference_plan(net)
    assert plan == {"3": "binary", "7": "binary"}
    fast = to_binary_inference(net, backend=backend)
    assert isinstance(fast[3], BinaryConv2d) and isinstance(fast[7], BinaryLinear)
    assert not any(isinstance(m, QuantConv2d | QuantLinear) for m in fast.modules())
    with torch.no_grad():
        got = fast(x)
    # xnor sums are exact integers; the float conv sums +-1 products: equal up to float rounding
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_binary_conv_equals_float_conv_of_signs_with_stride_and_dilation():
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 7, (3, 2), stride=(2, 1), dilation=(1, 2), bias=True)
    with torch.no_grad():
        conv.weight.copy_(torch.sign(torch.randn_like(conv.weight)) * torch.rand(7, 1, 1, 1))
    x = torch.randn(3, 5, 13, 12)
    binary = BinaryConv2d.from_conv(conv, backend="torch")
    with torch.no_grad():
        expected = conv(torch.where(x >= 0, 1.0, -1.0))
        torch.testing.assert_close(binary(x), expected, rtol=1e-5, atol=1e-5)


def test_layers_that_cannot_run_binary_are_left_alone_and_say_why():
    net = _bnn(padding=1)
    with torch.no_grad():
        net[7].weight[0, 0] = 0.0  # a pruned weight: the kernel has no zero
    plan = binary_inference_plan(net)
    assert "padding" in plan["3"] and "zeros" in plan["7"]
    fast = to_binary_inference(net, backend="torch")
    assert isinstance(fast[3], QuantConv2d) and isinstance(fast[7], QuantLinear)
    with pytest.raises(ValueError, match="cannot run binary"):
        to_binary_inference(_bnn(groups=2), strict=True)


def test_real_input_layers_are_not_binary():
    layer = quantize_module(nn.Linear(4, 3), SignQuantizer(), None)  # BinaryConnect-style: real inputs
    plan = binary_inference_plan(nn.Sequential(layer))
    assert plan["0"].startswith("input is not binarised")
    assert isinstance(to_binary_inference(nn.Sequential(layer), strict=True)[0], QuantLinear)
    with pytest.raises(ValueError, match=r"BinaryConv2d\.from_conv: grouped"):
        BinaryConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))


def test_zoo_latency_times_binary_layers_on_the_kernel_and_leaves_the_model_alone():
    from lit_compress.zoo.latency import inference_form

    net = _bnn()
    timed = inference_form(net)
    assert isinstance(timed[7], BinaryLinear) and isinstance(net[7], QuantLinear)
    plain = nn.Sequential(nn.Linear(3, 2))
    assert inference_form(plain) is plain
