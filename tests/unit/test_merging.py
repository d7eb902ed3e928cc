"""Layer merging: BN folding, Linear+Linear, affine absorption, no-op removal, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.merging import merge_layers, register_affine
from lit_compress.models import create_model


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a fold that ignores one of them fails."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def _count(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def _bn_params(model: nn.Module) -> int:
    return sum(
        p.numel()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for p in m.parameters()
    )


NETS = [
    ("resnet8", {"in_chans": 1, "width": 4}, (3, 1, 28, 28)),
    ("resnet8", {"in_chans": 1, "width": 4, "shortcut": "B"}, (3, 1, 28, 28)),
    ("cifarnet", {"width": 8, "hidden": 32, "dropout": 0.5}, (3, 3, 32, 32)),
    ("binary_mlp", {"hidden": [32, 32], "dropout": 0.2, "output_bn": True}, (3, 1, 28, 28)),
    ("binary_lenet5", {"widths": [4, 8, 16], "output_bn": True}, (3, 1, 28, 28)),
    ("timm-resnet", {}, (2, 3, 32, 32)),
]


def _build(name: str, kwargs: dict) -> nn.Module:
    if (
        name == "timm-resnet"
    ):  # timm's ResNet class with BasicBlocks, deep stem and 1x1 downsample, made small
        from timm.models.resnet import BasicBlock, ResNet

        return ResNet(
            BasicBlock, [1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=8, stem_type="deep", num_classes=10
        )
    return create_model(name, **kwargs)


@pytest.mark.parametrize(
    "name, kwargs, shape", NETS, ids=[f"{n}-{k.get('shortcut', '')}" for n, k, _ in NETS]
)
def test_every_batchnorm_folds_and_outputs_are_unchanged(name, kwargs, shape):
    torch.manual_seed(0)
    model = _randomize_bn(_build(name, kwargs))
    model.train()  # merging must use eval statistics and leave the original as it was
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(*shape)
    merged, report = merge_layers(model, x)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert _count(merged, nn.modules.batchnorm._BatchNorm) == 0, report
    assert report.skipped == {}
    # Folding removes exactly the BN parameters and adds a bias to every conv that had none.
    convs_without_bias = sum(
        1 for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is None
    )
    added = sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.bias is None) + sum(
        m.out_features for m in model.modules() if isinstance(m, nn.Linear) and m.bias is None
    )
    assert convs_without_bias > 0 or name.startswith("binary")
    assert report.params_after == report.params_before - _bn_params(model) + added
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model.eval()(x), rtol=1e-4, atol=1e-5)
    assert set(merged.state_dict()) <= set(model.state_dict()) | {
        f"{n}.bias" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
    }


def test_folded_conv_weights_match_the_hand_formula():
    torch.manual_seed(0)
    net = _randomize_bn(nn.Sequential(nn.Conv2d(2, 3, 3, bias=True), nn.BatchNorm2d(3, eps=1e-3)))
    merged, report = merge_layers(net, torch.randn(1, 2, 5, 5))
    conv, bn = net[0], net[1]
    s = bn.weight / torch.sqrt(bn.running_var + 1e-3)
    want_w = conv.weight * s.view(3, 1, 1, 1)
    want_b = (conv.bias - bn.running_mean) * s + bn.bias
    torch.testing.assert_close(merged.get_submodule("0").weight, want_w)
    torch.testing.assert_close(merged.get_submodule("0").bias, want_b)
    assert [(s.kind, s.into) for s in report.steps] == [("fold", "0")]


def test_lenet_300_100_drops_dropout_and_merges_nothing_across_relu():
    torch.manual_seed(0)
    model = create_model("lenet_300_100", dropout=0.5)
    x = torch.randn(4, 1, 28, 28)
    merged, report = merge_layers(model, x)
    assert [s.kind for s in report.steps] == ["drop", "drop"]  # dropout is called twice
    assert _count(merged, nn.Dropout) == 0 and _count(merged, nn.Linear) == 3
    torch.testing.assert_close(merged(x), model.eval()(x))


class LinearStack(nn.Module):
    def __init__(self, dims=(8, 32, 4), bn: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dims[0], dims[1])
        self.bn = nn.BatchNorm1d(dims[1]) if bn else nn.Identity()
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(dims[1], dims[2])

    def forward(self, x):
        return self.fc2(self.drop(self.bn(self.fc1(x))))


def test_consecutive_linears_merge_into_w2_w1():
    torch.manual_seed(0)
    model = LinearStack()
    x = torch.randn(5, 8)
    merged, report = merge_layers(model, x)
    assert _count(merged, nn.Linear) == 1
    fc = merged.get_submodule("fc2")
    torch.testing.assert_close(fc.weight, model.fc2.weight @ model.fc1.weight)
    torch.testing.assert_close(fc.bias, model.fc2.weight @ model.fc1.bias + model.fc2.bias)
    assert ("linear", "fc2", "Linear 'fc1'") in [(s.kind, s.into, s.absorbed) for s in report.steps]
    assert report.params_after == 8 * 4 + 4
    torch.testing.assert_close(merged(x), model.eval()(x))


def test_linear_bn1d_linear_folds_then_merges():
    torch.manual_seed(0)
    model = _randomize_bn(LinearStack(bn=True))
    x = torch.randn(5, 8)
    merged, report = merge_layers(model, x)
    assert [s.kind for s in report.steps if s.kind != "drop"] == ["fold", "linear"]
    assert _count(merged, nn.Linear) == 1 and _count(merged, nn.BatchNorm1d) == 0
    torch.testing.assert_close(merged(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_a_bottleneck_pair_is_only_merged_when_asked():
    model = LinearStack(dims=(64, 2, 64))  # 64x2 + 2x64 weights; merged it would be 64x64
    x = torch.randn(3, 64)
    merged, report = merge_layers(model, x)
    assert _count(merged, nn.Linear) == 2
    assert "more weights (4,096) than the pair (256)" in report.skipped["Linear 'fc1' + Linear 'fc2'"]
    merged, _ = merge_layers(model, x, linear_merge="always")
    assert _count(merged, nn.Linear) == 1
    torch.testing.assert_close(merged(x), model.eval()(x), rtol=1e-5, atol=1e-6)
    merged, report = merge_layers(LinearStack(), torch.randn(2, 8), linear_merge="never")
    assert _count(merged, nn.Linear) == 2 and report.skipped == {}


class ScaledConv(nn.Module):
    """conv -> x * scale (per channel parameter) -> + shift (buffer) -> * 0.5 -> relu."""

    def __init__(self, scale_shape=(3, 1, 1)):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.scale = nn.Parameter(torch.rand(scale_shape) + 0.5)
        self.register_buffer("shift", torch.randn(1, 3, 1, 1))

    def forward(self, x):
        return torch.relu((self.conv(x) * self.scale + self.shift) * 0.5)


def test_per_channel_scale_shift_and_scalar_are_absorbed():
    torch.manual_seed(0)
    model = ScaledConv()
    x = torch.randn(2, 2, 6, 6)
    merged, report = merge_layers(model, x)
    assert [s.kind for s in report.steps] == ["fold", "fold", "fold"]
    assert "scale" not in dict(merged.named_parameters())  # the absorbed parameter is gone
    assert report.params_after == 3 * 2 * 9 + 3  # conv weight + the bias that took the shift
    torch.testing.assert_close(merged(x), model(x))
    want = model.conv.weight * model.scale.view(3, 1, 1, 1) * 0.5
    torch.testing.assert_close(merged.get_submodule("conv").weight, want)


def test_a_scale_that_varies_over_space_is_not_absorbed():
    torch.manual_seed(0)
    model = ScaledConv(scale_shape=(1, 1, 4, 4))
    x = torch.randn(2, 2, 6, 6)
    merged, report = merge_layers(model, x)
    assert any("varies along dim 2" in why for why in report.skipped.values()), report.skipped
    torch.testing.assert_close(merged(x), model(x))


def test_timm_layer_scale_and_registered_affines_fold():
    from timm.layers import LayerScale, LayerScale2d

    class Channels(nn.Module):  # a user affine layer: y = x * a + b on dim 1
        def __init__(self, c):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.rand(c) + 0.5), nn.Parameter(torch.randn(c))

        def forward(self, x):
            return x * self.a.view(1, -1, 1, 1) + self.b.view(1, -1, 1, 1)

    register_affine(Channels, lambda m: (m.a.double(), m.b.double(), 1))
    torch.manual_seed(0)
    fx_leaf = nn.Sequential(nn.Conv2d(2, 4, 1), LayerScale2d(4, init_values=0.3), Channels(4))
    tokens = nn.Sequential(nn.Linear(6, 5), LayerScale(5, init_values=2.0))
    for model, x in ((fx_leaf, torch.randn(2, 2, 3, 3)), (tokens, torch.randn(2, 7, 6))):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.rand_like(p))
        merged, report = merge_layers(model, x)
        torch.testing.assert_close(merged(x), model(x))
        assert report.skipped == {} and report.params_after < report.params_before


class BranchingBN(nn.Module):
    """The conv output is read by the BN and by the add: folding the BN would change the add's input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.conv(x)
        return self.relu(self.bn(y)) + y


