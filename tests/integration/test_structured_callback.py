"""The StructuredPruning callback on real Lightning runs (LeNet-5 / tiny ResNet, synthetic data, CPU)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import pytest
import torch

from lit_compress.data import SyntheticDataModule
from lit_compress.models import ImageClassifier
from lit_compress.models.lenet import LeNet5
from lit_compress.pruning import Iterative, OneShot
from lit_compress.pruning.structured.callback import StructuredPruning
from lit_compress.pruning.structured.spec import build_channels

STEPS_PER_EPOCH = 8  # SyntheticDataModule(num_train=256, batch_size=32)


def lenet(optimizer=None, **kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        model="lenet5",
        optimizer=optimizer or (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
        **kwargs,
    )


def trainer(tmp_path, callbacks, max_steps=6, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )


def l1_of_filters(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().abs().flatten(1).sum(1)


class Snapshot(L.Callback):
    """Copies the network's weights at the start of optimizer step ``step`` (after any pruning there)."""

    def __init__(self, step):
        self.step, self.weights = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.weights is None:
            self.weights = {n: p.detach().clone() for n, p in pl_module.net.named_parameters()}


def test_at_end_masks_channels_keeps_training_and_exports_a_smaller_equivalent_net(tmp_path):
    model = lenet()
    initial = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    cb = StructuredPruning(
        amount=0.5, criterion="l1", schedule=OneShot(step=0), group_amount={"conv1": 0.9}, min_channels=4
    )
    after_prune = Snapshot(1)
    trainer(tmp_path, [cb, after_prune]).fit(model, SyntheticDataModule())
    net = model.net
    assert net.conv1.out_channels == 20 and net.fc1.out_features == 500  # masked, not removed
    assert cb.sizes == {"conv1": 20, "conv2": 50, "fc1": 500}  # fc2 feeds the output: not prunable
    expected_counts = {"conv1": 4, "conv2": 25, "fc1": 250}  # conv1: 20 - 18 = 2 < min_channels = 4
    for name, count in expected_counts.items():
        kept = cb.kept[name]
        assert len(kept) == count
        # l1 at step 0: the kept filters are the ones with the largest initial L1 norms
        norms = l1_of_filters(initial[f"{name}.weight"])
        assert torch.equal(kept, torch.sort(torch.topk(norms, count).indices).values)
    # Removed channels are exactly zero in producers (rows, bias) and consumers (columns) after training.
    gone = torch.ones(20, dtype=torch.bool)
    gone[cb.kept["conv1"]] = False
    assert torch.all(net.conv1.weight[gone] == 0) and torch.all(net.conv1.bias[gone] == 0)
    assert torch.all(net.conv2.weight[:, gone] == 0)
    gone2 = torch.ones(50, dtype=torch.bool)
    gone2[cb.kept["conv2"]] = False
    assert torch.all(net.fc1.weight.view(500, 50, 16)[:, gone2] == 0)  # flatten: 16 columns per channel
    # ... and the kept ones kept training.
    kept_rows = net.conv1.weight[cb.kept["conv1"]]
    assert not torch.equal(kept_rows, after_prune.weights["conv1.weight"][cb.kept["conv1"]])

    small, spec = cb.export(model)
    assert (small.conv1.out_channels, small.conv2.in_channels, small.conv2.out_channels) == (4, 4, 25)
    assert (small.fc1.in_features, small.fc1.out_features, small.fc2.in_features) == (25 * 16, 250, 250)
    assert sum(p.numel() for p in small.parameters()) < 0.3 * sum(p.numel() for p in net.parameters())
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(small(x), net.eval()(x), rtol=1e-4, atol=1e-5)
    # The spec rebuilds the smaller architecture from a fresh LeNet-5; the exported weights load into it.
    rebuilt = build_channels(LeNet5(), spec)
    rebuilt.load_state_dict(small.state_dict())
    torch.testing.assert_close(rebuilt.eval()(x), small(x))


