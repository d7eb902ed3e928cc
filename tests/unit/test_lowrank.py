"""Low-rank factorization: exactness at full rank, Eckart-Young truncation, rank selection, counts, specs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from lit_compress.factorization import (
    LowRankConv2d,
    LowRankLinear,
    apply_factorization,
    dense_reference,
    factorization_spec,
    factorize,
    factorized_weight_count,
    layer_matrix,
    max_rank,
    rank_for_budget,
    rank_for_energy,
    singular_values,
    verify_spec,
)
from lit_compress.measure.macs import count_macs
from lit_compress.models.lenet import LeNet5, LeNet300100
from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.structure import apply_structure


def _composed_linear(pair: LowRankLinear) -> torch.Tensor:
    return pair[1].weight @ pair[0].weight


CONVS = [
    dict(),
    dict(stride=2, padding=1, dilation=2),
    dict(padding=2, padding_mode="reflect"),
    dict(padding="same"),
    dict(padding=(1, 2), stride=(1, 2), bias=False),
]


def test_linear_at_full_rank_reproduces_the_layer():
    torch.manual_seed(0)
    layer = nn.Linear(20, 12)
    pair = factorize(layer, 12)
    assert isinstance(pair, LowRankLinear) and isinstance(pair, nn.Sequential)
    assert [type(m) for m in pair] == [nn.Linear, nn.Linear]
    assert pair[0].bias is None and torch.equal(pair[1].bias, layer.bias)
    x = torch.randn(7, 20)
    torch.testing.assert_close(pair(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("kwargs", CONVS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()) or "plain")
def test_conv_at_full_rank_reproduces_the_layer(scheme, kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, (3, 5), **kwargs)
    pair = factorize(conv, max_rank(conv, scheme), scheme)
    assert isinstance(pair, LowRankConv2d) and [type(m) for m in pair] == [nn.Conv2d, nn.Conv2d]
    x = torch.randn(2, 3, 11, 13)
    torch.testing.assert_close(pair(x), conv(x), rtol=1e-5, atol=1e-5)


def test_channel_scheme_shapes():
    conv = nn.Conv2d(4, 10, 3, stride=2, padding=1)
    pair = factorize(conv, 5, "channel")
    assert pair[0].weight.shape == (5, 4, 3, 3) and pair[0].stride == (2, 2) and pair[0].bias is None
    assert pair[1].weight.shape == (10, 5, 1, 1) and pair[1].stride == (1, 1)


def test_spatial_scheme_shapes():
    conv = nn.Conv2d(4, 10, (3, 5), stride=(2, 3), padding=(1, 2), dilation=(1, 2))
    pair = factorize(conv, 6, "spatial")
    first, second = pair
    assert first.weight.shape == (6, 4, 3, 1) and second.weight.shape == (10, 6, 1, 5)
    assert (first.stride, first.padding, first.dilation) == ((2, 1), (1, 0), (1, 1))
    assert (second.stride, second.padding, second.dilation) == ((1, 3), (0, 2), (1, 2))


def test_truncation_is_the_best_rank_k_approximation():
    """Eckart-Young against numpy's SVD: the composed weight is U_K S_K V_K^T, the error sum_{i>=K} s_i^2."""
    torch.manual_seed(1)
    layer = nn.Linear(30, 16)
    w = layer.weight.detach().double().numpy()
    u, s, vh = np.linalg.svd(w, full_matrices=False)
    for k in (1, 4, 9):
        pair = factorize(layer, k)
        reference = (u[:, :k] * s[:k]) @ vh[:k]
        composed = _composed_linear(pair).detach().double().numpy()
        np.testing.assert_allclose(composed, reference, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(((w - composed) ** 2).sum(), (s[k:] ** 2).sum(), rtol=1e-3)
        # sqrt(S) on both sides: the two factors have the same Frobenius norm.
        torch.testing.assert_close(pair[0].weight.norm(), pair[1].weight.norm(), rtol=1e-5, atol=0)


def test_spatial_truncation_matches_the_reshaped_matrix_svd():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, bias=False)
    w = conv.weight.detach().double()
    matrix = w.permute(1, 2, 0, 3).reshape(9, 12).numpy()  # [(c, i), (n, j)]
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    reference = (u[:, :2] * s[:2]) @ vh[:2]
    pair = factorize(conv, 2, "spatial")
    v, h = pair[0].weight.detach().double(), pair[1].weight.detach().double()  # [K,C,3,1], [N,K,1,3]
    kernel = torch.einsum("kci,nkj->ncij", v[..., 0], h[:, :, 0])
    np.testing.assert_allclose(kernel.permute(1, 2, 0, 3).reshape(9, 12).numpy(), reference, atol=1e-5)
    np.testing.assert_allclose(layer_matrix(conv, "spatial").double().numpy(), matrix)