def test_bn_whose_conv_output_is_also_used_elsewhere_is_kept():
    model = _randomize_bn(BranchingBN())
    x = torch.randn(2, 2, 5, 5)
    merged, report = merge_layers(model, x)
    assert _count(merged, nn.BatchNorm2d) == 1
    assert "also feeds ['add']" in report.skipped["BatchNorm2d 'bn'"]
    torch.testing.assert_close(merged(x), model.eval()(x))
    with pytest.raises(
        ValueError, match=r"cannot merge BatchNorm2d 'bn': the output of Conv2d 'conv' also feeds"
    ):
        merge_layers(model, x, pairs=[("conv", "bn")])


def test_batch_statistics_bn_subclassed_layers_and_3d_bn1d_are_kept_with_reasons():
    class MyLinear(nn.Linear):
        pass

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2, track_running_stats=False)
            self.fc = MyLinear(4, 3)
            self.bn_fc = nn.BatchNorm1d(3)
            self.fc3 = nn.Linear(4, 5)
            self.bn3 = nn.BatchNorm1d(6)  # normalises dim 1 of [N, 6, 5]; fc3's features are on the last dim

        def forward(self, x, t, s):
            return self.bn(self.conv(x)).sum(), self.bn_fc(self.fc(t)), self.bn3(self.fc3(s))

    model = _randomize_bn(Net())
    x = (torch.randn(2, 1, 5, 5), torch.randn(2, 4), torch.randn(2, 6, 4))
    merged, report = merge_layers(model, x)
    assert "batch statistics" in report.skipped["BatchNorm2d 'bn'"]
    assert "its input is linear(...), not a Conv / Linear layer" in report.skipped["BatchNorm1d 'bn_fc'"]
    assert "acts on dim 1 of a 3-D output whose channels are on dim 2" in report.skipped["BatchNorm1d 'bn3'"]
    assert report.steps == []
    for a, b in zip(merged(*x), model.eval()(*x)):
        torch.testing.assert_close(a, b)