def test_immediately_removes_physically_rebuilds_the_optimizer_and_keeps_training(tmp_path):
    model = lenet(
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
        lr_scheduler_interval="step",
    )
    cb = StructuredPruning(
        amount=0.5,
        criterion="l2",
        schedule=Iterative(rounds=2, steps_per_round=2, start_step=1, growth="linear"),
        remove="immediately",
    )
    after_last = Snapshot(4)
    fit = trainer(tmp_path, [cb, after_last], max_steps=8)
    fit.fit(model, SyntheticDataModule())
    net = model.net
    assert (net.conv1.out_channels, net.conv2.out_channels, net.fc1.out_features) == (10, 25, 250)
    assert net.fc1.in_features == 25 * 16 and net.fc2.in_features == 250
    assert [h["step"] for h in cb.history] == [1, 3]
    assert cb.history[0]["channels/conv1"] == 15 and cb.history[1]["channels/conv1"] == 10  # 25% then 50%
    optimizer = fit.optimizers[0]
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    model_params = list(model.parameters())
    assert {id(p) for p in in_optimizer} == {id(p) for p in model_params}  # no stale parameters
    assert len(in_optimizer) == len(model_params)
    for p, state in optimizer.state.items():
        assert any(p is q for q in model_params)
        assert state["momentum_buffer"].shape == p.shape
    # Training continued after the last removal, with the LR scheduler still stepping the same optimizer.
    assert not torch.equal(net.conv1.weight, after_last.weights["conv1.weight"])
    assert fit.lr_scheduler_configs[0].scheduler.optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)
    assert torch.isfinite(model(torch.randn(2, 1, 28, 28))).all()
    _, spec = cb.export(model)
    assert spec["modules"]["conv1"]["out_channels"] == 10
    summary = cb.compression_summary()
    assert set(summary) == {"methods", "description", "structure", "network"}
    assert summary["methods"] == ["structured_pruning:l2"] and summary["structure"] == spec
    assert summary["network"].fc1.out_features == 250


@pytest.mark.parametrize("remove", ["immediately", "at_end"])
def test_resume_after_removal_matches_uninterrupted_run(tmp_path, remove):
    class SaveAndStop(L.Callback):
        """Saves a checkpoint with trainer.save_checkpoint at an optimizer step and ends the run there."""

        def __init__(self, step, path):
            self.step, self.path = step, path

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step:
                trainer.save_checkpoint(self.path)
                trainer.should_stop = True

    def callback():
        return StructuredPruning(
            amount=0.6,
            criterion="l1",
            schedule=Iterative(rounds=2, steps_per_round=8, start_step=2),
            remove=remove,
            verbose=False,
        )

    # Saved at an epoch end (a plain DataLoader is not restored mid-epoch); pruned at 2 (before the
    # checkpoint at 8) and at 10 (after the resume).
    def run(root, extra=(), ckpt_path=None):
        model, cb = lenet(), callback()
        trainer(root, [cb, *extra], max_steps=12).fit(
            model, SyntheticDataModule(shuffle=False), ckpt_path=ckpt_path
        )
        return model, cb

    ckpt = tmp_path / "step8.ckpt"
    full_model, full_cb = run(tmp_path / "full")
    _, part_cb = run(tmp_path / "part", extra=[SaveAndStop(STEPS_PER_EPOCH, ckpt)])
    assert part_cb.last_event_step == 2
    resumed_model, resumed_cb = run(tmp_path / "resumed", ckpt_path=str(ckpt))  # a fresh, dense model
    assert [h["step"] for h in resumed_cb.history] == [h["step"] for h in full_cb.history] == [2, 10]
    assert resumed_cb.kept.keys() == full_cb.kept.keys()
    for name in full_cb.kept:
        assert torch.equal(resumed_cb.kept[name], full_cb.kept[name])
    full_state, resumed_state = full_model.state_dict(), resumed_model.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for name, a in full_state.items():
        torch.testing.assert_close(resumed_state[name], a, rtol=1e-5, atol=1e-6, msg=name)
    if remove == "immediately":
        assert resumed_model.net.conv1.out_channels == 8  # 20 * (1 - 0.6)
        # Testing a fresh, dense module from the pruned checkpoint: the structure is re-applied first.
        fresh = lenet()
        tester = trainer(tmp_path / "test", [callback()], limit_test_batches=1)
        tester.test(fresh, SyntheticDataModule(shuffle=False), ckpt_path=str(ckpt), verbose=False)
        saved = torch.load(ckpt, weights_only=True)["state_dict"]
        assert fresh.net.conv1.out_channels == 13  # after round 1 of 2 (geometric): 20 - round(20 * 0.368)
        for name, value in fresh.state_dict().items():
            assert torch.equal(value, saved[name]), name
        assert "on_load_checkpoint" not in vars(fresh)  # the patch is undone in teardown


