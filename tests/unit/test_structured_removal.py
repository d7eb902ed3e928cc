"""Physical channel removal, optimizer rebuild and the zoo structure spec."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.models import create_model
from lit_compress.pruning.structured import (
    channel_groups,
    rebuild_optimizer,
    remove_channels,
    slice_tensor,
    structure_spec,
    zero_channels,
)
from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.structure import apply_structure


def _random_keep(groups, seed=0, frac=0.5):
    """Random kept (sorted) and removed channels for every prunable group."""
    g = torch.Generator().manual_seed(seed)
    keep, gone = {}, {}
    for grp in groups:
        if grp.prunable:
            perm = torch.randperm(grp.size, generator=g)
            n = max(1, int(grp.size * frac))
            keep[grp.name], gone[grp.name] = perm[:n].sort().values, perm[n:]
    return keep, gone


def _zero_then_remove(model, x, seed=0):
    """Zero the channels to remove, then remove them: outputs must not change."""
    model.eval()
    groups = channel_groups(model, x)
    keep, gone = _random_keep(groups, seed)
    assert keep, "nothing prunable"
    with torch.no_grad():
        dense = model(x)
    for grp in groups:
        if grp.name in gone:
            zero_channels(model, grp, gone[grp.name])
    with torch.no_grad():
        zeroed = model(x)
    assert not torch.allclose(zeroed, dense, atol=1e-3)  # the zeroing really changed the network
    n_before = sum(p.numel() for p in model.parameters())
    remove_channels(model, groups, keep)
    with torch.no_grad():
        pruned = model(x)
    assert torch.allclose(pruned, zeroed, atol=1e-5), (pruned - zeroed).abs().max()
    assert sum(p.numel() for p in model.parameters()) < 0.7 * n_before
    return groups, keep


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


def _randomise_bn(model, seed=0):
    """Non-trivial BN statistics so that a wrong slice of running stats would show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


# -- zero-then-remove equivalence ----------------------------------------------------------------------------


def test_lenet5_zero_then_remove_is_exact_and_slices_by_hand():
    torch.manual_seed(0)
    model = create_model("lenet5")
    old = copy.deepcopy(model)
    _, keep = _zero_then_remove(model, torch.randn(4, 1, 28, 28))
    k1, k2, k3 = keep["conv1"], keep["conv2"], keep["fc1"]
    assert model.conv1.out_channels == len(k1) == 10 and model.conv2.in_channels == 10
    assert model.conv2.out_channels == 25 and model.fc1.in_features == 25 * 16
    assert model.fc1.out_features == 250 and model.fc2.in_features == 250
    # Hand-computed slices: fc1 input feature c*16 + j belongs to conv2 channel c.
    cols = (k2[:, None] * 16 + torch.arange(16)).flatten()
    assert torch.equal(model.conv2.weight, old.conv2.weight[k2][:, k1])
    assert torch.equal(model.fc1.weight, old.fc1.weight[k3][:, cols])
    assert torch.equal(model.fc1.bias, old.fc1.bias[k3]) and torch.equal(model.fc2.bias, old.fc2.bias)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet_zero_then_remove_is_exact(shortcut):
    torch.manual_seed(0)
    model = _randomise_bn(create_model("resnet", depth=14, shortcut=shortcut))
    _zero_then_remove(model, torch.randn(2, 3, 32, 32))
    if shortcut == "B":
        assert (
            model.layer2[0].shortcut[0].out_channels == 16 and model.layer3[0].shortcut[0].in_channels == 16
        )
        assert model.fc.in_features == 32 and model.layer2[1].bn2.running_mean.shape == (16,)


def test_torchvision_resnet18_zero_then_remove_is_exact():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.resnet18(num_classes=10))
    _zero_then_remove(model, torch.randn(1, 3, 32, 32))
    assert model.layer4[1].conv2.out_channels == 256 and model.fc.in_features == 256


