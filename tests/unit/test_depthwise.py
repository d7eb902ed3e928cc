"""Depthwise-separable replacement: exact on separable kernels, least-squares fit on activations, counts."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.factorization import (
    DepthwiseSeparableConv2d,
    apply_factorization,
    check_separable_target,
    depthwise_from_kernel,
    depthwise_ratio,
    factorization_spec,
    factorize,
    fit_depthwise,
    input_patches,
    output_error,
    patch_moment,
    verify_spec,
)
from lit_compress.measure.macs import count_macs
from lit_compress.models.lenet import LeNet5
from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.structure import apply_structure


def separable_conv(
    c=6, n=10, k=3, multiplier=1, seed=0, **kwargs
) -> tuple[nn.Conv2d, DepthwiseSeparableConv2d]:
    """A random depthwise-separable pair and the standard conv with exactly its kernel (built by hand)."""
    torch.manual_seed(seed)
    pair = DepthwiseSeparableConv2d(c, n, k, multiplier, **kwargs)
    d = pair[0].weight.detach()[:, 0]  # [C m, k, k]
    p = pair[1].weight.detach()[:, :, 0, 0]  # [N, C m]
    kernel = torch.einsum("ncj,cjxy->ncxy", p.reshape(n, c, multiplier), d.reshape(c, multiplier, k, k))
    conv = nn.Conv2d(c, n, k, **kwargs)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(pair[1].bias)
    return conv, pair


def correlated_inputs(c=6, latent=2, batch=16, size=9, seed=0) -> torch.Tensor:
    """Inputs whose channels mix two latent maps (plus a little noise): strongly correlated, as features are.
    The mixing is fixed; ``seed`` draws the latent maps and the noise."""
    mix = torch.randn(c, latent, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, latent, size, size, generator=g)
    return torch.einsum("bihw,ci->bchw", z, mix) + 0.05 * torch.randn(batch, c, size, size, generator=g) + 0.3


@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize(
    "kwargs", [dict(), dict(stride=2, padding=1), dict(padding=1, padding_mode="reflect")]
)
def test_a_separable_conv_is_reproduced_exactly_from_its_kernel(multiplier, kwargs):
    conv, pair = separable_conv(multiplier=multiplier, **kwargs)
    x = torch.randn(3, 6, 11, 11)
    torch.testing.assert_close(conv(x), pair(x), rtol=1e-4, atol=1e-5)  # the hand-built reference
    new = depthwise_from_kernel(conv, multiplier)
    assert isinstance(new, nn.Sequential) and [type(m) for m in new] == [nn.Conv2d, nn.Conv2d]
    assert new[0].groups == 6 and new[0].out_channels == 6 * multiplier and new[0].bias is None
    assert new[1].kernel_size == (1, 1)
    torch.testing.assert_close(new(x), conv(x), rtol=1e-4, atol=1e-5)


def test_fit_of_a_separable_conv_is_exact_too():
    conv, _ = separable_conv()
    moment = patch_moment(conv, [correlated_inputs()])
    new, errors = fit_depthwise(conv, moment, iterations=3)
    assert max(errors) < 1e-10
    x = correlated_inputs(seed=1)
    torch.testing.assert_close(new(x), conv(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(stride=2, padding=1, dilation=2),
        dict(padding=2, padding_mode="reflect"),
        dict(padding="same"),
    ],
)
def test_input_patches_times_the_kernel_is_the_conv(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, (3, 5), **kwargs)
    x = torch.randn(2, 3, 10, 12)
    y = conv(x)
    patches = input_patches(conv, x)
    flat = patches @ conv.weight.flatten(1).T + conv.bias
    torch.testing.assert_close(flat, y.permute(0, 2, 3, 1).reshape(-1, 5), rtol=1e-5, atol=1e-5)


def test_patch_moment_is_the_mean_outer_product_and_chunks_do_not_matter():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3)
    batches = [torch.randn(4, 2, 6, 6), torch.randn(3, 2, 6, 6)]
    patches = torch.cat([input_patches(conv, x) for x in batches]).double()
    augmented = torch.cat([patches, torch.ones(len(patches), 1, dtype=torch.float64)], 1)
    reference = augmented.T @ augmented / len(augmented)
    torch.testing.assert_close(patch_moment(conv, batches), reference)
    torch.testing.assert_close(patch_moment(conv, batches, max_elements=50), reference)  # one image per chunk
    assert patch_moment(conv, batches, reduce=lambda t: 2 * t)[-1, -1] == 2.0


def test_output_error_matches_the_error_measured_on_the_outputs():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    x = correlated_inputs()
    moment = patch_moment(conv, [x])
    new = depthwise_from_kernel(conv)
    with torch.no_grad():
        y, y_hat = conv(x).double(), new(x).double()
    measured = float(((y - y_hat) ** 2).sum() / (y**2).sum())
    assert output_error(conv, new, moment) == pytest.approx(measured, rel=1e-4)
    assert output_error(conv, conv, moment) == 0.0


def test_fit_on_activations_beats_random_and_kernel_svd_and_never_increases():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, padding=1)
    moment = patch_moment(conv, [correlated_inputs()])
    new, errors = fit_depthwise(conv, moment, iterations=10)
    random = DepthwiseSeparableConv2d(6, 10, 3, padding=1)
    assert output_error(conv, random, moment) > 1.0  # a random pair is worse than predicting zero
    assert errors[0] == pytest.approx(output_error(conv, depthwise_from_kernel(conv), moment), rel=1e-6)
    assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(errors))
    assert errors[-1] < 0.5 * errors[0]  # correlated inputs: the data-weighted fit is much better
    assert output_error(conv, new, moment) == pytest.approx(min(errors), rel=1e-5)
    # ... and it generalises to fresh inputs from the same distribution.
    fresh = patch_moment(conv, [correlated_inputs(seed=7)])
    assert output_error(conv, new, fresh) < 0.6 * output_error(conv, depthwise_from_kernel(conv), fresh)


def test_fit_without_bias_keeps_no_bias():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, bias=False)
    new, errors = fit_depthwise(conv, patch_moment(conv, [correlated_inputs(c=4)]), iterations=2)
    assert new[1].bias is None and errors[-1] <= errors[0]


def test_parameter_ratio_formula_and_measured_count():
    conv = nn.Conv2d(20, 50, 5)  # LeNet-5 conv2
    for m in (1, 2):
        new = depthwise_from_kernel(conv, m)
        weights = new[0].weight.numel() + new[1].weight.numel()
        assert weights == 20 * m * 25 + 20 * m * 50
        assert weights / conv.weight.numel() == pytest.approx(depthwise_ratio(conv, m))  # m/N + m/k^2
        assert depthwise_ratio(conv, m) == pytest.approx(m / 50 + m / 25)
        assert sum(p.numel() for p in new.parameters()) == weights + 50


def test_macs_match_the_formula():
    conv = nn.Conv2d(20, 50, 5, stride=1)
    new = depthwise_from_kernel(conv, 2)
    macs = count_macs(new, input_shape=[20, 12, 12]).dense
    assert macs == 8 * 8 * (20 * 2 * 25 + 20 * 2 * 50)  # depthwise + pointwise per output position
    assert macs / count_macs(conv, input_shape=[20, 12, 12]).dense == pytest.approx(2 / 50 + 2 / 25)


@pytest.mark.parametrize(
    "conv, multiplier, error, message",
    [
        (nn.Conv2d(4, 4, 3, groups=4), 1, ValueError, r"conv2 is already depthwise; only standard"),
        (nn.Conv2d(4, 8, 3, groups=2), 1, ValueError, r"conv2 is grouped \(groups=2\)"),
        (nn.Conv2d(4, 8, 1), 1, ValueError, r"conv2 has a 1 x 1 kernel"),
        (
            nn.Conv2d(4, 8, 3),
            8,
            ValueError,
            r"multiplier 8 for conv2 must be below min\(out_channels, k_h k_w\) = 8",
        ),
        (nn.Linear(4, 8), 1, TypeError, r"conv2 is a Linear; .*takes an nn.Conv2d"),
    ],
)
def test_bad_targets_are_refused(conv, multiplier, error, message):
    with pytest.raises(error, match=message):
        check_separable_target(conv, "conv2", multiplier)
    if isinstance(conv, nn.Conv2d):
        with pytest.raises(error, match=message):
            depthwise_from_kernel(conv, multiplier, name="conv2")


def test_fit_checks_its_arguments():
    conv = nn.Conv2d(2, 4, 3)
    with pytest.raises(ValueError, match=r"moment for conv2 must be \(19, 19\).*got \(5, 5\)"):
        fit_depthwise(conv, torch.eye(5), name="conv2")
    with pytest.raises(ValueError, match=r"iterations must be an int >= 0"):
        fit_depthwise(conv, torch.eye(19), iterations=-1)
    with pytest.raises(ValueError, match=r"expected conv inputs of shape \[B, 2, H, W\]"):
        patch_moment(conv, [torch.randn(2, 3, 5, 5)])
    with pytest.raises(ValueError, match=r"no input batches"):
        patch_moment(conv, [])
    with pytest.raises(ValueError, match=r"multiplier must be a positive int"):
        DepthwiseSeparableConv2d(2, 4, 3, multiplier=0)


# ------------------------------------------------------------------------------------------- structure spec


def test_spec_round_trip_through_the_zoo_structure_registry():
    torch.manual_seed(0)
    net = LeNet5()
    net.conv2 = depthwise_from_kernel(net.conv2, 2)
    spec = factorization_spec(net, "depthwise")
    assert spec == {"kind": "depthwise", "version": 1, "modules": {"conv2": {"multiplier": 2}}, "inner": None}
    rebuilt = apply_structure(LeNet5(), json.loads(json.dumps(spec)))
    assert isinstance(rebuilt.conv2, DepthwiseSeparableConv2d)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), net(x))


def test_both_kinds_in_one_network_nest_as_inner():
    torch.manual_seed(0)
    net = LeNet5()
    net.conv2 = depthwise_from_kernel(net.conv2)
    net.fc1 = factorize(net.fc1, 40)
    spec = factorization_spec(net, "depthwise")
    assert spec["kind"] == "depthwise" and spec["modules"] == {"conv2": {"multiplier": 1}}
    assert spec["inner"] == {
        "kind": "lowrank",
        "version": 1,
        "modules": {"fc1": {"type": "Linear", "rank": 40}},
        "inner": None,
    }
    assert factorization_spec(net, "lowrank")["inner"]["kind"] == "depthwise"
    for kind in ("lowrank", "depthwise"):
        rebuilt = apply_structure(LeNet5(), factorization_spec(net, kind))
        rebuilt.load_state_dict(net.state_dict(), strict=True)
        verify_spec(net, factorization_spec(net, kind))


@pytest.mark.parametrize(
    "modules, message",
    [
        ({"conv2": {"multiplier": 25}}, r"multiplier 25 for conv2 must be below"),
        ({"fc1": {"multiplier": 1}}, r"names 'fc1', a Linear; expected an nn.Conv2d"),
        ({"conv2": {"multiplier": 1, "rank": 2}}, r"must be \{multiplier: int\}"),
        ({"conv2": {"multiplier": 0}}, r"'conv2'.multiplier must be a positive integer"),
    ],
)
def test_bad_depthwise_specs_are_zoo_format_errors(modules, message):
    with pytest.raises(ZooFormatError, match=message):
        apply_factorization(LeNet5(), {"kind": "depthwise", "version": 1, "modules": modules, "inner": None})


def test_f_conv_reference_for_the_pair():
    """The pair computes exactly F.conv2d(groups=C) followed by a 1 x 1 F.conv2d (nothing hidden)."""
    _, pair = separable_conv(padding=1)
    x = torch.randn(2, 6, 7, 7)
    mid = F.conv2d(x, pair[0].weight, None, padding=1, groups=6)
    torch.testing.assert_close(pair(x), F.conv2d(mid, pair[1].weight, pair[1].bias))