def _matrix_with_singular_values(values, rows=8, cols=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    s = torch.zeros(rows, cols, dtype=torch.float64)
    for i, v in enumerate(values):
        s[i, i] = v
    return q1 @ s @ q2.T


@pytest.mark.parametrize(
    "energy, expected",
    [(0.5, 1), (16 / 30, 1), (0.54, 2), (25 / 30, 2), (0.84, 3), (29 / 30, 3), (0.97, 4), (1.0, 4)],
)
def test_energy_threshold_picks_the_smallest_sufficient_rank(energy, expected):
    # s^2 = 16, 9, 4, 1 (total 30): cumulative fractions 16/30, 25/30, 29/30, 1 -- thresholds hit exactly.
    values = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    assert rank_for_energy(values, energy) == expected


@pytest.mark.parametrize("energy, expected", [(0.5, 1), (0.6, 2), (0.9, 3), (0.99, 4)])
def test_energy_of_a_constructed_layer(energy, expected):
    layer = nn.Linear(6, 8, bias=False)  # an 8 x 6 weight with singular values 4, 3, 2, 1, 0, 0
    with torch.no_grad():
        layer.weight.copy_(_matrix_with_singular_values([4.0, 3.0, 2.0, 1.0]).float())
    values = singular_values(layer)
    reference = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(values, reference, atol=1e-5, rtol=0)
    assert rank_for_energy(values, energy) == expected


def test_energy_rejects_values_outside_the_unit_interval():
    for bad in (0.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=r"energy must be a number in \(0, 1\]"):
            rank_for_energy(torch.ones(3), bad)


def test_param_budget_gives_the_largest_rank_that_fits():
    fc1 = nn.Linear(784, 300)
    assert rank_for_budget(fc1, 0.25) == 54  # floor(0.25 * 235200 / 1084) = floor(54.24)
    assert factorized_weight_count(fc1, 54) <= 0.25 * 235200 < factorized_weight_count(fc1, 55)
    conv = nn.Conv2d(20, 50, 5)  # channel: 50 x 500; spatial: 100 x 250
    assert rank_for_budget(conv, 0.5, "channel") == 22  # floor(0.5 * 25000 / 550) = 22.7
    assert rank_for_budget(conv, 0.5, "spatial") == 35  # floor(0.5 * 25000 / 350) = 35.7
    with pytest.raises(ValueError, match=r"param_budget 0.01 for fc3 .*allows no rank.*exclude fc3"):
        rank_for_budget(nn.Linear(100, 10), 0.01, name="fc3")
    with pytest.raises(ValueError, match=r"param_budget must be a number in \(0, 1\)"):
        rank_for_budget(fc1, 1.0)


def test_params_and_macs_match_the_formulas():
    torch.manual_seed(0)
    net = LeNet300100()
    k1, k2 = 40, 20
    net.fc1, net.fc2 = factorize(net.fc1, k1), factorize(net.fc2, k2)
    params = sum(p.numel() for p in net.parameters())
    assert params == k1 * (784 + 300) + 300 + k2 * (300 + 100) + 100 + 100 * 10 + 10
    macs = count_macs(net, input_shape=[1, 28, 28])
    assert macs.dense == k1 * (784 + 300) + k2 * (300 + 100) + 100 * 10
    assert {layer.name for layer in macs.layers} == {"fc1.0", "fc1.1", "fc2.0", "fc2.1", "fc3"}


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_conv_macs_match_the_formulas(scheme):
    conv = nn.Conv2d(20, 50, 5)  # LeNet-5 conv2 on a 12 x 12 map: 8 x 8 outputs
    pair = factorize(conv, 10, scheme)
    macs = count_macs(pair, input_shape=[20, 12, 12]).dense
    if scheme == "channel":  # k x k conv to K channels, then 1 x 1, both at 8 x 8
        assert macs == 64 * 10 * (20 * 25 + 50)
    else:  # vertical 5 x 1 at 8 x 12, horizontal 1 x 5 at 8 x 8
        assert macs == 8 * 12 * 10 * 20 * 5 + 64 * 50 * 10 * 5
    assert factorized_weight_count(conv, 10, scheme) == sum(p.numel() for p in pair.parameters()) - 50


def test_rank_above_the_bound_names_the_layer_and_the_bound():
    with pytest.raises(ValueError, match=r"rank 301 for net.fc1 exceeds its maximum rank 300.*300 x 784"):
        factorize(nn.Linear(784, 300), 301, name="net.fc1")
    with pytest.raises(ValueError, match=r"rank 51 for conv2 exceeds its maximum rank 50"):
        factorize(nn.Conv2d(20, 50, 5), 51, name="conv2")
    with pytest.raises(ValueError, match=r"rank must be a positive int, got 0"):
        factorize(nn.Linear(4, 4), 0)


def test_grouped_convolutions_and_other_layers_are_refused():
    with pytest.raises(ValueError, match=r"dw is a grouped convolution \(groups=4\).*exclude it"):
        factorize(nn.Conv2d(4, 4, 3, groups=4), 2, name="dw")
    with pytest.raises(TypeError, match=r"bn is a BatchNorm2d; .*nn.Linear and nn.Conv2d only"):
        factorize(nn.BatchNorm2d(4), 2, name="bn")
    with pytest.raises(ValueError, match=r"conv scheme must be one of"):
        factorize(nn.Conv2d(4, 4, 3), 2, "depth")


def test_gradients_flow_and_requires_grad_is_kept():
    layer = nn.Linear(8, 6)
    layer.weight.requires_grad_(False)
    pair = factorize(layer, 3)
    assert not pair[0].weight.requires_grad and not pair[1].weight.requires_grad
    assert pair[1].bias.requires_grad


# ------------------------------------------------------------------------------------------- structure spec


def _factorized_lenet300(seed=0):
    torch.manual_seed(seed)
    net = LeNet300100()
    net.fc1 = factorize(net.fc1, 30)
    net.fc2 = factorize(net.fc2, 12)
    return net


def test_spec_round_trip_rebuilds_the_architecture_and_loads_the_weights():
    net = _factorized_lenet300()
    spec = factorization_spec(net)
    assert spec == {
        "kind": "lowrank",
        "version": 1,
        "modules": {"fc1": {"type": "Linear", "rank": 30}, "fc2": {"type": "Linear", "rank": 12}},
        "inner": None,
    }
    spec = json.loads(json.dumps(spec))  # plain JSON
    assert set(net.state_dict()) >= {"fc1.0.weight", "fc1.1.weight", "fc1.1.bias"}
    rebuilt = apply_structure(LeNet300100(), spec)  # the zoo's path: registered kind
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), net(x))
    verify_spec(net, spec)


