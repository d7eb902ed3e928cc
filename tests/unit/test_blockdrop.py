"""BlockDrop mechanism: block discovery, gated blocks vs the original / shortcut paths, grouped skipping,
reward, REINFORCE, curriculum, MAC statistics and the zoo structure spec (tiny nets, no Lightning)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.gating.blockdrop import (
    BlockDropNetwork,
    GateState,
    PolicyNet,
    always_on_mask,
    block_costs,
    block_shortcut,
    blockdrop_reward,
    bound_probs,
    find_blocks,
    gate_blocks,
    gating_statistics,
    greedy_decisions,
    learned_blocks,
    register_shortcut,
    reinforce_loss,
    summarize_decisions,
    ungate_blocks,
)
from lit_compress.measure import count_macs
from lit_compress.models import create_model
from lit_compress.models.resnet_cifar import BasicBlock, CifarResNet

BLOCKS14 = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]


def tiny_resnet(shortcut: str = "A", depth: int = 14, seed: int = 0) -> CifarResNet:
    torch.manual_seed(seed)
    net = CifarResNet(depth=depth, in_chans=1, width=4, shortcut=shortcut)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode differs from identity BN
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def gated(net: nn.Module, blocks=BLOCKS14) -> GateState:
    state = GateState(len(blocks))
    gate_blocks(net, blocks, state)
    return state


def x_batch(n: int = 6, size: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


# -- discovery -------------------------------------------------------------------------------------------


def test_find_blocks_default_discovers_our_basic_blocks_in_order():
    assert find_blocks(tiny_resnet()) == BLOCKS14


def test_find_blocks_include_exclude_and_types():
    net = tiny_resnet()
    assert find_blocks(net, include=["layer3.*"]) == ["layer3.0", "layer3.1"]
    assert find_blocks(net, exclude=["layer1.*"]) == BLOCKS14[2:]
    assert find_blocks(net, types=["BasicBlock"], include=["layer2.1"]) == ["layer2.1"]


def test_no_residual_block_lists_what_it_looked_for():
    with pytest.raises(ValueError, match=r"no residual block.*BasicBlock.*Bottleneck.*Conv2d"):
        find_blocks(create_model("lenet5"))


def test_include_pattern_matching_nothing_lists_close_names():
    with pytest.raises(ValueError, match=r"'layer4\.\*' matches no residual block.*candidates"):
        find_blocks(tiny_resnet(), include=["layer4.*"])


def test_explicit_type_without_known_shortcut_is_an_error():
    class MyBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    with pytest.raises(ValueError, match=r"no known shortcut.*register_shortcut"):
        find_blocks(nn.Sequential(MyBlock(), MyBlock()), types=["MyBlock"])


def test_nested_selection_is_an_error():
    class Stage(nn.Module):  # a "block" that contains blocks
        def __init__(self):
            super().__init__()
            self.inner = tiny_resnet().layer1

        def forward(self, x):
            return self.inner(x)

    register_shortcut(Stage)(lambda block, x: x)
    with pytest.raises(ValueError, match=r"nested: \['0.inner.0', '0.inner.1'\] lie inside '0'"):
        find_blocks(nn.Sequential(Stage()), types=["BasicBlock", "Stage"])


@pytest.mark.parametrize("bad", ["layer1.*", [1, 2]])
def test_pattern_lists_must_be_lists_of_strings(bad):
    with pytest.raises(ValueError, match="must be a list of strings"):
        find_blocks(tiny_resnet(), include=bad)


# -- gated block == original / shortcut -----------------------------------------------------------------


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_decision_one_equals_the_original_block_exactly(shortcut, mode):
    net = tiny_resnet(shortcut)
    reference = copy.deepcopy(net)
    state = gated(net)
    net.train(mode == "train")
    reference.train(mode == "train")
    x = x_batch()
    state.forced = torch.ones(6, 6, dtype=torch.bool)
    with torch.set_grad_enabled(mode == "train"):
        assert torch.equal(net(x), reference(x))


def test_decision_zero_is_identity_or_zero_pad_shortcut_by_hand():
    net = tiny_resnet("A")
    state = gated(net)
    x = torch.randn(3, 4, 8, 8)
    state.forced = torch.zeros(3, 6, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(net.layer1[1](x), x)  # identity
        out = net.layer2[0](x)  # 4 -> 8 channels, stride 2: subsample, 2 zero channels on each side
    expected = torch.cat([torch.zeros(3, 2, 4, 4), x[:, :, ::2, ::2], torch.zeros(3, 2, 4, 4)], dim=1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_decision_zero_is_the_projection_shortcut_b(mode):
    net = tiny_resnet("B")
    state = gated(net)
    net.train(mode == "train")
    block = net.layer2[0]
    x = torch.randn(3, 4, 8, 8)
    with torch.set_grad_enabled(mode == "train"):
        expected = block.shortcut(x)
        state.forced = torch.zeros(3, 6, dtype=torch.bool)
        assert torch.equal(block(x), expected)


def test_mixed_decisions_select_per_sample_in_soft_mode():
    net = tiny_resnet("B")
    reference = copy.deepcopy(net)
    state = gated(net)
    block, ref_block = net.layer2[0], reference.layer2[0]
    x = torch.randn(4, 4, 8, 8, requires_grad=True)
    keep = torch.tensor([True, False, True, False])
    state.forced = torch.zeros(4, 6, dtype=torch.bool)
    state.forced[:, 2] = keep
    out = block(x)  # autograd on: soft mode
    assert torch.equal(out[keep], ref_block(x)[keep])
    assert torch.equal(out[~keep], ref_block.shortcut(x)[~keep])
    out.sum().backward()  # gradient reaches the block's weights (DDP: every parameter used)
    assert block.conv1.weight.grad is not None and block.conv1.weight.grad.abs().sum() > 0


def test_torchvision_and_timm_blocks_are_discovered_and_drop_to_their_downsample():
    """One test for both libraries: importing them costs seconds on a slow CPU, the blocks are tiny."""
    resnet = pytest.importorskip("torchvision.models.resnet")
    timm_resnet = pytest.importorskip("timm.models.resnet")
    torch.manual_seed(0)

    def downsample(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))

    blocks = [
        resnet.BasicBlock(8, 8),
        resnet.Bottleneck(8, 2, stride=2, downsample=downsample(8, 8)),
        timm_resnet.BasicBlock(8, 16, stride=2, downsample=downsample(8, 16)),
        timm_resnet.Bottleneck(16, 4),
    ]
    net = nn.Sequential(*blocks).eval()
    assert find_blocks(net) == ["0", "1", "2", "3"]
    reference = copy.deepcopy(net)
    state = gated(net, ["0", "1", "2", "3"])
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        state.forced = torch.ones(2, 4, dtype=torch.bool)
        assert torch.equal(net(x), reference(x))
        state.forced = torch.zeros(2, 4, dtype=torch.bool)
        for block in blocks:
            expected = x if block.downsample is None else block.downsample(x)
            assert torch.equal(block(x), expected)
            x = expected


def test_gating_keeps_state_dict_keys_and_isinstance_and_ungates():
    net = tiny_resnet()
    keys = list(net.state_dict())
    gated(net)
    assert list(net.state_dict()) == keys
    assert isinstance(net.layer1[0], BasicBlock) and type(net.layer1[0]).__name__ == "GatedBasicBlock"
    ungate_blocks(net, BLOCKS14)
    assert type(net.layer1[0]) is BasicBlock and "_blockdrop_state" not in net.layer1[0].__dict__


def test_block_shortcut_of_unknown_block_is_a_type_error():
    with pytest.raises(TypeError, match="register_shortcut"):
        block_shortcut(nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 2, 2))


# -- inference really skips ------------------------------------------------------------------------------


def count_calls(modules: dict[str, nn.Module]) -> tuple[dict[str, list[int]], list]:
    calls: dict[str, list[int]] = {name: [] for name in modules}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: calls[n].append(args[0].shape[0]))
        for n, m in modules.items()
    ]
    return calls, handles


def test_batch_of_one_never_runs_a_dropped_block():
    net = tiny_resnet("B")
    state = gated(net)
    convs = {name: net.get_submodule(name).conv1 for name in BLOCKS14}
    calls, handles = count_calls(convs)
    state.forced = torch.tensor([[True, False, False, True, False, True]])
    with torch.no_grad():
        net(x_batch(1))
    for handle in handles:
        handle.remove()
    assert {n: len(c) for n, c in calls.items()} == {
        "layer1.0": 1,
        "layer1.1": 0,
        "layer2.0": 0,
        "layer2.1": 1,
        "layer3.0": 0,
        "layer3.1": 1,
    }


def test_batch_of_one_follows_each_new_decisions_tensor_and_matches_the_batched_path():
    net = tiny_resnet("B").eval()
    state = gated(net)
    x = x_batch(2)
    rows = [
        torch.tensor([[True, False, False, True, False, True]]),
        torch.tensor([[False, True, True, False, True, False]]),  # the next forward: a new tensor
        torch.ones(1, 6, dtype=torch.bool),
    ]
    with torch.no_grad():
        for row in rows:
            state.forced = row
            single = net(x[:1])  # the batch-1 path (Python bools, cached per decisions tensor)
            state.forced = torch.cat([row, ~row])
            batched = net(x)  # the grouped path (tensor ops)
            torch.testing.assert_close(single, batched[:1], rtol=1e-5, atol=1e-6)
    state.forced = None


def test_grouped_batch_runs_blocks_on_the_kept_subset_and_matches_per_sample():
    net = tiny_resnet("B")
    state = gated(net)
    x = x_batch(6)
    decisions = torch.rand(6, 6, generator=torch.Generator().manual_seed(3)) > 0.5
    decisions[:, 1] = False  # a block nobody uses
    convs = {name: net.get_submodule(name).conv1 for name in BLOCKS14}
    calls, handles = count_calls(convs)
    state.forced = decisions
    with torch.no_grad():
        batched = net(x)
    for handle in handles:
        handle.remove()
    for k, name in enumerate(BLOCKS14):
        kept = int(decisions[:, k].sum())
        assert calls[name] == ([kept] if kept else []), name
    with torch.no_grad():
        singles = []
        for i in range(6):
            state.forced = decisions[i : i + 1]
            singles.append(net(x[i : i + 1]))
    torch.testing.assert_close(batched, torch.cat(singles), rtol=1e-5, atol=1e-5)


def test_train_skip_skips_in_training_too():
    net = tiny_resnet("B").train()
    state = gated(net)
    state.train_skip = True
    calls, handles = count_calls({"b": net.layer1[1].conv1})
    state.forced = torch.ones(4, 6, dtype=torch.bool)
    state.forced[:, 1] = torch.tensor([True, False, False, True])
    net(x_batch(4))
    handles[0].remove()
    assert calls["b"] == [2]


def test_decisions_that_do_not_fit_the_batch_are_an_error():
    net = tiny_resnet()
    state = gated(net)
    state.forced = torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad(), pytest.raises(RuntimeError, match="do not fit a batch of 3"):
        net(x_batch(3))


# -- reward, REINFORCE, curriculum -----------------------------------------------------------------------


def test_reward_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    targets = torch.tensor([0, 1, 1, 1])  # correct, correct, wrong, correct
    policy = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    reward, correct = blockdrop_reward(logits, targets, policy, gamma=5.0)
    assert correct.tolist() == [True, True, False, True]
    torch.testing.assert_close(reward, torch.tensor([0.0, 1 - (1 / 4) ** 2, -5.0, 1.0]))


def test_bound_probs():
    torch.testing.assert_close(bound_probs(torch.tensor([0.0, 0.5, 1.0]), 0.8), torch.tensor([0.2, 0.5, 0.8]))


def test_reinforce_loss_matches_the_formula_by_hand():
    p = torch.tensor([[0.7, 0.2], [0.4, 0.9]])
    a = torch.tensor([[1, 0], [0, 1]])
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([False, True])
    log_pi = torch.log(torch.tensor([[0.7, 0.8], [0.6, 0.9]]))
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    expected = ((-log_pi * adv.view(-1, 1) - 0.1 * entropy) * mask).sum() / 2
    torch.testing.assert_close(reinforce_loss(p, a, adv, mask, entropy_weight=0.1), expected)


@pytest.mark.parametrize("advantage, direction", [(1.0, 1), (-1.0, -1)])
def test_reinforce_gradient_sign(advantage, direction):
    """Positive advantage: a gradient step raises the probability of the action taken (negative: lowers)."""
    theta = torch.zeros(1, 3, requires_grad=True)
    actions = torch.tensor([[1, 0, 1]])
    prob_of_action = lambda t: torch.where(actions.bool(), torch.sigmoid(t), 1 - torch.sigmoid(t))  # noqa: E731
    before = prob_of_action(theta).detach()
    loss = reinforce_loss(torch.sigmoid(theta), actions, torch.tensor([advantage]))
    loss.backward()
    with torch.no_grad():
        after = prob_of_action(theta - 0.5 * theta.grad)
    assert torch.all(torch.sign(after - before) == direction)


def test_reinforce_mask_blocks_the_gradient_of_forced_blocks():
    theta = torch.zeros(2, 3, requires_grad=True)
    mask = always_on_mask(3, learned=1)  # first two kept on, only the last one learned
    assert mask.tolist() == [True, True, False]
    reinforce_loss(torch.sigmoid(theta), torch.ones(2, 3), torch.ones(2), ~mask, 0.1).backward()
    assert torch.all(theta.grad[:, :2] == 0) and torch.all(theta.grad[:, 2] != 0)


def test_curriculum_learned_blocks():
    assert [learned_blocks(e, 6, 6) for e in range(8)] == [1, 2, 3, 4, 5, 6, 6, 6]  # the paper's pace
    assert [learned_blocks(e, 6, 3) for e in range(4)] == [2, 4, 6, 6]
    assert [learned_blocks(e, 3, 6) for e in range(7)] == [1, 1, 2, 2, 3, 3, 3]
    assert learned_blocks(0, 6, 0) == 6


def test_greedy_decisions_threshold_and_forced():
    probs = torch.tensor([[0.49, 0.5, 0.9], [0.1, 0.2, 0.3]])
    assert greedy_decisions(probs).tolist() == [[False, True, True], [False, False, False]]
    forced = greedy_decisions(probs, torch.tensor([True, False, False]))
    assert forced.tolist() == [[True, True, True], [True, False, False]]


# -- policy, exported network, MACs ----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["resnet8", "cnn"])
def test_policy_net_outputs_one_logit_per_block(arch):
    policy = PolicyNet(6, in_chans=1, arch=arch, width=4, downsample=2)
    assert policy(x_batch(3, size=16)).shape == (3, 6)
    assert PolicyNet(**policy.config()).config() == policy.config()


@pytest.mark.parametrize("arch", ["resnet8", "cnn"])
def test_policy_shift_logits_moves_every_logit_and_nothing_else(arch):
    policy = PolicyNet(6, in_chans=1, arch=arch, width=4).eval()
    x = x_batch(3, size=16)
    before, keys = policy(x), list(policy.state_dict())
    policy.shift_logits(-0.75)
    torch.testing.assert_close(policy(x), before - 0.75)
    assert list(policy.state_dict()) == keys


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_blocks=0), "num_blocks must be an int >= 1"),
        (dict(num_blocks=3, arch="mlp"), "arch must be one of"),
        (dict(num_blocks=3, downsample=0), "downsample must be an int >= 1"),
    ],
)
def test_policy_net_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PolicyNet(**kwargs)


def blockdrop_network(shortcut: str = "B") -> tuple[BlockDropNetwork, CifarResNet]:
    net = tiny_resnet(shortcut)
    plain = copy.deepcopy(net)
    torch.manual_seed(5)
    policy = PolicyNet(6, in_chans=1, arch="cnn", width=4)
    with torch.no_grad():
        policy.body[-1].bias.copy_(torch.tensor([3.0, -3.0, 0.0, 0.0, 3.0, -3.0]))
    return BlockDropNetwork(net, policy, BLOCKS14).eval(), plain


def test_block_costs_add_up_to_the_static_backbone_by_hand():
    model, plain = blockdrop_network("B")
    x = x_batch(1)
    costs = model.costs(x)
    assert costs.backbone_dense == count_macs(plain, x).dense
    # Hand count, 8x8 input, width 4: a 4->4 block at 8x8 = 2 convs * 64 * 4*4*9; layer2.0: conv 4->8 stride 2
    # at 4x4 (16 * 8*4*9) + conv 8->8 (16 * 8*8*9) + the 1x1 projection shortcut (16 * 8*4).
    assert costs.full_dense[0] == 2 * 64 * 144
    assert costs.full_dense[2] == 16 * 288 + 16 * 576 + 16 * 32
    assert costs.shortcut_dense[:3] == (0.0, 0.0, 16 * 32)
    assert costs.policy == count_macs(model.policy, x).dense


def test_count_macs_of_the_gated_network_counts_the_decisions_taken():
    model, _ = blockdrop_network("B")
    x = x_batch(4)
    report = count_macs(model, x)
    costs = model.costs(x)
    per_image = costs.per_image(model.last_decisions)
    assert report.effective == pytest.approx(float(per_image.mean()))
    assert report.effective < report.dense


def test_blockdrop_network_decisions_and_output_match_a_manual_forced_run():
    model, plain = blockdrop_network("A")
    x = x_batch(5)
    with torch.no_grad():
        out = model(x)
        decisions = torch.sigmoid(model.policy(x)) >= 0.5
        assert torch.equal(model.last_decisions, decisions)
        state = gated(plain)
        state.forced = decisions
        assert torch.equal(out, plain(x))


def test_always_on_blocks_stay_on():
    model, _ = blockdrop_network()
    model.always_on = [0, 1]
    with torch.no_grad():
        model(x_batch(3))
    assert model.last_decisions[:, :2].all()


def test_summarize_decisions_by_hand():
    d = torch.tensor([[1, 0, 1], [1, 1, 1], [1, 0, 1], [0, 0, 0]]).bool()
    stats = summarize_decisions(d, blocks=["a", "b", "c"])
    # blocks used per image: 2, 3, 2, 0 -> mean 7/4; squared deviations 1/16 + 25/16 + 1/16 + 49/16 = 76/16
    assert stats["blocks_mean"] == 1.75 and stats["blocks_std"] == pytest.approx(math.sqrt(76 / 16 / 4))
    assert stats["block_usage"] == {"a": 0.75, "b": 0.25, "c": 0.75}
    assert stats["blocks_histogram"] == [1, 0, 2, 1]
    assert stats["distinct_policies"] == 3


def test_gating_statistics_per_image_macs():
    model, _ = blockdrop_network("B")
    x = x_batch(6)
    stats = gating_statistics(model, [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(2))])
    costs = model.costs(x)
    with torch.no_grad():
        model(x)
    macs = costs.per_image(model.last_decisions)
    assert stats["images"] == 6
    assert stats["macs_mean"] == pytest.approx(float(macs.mean()), abs=0.1)
    assert stats["macs_std"] == pytest.approx(float(macs.std(unbiased=False)), abs=0.1)
    assert stats["macs_backbone"] == costs.backbone_dense
    assert stats["block_usage"]["layer1.0"] == 1.0 and stats["block_usage"]["layer1.1"] == 0.0


def test_dynamic_statistics_dispatches_to_blockdrop_and_ignores_static_nets():
    from lit_compress.gating.statistics import dynamic_statistics, is_dynamic

    model, plain = blockdrop_network("B")
    x = x_batch(6)
    assert is_dynamic(model) and not is_dynamic(plain)
    assert dynamic_statistics(model, [x]) == gating_statistics(model, [x])
    assert dynamic_statistics(plain, [x]) is None


def test_block_costs_needs_gated_blocks():
    with pytest.raises(ValueError, match="not gated"):
        block_costs(tiny_resnet(), BLOCKS14, x_batch(1))


# -- zoo structure spec ----------------------------------------------------------------------------------


def test_structure_spec_rebuilds_the_gated_network_from_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from lit_compress.gating.structure import blockdrop_structure
    from lit_compress.zoo.structure import apply_structure

    model, _ = blockdrop_network("A")
    model.always_on = [0]
    spec = blockdrop_structure(model.blocks, model.policy.config(), model.always_on)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    rebuilt = apply_structure(CifarResNet(depth=14, in_chans=1, width=4), spec)
    rebuilt.load_state_dict(load_file(str(path)))
    rebuilt.eval()
    x = x_batch(4)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert torch.equal(rebuilt.last_decisions, model.last_decisions)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(version=2), "version 1"),
        (dict(blocks=[]), "non-empty 'blocks'"),
        (dict(blocks=["layer9.0"]), "does not fit the architecture"),
        (dict(policy={"num_blocks": 2, "in_chans": 1}), "does not fit the architecture"),
    ],
)
def test_bad_structure_spec_is_a_format_error(change, message):
    from lit_compress.gating.structure import blockdrop_structure
    from lit_compress.zoo.errors import ZooFormatError
    from lit_compress.zoo.structure import apply_structure

    spec = {
        **blockdrop_structure(BLOCKS14, {"num_blocks": 6, "in_chans": 1, "arch": "cnn", "width": 4}),
        **change,
    }
    with pytest.raises(ZooFormatError, match=message):
        apply_structure(CifarResNet(depth=14, in_chans=1, width=4), spec)


def test_relu_free_shortcut_matches_the_official_dropped_block():
    """A dropped block returns the shortcut without the block's final ReLU (official FlatResNet)."""
    net = tiny_resnet("B")
    state = gated(net)
    block = net.layer2[0]
    x = torch.randn(2, 4, 8, 8)
    state.forced = torch.zeros(2, 6, dtype=torch.bool)
    with torch.no_grad():
        out = block(x)
    assert (out < 0).any()  # the BN'd projection can be negative: no ReLU applied
    assert torch.equal(out, block.shortcut(x))
    assert not torch.equal(out, F.relu(out))
