"""The DepthPruning callback on real Lightning runs (tiny CIFAR ResNet-14, synthetic data, CPU)."""

from __future__ import annotations

import json

import lightning.pytorch as L
import pytest
import torch

from lit_compress.data import SyntheticDataModule
from lit_compress.models import ImageClassifier, create_model
from lit_compress.pruning.depth import ResidualShortcut, residual_blocks
from lit_compress.pruning.depth_callback import DepthPruning
from lit_compress.zoo.structure import apply_structure

STEPS_PER_EPOCH = 8  # SyntheticDataModule(num_train=256, batch_size=32)
X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def resnet(dead=("layer1.1", "layer3.0"), shortcut="A", lr=0.05) -> ImageClassifier:
    """ResNet-14 (width 4) whose ``dead`` blocks have an zero residual branch (bn2 gamma = beta = 0)."""
    torch.manual_seed(0)
    model = ImageClassifier(
        model="resnet14",
        model_kwargs={"in_chans": 1, "width": 4, "shortcut": shortcut},
        optimizer=lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9),
    )
    with torch.no_grad():
        for name in dead:
            bn = model.net.get_submodule(name).bn2
            bn.weight.zero_()
            bn.bias.zero_()
    return model


def trainer(tmp_path, callbacks, max_steps=6, **kwargs) -> L.Trainer:
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
    """The network's eval-mode output on ``X`` at the start of optimizer step ``step`` (place it around the
    DepthPruning callback to see the network just before and just after a removal)."""

    def __init__(self, step):
        self.step, self.output = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.output is None:
            pl_module.net.eval()
            with torch.no_grad():
                self.output = pl_module.net(X)
            pl_module.net.train()


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_epsilon_removes_blocks_whose_gate_stayed_closed_exactly_and_keeps_training(tmp_path, shortcut):
    model = resnet(shortcut=shortcut)
    params_before = sum(p.numel() for p in model.parameters())
    cb = DepthPruning(epsilon=1e-3, remove_steps=[2], verbose=False)
    before, after = Snapshot(2), Snapshot(2)
    fit = trainer(tmp_path, [before, cb, after])
    fit.fit(model, SyntheticDataModule(shuffle=False))
    net = model.net
    assert cb.removed == ["layer1.1", "layer3.0"]
    assert all(isinstance(net.get_submodule(b), ResidualShortcut) for b in cb.removed)
    assert list(residual_blocks(net)) == ["layer1.0", "layer2.0", "layer2.1", "layer3.1"]
    # The gated network and the one without the closed blocks compute the same thing.
    torch.testing.assert_close(after.output, before.output)
    first = cb.history[0]
    assert first["step"] == 2 and first["removed"] == cb.removed and first["blocks_left"] == 4
    assert first["statistics"]["layer1.1"] == 0.0 == first["statistics"]["layer3.0"]
    assert min(v for b, v in first["statistics"].items() if b not in cb.removed) > 1e-3
    assert [h["step"] for h in cb.history] == [2, 6] and cb.history[1]["removed"] == []  # remove_at_end
    optimizer = fit.optimizers[0]
    in_optimizer = [p for g in optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in model.parameters()}
    assert len(in_optimizer) == len(list(model.parameters()))
    assert all(any(p is q for q in in_optimizer) for p in optimizer.state)
    assert sum(p.numel() for p in model.parameters()) < params_before
    assert "on_load_checkpoint" not in vars(model)  # patch undone in teardown
    assert sum(len(m._forward_hooks) for m in net.modules()) == 0  # gates detached in teardown

    summary = cb.compression_summary()
    assert set(summary) == {"methods", "description", "structure", "network"}
    assert summary["methods"] == ["depth_pruning:epsilon"]
    assert "2/6 residual blocks removed (layer1.1, layer3.0)" in summary["description"]
    spec = json.loads(json.dumps(summary["structure"]))
    assert spec == {"kind": "depth", "version": 1, "removed": ["layer1.1", "layer3.0"], "inner": None}
    exported = summary["network"]
    assert not exported.training and not any(p.requires_grad for p in exported.parameters())
    rebuilt = apply_structure(create_model("resnet14", in_chans=1, width=4, shortcut=shortcut), spec).eval()
    rebuilt.load_state_dict(exported.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X), exported(X))


def test_too_large_epsilon_keeps_one_block_per_stage_and_warns(tmp_path):
    model = resnet(dead=())
    cb = DepthPruning(epsilon=1e6, remove_steps=[1], remove_at_end=False, verbose=False)
    with pytest.warns(UserWarning, match=r"min_blocks_per_stage=1 .* they are kept and no longer gated"):
        trainer(tmp_path, [cb], max_steps=3).fit(model, SyntheticDataModule())
    stats = cb.history[0]["statistics"]
    kept = set(residual_blocks(model.net))
    assert len(cb.removed) == 3 and len(kept) == 3
    for stage in ("layer1", "layer2", "layer3"):  # per stage, the block with the larger response stays
        a, b = f"{stage}.0", f"{stage}.1"
        assert (a if stats[a] >= stats[b] else b) in kept
    assert sorted(cb.exempt) == sorted(kept)
    # Exempt blocks are no longer gated: their branch contributes again.
    block = model.net.get_submodule(sorted(kept)[0])
    assert block.bn2.weight.grad is not None and block.bn2.weight.grad.abs().sum() > 0