def test_conv_spec_round_trip_with_both_schemes():
    torch.manual_seed(0)
    net = LeNet5()
    net.conv1 = factorize(net.conv1, 3, "spatial")
    net.conv2 = factorize(net.conv2, 8, "channel")
    spec = factorization_spec(net)
    assert spec["modules"] == {
        "conv1": {"type": "Conv2d", "scheme": "spatial", "rank": 3},
        "conv2": {"type": "Conv2d", "scheme": "channel", "rank": 8},
    }
    rebuilt = apply_factorization(LeNet5(), json.loads(json.dumps(spec)))
    rebuilt.load_state_dict(net.state_dict())
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), net(x))


def test_dense_reference_undoes_the_factorization_shapes():
    net = _factorized_lenet300()
    reference = dense_reference(net)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in LeNet300100().state_dict().items()}
    assert factorization_spec(LeNet300100()) is None


def test_verify_spec_catches_a_spec_that_does_not_rebuild_the_network():
    net = _factorized_lenet300()
    spec = factorization_spec(net)
    spec["modules"]["fc1"]["rank"] = 29
    with pytest.raises(ValueError, match=r"does not rebuild the network: \['fc1.0.weight', 'fc1.1.weight'\]"):
        verify_spec(net, spec)


@pytest.mark.parametrize(
    "modules, message",
    [
        ({"fc9": {"type": "Linear", "rank": 3}}, r"names module 'fc9', which LeNet300100 does not have"),
        ({"fc1": {"type": "Linear", "rank": 301}}, r"rank 301 exceeds the bound 300"),
        ({"fc1": {"type": "Linear", "rank": 0}}, r"'fc1'.rank must be a positive integer"),
        (
            {"fc1": {"type": "Conv2d", "scheme": "channel", "rank": 3}},
            r"says 'fc1' is a Conv2d but .* Linear",
        ),
        ({"fc1": {"type": "Linear"}}, r"must be \{type: Linear, rank\}"),
        ({"fc1": {"type": "Linear", "rank": 3, "extra": 1}}, r"must be \{type: Linear, rank\}"),
    ],
)
def test_bad_specs_are_zoo_format_errors(modules, message):
    spec = {"kind": "lowrank", "version": 1, "modules": modules, "inner": None}
    with pytest.raises(ZooFormatError, match=message):
        apply_factorization(LeNet300100(), spec)


def test_spec_version_and_keys_are_checked():
    with pytest.raises(ZooFormatError, match=r"version 2 is not supported"):
        apply_factorization(LeNet300100(), {"kind": "lowrank", "version": 2, "modules": {}})
    with pytest.raises(ZooFormatError, match=r"unknown keys \['rank'\]"):
        apply_factorization(LeNet300100(), {"kind": "lowrank", "version": 1, "modules": {}, "rank": 3})
