"""LowRank and DepthwiseSeparable on real Lightning runs (LeNet-300-100 / LeNet-5, synthetic data, CPU)."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from lit_compress.data import SyntheticDataModule
from lit_compress.factorization import (
    DepthwiseSeparableConv2d,
    LowRankLinear,
    factorize,
    fit_depthwise,
    patch_moment,
    rank_for_energy,
    singular_values,
)
from lit_compress.factorization.callback import (
    DepthwiseSeparable,
    LowRank,
    replace_in_optimizer,
    restore_factorization,
)
from lit_compress.models import ImageClassifier, create_model
from lit_compress.zoo.structure import apply_structure

STEPS_PER_EPOCH = 8  # SyntheticDataModule(num_train=256, batch_size=32)


def classifier(model="lenet_300_100", **kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    kwargs.setdefault("optimizer", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    return ImageClassifier(model=model, **kwargs)


def trainer(tmp_path, callbacks, max_steps=4, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        **kwargs,
    )


class Snapshot(L.Callback):
    """Copies the network (after any replacement there) at the start of optimizer step ``step``."""

    def __init__(self, step):
        self.step, self.net = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.net is None:
            self.net = copy.deepcopy(pl_module.net)


def _optimizer_holds_exactly_the_model(optimizer, model):
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    assert [id(p) for p in in_optimizer] == [id(p) for p in model.parameters()]  # same params, module order
    for p, state in optimizer.state.items():
        assert state["momentum_buffer"].shape == p.shape


def test_lowrank_by_energy_factorizes_at_step_0_and_fine_tunes(tmp_path):
    model = classifier()
    dense = copy.deepcopy(model.net)
    cb = LowRank(energy=0.6, include=["fc1", "net.fc2"], verbose=False)
    after = Snapshot(0)
    fit = trainer(tmp_path, [cb, after])
    fit.fit(model, SyntheticDataModule(shuffle=False))
    ranks = {n: rank_for_energy(singular_values(getattr(dense, n)), 0.6) for n in ("fc1", "fc2")}
    net = model.net
    assert isinstance(net.fc1, LowRankLinear) and isinstance(net.fc2, LowRankLinear)
    assert type(net.fc3) is nn.Linear
    assert {"fc1": net.fc1.rank, "fc2": net.fc2.rank} == ranks
    assert cb.applied and cb.applied_step == 0 and not cb.skipped
    assert cb.layers["fc1"]["weights_before"] == 784 * 300
    assert cb.layers["fc1"]["weights_after"] == ranks["fc1"] * (784 + 300)
    assert cb.layers["fc1"]["energy"] >= 0.6
    # Before the first optimizer step the network is the truncated-SVD factorization of the dense one.
    reference = copy.deepcopy(dense)
    reference.fc1, reference.fc2 = factorize(dense.fc1, ranks["fc1"]), factorize(dense.fc2, ranks["fc2"])
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(after.net(x), reference(x))
    # ... then it trained, through an optimizer that holds exactly the new parameters.
    assert not torch.equal(net.fc1[0].weight, after.net.fc1[0].weight)
    _optimizer_holds_exactly_the_model(fit.optimizers[0], model)
    # Export: a plain copy and the spec that rebuilds it from the registered architecture.
    summary = cb.compression_summary()
    assert summary["methods"] == ["low_rank_svd"] and "fc1 rank" in summary["description"]
    spec = summary["structure"]
    assert spec["kind"] == "lowrank" and set(spec["modules"]) == {"fc1", "fc2"}
    rebuilt = apply_structure(create_model("lenet_300_100"), spec)
    rebuilt.load_state_dict(summary["network"].state_dict(), strict=True)
    torch.testing.assert_close(rebuilt.eval()(x), net.eval()(x))
    # trainer.test after fit uses the factorized network.
    result = fit.test(model, SyntheticDataModule(shuffle=False), verbose=False)
    assert 0.0 <= result[0]["test/acc"] <= 1.0


def test_param_budget_and_a_layer_that_would_not_shrink_is_skipped(tmp_path, capsys):
    model = classifier()
    cb = LowRank(rank={"fc2": 10, "fc3": 10})  # fc3 is 10 x 100: rank 10 keeps 1,100 >= 1,000 weights
    trainer(tmp_path, [cb], max_steps=1).fit(model, SyntheticDataModule())
    assert isinstance(model.net.fc2, LowRankLinear) and type(model.net.fc3) is nn.Linear
    assert "fc3" in cb.skipped and "1,100 weights >= the layer's 1,000" in cb.skipped["fc3"]
    assert "fc3 left as it is" in capsys.readouterr().out
    assert cb.compression_summary()["structure"]["modules"] == {"fc2": {"type": "Linear", "rank": 10}}

    model = classifier()
    cb = LowRank(param_budget={"fc1": 0.25}, verbose=False)
    trainer(tmp_path, [cb], max_steps=1).fit(model, SyntheticDataModule())
    assert model.net.fc1.rank == 54  # floor(0.25 * 784 * 300 / 1084)


def test_lowrank_conv_with_a_later_step_and_adam(tmp_path):
    model = classifier("lenet5", optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    cb = LowRank(rank={"conv2": 8}, conv_scheme="spatial", step=2, verbose=False)
    before = Snapshot(1)
    fit = trainer(tmp_path, [cb, before])
    fit.fit(model, SyntheticDataModule())
    assert type(before.net.conv2) is nn.Conv2d  # nothing changed before step 2
    assert model.net.conv2.rank == 8 and model.net.conv2.scheme == "spatial" and cb.applied_step == 2
    optimizer = fit.optimizers[0]
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == [id(p) for p in model.parameters()]
    assert optimizer.state[model.net.conv2[0].weight]["exp_avg"].shape == (8, 20, 5, 1)  # fresh, then trained


def test_replace_in_optimizer_keeps_each_parameter_in_its_group():
    net = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    decay = [net[0].weight, net[1].weight]
    no_decay = [net[0].bias, net[1].bias]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
    )
    net(torch.randn(2, 6)).sum().backward()
    opt.step()
    old = net[0]
    new = factorize(old, 2)
    replace_in_optimizer(opt, old, new)
    assert [id(p) for p in opt.param_groups[0]["params"]] == [
        id(new[0].weight),
        id(new[1].weight),
        id(net[1].weight),
    ]
    assert [id(p) for p in opt.param_groups[1]["params"]] == [id(new[1].bias), id(net[1].bias)]
    assert old.weight not in opt.state and old.bias not in opt.state and net[1].weight in opt.state
    with pytest.raises(TypeError, match=r"must be a torch\.optim\.Optimizer"):
        replace_in_optimizer(object(), old, new)


def test_resume_after_factorization_matches_an_uninterrupted_run(tmp_path):
    class SaveAndStop(L.Callback):
        def __init__(self, step, path):
            self.step, self.path = step, path

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step:
                trainer.save_checkpoint(self.path)
                trainer.should_stop = True

    def callback():
        return LowRank(rank={"fc1": 20, "fc2": 10}, step=2, verbose=False)

    def run(root, extra=(), ckpt_path=None):
        model, cb = classifier(), callback()
        trainer(root, [cb, *extra], max_steps=12).fit(
            model, SyntheticDataModule(shuffle=False), ckpt_path=ckpt_path
        )
        return model, cb

    ckpt = tmp_path / "step8.ckpt"  # an epoch end: factorized at step 2, before the checkpoint
    full_model, full_cb = run(tmp_path / "full")
    _, part_cb = run(tmp_path / "part", extra=[SaveAndStop(STEPS_PER_EPOCH, ckpt)])
    assert part_cb.applied_step == 2
    resumed_model, resumed_cb = run(tmp_path / "resumed", ckpt_path=str(ckpt))  # a fresh, dense model
    assert resumed_cb.applied_step == 2 and resumed_cb.layers == full_cb.layers
    full_state, resumed_state = full_model.state_dict(), resumed_model.state_dict()
    assert full_state.keys() == resumed_state.keys() and "net.fc1.0.weight" in full_state
    for name, value in full_state.items():
        torch.testing.assert_close(resumed_state[name], value, rtol=1e-5, atol=1e-6, msg=name)

    # Testing a fresh, dense module from the factorized checkpoint: the layers are rebuilt first.
    fresh = classifier()
    tester = trainer(tmp_path / "test", [callback()], limit_test_batches=1)
    tester.test(fresh, SyntheticDataModule(shuffle=False), ckpt_path=str(ckpt), verbose=False)
    saved = torch.load(ckpt, weights_only=True)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, saved["state_dict"][name]), name
    assert "on_load_checkpoint" not in vars(fresh)  # the patch is undone in teardown
    # By hand: restore_factorization from the saved callback state.
    by_hand = create_model("lenet_300_100")
    restore_factorization(by_hand, saved["callbacks"][callback().state_key])
    by_hand.load_state_dict({k[4:]: v for k, v in saved["state_dict"].items()})


def test_depthwise_fits_on_training_activations_then_fine_tunes(tmp_path):
    model = classifier("lenet5", model_kwargs={"conv_relu": True})
    dense = copy.deepcopy(model.net)
    cb = DepthwiseSeparable(include=["conv2"], data_batches=2, iterations=3, verbose=False)
    after = Snapshot(0)
    fit = trainer(tmp_path, [cb, after], max_steps=3)
    data = SyntheticDataModule(shuffle=False)
    fit.fit(model, data)
    assert isinstance(model.net.conv2, DepthwiseSeparableConv2d) and type(model.net.conv1) is nn.Conv2d
    # Reference: the conv2 inputs of the dense net on the first two training batches, fitted by hand.
    inputs = []
    handle = dense.conv2.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach()))
    with torch.no_grad():
        for i, (x, _) in enumerate(data.train_dataloader()):
            if i == 2:
                break
            dense(x)
    handle.remove()
    expected, errors = fit_depthwise(dense.conv2, patch_moment(dense.conv2, inputs), 1, 3)
    for got, want in zip(after.net.conv2.parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    record = cb.layers["conv2"]
    assert record["error_kernel_svd"] == pytest.approx(errors[0]) and record["error_fitted"] == pytest.approx(
        min(errors)
    )
    assert record["error_fitted"] <= record["error_kernel_svd"]
    assert record["ratio_formula"] == pytest.approx(1 / 50 + 1 / 25)
    assert record["params_after"] == 20 * 25 + 20 * 50 + 50 and record["params_before"] == 25050
    assert record["ratio_measured"] == pytest.approx(1550 / 25050)
    _optimizer_holds_exactly_the_model(fit.optimizers[0], model)
    summary = cb.compression_summary()
    assert summary["structure"] == {
        "kind": "depthwise",
        "version": 1,
        "modules": {"conv2": {"multiplier": 1}},
        "inner": None,
    }
    assert "m/N + m/k^2 = 0.060" in summary["description"]


def test_both_callbacks_in_one_run_give_one_spec_that_rebuilds_everything(tmp_path):
    model = classifier("lenet5")
    low = LowRank(rank={"fc1": 32}, verbose=False)
    dw = DepthwiseSeparable(include=["conv2"], init="kernel", multiplier=2, verbose=False)
    trainer(tmp_path, [low, dw], max_steps=2).fit(model, SyntheticDataModule())
    a, b = low.compression_summary(), dw.compression_summary()
    assert a["structure"]["kind"] == "lowrank" and a["structure"]["inner"]["kind"] == "depthwise"
    for spec in (a["structure"], b["structure"]):
        rebuilt = apply_structure(create_model("lenet5"), spec)
        rebuilt.load_state_dict(a["network"].state_dict(), strict=True)
    assert low.state_dict()["spec"]["modules"] == {"fc1": {"type": "Linear", "rank": 32}}
    assert dw.state_dict()["spec"]["modules"] == {"conv2": {"multiplier": 2}}


# ------------------------------------------------------------------------------------------ bad input


class Holder(L.LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net


def grouped_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 6, 1), nn.Flatten())


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: LowRank(rank=10, energy=0.9),
            r"exactly one of rank, energy or param_budget.*\['energy', 'rank'\]",
        ),
        (lambda: LowRank(), r"exactly one of rank, energy or param_budget.*got none"),
        (lambda: LowRank(rank=0), r"rank must be a positive int"),
        (lambda: LowRank(rank={"fc1": 2.5}), r"rank\['fc1'\] must be a positive int"),
        (lambda: LowRank(energy=1.5), r"energy must be a number in \(0, 1\]"),
        (lambda: LowRank(param_budget=1.0), r"param_budget must be a number in \(0, 1\)"),
        (lambda: LowRank(rank={}), r"rank is an empty mapping"),
        (
            lambda: LowRank(rank=4, conv_scheme="spacial"),
            r"conv_scheme must be one of.*Did you mean 'spatial'",
        ),
        (lambda: LowRank(rank=4, step=-1), r"step must be an optimizer step >= 0"),
        (lambda: LowRank(rank=4, include="fc1"), r"include must be a list of glob strings"),
        (lambda: LowRank(rank=4, include=[]), r"include is empty"),
        (lambda: DepthwiseSeparable(init="kernal"), r"init must be one of.*Did you mean 'kernel'"),
        (lambda: DepthwiseSeparable(multiplier=0), r"multiplier must be a positive int"),
        (lambda: DepthwiseSeparable(data_batches=0), r"data_batches must be an int >= 1"),
    ],
)
def test_bad_arguments_are_rejected_up_front(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(
    "cb, message",
    [
        (
            LowRank(rank=301, include=["fc1"]),
            r"rank 301 for fc1 exceeds its maximum rank 300 .*use a rank <= 300",
        ),
        (LowRank(rank={"fc1": 10, "fc9": 3}), r"include pattern 'fc9' matches no Linear/Conv2d layer.*'fc1'"),
        (LowRank(rank=4, exclude=["net.fc7"]), r"exclude pattern 'net.fc7' matches no Linear/Conv2d layer"),
        (
            LowRank(rank={"fc1": 10}, include=["fc1", "fc2"]),
            r"targeted layers \['fc2'\] match no key of rank",
        ),
        (LowRank(rank={"fc*": 10, "fc9": 2}, include=["fc1"]), r"rank key 'fc9' matches no targeted layer"),
        (LowRank(param_budget={"fc3": 0.01}), r"param_budget 0.01 for fc3 .*allows no rank"),
        (DepthwiseSeparable(), r"DepthwiseSeparable: include pattern '\*' matches no Conv2d layer"),
    ],
)
def test_bad_targets_fail_in_setup_before_training(cb, message):
    with pytest.raises(ValueError, match=message):
        cb.setup(None, classifier(), "fit")


@pytest.mark.parametrize(
    "cb, message",
    [
        (LowRank(rank=2, include=["1"]), r"1 is a grouped convolution \(groups=8\).*exclude it"),
        (DepthwiseSeparable(include=["1"]), r"1 is already depthwise; only standard convolutions"),
        (DepthwiseSeparable(include=["2"]), r"2 has a 1 x 1 kernel"),
        (DepthwiseSeparable(), r"1 is already depthwise"),  # '*' takes every Conv2d: exclude what cannot go
        (DepthwiseSeparable(include=["0"], multiplier=9), r"multiplier 9 for 0 must be below"),
        (DepthwiseSeparable(include=["0"], multiplier={"2": 1}), r"include pattern|matches no key"),
    ],
)
def test_layers_that_cannot_be_replaced_are_refused(cb, message):
    with pytest.raises(ValueError, match=message):
        cb.setup(None, Holder(grouped_net()), "fit")


def test_depthwise_excluding_what_cannot_be_replaced_works():
    cb = DepthwiseSeparable(exclude=["1", "2"])
    cb.setup(None, Holder(grouped_net()), "fit")
    assert list(cb._targets(cb._net)) == ["0"]


def test_a_step_beyond_the_run_is_an_error(tmp_path):
    cb = LowRank(rank=4, include=["fc2"], step=10)
    with pytest.raises(ValueError, match=r"acts at optimizer step 10, but the run has only 4 steps"):
        trainer(tmp_path, [cb]).fit(classifier(), SyntheticDataModule())


def test_missing_model_attr_lists_the_submodules():
    with pytest.raises(ValueError, match=r"no nn.Module attribute 'network'; its submodules are \['net'"):
        LowRank(rank=4, model_attr="network").setup(None, classifier(), "fit")


def test_spawning_strategies_are_refused():
    spawn = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(ValueError, match=r"spawning strategy.*strategy='ddp'"):
        LowRank(rank=4).setup(spawn, classifier(), "fit")


# ------------------------------------------------------------------------------------------------ DDP

DDP_SCRIPT = """
import sys
import lightning.pytorch as L
import torch
from lit_compress.data import SyntheticDataModule
from lit_compress.factorization.callback import DepthwiseSeparable, LowRank
from lit_compress.models import ImageClassifier


