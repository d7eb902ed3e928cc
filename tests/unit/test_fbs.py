"""FBS mechanism (lit_compress.gating.fbs): gates, winner-take-all, L1 term, the skipping eval path, MACs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.gating.fbs import (
    FBSBatchNorm2d,
    FBSConv2d,
    FBSLinear,
    GateState,
    LayerPlan,
    apply_fbs,
    check_density,
    costly_gates,
    fbs_layers,
    kept_channels,
    mac_statistics,
    macs_per_image,
    plan_fbs,
    saliency_l1,
    set_density,
    winner_take_all,
)
from lit_compress.measure import count_macs
from lit_compress.models.cifarnet import CifarNet


def random_cifarnet(width: int, seed: int = 0, img_size: int = 12) -> CifarNet:
    """CifarNet (12x12 inputs: 3x3 maps before the classifier) with non-trivial BatchNorm statistics and
    affine parameters."""
    torch.manual_seed(seed)
    net = CifarNet(in_chans=1, img_size=img_size, width=width, hidden=16)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return net


def tiny_cifarnet(seed: int = 0) -> CifarNet:
    return random_cifarnet(4, seed, img_size=8)


def gated(net: nn.Module, density: float = 1.0, boost: bool = True, seed: int = 0) -> dict[str, FBSConv2d]:
    plans = plan_fbs(net, density=density, boost=boost)
    return apply_fbs(net, plans, generator=torch.Generator().manual_seed(seed))


class TwoConv(nn.Module):
    """conv0 -> bn0 -> relu -> conv1 -> bn1 -> relu -> global pool (a hand-checkable gated layer)."""

    def __init__(self, cin: int = 2, c0: int = 3, c1: int = 4):
        super().__init__()
        self.conv0 = nn.Conv2d(cin, c0, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(c0)
        self.conv1 = nn.Conv2d(c0, c1, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c1)

    def forward(self, x):
        x = F.relu(self.bn0(self.conv0(x)))
        return F.relu(self.bn1(self.conv1(x)))


# ------------------------------------------------------------------------------------------ pure functions


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.0001, 2, float("nan"), float("inf"), True, "0.5", None])
def test_density_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        check_density(bad)


def test_kept_channels_is_ceil_of_density_times_channels():
    assert kept_channels(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004 in floating point
    assert kept_channels(0.5, 8) == 4
    assert kept_channels(0.34, 32) == 11  # ceil(10.88)
    assert kept_channels(0.01, 8) == 1
    assert kept_channels(1.0, 7) == 7
    with pytest.raises(ValueError):
        kept_channels(0.0, 8)


def test_winner_take_all_keeps_the_k_largest_per_row():
    s = torch.tensor([[0.1, 0.5, 0.3, 0.9], [2.0, 1.0, 0.0, 3.0], [0.0, 0.2, 0.7, 0.4]])
    expected = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 1], [0, 0, 1, 1]], dtype=torch.float32)
    assert torch.equal(winner_take_all(s, 2), expected)
    assert torch.equal(winner_take_all(s, 4), torch.ones(3, 4))
    assert torch.equal(winner_take_all(s, 1).sum(1), torch.ones(3))
    with pytest.raises(ValueError):
        winner_take_all(s, 0)


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("train", [True, False])
def test_density_one_without_boost_equals_the_original_network(train):
    net = tiny_cifarnet()
    ref = copy.deepcopy(net)
    gated(net, density=1.0, boost=False)
    net.train(train)
    ref.train(train)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(net(x), ref(x))
    if train:  # the BatchNorm statistics were updated identically
        ours, theirs = net.state_dict(), ref.state_dict()
        assert set(ours) - set(theirs) == {k for k in ours if ".predictor." in k}
        for key, value in theirs.items():
            assert torch.equal(ours[key], value), key


def test_gated_layer_by_hand():
    torch.manual_seed(1)
    net = TwoConv().eval()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-0.5, 0.5)
        net.bn1.running_var.uniform_(0.5, 2.0)
    ref = copy.deepcopy(net)
    (layer,) = apply_fbs(net, {"conv1": LayerPlan(density=0.5, boost=True, norm="bn1")}).values()
    with torch.no_grad():
        layer.predictor.weight.copy_(torch.randn(4, 3))
        layer.predictor.bias.copy_(torch.tensor([0.1, -5.0, 0.3, 0.2]))  # channel 1 saliency clipped to 0
    x = torch.randn(3, 2, 6, 6)
    h = F.relu(ref.bn0(ref.conv0(x)))
    pooled = h.abs().mean(dim=(2, 3))
    s = torch.clamp(pooled @ layer.predictor.weight.T + layer.predictor.bias, min=0)
    top2 = s.argsort(dim=1, descending=True)[:, :2]
    mask = torch.zeros_like(s)
    for b in range(3):
        mask[b, top2[b]] = 1
    for boost in (True, False):
        layer.boost = boost
        gate = s * mask if boost else mask
        expected = F.relu(ref.bn1(ref.conv1(h)) * gate[:, :, None, None])
        for skip in (True, False):
            layer.skip = skip
            torch.testing.assert_close(net(x), expected, rtol=1e-5, atol=1e-6)


def test_single_conv_without_batchnorm_is_gated_at_its_output():
    class NoBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 3, 3)
            self.b = nn.Conv2d(3, 4, 3, bias=True)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    net = NoBN().eval()
    ref = copy.deepcopy(net)
    plans = plan_fbs(net, density=0.5)
    assert plans == {"b": LayerPlan(density=0.5, boost=True, norm=None, source=None)}
    (layer,) = apply_fbs(net, plans).values()
    x = torch.randn(2, 1, 7, 7)
    h = torch.relu(ref.a(x))
    s = torch.relu(layer.predictor(h.abs().mean(dim=(2, 3))))
    gate = s * winner_take_all(s, 2)
    torch.testing.assert_close(net(x), ref.b(h) * gate[:, :, None, None], rtol=1e-5, atol=1e-6)


def test_density_one_at_batch_one_keeps_the_channel_order():
    # batch 1 computes the channels in top-k order: a permutation even when every channel is kept, which
    # must still be scattered back (or read) in the right order
    net = tiny_cifarnet().eval()
    ref = copy.deepcopy(net)
    gated(net, density=1.0, boost=False)
    x = torch.randn(1, 1, 8, 8)
    torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ L1 term


def test_l1_term_value_and_gradient_by_hand():
    torch.manual_seed(2)
    net = TwoConv().train()
    (layer,) = apply_fbs(net, plan_fbs(net, density=0.5)).values()
    with torch.no_grad():
        layer.predictor.weight.copy_(torch.randn(4, 3))
        layer.predictor.bias.copy_(torch.tensor([0.5, -3.0, 0.2, 1.0]))
    x = torch.randn(6, 2, 5, 5)
    net(x)
    h = F.relu(net.bn0(net.conv0(x))).detach()  # the same batch statistics: bn0 sees the same input
    pre = h.abs().mean(dim=(2, 3)) @ layer.predictor.weight.T + layer.predictor.bias
    s = pre.clamp(min=0)
    term = saliency_l1([layer])
    torch.testing.assert_close(term, s.sum(dim=1).mean())
    assert saliency_l1([layer]) is None  # consumed
    term.backward()
    # d/db_c mean_b sum_c relu(pre) = mean_b 1[pre_bc > 0]
    torch.testing.assert_close(layer.predictor.bias.grad, (pre > 0).float().mean(dim=0).detach())
    # d/dW_cj = mean_b 1[pre_bc > 0] * pooled_bj
    pooled = h.abs().mean(dim=(2, 3))
    expected_w = ((pre > 0).float().T @ pooled / x.shape[0]).detach()
    torch.testing.assert_close(layer.predictor.weight.grad, expected_w)


def test_every_parameter_gets_a_gradient_so_ddp_needs_no_unused_parameter_search():
    net = tiny_cifarnet()
    gated(net, density=0.5, boost=True)
    net.train()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    loss = F.cross_entropy(net(x), y) + 1e-4 * saliency_l1(fbs_layers(net).values())
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []


def test_without_boost_and_l1_the_predictors_get_no_gradient():
    net = tiny_cifarnet()
    gated(net, density=0.5, boost=False)
    net.train()
    F.cross_entropy(net(torch.randn(4, 1, 8, 8)), torch.randint(0, 10, (4,))).backward()
    missing = sorted(n for n, p in net.named_parameters() if p.grad is None)
    assert missing and all(".predictor." in n for n in missing)


# ------------------------------------------------------------------------------------------ the skipping path


def test_plan_of_cifarnet_chains_compact_tensors_between_gated_convs():
    plans = plan_fbs(tiny_cifarnet(), density=0.5)
    assert plans == {
        "features.1.0": LayerPlan(0.5, True, "features.1.1", None),
        "features.3.0": LayerPlan(0.5, True, "features.3.1", "features.1.0"),
        # the last gated output reaches the classifier's Linear through ReLU, max-pool and flatten
        "features.4.0": LayerPlan(0.5, True, "features.4.1", "features.3.0", linear="classifier.0"),
    }


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("boost", [True, False])
def test_eval_skips_and_equals_the_masked_dense_computation(batch, boost):
    net = tiny_cifarnet().eval()
    layers = gated(net, density=0.5, boost=boost)
    seen: dict[str, tuple[int, int]] = {}

    def hook(name):
        return lambda m, args, out: seen.__setitem__(name, (args[0].shape[1], out.shape[1]))

    for name, layer in layers.items():
        layer.register_forward_hook(hook(name))
    x = torch.randn(batch, 1, 8, 8)
    fast = net(x)
    fast_macs = count_macs(net, x)
    shapes = dict(seen)
    for layer in layers.values():
        layer.skip = False
    masked = net(x)
    masked_macs = count_macs(net, x)
    torch.testing.assert_close(fast, masked, rtol=1e-5, atol=1e-6)
    assert fast_macs.effective < masked_macs.effective
    assert fast_macs.dense == masked_macs.dense
    if batch == 1 and not boost:  # exactly k = ceil(d * C) channels computed, and read by the next conv
        assert shapes == {"features.1.0": (4, 2), "features.3.0": (2, 4), "features.4.0": (4, 4)}
        assert seen["features.4.0"] == (8, 8)  # masked reference computes everything


def test_batch_one_fold_follows_parameter_updates_and_inference_mode():
    net = tiny_cifarnet().eval()
    layers = gated(net, density=0.5)
    x = torch.randn(1, 1, 8, 8)

    def masked() -> torch.Tensor:
        for layer in layers.values():
            layer.skip = False
        try:
            return net(x)
        finally:
            for layer in layers.values():
                layer.skip = True

    with torch.inference_mode():
        first = net(x)  # caches the folded weights as inference tensors
    with torch.no_grad():
        torch.testing.assert_close(net(x), first)
        net.features[3][1].weight.mul_(-2.0)  # in-place update: the fold must be rebuilt
        net.features[4][0].weight.add_(0.5)
        updated = net(x)
    assert not torch.allclose(updated, first)
    torch.testing.assert_close(updated, masked(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net(x), updated, rtol=1e-5, atol=1e-6)  # grad enabled: no cache, same result


def test_batch_one_cache_follows_predictor_updates():
    net = tiny_cifarnet().eval()
    layers = gated(net, density=0.5)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        first = net(x)
        for layer in layers.values():  # in place: the cached predictor tensors must be rebuilt
            layer.predictor.weight.copy_(torch.randn_like(layer.predictor.weight))
        updated = net(x)
        set_skip(net, False)
        masked = net(x)
    assert not torch.allclose(updated, first)
    torch.testing.assert_close(updated, masked, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("boost", [True, False])
def test_batch_one_when_no_saliency_is_positive(boost):
    """Every saliency <= 0: with boost one channel is computed with gate 0 (the layer outputs zeros, its
    BatchNorm shift included), without boost the top k of relu(saliency) (all 0) are kept with gate 1."""
    net = tiny_cifarnet().eval()
    layers = gated(net, density=0.5, boost=boost)
    with torch.no_grad():
        layers["features.3.0"].predictor.bias.fill_(-100.0)
    x = torch.randn(1, 1, 8, 8)
    seen: dict[str, int] = {}
    layers["features.3.0"].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out.shape[1]))
    with torch.no_grad():
        fast = net(x)
        assert seen["out"] == (1 if boost else 4)
        set_skip(net, False)
        torch.testing.assert_close(fast, net(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 3])
def test_channels_last_network_computes_the_same(batch):
    """``net.to(memory_format=torch.channels_last)`` (how zoo latency times a conv net in that layout) keeps
    the gated network's function, its batch-1 path included."""
    base = random_cifarnet(6).eval()
    gated(base, density=0.5)
    converted = copy.deepcopy(base).to(memory_format=torch.channels_last)
    assert converted.features[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(batch, 1, 12, 12)
    with torch.no_grad():
        expected = base(x)
        got = converted(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_batchnorm_on_batch_statistics_in_eval_is_not_folded():
    torch.manual_seed(3)
    net = TwoConv()
    net.bn1 = nn.BatchNorm2d(4, track_running_stats=False)
    net.eval()
    (layer,) = apply_fbs(net, plan_fbs(net, density=0.5)).values()
    x = torch.randn(1, 2, 6, 6)
    fast = net(x)
    layer.skip = False
    torch.testing.assert_close(fast, net(x), rtol=1e-5, atol=1e-6)


def test_per_image_loop_equals_the_batched_union_path():
    net = tiny_cifarnet().eval()
    gated(net, density=0.25)
    x = torch.randn(6, 1, 8, 8)
    torch.testing.assert_close(torch.cat([net(x[i : i + 1]) for i in range(6)]), net(x), rtol=1e-5, atol=1e-6)


def test_residual_network_gates_and_skips_exactly():
    from lit_compress.models import create_model

    torch.manual_seed(0)
    net = create_model("resnet14", in_chans=1).eval()
    plans = plan_fbs(net, density=0.5)
    assert "conv1" not in plans and len(plans) == 12  # the stem reads the image; 6 blocks x 2 convs
    for block in ("layer1.0", "layer2.0", "layer3.1"):
        # conv2 reads conv1's compact output; conv2's output meets the shortcut (expanded, read by nobody)
        assert plans[f"{block}.conv2"] == LayerPlan(0.5, True, f"{block}.bn2", f"{block}.conv1")
        assert plans[f"{block}.conv1"] == LayerPlan(0.5, True, f"{block}.bn1", None)
    apply_fbs(net, plans)
    x = torch.randn(1, 1, 12, 12)
    fast = net(x)
    for layer in fbs_layers(net).values():
        layer.skip = False
    torch.testing.assert_close(fast, net(x), rtol=1e-5, atol=1e-5)


def test_macs_per_image_by_hand():
    net = tiny_cifarnet().eval()
    gated(net, density=0.5, boost=False)
    values, dense = macs_per_image(net, torch.randn(3, 1, 8, 8))
    # conv0 8x8x4x1x9 | f1.0 64x9x2x4 + pred 4x4 | f3.0 16x9x4x2 + 2x8 | f4.0 16x9x4x4 + 4x8
    # | fc 32x16 + 16x10
    per_image = 2304 + (4608 + 16) + (1152 + 16) + (2304 + 32) + (512 + 160)
    assert values.tolist() == [per_image] * 3
    assert dense == 2304 + 9216 + 4608 + 9216 + 512 + 160
    assert count_macs(net, torch.randn(1, 1, 8, 8)).effective == per_image  # batch 1 does exactly this work
    stats = mac_statistics(net, [(torch.randn(4, 1, 8, 8), None), torch.randn(2, 1, 8, 8)])
    assert (stats.mean, stats.std, stats.images, stats.dense) == (per_image, 0.0, 6, dense)
    assert math.isclose(stats.reduction, dense / per_image)


def test_zero_saliencies_are_skipped_so_work_varies_per_image():
    net = tiny_cifarnet().eval()
    layers = gated(net, density=1.0, boost=True)
    layer = layers["features.4.0"]
    with torch.no_grad():  # saliency c = relu(3 * pooled input c - 0.6): 0 for weakly active inputs
        layer.predictor.weight.copy_(torch.eye(8, 8) * 3.0)
        layer.predictor.bias.fill_(-0.6)
    x = torch.randn(16, 1, 8, 8) * torch.linspace(0.1, 3, 16)[:, None, None, None]
    values, _ = macs_per_image(net, x)
    assert values.std() > 0
    fast = net(x)
    for m in layers.values():
        m.skip = False
    torch.testing.assert_close(fast, net(x), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- compact outputs after the gate point


def without_tails(plans: dict[str, LayerPlan]) -> dict[str, dict]:
    """The plans as a card written before ``expand_after`` / ``linear`` existed stores them."""
    return {
        n: {k: v for k, v in p.to_dict().items() if k not in ("expand_after", "linear")}
        for n, p in plans.items()
    }


def set_skip(net: nn.Module, skip: bool) -> None:
    for layer in fbs_layers(net).values():
        layer.skip = skip


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("density", [0.25, 0.375, 0.5, 1.0])
@pytest.mark.parametrize("width", [4, 6])
def test_compact_through_maxpool_and_linear_equals_the_expanded_and_full_paths(
    width, density, batch, channels_last, monkeypatch
):
    monkeypatch.setattr(FBSConv2d, "channels_last_one", channels_last)
    base = random_cifarnet(width).eval()
    plans = plan_fbs(base, density=density)
    assert plans["features.4.0"].linear == "classifier.0"
    compact, expanded = copy.deepcopy(base), copy.deepcopy(base)
    apply_fbs(compact, plans, generator=torch.Generator().manual_seed(1))
    apply_fbs(expanded, without_tails(plans), generator=torch.Generator().manual_seed(1))  # scatter at BN
    assert type(expanded.classifier[0]) is nn.Linear and isinstance(compact.classifier[0], FBSLinear)
    x = torch.randn(batch, 1, 12, 12)
    with torch.no_grad():
        fast, scattered = compact(x), expanded(x)
        set_skip(compact, False)
        full = compact(x)
    scale = full.abs().max().item()
    torch.testing.assert_close(fast, scattered, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-5 * scale)


def test_maxpool_and_linear_run_on_the_compact_tensor():
    net = random_cifarnet(8).eval()
    gated(net, density=0.25, boost=False)  # k = 2 of 8, 4 of 16, 4 of 16
    seen: dict[str, tuple[int, ...]] = {}
    for name in ("features.2", "features.5", "classifier.0"):
        net.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, (tuple(args[0].shape), tuple(out.shape)))
        )
    with torch.no_grad():
        net(torch.randn(1, 1, 12, 12))
    assert seen["features.2"] == ((1, 2, 12, 12), (1, 2, 6, 6))  # first gated conv's compact output
    assert seen["features.5"] == ((1, 4, 6, 6), (1, 4, 3, 3))  # last gated conv: no longer scattered at BN
    assert seen["classifier.0"] == ((1, 4 * 9), (1, 16))  # the Linear reads 36 of its 144 input features
    with torch.no_grad():
        set_skip(net, False)
        net(torch.randn(1, 1, 12, 12))
    assert seen["features.5"][0] == (1, 16, 6, 6) and seen["classifier.0"][0] == (1, 144)


def test_fbs_linear_reading_kept_columns_equals_the_dense_linear():
    torch.manual_seed(0)
    channels, positions = 6, 4
    linear = nn.Linear(channels * positions, 5)
    state = GateState(channels)
    reader = FBSLinear.from_linear(copy.deepcopy(linear), state, "fc", "conv")
    assert reader.weight is not linear.weight and torch.equal(reader.weight, linear.weight)
    for idx in ([4, 1, 3], [5, 0, 1, 2, 3, 4], [2]):  # top-k order, a permutation of every channel, one
        state.out_idx = torch.tensor(idx)
        for batch in (1, 3):
            compact = torch.randn(batch, len(idx), positions).relu()  # zeros read like the others
            full = torch.zeros(batch, channels, positions)
            full[:, idx] = compact
            expected = linear(full.flatten(1))
            with torch.no_grad():
                torch.testing.assert_close(reader(compact.flatten(1)), expected)
            torch.testing.assert_close(reader(compact.flatten(1)), expected)  # grad enabled: no cache
    with torch.no_grad():  # every input 0: the bias
        torch.testing.assert_close(reader(torch.zeros(1, len(idx) * positions)), linear.bias[None])
    with pytest.raises(RuntimeError, match="flattened compact output"):
        reader(torch.randn(1, 2 * positions))
    state.out_idx = None  # full width (training, skip=False): the plain Linear
    x = torch.randn(2, channels * positions)
    assert torch.equal(reader(x), linear(x))
    with pytest.raises(ValueError, match="whole number"):
        FBSLinear.from_linear(nn.Linear(10, 3), GateState(4), "fc", "conv")


def test_fbs_linear_at_batch_one_reads_every_kept_column_zero_inputs_included(monkeypatch):
    """Only the computed channels' columns are read (that is FBS), but all of them: inputs that are 0 after
    the ReLU are not skipped, as the dense Linear it is compared with does not skip them either."""
    torch.manual_seed(0)
    channels, positions = 6, 4
    linear = nn.Linear(channels * positions, 5)
    state = GateState(channels)
    reader = FBSLinear.from_linear(copy.deepcopy(linear), state, "fc", "conv")
    state.out_idx = torch.tensor([4, 1, 3])
    compact = torch.randn(1, 3 * positions).relu()
    compact[0, :positions] = 0.0  # a whole kept channel that is 0
    read: list[torch.Tensor] = []
    bag = torch.embedding_bag
    monkeypatch.setattr(torch, "embedding_bag", lambda w, idx, *a: read.append(idx) or bag(w, idx, *a))
    with torch.no_grad():
        out = reader(compact)
    (rows,) = read
    expected_rows = torch.tensor([c * positions + p for c in (4, 1, 3) for p in range(positions)])
    assert torch.equal(rows, expected_rows)
    full = torch.zeros(1, channels, positions)
    full[:, [4, 1, 3]] = compact.view(1, 3, positions)
    torch.testing.assert_close(out, linear(full.flatten(1)))


def test_fbs_linear_cache_follows_weight_updates():
    net = random_cifarnet(4).eval()
    gated(net, density=0.5)
    x = torch.randn(1, 1, 12, 12)
    with torch.inference_mode():
        first = net(x)
    with torch.no_grad():
        net.classifier[0].weight.mul_(2.0)
        updated = net(x)
        set_skip(net, False)
        full = net(x)
    assert not torch.allclose(first, updated)
    torch.testing.assert_close(updated, full, rtol=1e-5, atol=1e-5)


def test_training_is_unchanged_by_the_compact_tail():
    base = random_cifarnet(6).train()
    plans = plan_fbs(base, density=0.5)
    new, old = copy.deepcopy(base), copy.deepcopy(base)
    apply_fbs(new, plans, generator=torch.Generator().manual_seed(1))
    apply_fbs(old, without_tails(plans), generator=torch.Generator().manual_seed(1))
    x, y = torch.randn(4, 1, 12, 12), torch.randint(0, 10, (4,))
    losses = []
    for net in (new, old):
        torch.manual_seed(3)  # same dropout mask
        loss = F.cross_entropy(net(x), y) + 1e-4 * saliency_l1(fbs_layers(net).values())
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, p), (_, q) in zip(new.named_parameters(), old.named_parameters()):
        assert torch.equal(p.grad, q.grad), name