def test_ssl_penalty_adds_the_group_lasso_gradient_of_whole_branches(tmp_path):
    def one_step(penalty_weight):
        model = resnet(dead=(), lr=0.1)
        model.optimizer_factory = lambda p: torch.optim.SGD(p, lr=0.1)
        start = {n: p.detach().clone() for n, p in model.net.named_parameters()}
        cb = DepthPruning(
            criterion="ssl", penalty_weight=penalty_weight, remove_steps=[100], remove_at_end=False
        )
        trainer(tmp_path, [cb], max_steps=1).fit(model, SyntheticDataModule(shuffle=False))
        return model, start

    plain, start = one_step(0.0)
    ssl, _ = one_step(0.5)
    branch = [n for n in start if n.startswith("layer2.0.") and ".shortcut" not in n]
    norm = torch.sqrt(sum(start[n].square().sum() for n in branch))
    for name in branch:
        delta = dict(ssl.net.named_parameters())[name] - dict(plain.net.named_parameters())[name]
        torch.testing.assert_close(delta, -0.1 * 0.5 * start[name] / norm, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ssl.net.conv1.weight, plain.net.conv1.weight)  # the stem is not penalised


def test_ssl_removes_branches_whose_norm_is_below_the_threshold(tmp_path):
    model = resnet(dead=())
    with torch.no_grad():
        for p in model.net.layer2[1].parameters():
            p.zero_()
    cb = DepthPruning(criterion="ssl", threshold=0.01, remove_steps=[0], verbose=False)
    trainer(tmp_path, [cb], max_steps=3).fit(model, SyntheticDataModule())
    assert cb.removed == ["layer2.1"] and cb.history[0]["statistics"]["layer2.1"] == 0.0
    assert [h["removed"] for h in cb.history] == [["layer2.1"], []]
    assert cb.compression_summary()["structure"]["removed"] == ["layer2.1"]


def test_resume_after_removal_matches_an_uninterrupted_run(tmp_path):
    class SaveAndStop(L.Callback):
        def __init__(self, step, path):
            self.step, self.path = step, path

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == self.step:
                trainer.save_checkpoint(self.path)
                trainer.should_stop = True

    def callback():
        return DepthPruning(epsilon=1e-3, remove_steps=[2, 10], remove_at_end=False, verbose=False)

    def run(root, extra=(), ckpt_path=None):
        model, cb = resnet(), callback()
        trainer(root, [cb, *extra], max_steps=12).fit(
            model, SyntheticDataModule(shuffle=False), ckpt_path=ckpt_path
        )
        return model, cb

    ckpt = tmp_path / "step8.ckpt"
    full_model, full_cb = run(tmp_path / "full")
    _, part_cb = run(tmp_path / "part", extra=[SaveAndStop(STEPS_PER_EPOCH, ckpt)])
    assert part_cb.removed == ["layer1.1", "layer3.0"] and part_cb.last_event_step == 2
    resumed_model, resumed_cb = run(tmp_path / "resumed", ckpt_path=str(ckpt))  # a fresh, full-depth model
    assert resumed_cb.removed == full_cb.removed == ["layer1.1", "layer3.0"]
    # The window maxima (steps 2..9) survived the checkpoint: the statistics at step 10 are the same.
    assert resumed_cb.history == full_cb.history
    full_state, resumed_state = full_model.state_dict(), resumed_model.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for name, a in full_state.items():
        torch.testing.assert_close(resumed_state[name], a, rtol=1e-5, atol=1e-6, msg=name)
    # Testing a fresh, full-depth module from the checkpoint: the blocks are removed before the weights load.
    fresh = resnet()
    tester = trainer(tmp_path / "test", [callback()], limit_test_batches=1)
    tester.test(fresh, SyntheticDataModule(shuffle=False), ckpt_path=str(ckpt), verbose=False)
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert isinstance(fresh.net.layer3[0], ResidualShortcut)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_spawning_strategies_are_refused(tmp_path):
    fit = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False)
    with pytest.raises(ValueError, match="strategy='ddp'"):
        DepthPruning().setup(fit, resnet(), "fit")


def test_removal_under_ddp_rewraps_the_module_and_keeps_training(tmp_path, monkeypatch):
    """One in-process DDP rank (gloo): after a removal DDP's reducer must follow the new parameters."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"):
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)

    class Probe(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, *args):
            wrapper = trainer.strategy.model
            same = {id(p) for p in wrapper.parameters()} == {id(p) for p in pl_module.parameters()}
            self.seen.append(isinstance(wrapper, DistributedDataParallel) and same)

    was_initialised = dist.is_available() and dist.is_initialized()
    model, probe = resnet(), Probe()
    cb = DepthPruning(epsilon=1e-3, remove_steps=[1], verbose=False)
    fit = trainer(tmp_path, [cb, probe], max_steps=3, strategy="ddp")
    try:
        fit.fit(model, SyntheticDataModule(num_train=128))
        assert probe.seen == [True] * 3 and cb.removed == ["layer1.1", "layer3.0"]
    finally:
        if not was_initialised and dist.is_initialized():
            dist.destroy_process_group()
