"""Depth pruning mechanics: residual blocks, shortcut replacement, the epsilon gate, SSL norms, the spec."""

from __future__ import annotations

import copy
import json

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.models import create_model
from lit_compress.pruning.depth import (
    EpsilonGates,
    PadShortcut,
    ResidualShortcut,
    branch_norm,
    branch_parameters,
    drop_from_optimizer,
    epsilon_gate,
    remove_blocks,
    residual_blocks,
    select_blocks,
    shortcut_replacement,
)
from lit_compress.pruning.depth_callback import DepthPruning
from lit_compress.pruning.depth_spec import build_depth, depth_spec
from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.structure import apply_structure

X = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def resnet(shortcut: str = "A", depth: int = 14) -> nn.Module:
    torch.manual_seed(0)
    net = create_model(f"resnet{depth}", in_chans=1, width=4, shortcut=shortcut).eval()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong shortcut or activation would show
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def timm_resnet() -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    return ResNet(BasicBlock, [2, 2, 1, 1], channels=(8, 16, 16, 16), stem_width=8, in_chans=1).eval()


def zero_branch(block: nn.Module, end: str = "bn2") -> None:
    """F(x) = 0 exactly: the branch's last BatchNorm outputs beta = 0 with gamma = 0."""
    bn = block.get_submodule(end)
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.zero_()


def test_residual_blocks_and_stages_of_a_cifar_resnet():
    blocks = residual_blocks(resnet(depth=14))
    assert list(blocks) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
    assert select_blocks(list(blocks), ["net.layer2.*"], ["layer2.0"], prefix="net.") == ["layer2.1"]


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("name", ["layer1.1", "layer2.0", "layer3.0"])  # identity, then shape-changing ones
def test_removing_a_block_equals_zeroing_its_branch(shortcut, name):
    net = resnet(shortcut)
    block = net.get_submodule(name)
    zero_branch(block)
    with torch.no_grad():
        zeroed = net(X)
    keys = set(net.state_dict())
    gone = remove_blocks(net, [name])
    assert isinstance(net.get_submodule(name), ResidualShortcut)
    assert set(gone) == {n for n, _ in block.named_parameters(prefix=name) if ".shortcut" not in n}
    assert set(net.state_dict()) == keys - {
        k for k in keys if k.startswith(name + ".") and ".shortcut" not in k
    }
    with torch.no_grad():
        torch.testing.assert_close(net(X), zeroed)


def test_pad_shortcut_matches_the_hand_computation():
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(2, 2, 4, 4)
    out = PadShortcut(stride=2, pad=4)(x)
    assert out.shape == (2, 6, 2, 2)
    assert torch.equal(out[:, 2:4], x[:, :, ::2, ::2])
    assert torch.all(out[:, :2] == 0) and torch.all(out[:, 4:] == 0)


def test_replacement_applies_the_activation_out_of_place_and_shares_the_shortcut():
    net = resnet("B")
    block = net.layer2[0]
    replacement = shortcut_replacement(block)
    assert replacement.shortcut is block.shortcut  # same parameters: optimizer state carries over
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    y = x * 1.0
    out = replacement(y)
    torch.testing.assert_close(out, torch.relu(block.shortcut(y)))
    ident = shortcut_replacement(net.layer1[1])
    z = torch.randn(2, 4, 8, 8)
    before = z.clone()
    torch.testing.assert_close(ident(z), torch.relu(before))
    assert torch.equal(z, before)  # the block's input is not modified in place


def test_timm_blocks_with_and_without_downsample_are_removed_exactly():
    net = timm_resnet()
    assert list(residual_blocks(net)) == [
        "layer1.0",
        "layer1.1",
        "layer2.0",
        "layer2.1",
        "layer3.0",
        "layer4.0",
    ]
    for name in ("layer1.1", "layer2.0"):  # identity shortcut; strided 1x1 conv + BN downsample
        zero_branch(net.get_submodule(name))
    with torch.no_grad():
        zeroed = net(X)
    remove_blocks(net, ["layer1.1", "layer2.0"])
    assert "layer2.0.downsample.0.weight" in net.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(net(X), zeroed)


def test_torchvision_bottleneck_is_removed_exactly():
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    net = ResNet(Bottleneck, [1, 2, 1, 1], num_classes=3).eval()
    zero_branch(net.layer2[1], "bn3")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        zeroed = net(x)
    remove_blocks(net, ["layer2.1"])
    with torch.no_grad():
        torch.testing.assert_close(net(x), zeroed)


def test_remove_blocks_rejects_unknown_names_without_changing_anything():
    net = resnet()
    with pytest.raises(ValueError, match=r"cannot remove \['layer4.0'\]: not residual blocks"):
        remove_blocks(net, ["layer1.0", "layer4.0"])
    assert len(residual_blocks(net)) == 6