@pytest.mark.parametrize("criterion", ["apoz", "mean_activation", "taylor_activation", "thinet"])
def test_data_dependent_criteria_prune_inside_a_fit(tmp_path, criterion):
    model = lenet(model_kwargs={"conv_relu": True})
    cb = StructuredPruning(
        amount=0.5, criterion=criterion, schedule=OneShot(step=1), data_batches=2, remove="immediately"
    )
    trainer(tmp_path, [cb], max_steps=3).fit(model, SyntheticDataModule(num_train=128))
    assert (model.net.conv1.out_channels, model.net.fc1.out_features) == (10, 250)
    assert torch.isfinite(model(torch.randn(2, 1, 28, 28))).all()


def test_bn_l1_penalty_is_the_gradient_of_the_l1_term_inside_a_fit(tmp_path):
    def one_step(penalty):
        torch.manual_seed(0)
        model = ImageClassifier(
            model="resnet",
            model_kwargs={"depth": 8, "in_chans": 1, "width": 4},
            optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        )
        gamma0 = model.net.layer1[0].bn1.weight.detach().clone()
        cb = StructuredPruning(amount=0.0, criterion="bn_scale", penalty=penalty, penalty_weight=0.5)
        trainer(tmp_path, [cb], max_steps=1).fit(model, SyntheticDataModule(shuffle=False))
        return model, gamma0

    plain, gamma0 = one_step(None)
    slim, _ = one_step("bn_l1")
    delta = slim.net.layer1[0].bn1.weight - plain.net.layer1[0].bn1.weight
    torch.testing.assert_close(delta, -0.1 * 0.5 * torch.sign(gamma0))
    # Groups tied to the zero-padding shortcut are not targeted: their BN scales are left alone.
    torch.testing.assert_close(slim.net.bn1.weight, plain.net.bn1.weight)


def test_bn_scale_on_a_resnet_skips_unprunable_groups(tmp_path, capsys):
    torch.manual_seed(0)
    model = ImageClassifier(model="resnet", model_kwargs={"depth": 8, "in_chans": 1, "width": 4})
    cb = StructuredPruning(amount=0.5, criterion="bn_scale", schedule=OneShot(step=1), remove="immediately")
    trainer(tmp_path, [cb], max_steps=2).fit(model, SyntheticDataModule(num_train=64))
    blocks = [model.net.layer1[0], model.net.layer2[0], model.net.layer3[0]]
    assert [b.conv1.out_channels for b in blocks] == [2, 4, 8]  # inner block channels halved
    assert [b.conv2.out_channels for b in blocks] == [4, 8, 16]  # the residual stream is untouched
    assert "channels removed" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(amount=1.0), r"amount must be a number in \[0, 1\)"),
        (dict(amount=-0.1), r"amount must be a number in \[0, 1\)"),
        (
            dict(amount=0.5, group_amount={"conv1": 1.5}),
            r"group_amount\['conv1'\] must be a number in \[0, 1\)",
        ),
        (dict(amount=0.5, criterion="l3"), r"unknown channel criterion 'l3'.*Did you mean.*'l1'"),
        (dict(amount=0.5, criterion="apozz"), r"Did you mean 'apoz'"),
        (dict(amount=0.5, min_channels=0), r"min_channels must be an int >= 1.*got 0"),
        (dict(amount=0.5, remove="at_the_end"), r"remove must be one of.*Did you mean 'at_end'"),
        (dict(amount=0.5, penalty="bn_l2"), r"Did you mean 'bn_l1'"),
        (
            dict(amount=0.5, schedule="lottery_ticket", schedule_args=dict(rounds=2, steps_per_round=2)),
            "rewinds",
        ),
        (
            dict(amount=0.5, example_input_shape=[0, 28]),
            "example_input_shape must be a list of positive ints",
        ),
    ],
)
def test_bad_arguments_are_rejected_up_front(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredPruning(**kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(include=["conv3"]),
            r"include pattern 'conv3' matches no channel group.*\['conv1', 'conv2', 'fc1', 'fc2'\]",
        ),
        (dict(exclude=["net.fc9"]), r"exclude pattern 'net.fc9' matches no channel group.*'fc1'"),
        (
            dict(include=["fc2"]),
            r"matches only groups that cannot be pruned \(fc2: feeds the network output\)",
        ),
        (
            dict(group_amount={"conv9": 0.2}),
            r"group_amount pattern 'conv9' matches no targeted channel group",
        ),
    ],
)
def test_globs_that_match_no_group_list_the_groups(kwargs, message):
    cb = StructuredPruning(amount=0.5, example_input_shape=[1, 1, 28, 28], **kwargs)
    with pytest.raises(ValueError, match=message):
        cb.setup(None, lenet(), "fit")


