"""Channel criteria and structured penalties on tiny hand-built nets, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.pruning.structured.criteria import (
    ChannelCriterion,
    ChannelScoringContext,
    ThiNetCriterion,
    _contributions,
    channel_rows,
    get_channel_criterion,
    least_squares_scales,
    list_channel_criteria,
    register_channel_criterion,
)
from lit_compress.pruning.structured.graph import ChannelGroup, ChannelRef
from lit_compress.pruning.structured.penalties import get_penalty, list_penalties


def group(name, size, producers=None, norms=(), consumers=(), activations=None, relu=False) -> ChannelGroup:
    producers = producers or [name]
    return ChannelGroup(
        name=name,
        size=size,
        producers=tuple(ChannelRef(p, 0) for p in producers),
        norms=tuple(ChannelRef(n, 0) for n in norms),
        consumers=tuple(c if isinstance(c, ChannelRef) else ChannelRef(c, 1) for c in consumers),
        activations=tuple(activations if activations is not None else [name]),
        relu_follows=relu,
        prunable=True,
    )


class ConvBN(nn.Module):
    """conv1 (2 -> 3) -> bn1 -> relu -> conv2 (3 -> 4) -> global pool -> fc (4 -> 2)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def conv_groups() -> list[ChannelGroup]:
    return [
        group("conv1", 3, norms=["bn1"], consumers=["conv2"], activations=["bn1"], relu=True),
        group("conv2", 4, consumers=["fc"]),
    ]


def ctx(model, groups, batches=None, loss_fn=None, **kw) -> ChannelScoringContext:
    return ChannelScoringContext(
        model=model,
        groups=groups,
        batches=None if batches is None else (lambda: iter(batches)),
        loss_fn=loss_fn,
        **kw,
    )


# ------------------------------------------------------------------------------------- registry


def test_registry_lists_every_criterion_and_suggests_close_names():
    assert {
        "l1",
        "l2",
        "apoz",
        "mean_activation",
        "taylor_activation",
        "bn_scale",
        "group_lasso",
        "thinet",
    } <= set(list_channel_criteria())
    with pytest.raises(ValueError, match=r"unknown channel criterion 'l3'.*Did you mean.*'l1'"):
        get_channel_criterion("l3")
    with pytest.raises(ValueError, match="apoz"):
        get_channel_criterion("apozz")


def test_user_criterion_by_registration_and_dotted_path():
    @register_channel_criterion("test_constant")
    class Constant(ChannelCriterion):
        def scores(self, ctx):
            return {g.name: torch.ones(g.size) for g in ctx.groups}

    assert isinstance(get_channel_criterion("test_constant"), Constant)
    path = "lit_compress.pruning.structured.criteria.L1Criterion"
    assert get_channel_criterion(path).name == "l1"
    with pytest.raises(ValueError, match="does not name a ChannelCriterion"):
        get_channel_criterion("lit_compress.pruning.structured.criteria.channel_rows")


# ------------------------------------------------------------------------------------ data-free


def test_l1_and_l2_filter_norms_by_hand():
    model = ConvBN()
    with torch.no_grad():
        for c in range(3):  # filter c: 2 * 3 * 3 = 18 entries of value -(c + 1) / +(c + 1)
            model.conv1.weight[c] = (c + 1) * (-1) ** c
        model.conv1.bias.fill_(100.0)  # bias is not part of the filter norm
    g = [conv_groups()[0]]
    l1 = get_channel_criterion("l1").scores(ctx(model, g))["conv1"]
    l2 = get_channel_criterion("l2").scores(ctx(model, g))["conv1"]
    torch.testing.assert_close(l1, torch.tensor([18.0, 36.0, 54.0]))
    torch.testing.assert_close(l2, math.sqrt(18) * torch.tensor([1.0, 2.0, 3.0]))