def paper_gate(f: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference implementation's four ReLUs (tensorpack strict_identity), batch scope."""
    s = (torch.relu(f - eps) + torch.relu(-f - eps)).max()
    return torch.relu(torch.relu(s * -1e6 + 1.0) * -1e6 + 1.0)


def test_epsilon_gate_is_the_papers_four_relu_function():
    f = torch.tensor([[0.5, -0.9], [0.2, 0.1]])
    for eps, want in ((1.0, 0.0), (0.9, 0.0), (0.8, 1.0), (0.3, 1.0)):
        gate, peak = epsilon_gate(f, eps)
        assert gate.item() == want == paper_gate(f, eps).item()
        assert peak.item() == pytest.approx(0.9)
    per_sample, peaks = epsilon_gate(f, 0.4, per_sample=True)
    assert per_sample.flatten().tolist() == [1.0, 0.0]
    assert peaks.flatten().tolist() == pytest.approx([0.9, 0.2])


def test_gates_close_small_branches_and_record_the_largest_training_response():
    net = resnet()
    peaks = {}

    def spy(name):
        def hook(module, args, out):
            peaks[name] = max(peaks.get(name, 0.0), out.detach().abs().max().item())

        return hook

    for name in ("layer1.0", "layer2.1"):
        net.get_submodule(name).bn2.register_forward_hook(spy(name))
    blocks = residual_blocks(net)
    gates = EpsilonGates(epsilon=1e6, scope="batch")  # every branch is below epsilon: all gates closed
    with torch.no_grad():
        dense = net(X)
        gates.attach(blocks)
        closed = net(X)  # eval mode: gated, but not recorded
        assert gates.window == {}
        reference = copy.deepcopy(net)
        gates.strip_copy(reference)
        remove_blocks(reference, list(blocks))  # every block replaced by its shortcut
        torch.testing.assert_close(closed, reference(X))
        assert not torch.allclose(closed, dense)
        gates.exempt = set(blocks)  # exempt blocks are not gated
        torch.testing.assert_close(net(X), dense)
        gates.exempt = set()
        gates.epsilon = 1e-6  # every branch passes
        torch.testing.assert_close(net(X), dense)
        peaks.clear()
        net.train()
        net(X)
        net.eval()
    assert gates.window["layer1.0"].item() == pytest.approx(peaks["layer1.0"])
    assert gates.window["layer2.1"].item() == pytest.approx(peaks["layer2.1"])
    gates.detach()
    assert sum(len(m._forward_hooks) for m in net.modules()) == 2  # only the two spies are left


def test_branch_norm_and_parameters_leave_the_shortcut_out():
    net = resnet("B")
    block = net.layer2[0]
    params = branch_parameters(block)
    assert {id(p) for p in params} == {
        id(p) for n, p in block.named_parameters() if not n.startswith("shortcut")
    }
    want = torch.sqrt(sum((p.detach() ** 2).sum() for p in params))
    assert branch_norm(block) == pytest.approx(want.item(), rel=1e-6)


def test_drop_from_optimizer_keeps_the_state_of_the_others():
    net = resnet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(X).sum().backward()
    opt.step()
    kept_before = {id(p): opt.state[p]["momentum_buffer"].clone() for p in net.fc.parameters()}
    gone = remove_blocks(net, ["layer1.1"])
    assert drop_from_optimizer(opt, gone.values()) == len(gone) == 6  # conv1, bn1 (2), conv2, bn2 (2)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in net.parameters()}
    assert all(id(p) not in {id(q) for q in opt.state} for p in gone.values())
    for p in net.fc.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], kept_before[id(p)])


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_depth_spec_round_trips_through_json_and_the_zoo_builder(shortcut):
    net = resnet(shortcut)
    reference = copy.deepcopy(net)
    remove_blocks(net, ["layer1.0", "layer2.0", "layer3.1"])
    spec = json.loads(json.dumps(depth_spec(net, reference)))
    assert spec == {
        "kind": "depth",
        "version": 1,
        "removed": ["layer1.0", "layer2.0", "layer3.1"],
        "inner": None,
    }
    fresh = create_model("resnet14", in_chans=1, width=4, shortcut=shortcut)
    rebuilt = apply_structure(fresh, spec).eval()
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X), net(X))
    assert sum(p.numel() for p in rebuilt.parameters()) < sum(p.numel() for p in reference.parameters())