def test_timm_mobilenetv3_zero_then_remove_and_spec_round_trip():
    """Depthwise convs, squeeze-excitation (a channel-wise mul), timm's BatchNormAct2d and Linear."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    groups, _ = _zero_then_remove(model, x)
    assert sum(g.prunable for g in groups) == len(groups) - 1
    spec = json.loads(
        json.dumps(structure_spec(model, timm.create_model("mobilenetv3_small_050", num_classes=10)))
    )
    fresh = apply_structure(timm.create_model("mobilenetv3_small_050", num_classes=10), spec).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_cat_and_depthwise_zero_then_remove_is_exact():
    torch.manual_seed(0)
    cat = _randomise_bn(CatNet())
    _, keep = _zero_then_remove(cat, torch.randn(2, 3, 8, 8))
    assert cat.bn.num_features == cat.c.in_channels == len(keep["a"]) + len(keep["b"])
    dw = _randomise_bn(DepthwiseNet())
    _zero_then_remove(dw, torch.randn(2, 3, 6, 6))
    assert dw.dw.groups == dw.dw.in_channels == dw.dw.out_channels == 4 and dw.dw.weight.shape == (4, 1, 3, 3)


def test_removal_without_zeroing_changes_the_output():
    """The equivalence tests can fail: removing live channels changes the function."""
    torch.manual_seed(0)
    model = create_model("lenet5").eval()
    x = torch.randn(2, 1, 28, 28)
    ref = model(x)
    groups = channel_groups(model, x)
    remove_channels(model, groups, {"conv1": torch.arange(10)})
    assert not torch.allclose(model(x), ref, atol=1e-3)


def test_return_value_records_every_replaced_parameter():
    model = create_model("lenet5")
    before = dict(model.named_parameters())
    groups = channel_groups(model, torch.randn(1, 1, 28, 28))
    k1, k2 = torch.tensor([0, 3, 7]), torch.arange(0, 50, 2)
    sliced = remove_channels(model, groups, {"conv1": k1, "conv2": k2})
    assert set(sliced) == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc1.weight"}
    assert sliced["conv1.weight"][0] == 0 and torch.equal(sliced["conv1.weight"][1], k1)
    dims, idx = sliced["conv2.weight"]
    assert dims == (0, 1) and torch.equal(idx[0], k2) and torch.equal(idx[1], k1)
    assert sliced["fc1.weight"][0] == 1 and len(sliced["fc1.weight"][1]) == 25 * 16
    for name, info in sliced.items():
        assert torch.equal(slice_tensor(before[name].detach(), info), dict(model.named_parameters())[name])
        assert dict(model.named_parameters())[name] is not before[name]
    assert model.fc1.weight.requires_grad


def test_requires_grad_is_kept():
    model = create_model("lenet5")
    model.conv1.weight.requires_grad_(False)
    groups = channel_groups(model, torch.randn(1, 1, 28, 28))
    remove_channels(model, groups, {"conv1": torch.tensor([1, 2])})
    assert not model.conv1.weight.requires_grad and model.conv1.bias.requires_grad
    assert isinstance(model.conv1.weight, nn.Parameter)


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.fixture
def lenet():
    model = create_model("lenet5")
    return model, channel_groups(model, torch.randn(1, 1, 28, 28))


@pytest.mark.parametrize(
    ("keep", "exc", "match"),
    [
        (
            {"conv1": torch.tensor([], dtype=torch.long)},
            ValueError,
            r"would remove every channel of 'conv1'; keep at least 1 \(min_channels\)",
        ),
        ({"fc2": torch.tensor([0, 1])}, ValueError, r"group 'fc2' is not prunable: feeds the network output"),
        ({"conv1": torch.tensor([0, 20])}, ValueError, r"outside \[0, 20\)"),
        ({"conv1": torch.tensor([-1, 2])}, ValueError, r"outside \[0, 20\)"),
        ({"conv1": torch.tensor([3, 1])}, ValueError, "sorted ascending without duplicates"),
        ({"conv1": torch.tensor([1, 1, 2])}, ValueError, "sorted ascending without duplicates"),
        ({"conv1": torch.tensor([0.0, 1.0])}, TypeError, "integer channel indices"),
        ({"conv1": torch.ones(20, dtype=torch.bool)}, TypeError, "nonzero"),
        ({"conv3": torch.tensor([0])}, ValueError, r"group 'conv3', which is not among the groups"),
    ],
)
def test_bad_keep_is_refused_and_nothing_changes(lenet, keep, exc, match):
    model, groups = lenet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        remove_channels(model, groups, {"fc1": torch.arange(10), **keep})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_stale_groups_are_refused(lenet):
    model, groups = lenet
    remove_channels(model, groups, {"conv1": torch.arange(5)})
    with pytest.raises(ValueError, match="stale"):
        remove_channels(model, groups, {"conv1": torch.arange(2)})


# -- optimizer rebuild ---------------------------------------------------------------------------------------


def _step(model, opt, x):
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_rebuild_optimizer_slices_state(make_opt):
    torch.manual_seed(0)
    model = create_model("lenet5")
    x = torch.randn(3, 1, 28, 28)
    opt = make_opt(model.parameters())
    _step(model, opt, x)
    old = dict(model.named_parameters())
    old_state = {
        n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
        for n, p in old.items()
    }
    groups = channel_groups(model, x)
    keep = {"conv1": torch.tensor([0, 2, 5, 19]), "conv2": torch.arange(1, 50, 3), "fc1": torch.arange(100)}
    sliced = remove_channels(model, groups, keep)
    rebuild_optimizer(opt, old, model, sliced)

    params = [p for g in opt.param_groups for p in g["params"]]
    assert [id(p) for p in params] == [id(p) for p in model.parameters()]  # no stale parameter left
    assert set(map(id, opt.state)) == set(map(id, params))
    for name, p in model.named_parameters():
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.ndim:
                assert value.shape == p.shape, (name, key)
                want = old_state[name][key]
                if name in sliced:
                    want = slice_tensor(want, sliced[name])
                assert torch.equal(value, want), (name, key)
            else:
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(old_state[name][key]))  # step
    k1, k2 = keep["conv1"], keep["conv2"]
    key = "momentum_buffer" if isinstance(opt, torch.optim.SGD) else "exp_avg"
    assert torch.equal(opt.state[model.conv2.weight][key], old_state["conv2.weight"][key][k2][:, k1])
    before = model.conv2.weight.detach().clone()
    _step(model, opt, x)
    assert not torch.equal(before, model.conv2.weight)


def test_rebuild_optimizer_accepts_a_wrapper_and_rejects_junk():
    model = create_model("lenet5")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    class Wrapper:  # LightningOptimizer-like
        optimizer = opt

    old = dict(model.named_parameters())
    groups = channel_groups(model, torch.randn(1, 1, 28, 28))
    sliced = remove_channels(model, groups, {"fc1": torch.arange(3)})
    rebuild_optimizer(Wrapper(), old, model, sliced)
    assert opt.param_groups[0]["params"][4] is model.fc1.weight
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        rebuild_optimizer(object(), old, model, sliced)


# -- structure spec ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [("lenet5", {}, (2, 1, 28, 28)), ("resnet", {"depth": 8, "shortcut": "B"}, (2, 3, 32, 32))],
)
def test_spec_round_trip(name, kwargs, shape):
    torch.manual_seed(0)
    model = _randomise_bn(create_model(name, **kwargs)).eval()
    x = torch.randn(*shape)
    groups = channel_groups(model, x)
    keep, _ = _random_keep(groups, seed=1, frac=0.4)
    remove_channels(model, groups, keep)
    spec = json.loads(json.dumps(structure_spec(model, create_model(name, **kwargs))))
    assert spec["kind"] == "channels" and spec["version"] == 1 and spec["modules"]
    for entry in spec["modules"].values():
        assert all(isinstance(v, int) for k, v in entry.items() if k != "type")
    fresh = apply_structure(create_model(name, **kwargs), spec)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_spec_entries_and_unchanged_model():
    model = create_model("lenet5")
    assert structure_spec(model, create_model("lenet5"))["modules"] == {}
    groups = channel_groups(model, torch.randn(1, 1, 28, 28))
    remove_channels(model, groups, {"conv2": torch.arange(7)})
    assert structure_spec(model, create_model("lenet5"))["modules"] == {
        "conv2": {"type": "Conv2d", "in_channels": 20, "out_channels": 7, "groups": 1},
        "fc1": {"type": "Linear", "in_features": 112, "out_features": 500},
    }
    rebuilt = apply_structure(create_model("lenet5"), structure_spec(model, create_model("lenet5")))
    assert rebuilt.conv2.kernel_size == (5, 5) and rebuilt.fc1.bias is not None


def test_spec_refuses_what_it_cannot_express():
    model = create_model("lenet5")
    model.conv1 = nn.Conv2d(1, 20, kernel_size=3)  # same channels, other kernel
    with pytest.raises(ValueError, match="cannot express"):
        structure_spec(model, create_model("lenet5"))
    model = create_model("lenet5")
    model.extra = nn.ReLU()
    with pytest.raises(ValueError, match="'extra' where the reference architecture has nothing"):
        structure_spec(model, create_model("lenet5"))


def _spec(modules, **top):
    return {"kind": "channels", "version": 1, "modules": modules, **top}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            _spec({"conv9": {"type": "Conv2d", "in_channels": 1, "out_channels": 2, "groups": 1}}),
            "names module 'conv9', which LeNet5 does not have",
        ),
        (_spec({"conv1": {"type": "ConvTranspose2d"}}), "unknown module type 'ConvTranspose2d'"),
        (
            _spec({"conv1": {"type": "Linear", "in_features": 1, "out_features": 2}}),
            "says 'conv1' is a Linear but LeNet5 builds a Conv2d",
        ),
        (_spec({"conv1": {"type": "Conv2d", "in_channels": 1}}), "must have exactly"),
        (
            _spec({"conv1": {"type": "Conv2d", "in_channels": 1, "out_channels": 0, "groups": 1}}),
            "positive integer",
        ),
        (
            _spec({"conv1": {"type": "Conv2d", "in_channels": 1, "out_channels": 2.0, "groups": 1}}),
            "positive integer",
        ),
        (
            _spec({"conv1": {"type": "Conv2d", "in_channels": 1, "out_channels": 3, "groups": 2}}),
            "not a valid Conv2d",
        ),
        (_spec({}, version=2), "version 2 is not supported"),
        (_spec({}, extra=1), "unknown keys"),
        (_spec([]), "'modules' must be an object"),
    ],
)
def test_builder_refuses_bad_specs(spec, match):
    with pytest.raises(ZooFormatError, match=match):
        apply_structure(create_model("lenet5"), spec)