def test_tied_group_sums_over_producers():
    a, b = nn.Linear(2, 3), nn.Linear(2, 3)
    model = nn.ModuleDict({"a": a, "b": b})
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[1.0, 0], [0, 2], [3, 3]]))
        b.weight.copy_(torch.tensor([[0.0, -1], [4, 0], [0, 0]]))
    g = group("a", 3, producers=["a", "b"])
    torch.testing.assert_close(
        get_channel_criterion("l1").scores(ctx(model, [g]))["a"], torch.tensor([2.0, 6, 6])
    )
    l2 = get_channel_criterion("l2").scores(ctx(model, [g]))["a"]
    torch.testing.assert_close(l2, torch.tensor([2.0, 6, math.sqrt(18)]))


def test_channel_rows_with_offset_and_repeat():
    w = torch.arange(2 * 10).float().view(2, 10)  # Linear consumer reading [other(2) | 4 channels x 2 each]
    rows = channel_rows(w, ChannelRef("fc", 1, offset=2, repeat=2), 4)
    assert rows.shape == (4, 4)
    # channel 1 = columns 4 and 5 of both output rows: 4, 5, 14, 15
    assert sorted(rows[1].tolist()) == [4.0, 5.0, 14.0, 15.0]


def test_bn_scale_and_group_lasso_by_hand():
    model = ConvBN()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        model.bn1.bias.copy_(torch.tensor([1.0, 0.0, -2.0]))
        model.conv1.weight.zero_()
        model.conv1.weight[2, 0, 0, 0] = 2.0
        model.conv1.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    g = [conv_groups()[0]]
    torch.testing.assert_close(
        get_channel_criterion("bn_scale").scores(ctx(model, g))["conv1"], torch.tensor([0.5, 2.0, 1.0])
    )
    # sqrt(w^2 + bias^2 + gamma^2 + beta^2): [0.25 + 1, 4, 4 + 1 + 1 + 4]
    expected = torch.tensor([1.25, 4.0, 10.0]).sqrt()
    torch.testing.assert_close(get_channel_criterion("group_lasso").scores(ctx(model, g))["conv1"], expected)
    with pytest.raises(ValueError, match="group 'conv2' has no affine BatchNorm"):
        get_channel_criterion("bn_scale").scores(ctx(model, [conv_groups()[1]]))


# ---------------------------------------------------------------------------- activation criteria


class Probe(nn.Module):
    """fc1 = identity (its output is the input): the activations are exactly the data."""

    def __init__(self, n=3):
        super().__init__()
        self.fc1 = nn.Linear(n, n)
        self.fc2 = nn.Linear(n, 1)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.eye(n))
            self.fc1.bias.zero_()

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def probe_ctx(model, batches, relu=True, **kw):
    g = group("fc1", 3, consumers=["fc2"], relu=relu)
    return ctx(model, [g], batches=batches, loss_fn=lambda x: model(x).mean(), **kw)


def test_apoz_counts_zeros_after_relu():
    model = Probe()
    batches = [torch.tensor([[1.0, -1.0, 0.0]]), torch.tensor([[2.0, 3.0, -4.0], [5.0, -1.0, 0.0]])]
    scores = get_channel_criterion("apoz").scores(probe_ctx(model, batches))["fc1"]
    # zeros after relu: channel 0: 0/3, channel 1: 2/3, channel 2: 3/3
    torch.testing.assert_close(scores, torch.tensor([1.0, 1 / 3, 0.0]))


def test_apoz_on_conv_counts_every_position():
    model = ConvBN().eval()
    with torch.no_grad():
        model.bn1.weight.fill_(1.0)
        model.bn1.bias.copy_(torch.tensor([-100.0, 100.0, 0.0]))  # channel 0 always zero, 1 never
        model.conv1.weight.zero_()
        model.conv1.bias.zero_()
        model.conv1.weight[2, 0, 1, 1] = 1.0  # channel 2 = input channel 0: sign of the data
    x = torch.tensor([1.0, -1.0]).repeat(8)[:9].view(1, 1, 3, 3).repeat(1, 2, 1, 1)  # 5 positive, 4 negative
    scores = get_channel_criterion("apoz").scores(
        ctx(model, [conv_groups()[0]], [x], lambda b: model(b).sum())
    )
    torch.testing.assert_close(scores["conv1"], torch.tensor([0.0, 1.0, 5 / 9]))