MNIST = (1, 1, 28, 28)
CIFAR = (1, 3, 32, 32)


@pytest.mark.parametrize(
    "name, kwargs, shape, pairs, message",
    [
        ("lenet_300_100", {}, MNIST, [("fc1", "fc2")], r"between them is ReLU 'relu'"),
        (
            "cifarnet",
            {"width": 4, "hidden": 8},
            CIFAR,
            [("features.0.0", "features.1.0")],
            r"between them is BatchNorm2d 'features.0.1', ReLU 'features.0.2'",
        ),
        (
            "lenet5",
            {"conv_relu": True},
            MNIST,
            [("conv1", "conv2")],
            r"between them is MaxPool2d 'pool', ReLU",
        ),
        ("lenet_300_100", {}, MNIST, [("fc1", "fc9")], r"'fc9' is not called.*Close names: .*'fc1'"),
        ("lenet_300_100", {}, MNIST, [("fc2", "fc1")], r"input of 'fc1' is flatten\(\.\.\.\), which is not"),
        ("lenet_300_100", {}, MNIST, [("fc2", "relu")], r"'relu' is called 2 times"),
        (
            "cifarnet",
            {"width": 4, "hidden": 8},
            CIFAR,
            [("features.0.1", "features.0.2")],
            r"ReLU 'features.0.2' is not a per-channel affine layer",
        ),
        ("lenet_300_100", {}, MNIST, ["fc1"], r"each pair must be two module names"),
        ("lenet_300_100", {}, MNIST, "fc1", r"pairs must be a list"),
    ],
)
def test_explicit_pairs_that_cannot_merge_raise_and_name_the_reason(name, kwargs, shape, pairs, message):
    with pytest.raises(ValueError, match=message):
        merge_layers(create_model(name, **kwargs), torch.randn(*shape), pairs=pairs)


def test_function_relu_between_linears_is_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(F.relu(self.a(x)))

    with pytest.raises(ValueError, match=r"between them is relu\(\.\.\.\)"):
        merge_layers(Net(), torch.randn(2, 4), pairs=[["a", "b"]])


def test_explicit_pairs_merge_only_what_is_listed():
    model = _randomize_bn(create_model("resnet8", in_chans=1, width=4))
    x = torch.randn(2, 1, 28, 28)
    merged, report = merge_layers(model, x, pairs=[("conv1", "bn1"), ("layer1.0.conv2", "layer1.0.bn2")])
    assert [(s.into, s.absorbed) for s in report.steps if s.kind != "drop"] == [
        ("conv1", "BatchNorm2d 'bn1'"),
        ("layer1.0.conv2", "BatchNorm2d 'layer1.0.bn2'"),
    ]
    assert _count(merged, nn.BatchNorm2d) == _count(model, nn.BatchNorm2d) - 2
    torch.testing.assert_close(merged(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    model = LinearStack()
    with pytest.raises(ValueError, match=r"linear_merge must be one of .* Did you mean 'always'"):
        merge_layers(model, torch.randn(1, 8), linear_merge="alway")
    with pytest.raises(TypeError, match=r"example_input must be a tensor .* got list"):
        merge_layers(model, [[1.0] * 8])
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        merge_layers("lenet5", torch.randn(1, 8))

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(DataDependent())

        def forward(self, x):
            return self.inner(x)

    class DataDependent(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(
        ValueError, match=r"cannot trace Untraceable with torch.fx \(in submodule 'inner.0'\)"
    ):
        merge_layers(Untraceable(), torch.randn(1, 8))


def test_a_constant_that_is_also_a_called_layers_weight_is_not_deleted():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.gain = nn.Linear(1, 3, bias=False)  # called below, and its weight also used as a scale

        def forward(self, x):
            return self.fc(x) * self.gain.weight.view(-1) + self.gain(x[:, :1])

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(4, 3)
    merged, report = merge_layers(model, x)
    assert [s.kind for s in report.steps] == ["fold"]
    assert "gain.weight" in merged.state_dict()
    torch.testing.assert_close(merged(x), model(x))