class PoolThenConv(nn.Module):
    """A gated conv whose output passes ReLU and max-pool (modules), then a shared ReLU, before an ungated
    conv that needs full width: scattered back after the pool (the last module called once)."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.act, self.pool, self.shared = nn.ReLU(), nn.MaxPool2d(2), nn.ReLU()
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        x = self.shared(self.bn0(self.conv0(x)))
        x = self.shared(self.pool(self.act(self.bn1(self.conv1(x)))))  # `shared` is called twice
        return self.conv2(x).mean(dim=(2, 3))


@pytest.mark.parametrize("batch", [1, 3])
def test_compact_output_is_scattered_back_after_the_last_zero_preserving_module(batch):
    torch.manual_seed(0)
    net = PoolThenConv().eval()
    plans = plan_fbs(net, ["conv1"], density=0.5)
    assert plans == {"conv1": LayerPlan(0.5, True, "bn1", None, expand_after="pool")}
    apply_fbs(net, plans)
    seen: dict[str, int] = {}
    for name in ("act", "pool", "conv2"):
        net.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, args[0].shape[1])
        )
    x = torch.randn(batch, 1, 8, 8)
    with torch.no_grad():
        fast = net(x)
        if batch == 1:
            assert seen == {"act": 4, "pool": 4, "conv2": 8}  # compact through ReLU and pool, then full
        set_skip(net, False)
        torch.testing.assert_close(fast, net(x), rtol=1e-5, atol=1e-6)
    copied = copy.deepcopy(net)  # the copied hook scatters with the copied state
    (hook,) = [h for h in copied.pool._forward_hooks.values() if hasattr(h, "state")]  # not the test's
    assert hook.state is copied.conv1.fbs_state
    set_skip(copied, True)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), fast)


def test_plan_with_bad_tails_is_refused():
    net = tiny_cifarnet()
    plans = plan_fbs(net, density=0.5)
    bad_after = {
        **plans,
        "features.4.0": LayerPlan(0.5, True, "features.4.1", "features.3.0", "features.4.1"),
    }
    with pytest.raises(ValueError, match="not a zero-preserving"):
        apply_fbs(copy.deepcopy(net), bad_after)
    both = LayerPlan(0.5, True, "features.4.1", "features.3.0", "features.5", "classifier.0")
    with pytest.raises(ValueError, match="only one"):
        apply_fbs(copy.deepcopy(net), {**plans, "features.4.0": both})
    source_with_tail = LayerPlan(0.5, True, "features.1.1", None, linear="classifier.0")
    with pytest.raises(ValueError, match="only one"):
        apply_fbs(copy.deepcopy(net), {**plans, "features.1.0": source_with_tail})
    with pytest.raises(ValueError, match="nope"):
        apply_fbs(
            copy.deepcopy(net),
            {**plans, "features.4.0": {**plans["features.4.0"].to_dict(), "linear": "nope"}},
        )
    shared = {
        **plans,
        "features.3.0": LayerPlan(0.5, True, "features.3.1", "features.1.0", linear="classifier.0"),
        "features.4.0": LayerPlan(0.5, True, "features.4.1", None, linear="classifier.0"),
    }
    with pytest.raises(ValueError, match="same module"):
        apply_fbs(copy.deepcopy(net), shared)
    with pytest.raises(ValueError, match="keys"):
        LayerPlan.from_dict({"density": 0.5, "tail": None})


# ------------------------------------------------------------------------------------------ copies and specs


def test_deepcopy_keeps_the_shared_gate_state_between_copied_layers():
    net = tiny_cifarnet().eval()
    gated(net, density=0.5)
    x = torch.randn(2, 1, 8, 8)
    expected = net(x)
    copied = copy.deepcopy(net)
    conv, bn = copied.features[1][0], copied.features[1][1]
    assert isinstance(bn, FBSBatchNorm2d) and bn.fbs_state is conv.fbs_state
    assert conv.fbs_state is not net.features[1][0].fbs_state
    assert copied.features[3][0].fbs_source is conv.fbs_state
    torch.testing.assert_close(copied(x), expected)


def test_structure_spec_rebuilds_the_gated_network():
    from lit_compress.gating.fbs_structure import build_fbs, fbs_structure
    from lit_compress.zoo.errors import ZooFormatError

    net = tiny_cifarnet().eval()
    gated(net, density=0.5, seed=3)
    spec = fbs_structure(net)
    assert spec["kind"] == "fbs" and spec["layers"]["features.3.0"]["source"] == "features.1.0"
    state = net.state_dict()
    assert {k for k in state if "predictor" in k} == {
        f"features.{i}.0.predictor.{p}" for i in (1, 3, 4) for p in ("weight", "bias")
    }
    rebuilt = build_fbs(CifarNet(in_chans=1, img_size=8, width=4, hidden=16), spec)
    rebuilt.load_state_dict(state, strict=True)
    rebuilt.eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(rebuilt(x), net(x))
    assert spec["layers"]["features.4.0"]["linear"] == "classifier.0"
    with pytest.raises(ZooFormatError):
        build_fbs(CifarNet(in_chans=1, img_size=8, width=4, hidden=16), {**spec, "version": 99})
    with pytest.raises(ZooFormatError, match="does not have"):
        build_fbs(CifarNet(in_chans=1, img_size=8, width=4), {**spec, "layers": {"nope": {}}})


# ------------------------------------------------------------------------------------------ bad input


def test_card_written_before_the_tail_fields_still_loads(monkeypatch):
    import importlib

    from lit_compress.gating.fbs_structure import build_fbs
    from lit_compress.gating.fbs_structure import fbs_structure as structure_of

    # the module itself: lit_compress.gating exports a function of the same name
    module = importlib.import_module("lit_compress.gating.fbs_structure")

    net = tiny_cifarnet().eval()
    gated(net, density=0.5, seed=3)
    spec = structure_of(net)
    old_spec = {**spec, "layers": without_tails(plan_fbs(tiny_cifarnet(), density=0.5))}
    assert old_spec["layers"]["features.4.0"] == {
        "density": 0.5,
        "boost": True,
        "norm": "features.4.1",
        "source": "features.3.0",
    }
    x = torch.randn(1, 1, 8, 8)
    expected = net(x)
    rebuilt = build_fbs(CifarNet(in_chans=1, img_size=8, width=4, hidden=16), old_spec)  # traced once
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    assert isinstance(rebuilt.eval().classifier[0], FBSLinear)
    torch.testing.assert_close(rebuilt(x), expected)

    # untraceable: the card's behaviour (scatter at the gate point)
    traced = []

    def untraceable(model, plans):
        traced.append(model)
        raise ValueError("tracing failed")

    monkeypatch.setattr(module, "plan_tails", untraceable)
    rebuilt = build_fbs(CifarNet(in_chans=1, img_size=8, width=4, hidden=16), old_spec)
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    assert len(traced) == 1 and type(rebuilt.eval().classifier[0]) is nn.Linear
    torch.testing.assert_close(rebuilt(x), expected)
    # a current card is not traced
    rebuilt = build_fbs(CifarNet(in_chans=1, img_size=8, width=4, hidden=16), spec)
    assert len(traced) == 1 and isinstance(rebuilt.classifier[0], FBSLinear)


def test_conv_reading_the_network_input_has_no_predecessor():
    with pytest.raises(ValueError, match=r"features\.0\.0.*predecessor"):
        plan_fbs(tiny_cifarnet(), ["features.0.0"])


def test_explicit_bad_targets_are_named():
    net = tiny_cifarnet()
    with pytest.raises(ValueError, match=r"classifier\.0.*Linear"):
        plan_fbs(net, ["classifier.0"])
    with pytest.raises(ValueError, match=r"nope.*no such module"):
        plan_fbs(net, ["nope"])

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2)

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(ValueError, match=r"'b'.*grouped"):
        plan_fbs(Grouped(), ["b"])
    with pytest.raises(ValueError, match="no conv layer to gate"):
        plan_fbs(Grouped())


def test_input_that_cannot_be_pooled_names_the_conv():
    net = TwoConv()
    (layer,) = apply_fbs(net, plan_fbs(net)).values()
    with pytest.raises(ValueError, match=r"'conv1'.*\[B, C, H, W\]"):
        layer(torch.randn(3, 6, 6))  # unbatched [C, H, W]


def test_untraceable_network_is_a_clear_error():
    class Dynamic(TwoConv):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.conv1(self.conv0(x))
            return x

    with pytest.raises(ValueError, match=r"torch\.fx"):
        plan_fbs(Dynamic())


def test_set_density_validates():
    net = tiny_cifarnet()
    gated(net)
    for bad in (0, 1.5):
        with pytest.raises(ValueError):
            set_density(net, bad)
    set_density(net, 0.25)
    assert {m.density for m in fbs_layers(net).values()} == {0.25}


class OneByOneHead(nn.Module):
    """conv (3x3 on 8x8) -> bn -> relu -> global pool -> 1x1 conv on the 1x1 map (a squeeze-excitation-like
    head): gating the head costs its predictor C_in * C_out MACs and saves at most that."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 16, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(F.relu(self.bn0(self.conv0(x))))))
        return self.head(F.adaptive_avg_pool2d(x, 1)).flatten(1)


def test_costly_gates_names_convs_whose_predictor_costs_what_gating_saves():
    net = OneByOneHead()
    layers = gated(net, density=0.5)
    assert sorted(layers) == ["conv1", "head"]
    assert costly_gates(layers, 0.5) == {}  # no forward yet: output sizes unknown
    net.train()(torch.randn(2, 1, 8, 8))
    # head: predictor 8 * 16 = 128 MACs; saved 1 * 1 * 8 * (16 - 8) = 64. conv1 (8x8 map): saved 64*9*8*4
    assert costly_gates(layers, 0.5) == {"head": (128, 64)}
    assert costly_gates(layers, 1.0) == {"conv1": (64, 0), "head": (128, 0)}  # density 1 saves nothing