def test_globs_accept_names_with_and_without_the_model_attr_prefix():
    cb = StructuredPruning(amount=0.5, include=["net.conv*", "fc1"], example_input_shape=[1, 1, 28, 28])
    cb.setup(None, lenet(), "fit")
    assert cb._targets == ["conv1", "conv2", "fc1"]


def test_missing_model_attr_lists_the_submodules():
    cb = StructuredPruning(amount=0.5, model_attr="network")
    with pytest.raises(ValueError, match=r"no nn.Module attribute 'network'; its submodules are \['net'"):
        cb.setup(None, lenet(), "fit")


# ------------------------------------------------------------------------------------------------ DDP


class SaveKeptPerRank(L.Callback):
    """ddp_spawn runs the fit in child processes: each rank writes what its StructuredPruning holds."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, StructuredPruning))
        weights = {n: p.detach().cpu() for n, p in pl_module.named_parameters()}
        torch.save({"kept": cb.kept, "weights": weights}, Path(self.folder) / f"rank{trainer.global_rank}.pt")


def test_apoz_statistics_are_reduced_so_both_ranks_keep_the_same_channels(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(model="lenet5", model_kwargs={"conv_relu": True})
    cb = StructuredPruning(amount=0.5, criterion="apoz", schedule=OneShot(step=1), data_batches=2)
    fit = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, SaveKeptPerRank(str(tmp_path))],
        default_root_dir=tmp_path,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    fit.fit(model, SyntheticDataModule(num_train=64, batch_size=8))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["kept"].keys() == ranks[1]["kept"].keys() == {"conv1", "conv2", "fc1"}
    for name, kept in ranks[0]["kept"].items():
        assert torch.equal(kept, ranks[1]["kept"][name]), name
    for name, w in ranks[0]["weights"].items():
        torch.testing.assert_close(w, ranks[1]["weights"][name])


def test_immediately_under_ddp_rewraps_the_module_and_keeps_training(tmp_path, monkeypatch):
    """One in-process DDP rank (gloo): after a removal DDP's reducer must follow the new parameters, or the
    next backward fails ("Expected to have finished reduction in the prior iteration")."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])  # restored after the test
        else:
            monkeypatch.delenv(key, raising=False)

    class Probe(L.Callback):
        seen: list[bool] = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            wrapper = trainer.strategy.model
            same = {id(p) for p in wrapper.parameters()} == {id(p) for p in pl_module.parameters()}
            self.seen.append(isinstance(wrapper, DistributedDataParallel) and same)

    was_initialised = dist.is_available() and dist.is_initialized()
    model = lenet()
    cb = StructuredPruning(amount=0.5, criterion="l1", schedule=OneShot(step=1), remove="immediately")
    probe = Probe()
    fit = trainer(tmp_path, [cb, probe], max_steps=4, strategy="ddp")
    try:
        fit.fit(model, SyntheticDataModule(num_train=128))
        assert probe.seen == [True] * 4  # wrapped by DDP, around the current parameters, at every step
        assert model.net.conv1.out_channels == 10 and fit.global_step == 4
    finally:
        if not was_initialised and dist.is_initialized():
            dist.destroy_process_group()


def test_immediately_is_rejected_under_ddp_spawn(tmp_path):
    cb = StructuredPruning(amount=0.5, remove="immediately")
    fit = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False)
    with pytest.raises(ValueError, match="remove='at_end'"):
        cb.setup(fit, lenet(), "fit")


def test_round_to_makes_kept_counts_multiples(tmp_path):
    model = lenet()
    cb = StructuredPruning(amount=0.6, criterion="l1", remove="immediately", round_to=8, verbose=False)
    trainer(tmp_path, [cb], max_steps=2).fit(model, SyntheticDataModule())
    net = model.net
    # 20 * 0.4 = 8, 50 * 0.4 = 20 -> 16 or 24 (nearest multiple of 8), 500 * 0.4 = 200.
    assert (net.conv1.out_channels, net.conv2.out_channels, net.fc1.out_features) == (8, 16, 200)
    with pytest.raises(ValueError, match="round_to must be an int >= 1"):
        StructuredPruning(amount=0.5, round_to=0)