def test_depth_spec_records_channel_pruning_as_inner():
    from lit_compress.pruning.structured import channel_groups, remove_channels

    net = resnet("A")
    reference = copy.deepcopy(net)
    remove_blocks(net, ["layer2.1"])
    groups = {g.name: g for g in channel_groups(net, X[:1])}
    remove_channels(net, list(groups.values()), {"layer1.0.conv1": torch.tensor([0, 2])})
    spec = depth_spec(net, reference)
    assert spec["removed"] == ["layer2.1"] and spec["inner"]["kind"] == "channels"
    rebuilt = build_depth(create_model("resnet14", in_chans=1, width=4), json.loads(json.dumps(spec))).eval()
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X), net(X))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "depth", "version": 2, "removed": []}, "version 2 is not supported"),
        ({"kind": "depth", "version": 1, "removed": [], "blocks": 3}, r"unknown keys \['blocks'\]"),
        ({"kind": "depth", "version": 1, "removed": "layer1.0"}, "must be a list of block names"),
        ({"kind": "depth", "version": 1, "removed": ["layer1.0", "layer1.0"]}, "lists a block twice"),
        ({"kind": "depth", "version": 1, "removed": ["layer9.0"]}, r"does not fit CifarResNet.*layer9.0"),
        ({"kind": "depth", "version": 1, "removed": [], "inner": 3}, "'inner' must be a structure spec"),
    ],
)
def test_bad_depth_specs_are_zoo_format_errors(spec, message):
    with pytest.raises(ZooFormatError, match=message):
        apply_structure(create_model("resnet14", in_chans=1, width=4), spec)


class _Module(L.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net


def _planner(**kwargs) -> DepthPruning:
    cb = DepthPruning(**kwargs)
    cb.setup(None, _Module(resnet()), "validate")
    return cb


def test_plan_keeps_the_minimum_per_stage_with_the_largest_responses():
    cb = _planner(epsilon=1.0)
    stats = {
        "layer1.0": 0.5,
        "layer1.1": 0.7,
        "layer2.0": 0.2,
        "layer2.1": 3.0,
        "layer3.0": None,
        "layer3.1": 0.1,
    }
    remove, kept = cb.plan(stats)
    assert remove == ["layer1.0", "layer2.0", "layer3.1"] and kept == ["layer1.1"]
    cb = _planner(epsilon=1.0, min_blocks_per_stage=2)
    assert cb.plan(stats) == ([], ["layer1.1", "layer1.0", "layer2.0", "layer3.1"])


def test_plan_never_removes_every_block():
    cb = _planner(epsilon=10.0, min_blocks_per_stage=0)
    stats = {b: 0.1 * i for i, b in enumerate(residual_blocks(cb._net))}
    remove, kept = cb.plan(stats)
    assert kept == ["layer3.1"] and len(remove) == 5  # the block with the largest response stays


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"criterion": "l1"}, r"criterion must be one of \('epsilon', 'ssl'\)"),
        ({"epsilon": 0}, "epsilon must be a finite number > 0, got 0"),
        ({"epsilon": float("inf")}, "epsilon must be a finite number > 0"),
        ({"threshold": -1.0}, "threshold must be a finite number > 0"),
        ({"penalty_weight": -1e-4}, "penalty_weight must be a finite number >= 0"),
        ({"gate": "batches"}, r"gate must be one of \('batch', 'sample', 'off'\)"),
        ({"remove_every": 0}, "remove_every must be a positive number of optimizer steps"),
        ({"remove_steps": "100"}, "remove_steps must be a list of optimizer steps"),
        ({"remove_steps": [-1]}, "remove_steps must be a list of optimizer steps"),
        ({"remove_at_end": False}, "no removal event is configured"),
        ({"min_blocks_per_stage": -1}, "min_blocks_per_stage must be an int >= 0, got -1"),
        ({"include": "layer1.*"}, "include must be a list of glob strings"),
        ({"include": []}, "include is empty"),
        ({"model_attr": ""}, "model_attr must be an attribute name"),
    ],
)
def test_bad_callback_arguments_are_rejected_up_front(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DepthPruning(**kwargs)


def test_globs_that_match_no_block_list_the_blocks():
    with pytest.raises(
        ValueError, match=r"include pattern 'layer4.\*' matches no residual block.*'layer3.1'"
    ):
        _planner(include=["layer4.*"])
    with pytest.raises(ValueError, match="no residual block that depth pruning knows"):
        DepthPruning().setup(None, _Module(create_model("lenet5")), "validate")
    with pytest.raises(ValueError, match=r"no nn.Module attribute 'network'; its submodules are \['net'\]"):
        DepthPruning(model_attr="network").setup(None, _Module(resnet()), "validate")


def test_functional_shortcut_helpers_are_consistent_with_the_block():
    net = resnet("A")
    block = net.layer2[0]
    x = torch.relu(torch.randn(2, 4, 8, 8))
    identity = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
    torch.testing.assert_close(shortcut_replacement(block)(x), torch.relu(identity))