def test_mean_activation_relu_and_absolute():
    batches = [torch.tensor([[1.0, -1.0, 0.0], [2.0, 4.0, -4.0]])]
    relu = get_channel_criterion("mean_activation").scores(probe_ctx(Probe(), batches))["fc1"]
    torch.testing.assert_close(relu, torch.tensor([1.5, 2.0, 0.0]))
    absolute = get_channel_criterion("mean_activation").scores(probe_ctx(Probe(), batches, relu=False))["fc1"]
    torch.testing.assert_close(absolute, torch.tensor([1.5, 2.5, 2.0]))


def test_taylor_activation_on_a_linear_net_by_hand():
    # y = v . h, h = x (fc1 = identity), loss = mean_n y_n -> dL_n/dh = v, theta_nc = |x_nc * v_c|.
    model = nn.Sequential()
    model.fc1 = nn.Linear(3, 3, bias=False)
    model.fc2 = nn.Linear(3, 1, bias=False)
    v = torch.tensor([2.0, -1.0, 0.5])
    with torch.no_grad():
        model.fc1.weight.copy_(torch.eye(3))
        model.fc2.weight.copy_(v.view(1, 3))
    x = torch.tensor([[1.0, 2.0, -4.0], [-3.0, 0.0, 2.0]])
    g = group("fc1", 3, consumers=["fc2"])
    c = ctx(model, [g], batches=[x[:1], x[1:]], loss_fn=lambda b: model(b).mean())
    theta = (x * v).abs().mean(0)  # [4, 1, 3]
    scores = get_channel_criterion("taylor_activation").scores(c)["fc1"]
    torch.testing.assert_close(scores, theta / theta.norm())
    # Same data in one batch of two: the per-example gradient (B * dL/dh) makes it batch-size free.
    c2 = ctx(model, [g], batches=[x], loss_fn=lambda b: model(b).mean())
    torch.testing.assert_close(get_channel_criterion("taylor_activation").scores(c2)["fc1"], scores)


def test_taylor_activation_averages_over_positions_before_the_absolute_value():
    # conv output a (1 channel, 2 positions) feeds a sum with weights +1 / -1 at the two positions.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 1, bias=False)

        def forward(self, x):
            a = self.conv(x)
            return (a[..., 0] - a[..., 1]).sum()

    net = Net()
    with torch.no_grad():
        net.conv.weight.fill_(1.0)
    x = torch.tensor([[[3.0, 1.0]]])  # a * g = [3, -1] -> mean 1 -> |1| = 1 (not mean |.| = 2)
    g = ChannelGroup("conv", 1, (ChannelRef("conv", 0),), (), (), ("conv",), False, True)
    raw = get_channel_criterion("taylor_activation").scores(ctx(net, [g], [x], lambda b: net(b)))["conv"]
    torch.testing.assert_close(raw, torch.tensor([1.0]))  # normalised: 1 / |1|


def test_scoring_leaves_no_trace_and_reduces_statistics():
    model = ConvBN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def all_reduce_mean(t):
        calls.append(t.shape)
        return t

    rng = torch.random.get_rng_state()
    x = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    for name in ("apoz", "mean_activation", "taylor_activation", "thinet"):
        calls.clear()
        c = ctx(
            model,
            conv_groups(),
            [x],
            lambda b: F.dropout(model(b), 0.5).sum(),
            all_reduce_mean=all_reduce_mean,
        )
        scores = get_channel_criterion(name).scores(c)
        assert scores["conv1"].shape == (3,) and scores["conv2"].shape == (4,)
        assert calls, f"{name} never all-reduced its statistics"
        assert model.training and model.bn1.training
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), (name, k)  # incl. BN running statistics and num_batches_tracked
        assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_data_criteria_require_data():
    with pytest.raises(ValueError, match=r"needs data.*loss_fn=None and batches=None"):
        get_channel_criterion("apoz").scores(ctx(ConvBN(), conv_groups()))


