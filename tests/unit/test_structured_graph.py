"""Channel dependency graph: which channels are tied, who reads them, and what cannot be pruned."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.models import create_model
from lit_compress.pruning.structured.graph import (
    ChannelRef,
    UnsupportedGraphError,
    channel_groups,
    register_channel_op,
)


def _by_name(groups):
    return {g.name: g for g in groups}


def _modules(refs):
    return [r.module for r in refs]


# -- reference networks ------------------------------------------------------------------------------------


def test_lenet5_groups_flatten_repeat_and_output():
    groups = channel_groups(create_model("lenet5"), torch.randn(2, 1, 28, 28))
    assert [g.name for g in groups] == ["conv1", "conv2", "fc1", "fc2"]
    g = _by_name(groups)
    assert g["conv1"].consumers == (ChannelRef("conv2", 1),)
    assert g["conv1"].size == 20 and g["conv1"].prunable
    # 50 x 4 x 4 feature map flattened: every conv2 channel is 16 consecutive fc1 inputs.
    assert g["conv2"].consumers == (ChannelRef("fc1", 1, 0, 16),)
    assert g["fc1"].consumers == (ChannelRef("fc2", 1),)
    assert g["fc1"].relu_follows and not g["conv1"].relu_follows  # Caffe LeNet: no ReLU after the convs
    assert g["fc1"].activations == ("fc1",)
    assert not g["fc2"].prunable and g["fc2"].reason == "feeds the network output"
    assert all(g[n].producers == (ChannelRef(n, 0),) and not g[n].norms for n in g)


def test_lenet5_at_32px_has_repeat_25():
    groups = _by_name(channel_groups(create_model("lenet5", img_size=32), torch.randn(1, 1, 32, 32)))
    assert groups["conv2"].consumers == (ChannelRef("fc1", 1, 0, 25),)


def test_channel_groups_leaves_modes_and_bn_statistics_untouched():
    model = create_model("resnet", depth=8)
    model.train()
    model.layer1[0].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    channel_groups(model, torch.randn(2, 3, 32, 32))
    assert model.training and not model.layer1[0].training and model.layer2[0].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("depth", [8, 14])
def test_cifar_resnet_option_a_stage_channels_are_tied_to_the_padding(depth):
    n = (depth - 2) // 6
    groups = _by_name(channel_groups(create_model("resnet", depth=depth), torch.randn(1, 3, 32, 32)))
    internal = [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(n)]
    assert sorted(name for name, grp in groups.items() if grp.prunable) == sorted(internal)
    for name in internal:  # conv1 -> bn1 -> relu -> conv2, as in Li et al. (2017)
        blk = name.rsplit(".", 1)[0]
        grp = groups[name]
        assert grp.norms == (ChannelRef(f"{blk}.bn1", 0),)
        assert grp.consumers == (ChannelRef(f"{blk}.conv2", 1),)
        assert grp.activations == (f"{blk}.bn1",) and grp.relu_follows
    stem = groups["conv1"]
    assert _modules(stem.producers) == ["conv1"] + [f"layer1.{b}.conv2" for b in range(n)]
    assert _modules(stem.norms) == ["bn1"] + [f"layer1.{b}.bn2" for b in range(n)]
    assert "zero-padded along channels" in stem.reason and "'layer2.0'" in stem.reason
    stage2 = groups["layer2.0.conv2"]
    assert "channel-padded output" in stage2.reason and "layer2.0" in stage2.reason
    assert "layer3.0" in groups["layer3.0.conv2"].reason
    assert groups["fc"].reason == "feeds the network output"


def test_cifar_resnet_option_b_stage_groups_are_prunable_together():
    groups = _by_name(
        channel_groups(create_model("resnet", depth=14, shortcut="B"), torch.randn(1, 3, 32, 32))
    )
    assert [name for name, grp in groups.items() if not grp.prunable] == ["fc"]
    stage2 = groups["layer2.0.conv2"]
    assert _modules(stage2.producers) == ["layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2"]
    assert _modules(stage2.norms) == ["layer2.0.bn2", "layer2.0.shortcut.1", "layer2.1.bn2"]
    assert _modules(stage2.consumers) == ["layer2.1.conv1", "layer3.0.conv1", "layer3.0.shortcut.0"]
    assert stage2.activations == ("layer2.0.bn2", "layer2.0.shortcut.1", "layer2.1.bn2")
    assert not stage2.relu_follows  # the ReLU comes after the residual add
    assert groups["layer3.0.conv2"].consumers[-1] == ChannelRef("fc", 1)
    assert len(groups) == 1 + 6 + 2 + 1  # stem/stage1, block-internal, stage 2 and 3, fc


def _check_resnet18(groups):
    g = _by_name(groups)
    internal = [f"layer{s}.{b}.conv1" for s in (1, 2, 3, 4) for b in (0, 1)]
    stages = ["conv1", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2"]
    assert sorted(g) == sorted([*internal, *stages, "fc"])
    assert all(g[n].prunable for n in internal + stages) and not g["fc"].prunable
    assert _modules(g["conv1"].producers) == ["conv1", "layer1.0.conv2", "layer1.1.conv2"]
    assert _modules(g["layer2.0.conv2"].producers) == [
        "layer2.0.conv2",
        "layer2.0.downsample.0",
        "layer2.1.conv2",
    ]
    assert _modules(g["layer4.0.conv2"].consumers) == ["layer4.1.conv1", "fc"]
    assert g["layer3.1.conv1"].consumers == (ChannelRef("layer3.1.conv2", 1),)
    assert g["layer3.1.conv1"].relu_follows


def test_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    _check_resnet18(channel_groups(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32)))


def test_timm_resnet18():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    _check_resnet18(channel_groups(model, torch.randn(1, 3, 64, 64)))


# -- toy graphs --------------------------------------------------------------------------------------------


class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 5, 1)
        self.head = nn.Linear(5 * 2 * 2, 3)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        y = F.relu(self.c(self.bn(y)))
        return self.head(F.adaptive_avg_pool2d(y, 2).flatten(1))


def test_cat_along_channels_gives_offsets():
    g = _by_name(channel_groups(CatNet(), torch.randn(1, 3, 8, 8)))
    assert g["a"].norms == (ChannelRef("bn", 0, 0),) and g["b"].norms == (ChannelRef("bn", 0, 4),)
    assert g["a"].consumers == (ChannelRef("c", 1, 0),) and g["b"].consumers == (ChannelRef("c", 1, 4),)
    assert g["a"].relu_follows and g["a"].activations == ("a",)
    assert g["c"].consumers == (ChannelRef("head", 1, 0, 4),)  # flatten after 2x2 pooling
    assert g["a"].prunable and g["b"].prunable and g["c"].prunable


class CatThenFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 1)
        self.b = nn.Conv2d(1, 3, 1)
        self.fc = nn.Linear(5 * 9, 2)

    def forward(self, x):
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).view(x.size(0), -1))


def test_cat_then_view_gives_offset_and_repeat():
    g = _by_name(channel_groups(CatThenFlatten(), torch.randn(2, 1, 3, 3)))
    assert g["a"].consumers == (ChannelRef("fc", 1, 0, 9),)
    assert g["b"].consumers == (ChannelRef("fc", 1, 18, 9),)


class AddCatMismatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 1)
        self.b = nn.Conv2d(1, 3, 1)
        self.c = nn.Conv2d(1, 5, 1)
        self.d = nn.Conv2d(5, 1, 1)

    def forward(self, x):
        return self.d(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))


def test_add_of_cat_and_single_group_is_not_prunable():
    g = _by_name(channel_groups(AddCatMismatch(), torch.randn(1, 1, 2, 2)))
    for name in "abc":
        assert not g[name].prunable and "different concatenation layout" in g[name].reason


class DepthwiseNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw1 = nn.Conv2d(3, 8, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.pw2 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu6(self.bn1(self.pw1(x)))
        x = F.relu6(self.bn2(self.dw(x)))
        return self.fc(self.pw2(x).mean((2, 3)))


def test_depthwise_conv_passes_the_group_through():
    g = _by_name(channel_groups(DepthwiseNet(), torch.randn(1, 3, 6, 6)))
    assert g["pw1"].passthrough == (ChannelRef("dw", 0),)
    assert _modules(g["pw1"].norms) == ["bn1", "bn2"]
    assert g["pw1"].consumers == (ChannelRef("pw2", 1),) and g["pw1"].prunable
    assert g["pw2"].consumers == (ChannelRef("fc", 1),) and g["pw2"].prunable  # mean over H, W only
    assert "dw" not in g


class GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(self.g(self.a(x)))


def test_grouped_conv_makes_both_sides_non_prunable():
    g = _by_name(channel_groups(GroupedConvNet(), torch.randn(1, 3, 4, 4)))
    assert not g["a"].prunable and "grouped conv 'g' (Conv2d) with groups=2" in g["a"].reason
    assert not g["g"].prunable and "output of grouped conv" in g["g"].reason


class ChannelSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(4, 2, 1)
        self.c = nn.Conv2d(3, 6, 1)
        self.d = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        spatial = self.c(x)[:, :, 1:, ::2]  # spatial slicing keeps the channels
        return self.b(self.a(x)[:, :4]), self.d(spatial)


def test_channel_slicing_is_not_prunable_but_spatial_slicing_is():
    g = _by_name(channel_groups(ChannelSlice(), torch.randn(1, 3, 4, 4)))
    assert not g["a"].prunable and "sliced along channels by node 'getitem_1'" in g["a"].reason
    assert g["c"].prunable and g["c"].consumers == (ChannelRef("d", 1),)


class HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.conv(x).view(-1, 16))


def test_hard_coded_reshape_is_not_prunable():
    g = _by_name(channel_groups(HardCodedView(), torch.randn(1, 1, 2, 2)))
    assert not g["conv"].prunable and "hard-coded size 16" in g["conv"].reason


class Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x):
        return x * self.scale


class ScaledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.s = Scale(4)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(self.s(self.a(x)))


def test_custom_module_traced_through_or_leaf_keeps_its_channels():
    traced = _by_name(channel_groups(ScaledNet(), torch.randn(1, 3, 2, 2)))
    assert not traced["a"].prunable and "parameter/buffer 's.scale'" in traced["a"].reason
    leaf = _by_name(channel_groups(ScaledNet(), torch.randn(1, 3, 2, 2), leaf_types=[Scale]))
    assert not leaf["a"].prunable
    assert (
        "read by 's' (Scale), a module with parameters the channel analysis does not know" in leaf["a"].reason
    )


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.shared = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.shared(self.a(x)) + self.shared(self.b(x))


def test_module_called_twice_ties_its_input_groups():
    g = _by_name(channel_groups(SharedConv(), torch.randn(1, 3, 2, 2)))
    assert _modules(g["a"].producers) == ["a", "b"] and g["a"].prunable
    assert g["a"].consumers == (ChannelRef("shared", 1),)


class TiedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.c = nn.Linear(4, 2)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_shared_parameters_make_groups_non_prunable():
    g = _by_name(channel_groups(TiedWeights(), torch.randn(2, 4)))
    assert not g["a"].prunable and "shares a parameter" in g["a"].reason


@torch.fx.wrap
def mystery_op(x):
    return x.flip(1)


@torch.fx.wrap
def declared_opaque_op(x):
    return x.roll(1, 1)


class Block(nn.Module):
    def __init__(self, declared: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.declared = declared

    def forward(self, x):
        x = self.conv(x)
        return declared_opaque_op(x) if self.declared else mystery_op(x)


class MysteryNet(nn.Module):
    def __init__(self, declared: bool = False):
        super().__init__()
        self.block = Block(declared)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.block(x))


def test_unknown_op_on_channels_raises_naming_node_op_and_layer():
    with pytest.raises(UnsupportedGraphError) as info:
        channel_groups(MysteryNet(), torch.randn(1, 3, 2, 2))
    msg = str(info.value)
    assert "cannot analyse node 'mystery_op' (tests.unit.test_structured_graph.mystery_op) in 'block'" in msg
    assert "reads the channels of 'block.conv'" in msg and "While executing" not in msg
    assert "register_channel_op" in msg
    assert isinstance(info.value, ValueError)


def test_register_channel_op_declares_an_opaque_op():
    register_channel_op(declared_opaque_op, "opaque")
    g = _by_name(channel_groups(MysteryNet(declared=True), torch.randn(1, 3, 2, 2)))
    assert not g["block.conv"].prunable and "declared opaque" in g["block.conv"].reason
    with pytest.raises(ValueError, match="'elementwise' or 'opaque'"):
        register_channel_op(declared_opaque_op, "mystery")


class FunctionalOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = F.interpolate(self.a(x), scale_factor=2.0)  # spatial: channels pass through
        z = self.b(y)
        return self.c(F.layer_norm(z.permute(0, 2, 3, 1), (4,)).permute(0, 3, 1, 2))


def test_spatial_functional_ops_pass_channels_and_mixing_ops_keep_them():
    g = _by_name(channel_groups(FunctionalOps(), torch.randn(1, 3, 2, 2)))
    assert g["a"].prunable and g["a"].consumers == (ChannelRef("b", 1),)
    assert not g["b"].prunable
    assert "node 'layer_norm' (F.layer_norm) in the root module, which mixes or normalises" in g["b"].reason


class ReadsChannelCount(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        a, b, c = self.a(x), self.b(x), self.c(x)
        n, ch, h, w = a.shape  # h, w and n unused; ch scales the output
        return self.head(torch.cat([a / ch, b, c.view(c.size(0), c.size(1), h * w).view(n, -1, h, w)], 1))


def test_reading_channel_count_keeps_the_channels():
    g = _by_name(channel_groups(ReadsChannelCount(), torch.randn(1, 3, 2, 2)))
    assert not g["a"].prunable and "channel count read by node 'getitem_1'" in g["a"].reason
    assert g["b"].prunable  # its channels are only concatenated
    assert not g["c"].prunable and "channel count read by node 'size_1'" in g["c"].reason


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            return y
        return -y


def test_untraceable_model_raises():
    with pytest.raises(UnsupportedGraphError, match=r"cannot trace Untraceable with torch\.fx"):
        channel_groups(Untraceable(), torch.randn(1, 3, 2, 2))


def test_bad_example_input_is_reported():
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        channel_groups(create_model("lenet5"), [1, 2])
    with pytest.raises(ValueError, match=r"example_input of shape \[\(1, 3, 28, 28\)\]"):
        channel_groups(create_model("lenet5"), torch.randn(1, 3, 28, 28))