class Save(L.Callback):
    def on_train_end(self, trainer, pl_module):
        cbs = [c for c in trainer.callbacks if isinstance(c, (LowRank, DepthwiseSeparable))]
        weights = {n: p.detach().cpu() for n, p in pl_module.named_parameters()}
        path = f"{sys.argv[1]}/rank{trainer.global_rank}.pt"
        torch.save({"weights": weights, "layers": [c.layers for c in cbs]}, path)


if __name__ == "__main__":
    torch.manual_seed(0)
    model = ImageClassifier(model="lenet5", optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    callbacks = [
        DepthwiseSeparable(include=["conv2"], data_batches=2, iterations=2, step=1, verbose=False),
        LowRank(energy=0.5, include=["fc1"], step=1, verbose=False),
        Save(),
    ]
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, default_root_dir=sys.argv[1], limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(model, SyntheticDataModule(num_train=128, batch_size=16))
"""


def test_ddp_ranks_replace_identically_and_keep_training_in_sync(tmp_path):
    """Two processes (strategy='ddp', gloo): each rank sees other batches, yet the activation statistics are
    all-reduced, so both fit the same depthwise pair and pick the same rank; DDP is re-wrapped afterwards."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_factorize.py"
    script.write_text(DDP_SCRIPT)
    # Distributed variables left in os.environ by earlier in-process DDP tests would make Lightning believe
    # this script is an already-launched rank and wait forever for the other one.
    launched = {"LOCAL_RANK", "RANK", "GLOBAL_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"}
    leftover = ("MASTER_", "PL_")
    clean = {k: v for k, v in os.environ.items() if k not in launched and not k.startswith(leftover)}
    env = {**clean, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["layers"] == ranks[1]["layers"]
    assert (
        ranks[0]["layers"][0]["conv2"]["error_fitted"] <= ranks[0]["layers"][0]["conv2"]["error_kernel_svd"]
    )
    assert "net.conv2.0.weight" in ranks[0]["weights"] and "net.fc1.1.bias" in ranks[0]["weights"]
    for name, w in ranks[0]["weights"].items():
        torch.testing.assert_close(w, ranks[1]["weights"][name], msg=name)


def test_timm_resnet_from_a_fit_round_trips_through_its_spec(tmp_path):
    pytest.importorskip("timm")
    kwargs = {"in_chans": 1, "zero_init_last": False}
    model = classifier("timm:resnet18", model_kwargs=kwargs)
    low = LowRank(param_budget=0.3, include=["layer1.*.conv*"], conv_scheme="spatial", verbose=False)
    dw = DepthwiseSeparable(include=["layer2.*.conv2"], data_batches=1, iterations=1, verbose=False)
    trainer(tmp_path, [low, dw], max_steps=1).fit(model, SyntheticDataModule(num_train=32, batch_size=16))
    assert set(low.layers) == {"layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"}
    assert low.layers["layer1.0.conv1"]["rank"] == 28  # spatial: 192 x 192 matrix, floor(0.3 * 192^2 / 384)
    assert set(dw.layers) == {"layer2.0.conv2", "layer2.1.conv2"}
    summary = low.compression_summary()
    rebuilt = apply_structure(create_model("timm:resnet18", num_classes=10, **kwargs), summary["structure"])
    rebuilt.load_state_dict(summary["network"].state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(rebuilt.eval()(x), summary["network"](x))