# ------------------------------------------------------------------------------------------ ThiNet


def thinet_data(n=512):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, generator=gen)
    x2 = torch.randn(n, generator=gen)
    x1 = 0.5 * x0 + 0.05 * torch.randn(n, generator=gen)  # small and predictable from channel 0
    return torch.stack([x0, x1, x2], 1)


def test_thinet_removes_the_channel_that_changes_the_next_layer_least():
    model = Probe()
    with torch.no_grad():
        model.fc2.weight.copy_(torch.tensor([[1.0, 1.5, 1.0]]))  # channel 1 has the largest weight
        model.fc2.bias.zero_()
    x = thinet_data()
    g = group("fc1", 3, consumers=["fc2"])
    c = ctx(model, [g], batches=[x], loss_fn=lambda b: model(b).mean())
    thinet = ThiNetCriterion(samples_per_batch=4096)
    scores = thinet.scores(c)["fc1"]
    # Brute force: the output change when removing one channel is its contribution x_c * w_c.
    contrib = x * model.fc2.weight.detach()
    removal_error = contrib.square().mean(0)
    assert int(scores.argmin()) == int(removal_error.argmin()) == 1
    assert sorted(scores.tolist()) == [0.0, 1.0, 2.0]  # a full greedy order
    # L1 of the consumer column would have kept channel 1: ThiNet looks at what the layer outputs.
    assert int(model.fc2.weight.abs().argmax()) == 1

    keep = torch.tensor([0, 2])
    update = thinet.update_weights(c, {"fc1": keep})
    new_w = update["fc2.weight"]
    h = F.relu(x)
    full = h @ model.fc2.weight.detach().T
    plain = h[:, keep] @ model.fc2.weight.detach()[:, keep].T
    reweighted = h[:, keep] @ new_w[:, keep].T
    err_plain = (full - plain).square().mean()
    err_rw = (full - reweighted).square().mean()
    assert err_rw < 0.5 * err_plain
    assert torch.equal(new_w[:, 1], model.fc2.weight.detach()[:, 1])  # the removed column is untouched
    with pytest.raises(ValueError, match="call scores"):
        thinet.update_weights(c, {"fc1": keep})


def test_least_squares_scales_solve_the_normal_equations():
    xhat = thinet_data(256)
    gram = xhat.T.double() @ xhat.double() / 256
    kept = torch.tensor([0, 2])
    w = least_squares_scales(gram, kept, damp=0.0)
    ref = torch.linalg.lstsq(xhat[:, kept].double(), xhat.sum(1, keepdim=True).double()).solution.flatten()
    torch.testing.assert_close(w, ref)


def test_thinet_contributions_reconstruct_sampled_conv_outputs():
    conv = nn.Conv2d(5, 3, 3, stride=2, padding=2, dilation=2, bias=False)
    x = torch.randn(2, 5, 7, 6)
    y = conv(x).detach()
    ref = ChannelRef("conv", 1, offset=1)  # the group is input channels 1..3
    xhat = _contributions(conv, ref, 3, x, 64, torch.Generator().manual_seed(0))
    # channel-0 and channel-4 contributions are not part of the group: add them back per candidate output
    rest = conv.weight.detach().clone()
    rest[:, 1:4] = 0
    y_rest = F.conv2d(x, rest, stride=2, padding=2, dilation=2)
    candidates = (y - y_rest).flatten()
    for total in xhat.sum(1):
        assert (candidates.double() - total).abs().min() < 1e-5


def test_thinet_greedy_starts_from_the_dead_channels_and_falls_back():
    model = Probe()
    x = thinet_data()
    g = group("fc1", 3, consumers=["fc2"])
    alive = {"fc1": torch.tensor([True, True, False])}
    c = ctx(model, [g], batches=[x], loss_fn=lambda b: model(b).mean(), alive=alive)
    scores = ThiNetCriterion().scores(c)["fc1"]
    assert scores[2] == -math.inf and sorted(scores[:2].tolist()) == [0.0, 1.0]
    two = group("fc1", 3, consumers=["fc2", "fc2"])
    with pytest.raises(ValueError, match="thinet cannot score these groups: fc1: it has 2 consumers"):
        ThiNetCriterion().scores(ctx(model, [two], batches=[x], loss_fn=lambda b: model(b).mean()))
    fallback = ThiNetCriterion(fallback="l1").scores(
        ctx(model, [two], batches=[x], loss_fn=lambda b: model(b).mean())
    )
    torch.testing.assert_close(fallback["fc1"], model.fc1.weight.detach().abs().sum(1))


# --------------------------------------------------------------------------------------- penalties


def test_penalty_registry():
    assert {"bn_l1", "group_lasso"} <= set(list_penalties())
    with pytest.raises(ValueError, match="Did you mean 'bn_l1'"):
        get_penalty("bn_l2")


def _grad_matches_autograd(penalty, model):
    for p in model.parameters():
        p.grad = None
    penalty.value().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    penalty.add_gradient()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)
    return got


def test_bn_l1_gradient_is_autograd_of_the_l1_of_the_scales():
    torch.manual_seed(0)
    model = ConvBN()
    with torch.no_grad():
        model.bn1.weight.copy_(torch.tensor([0.5, -2.0, 0.0]))
    penalty = get_penalty("bn_l1", weight=0.1)
    penalty.prepare(model, conv_groups())
    torch.testing.assert_close(penalty.value(), torch.tensor(0.25))
    got = _grad_matches_autograd(penalty, model)
    torch.testing.assert_close(got["bn1.weight"], torch.tensor([0.1, -0.1, 0.0]))
    with pytest.raises(ValueError, match=r"bn_l1.*no scale"):
        penalty.prepare(model, conv_groups()[1:])


def test_group_lasso_gradient_is_autograd_of_the_explicit_penalty():
    torch.manual_seed(0)
    model = ConvBN()
    penalty = get_penalty("group_lasso", weight=0.3)
    penalty.prepare(model, conv_groups())
    explicit = sum(
        torch.cat(
            [
                model.conv1.weight[c].flatten(),
                model.conv1.bias[c : c + 1],
                model.bn1.weight[c : c + 1],
                model.bn1.bias[c : c + 1],
            ]
        ).norm()
        for c in range(3)
    ) + sum(
        torch.cat([model.conv2.weight[c].flatten(), model.conv2.bias[c : c + 1]]).norm() for c in range(4)
    )
    torch.testing.assert_close(penalty.value(), 0.3 * explicit)
    _grad_matches_autograd(penalty, model)
    # An all-zero channel gets the subgradient 0 (autograd of the norm would give NaN there): it stays zero.
    with torch.no_grad():
        for t in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias):
            t[1] = 0
    model.conv1.weight.grad = None
    penalty.add_gradient()
    assert torch.all(model.conv1.weight.grad[1] == 0) and torch.isfinite(model.conv1.weight.grad).all()
    assert torch.all(model.conv1.weight.grad[0] != 0)


def test_group_lasso_depth_variant_over_residual_branches():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.block1 = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model.block2 = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    penalty = get_penalty(
        "group_lasso", weight=0.2, filters=False, depth_branches=["block*"], depth_exclude=["*.1"]
    )
    penalty.prepare(model, [])
    explicit = sum(
        torch.cat([p.flatten() for p in getattr(model, b)[0].parameters()]).norm()
        for b in ("block1", "block2")
    )
    torch.testing.assert_close(penalty.value(), 0.2 * explicit)
    got = _grad_matches_autograd(penalty, model)
    assert "block1.1.weight" not in got  # excluded from the branch
    with pytest.raises(ValueError, match="depth pattern 'blok\\*' matches no module"):
        get_penalty("group_lasso", depth_branches=["blok*"]).prepare(model, [])
    with pytest.raises(ValueError, match="nothing to penalise"):
        get_penalty("group_lasso", filters=False)
