"""The BlockDrop callback on real Lightning runs (tiny CIFAR-style ResNet-8, synthetic 8x8 data)."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from safetensors.torch import load_file, save_file

from lit_compress.data import SyntheticDataModule
from lit_compress.gating.blockdrop import BlockDropNetwork, gating_statistics
from lit_compress.gating.blockdrop_callback import BlockDrop
from lit_compress.models import ImageClassifier, create_model
from lit_compress.models.resnet_cifar import BasicBlock

SHAPE = (1, 8, 8)
NET = {"depth": 8, "in_chans": 1, "width": 4}
BLOCKS = ["layer1.0", "layer2.0", "layer3.0"]
STEPS_PER_EPOCH = 4  # 64 training images, batches of 16


def classifier(model: str = "resnet", model_kwargs: dict | None = NET) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        model=model,
        model_kwargs=model_kwargs,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    )


def data() -> SyntheticDataModule:
    return SyntheticDataModule(
        num_train=64, num_val=32, num_test=32, input_shape=SHAPE, batch_size=16, shuffle=False
    )


def blockdrop(**kwargs) -> BlockDrop:
    kwargs = {"policy": "cnn", "policy_width": 4, "curriculum_epochs": 2, "verbose": False, **kwargs}
    return BlockDrop(**kwargs)


def make_trainer(root, callbacks, max_epochs: int = 3, **kwargs) -> L.Trainer:
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        num_sanity_val_steps=0,
        **kwargs,
    )


class Snapshots(L.Callback):
    """Network and policy state at the end of every training epoch, and the stage the callback was in."""

    def __init__(self):
        self.net: list[dict] = []
        self.policy: list[dict] = []
        self.learned: list[int] = []

    def on_train_epoch_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, BlockDrop))
        self.net.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})
        self.policy.append({k: v.detach().clone() for k, v in cb.policy.state_dict().items()})
        self.learned.append(cb.learned)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_curriculum_freezes_the_backbone_then_the_joint_stage_trains_both(tmp_path):
    model = classifier()
    keys = list(model.state_dict())
    initial = {k: v.clone() for k, v in model.net.state_dict().items()}
    cb, snaps = blockdrop(), Snapshots()
    policy_init = None
    trainer = make_trainer(tmp_path, [cb, snaps])
    trainer.fit(model, data())
    policy_init = copy.deepcopy(snaps.policy[0])
    assert snaps.learned == [2, 3, 3]  # c(e) = ceil((e + 1) * 3 / 2), then all blocks
    assert same(snaps.net[0], initial) and same(snaps.net[1], initial)  # weights and BN statistics frozen
    assert not same(snaps.net[2], initial)  # joint fine-tuning moved the backbone
    assert not same(snaps.policy[1], policy_init) and not same(snaps.policy[2], snaps.policy[1])
    assert cb.policy_steps == trainer.global_step == 3 * STEPS_PER_EPOCH
    # The module is untouched after teardown: same keys (the policy lives in the callback), original classes.
    assert list(model.state_dict()) == keys
    assert type(model.net.layer1[0]) is BasicBlock and "training_step" not in model.__dict__
    stats = cb.statistics["val"]
    assert stats["images"] == 32 and stats["blocks"] == 3
    assert 0 < stats["macs_mean"] <= stats["macs_backbone"] + stats["macs_policy"]
    assert sum(stats["blocks_histogram"]) == 32
    assert "blockdrop/val_blocks_mean" in trainer.callback_metrics


def test_evaluation_skips_dropped_blocks_and_test_reuses_the_trained_policy(tmp_path):
    model, cb = classifier(), blockdrop(curriculum_epochs=1)
    make_trainer(tmp_path, [cb], max_epochs=2).fit(model, data())

    def policy_logits(x):  # keep layer1.0 for bright images only, never layer2.0, always layer3.0
        brightness = x.mean(dim=(1, 2, 3))
        return torch.stack(
            [100 * brightness, torch.full_like(brightness, -5), torch.full_like(brightness, 5)], 1
        )

    cb.policy.forward = policy_logits

    class CountConvCalls(L.Callback):
        """Images seen by each block's first conv during the test batches (before BlockDrop's MAC count)."""

        def __init__(self):
            self.seen = {name: 0 for name in BLOCKS}

        def on_test_epoch_start(self, trainer, pl_module):
            self.handles = [
                pl_module.net.get_submodule(name).conv1.register_forward_pre_hook(
                    lambda m, args, n=name: self.seen.__setitem__(n, self.seen[n] + args[0].shape[0])
                )
                for name in BLOCKS
            ]

        def on_test_epoch_end(self, trainer, pl_module):
            for handle in self.handles:
                handle.remove()

    counter = CountConvCalls()
    make_trainer(tmp_path, [counter, cb]).test(model, data())
    dm = data()
    dm.setup("test")
    bright = int(sum((x.mean(dim=(1, 2, 3)) >= 0).sum() for x, _ in dm.test_dataloader()))
    assert 0 < bright < 32
    # Each block's convolutions saw exactly the images whose decision kept it: nothing else was computed.
    assert counter.seen == {"layer1.0": bright, "layer2.0": 0, "layer3.0": 32}
    stats = cb.statistics["test"]
    assert stats["block_usage"] == {"layer1.0": bright / 32, "layer2.0": 0.0, "layer3.0": 1.0}
    assert stats["distinct_policies"] == 2 and stats["blocks_histogram"] == [0, 32 - bright, bright, 0]


def test_resume_equals_an_uninterrupted_run(tmp_path):
    class StopAt(L.Callback):
        def __init__(self, step):
            self.step = step

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= self.step:
                trainer.should_stop = True

    # Checkpoints at epoch ends: Lightning does not restore a plain DataLoader's position mid-epoch.
    def run(root, extra=(), ckpt_path=None):
        model, cb = classifier(), blockdrop()
        checkpoint = L.callbacks.ModelCheckpoint(
            dirpath=root, save_top_k=-1, every_n_train_steps=STEPS_PER_EPOCH
        )
        fit = make_trainer(root, [cb, checkpoint, *extra], enable_checkpointing=True)
        fit.fit(model, data(), ckpt_path=ckpt_path)
        return model, cb

    full_model, full_cb = run(tmp_path / "full")
    _, part_cb = run(tmp_path / "part", extra=[StopAt(STEPS_PER_EPOCH)])  # killed after curriculum epoch 0
    assert part_cb.policy_steps == STEPS_PER_EPOCH
    (ckpt,) = (tmp_path / "part").glob("*.ckpt")
    resumed_model, resumed_cb = run(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert resumed_cb.policy_steps == full_cb.policy_steps and resumed_cb.learned == full_cb.learned
    for name, value in full_cb.policy.state_dict().items():
        torch.testing.assert_close(resumed_cb.policy.state_dict()[name], value, rtol=0, atol=0, msg=name)
    full_opt, resumed_opt = full_cb.optimizer.state_dict(), resumed_cb.optimizer.state_dict()
    for index, state in full_opt["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(resumed_opt["state"][index][key], value, rtol=0, atol=0)
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert resumed_cb.statistics["val"] == full_cb.statistics["val"]


def test_export_and_zoo_structure_round_trip(tmp_path):
    from lit_compress.zoo.structure import apply_structure

    model, cb = classifier(), blockdrop(curriculum_epochs=1)
    trainer = make_trainer(tmp_path, [cb], max_epochs=2)
    trainer.fit(model, data())
    summary = cb.compression_summary()
    exported = summary["network"]
    assert isinstance(exported, BlockDropNetwork) and not exported.training
    assert summary["methods"] == ["blockdrop"] and "of 3 blocks used" in summary["description"]
    assert summary["gating"]["statistics"] == cb.statistics["val"]
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in exported.state_dict().items()}, str(path))
    import lit_compress.gating.structure  # noqa: F401  (registers the "blockdrop" kind)

    rebuilt = apply_structure(create_model("resnet", **NET), summary["structure"])
    rebuilt.load_state_dict(load_file(str(path)))
    rebuilt.eval()
    dm = data()
    dm.setup("validate")
    x = next(iter(dm.val_dataloader()))[0]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), exported(x))
    # The exported model decides exactly as the callback did during validation.
    stats = gating_statistics(rebuilt, dm.val_dataloader())
    assert {k: stats[k] for k in ("blocks_mean", "block_usage", "macs_mean")} == {
        k: cb.statistics["val"][k] for k in ("blocks_mean", "block_usage", "macs_mean")
    }


def test_policy_only_stage_with_gradient_accumulation(tmp_path):
    model, cb = classifier(), blockdrop(curriculum_epochs=1, finetune=False)
    initial = {k: v.clone() for k, v in model.net.state_dict().items()}
    trainer = make_trainer(tmp_path, [cb], max_epochs=2, accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(model, data())
    assert cb.policy_steps == trainer.global_step == 2 * STEPS_PER_EPOCH // 2
    assert same(model.net.state_dict(), initial)  # finetune=False: the backbone never trains


def test_joint_stage_loss_is_task_loss_plus_policy_term(tmp_path):
    class Capture(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.loss = outputs["loss"].detach()
            self.task = F.cross_entropy(self.logits, batch[1])

    model, cb, capture = classifier(), blockdrop(curriculum_epochs=0), Capture()
    model.net.register_forward_hook(
        lambda m, a, out: setattr(capture, "logits", out.detach()) if torch.is_grad_enabled() else None
    )
    trainer = make_trainer(tmp_path, [cb, capture], max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, data())
    policy_term = trainer.callback_metrics["blockdrop/policy_loss"]
    torch.testing.assert_close(capture.loss, capture.task + policy_term)


def test_backbone_stage_freezes_the_policy_and_trains_the_backbone_under_its_decisions(tmp_path):
    class Decisions(L.Callback):
        """The decisions the network ran with in every training forward, and what the policy's greedy
        decision at threshold 0.7 (the policy as it was when the stage began) would have been."""

        def on_train_epoch_start(self, trainer, pl_module):
            cb = next(c for c in trainer.callbacks if isinstance(c, BlockDrop))
            self.before = copy.deepcopy(cb.policy).eval()  # the fold happens at the stage's first batch
            self.seen = []

            def hook(module, args):
                if not module.training:  # validation forwards run inside the epoch too
                    return
                with torch.no_grad():
                    p = torch.sigmoid(self.before(args[0]))
                self.seen.append((cb._state.current().clone(), p))

            self.handle = pl_module.net.register_forward_pre_hook(hook)

        def on_train_epoch_end(self, trainer, pl_module):
            self.handle.remove()

    model, snaps, seen = classifier(), Snapshots(), Decisions()
    cb = blockdrop(curriculum_epochs=1, freeze_policy_at=2, frozen_threshold=0.7)
    trainer = make_trainer(tmp_path, [cb, snaps, seen], max_epochs=3)
    trainer.fit(model, data())
    assert [cb.stage(e) for e in range(3)] == ["curriculum", "joint", "backbone"]
    assert cb.policy_steps == 2 * STEPS_PER_EPOCH  # no policy step in the backbone stage
    assert not same(snaps.net[2], snaps.net[1])  # the backbone trained
    bias = [k for k in snaps.policy[2] if k.endswith("bias")][-1]  # the last Linear's bias moved, only it
    logit = torch.log(torch.tensor(0.7 / 0.3))
    torch.testing.assert_close(snaps.policy[2][bias], snaps.policy[1][bias] - logit)
    assert all(torch.equal(v, snaps.policy[1][k]) for k, v in snaps.policy[2].items() if k != bias)
    assert len(seen.seen) == STEPS_PER_EPOCH
    for decisions, p in seen.seen:  # deterministic decisions at the new threshold, never a sample
        assert torch.equal(decisions, p >= 0.7)
    assert cb.threshold_folded and "keep threshold 0.7" in cb.compression_summary()["description"]


@pytest.mark.parametrize("stop_after_epoch", [1, 2])  # before the fold / after it
def test_backbone_stage_resumes_exactly_and_folds_the_threshold_once(tmp_path, stop_after_epoch):
    class StopAt(L.Callback):
        def on_train_epoch_end(self, trainer, *args):
            if trainer.current_epoch == stop_after_epoch:
                trainer.should_stop = True

    def run(root, extra=(), ckpt_path=None):
        model, cb = classifier(), blockdrop(curriculum_epochs=1, freeze_policy_at=2, frozen_threshold=0.6)
        checkpoint = L.callbacks.ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_epochs=1)
        fit = make_trainer(root, [cb, checkpoint, *extra], max_epochs=4, enable_checkpointing=True)
        fit.fit(model, data(), ckpt_path=ckpt_path)
        return model, cb

    full_model, full_cb = run(tmp_path / "full")
    run(tmp_path / "part", extra=[StopAt()])
    (ckpt,) = (tmp_path / "part").glob(f"epoch={stop_after_epoch}-*.ckpt")
    resumed_model, resumed_cb = run(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert resumed_cb.threshold_folded
    for name, value in full_cb.policy.state_dict().items():
        torch.testing.assert_close(resumed_cb.policy.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    assert resumed_cb.statistics["val"] == full_cb.statistics["val"]


def test_init_policy_from_a_blockdrop_entry_starts_a_new_fit_from_its_policy_and_backbone(
    tmp_path, monkeypatch
):
    import lit_compress.zoo as zoo_api

    model, cb = classifier(), blockdrop(curriculum_epochs=1)
    make_trainer(tmp_path / "first", [cb], max_epochs=2).fit(model, data())
    entry = cb.export(model)
    monkeypatch.setattr(zoo_api, "load", lambda name, *a, **k: {"tiny.blockdrop": entry}[name])
    fresh = ImageClassifier(
        model="resnet", model_kwargs=NET, init_from="zoo:tiny.blockdrop", optimizer=torch.optim.SGD
    )
    assert same(fresh.net.state_dict(), model.net.state_dict())  # the backbone's weights, same keys
    cb2 = blockdrop(curriculum_epochs=0, freeze_policy_at=0, init_policy_from="zoo:tiny.blockdrop")

    class Probe(L.Callback):  # forwards outside the training step, as CompressionSummary's MAC count
        def on_fit_start(self, trainer, pl_module):
            with torch.no_grad():
                pl_module.net(torch.randn(4, *SHAPE))

        on_train_batch_end = on_train_epoch_start = lambda self, trainer, pl_module, *a: self.on_fit_start(
            trainer, pl_module
        )

    make_trainer(tmp_path / "second", [cb2, Probe()], max_epochs=1).fit(fresh, data())
    # Taken over, then frozen: not even the policy's batch-norm statistics move under the probe's forwards.
    assert same(cb2.policy.state_dict(), entry.policy.state_dict())
    assert cb2.policy_steps == 0 and not same(fresh.net.state_dict(), model.net.state_dict())
    assert "init_policy_from" not in cb2.state_key  # a resume with the same run's arguments still matches


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(policy_width=8), r"the entry gates .* with policy .*'width': 4.*this callback gates"),
        (dict(include=["layer1.*", "layer2.*"]), r"the entry gates \['layer1.0', 'layer2.0', 'layer3.0'\]"),
        ("not gated", "that entry is a CifarResNet, not a BlockDrop network"),
    ],
)
def test_init_policy_from_an_entry_that_does_not_fit_is_refused(tmp_path, monkeypatch, change, message):
    import lit_compress.zoo as zoo_api

    model, cb = classifier(), blockdrop(curriculum_epochs=0)
    make_trainer(tmp_path, [cb], max_epochs=1, limit_val_batches=0).fit(model, data())
    entry = model.net if change == "not gated" else cb.export(model)
    monkeypatch.setattr(zoo_api, "load", lambda name, *a, **k: entry)
    kwargs = {} if change == "not gated" else change
    cb2 = blockdrop(curriculum_epochs=0, init_policy_from="zoo:x", **kwargs)
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, [cb2], max_epochs=1).fit(classifier(), data())


def test_a_backbone_stage_before_the_curriculum_ends_is_refused(tmp_path):
    with pytest.raises(ValueError, match="freeze_policy_at >= curriculum_epochs"):
        make_trainer(tmp_path, [blockdrop(curriculum_epochs=2, freeze_policy_at=1)]).fit(classifier(), data())


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(gamma=-1.0), ValueError, r"gamma must be a number in \[0, inf\)"),
        (dict(alpha=0.4), ValueError, r"alpha must be a number in \(0.5, 1\]"),
        (dict(policy="vit"), ValueError, "policy must be one of"),
        (dict(curriculum_epochs=-1), ValueError, "curriculum_epochs must be an integer >= 0"),
        (dict(finetune="yes"), TypeError, "finetune must be true or false"),
        (dict(target_key=1.5), TypeError, "target_key must be a batch index"),
        (dict(include="layer1.*"), ValueError, "include must be a list of strings"),
        (dict(freeze_policy_at=-1), ValueError, "freeze_policy_at must be an integer >= 0"),
        (dict(freeze_policy_at=3, frozen_threshold=0.0), ValueError, r"frozen_threshold must be .*\(0, 1\]"),
        (dict(freeze_policy_at=3, frozen_threshold=1.0), ValueError, "frozen_threshold must be below 1"),
        (dict(frozen_threshold=0.6), ValueError, "freeze_policy_at is not set"),
        (dict(init_policy_from="runs/last.ckpt"), ValueError, "init_policy_from must name a BlockDrop zoo"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        BlockDrop(**kwargs)


def test_network_without_residual_blocks_is_refused(tmp_path):
    trainer = make_trainer(tmp_path, [blockdrop()])
    with pytest.raises(ValueError, match=r"no residual block.*\['BasicBlock', 'Bottleneck'\]"):
        trainer.fit(classifier("lenet5_small", None), SyntheticDataModule(num_train=16, batch_size=8))


def test_wrong_model_attr(tmp_path):
    with pytest.raises(ValueError, match=r"no nn.Module attribute.*submodules are \['net'"):
        make_trainer(tmp_path, [blockdrop(model_attr="model")]).fit(classifier(), data())


def test_joint_stage_that_can_never_run_is_refused(tmp_path):
    with pytest.raises(ValueError, match="joint fine-tuning stage would never run"):
        make_trainer(tmp_path, [blockdrop(curriculum_epochs=3)], max_epochs=3).fit(classifier(), data())


def test_wrong_target_key(tmp_path):
    with pytest.raises(ValueError, match=r"cannot take target_key=2 .*set target_key"):
        make_trainer(tmp_path, [blockdrop(target_key=2)], max_epochs=3).fit(classifier(), data())


def test_manual_optimization_is_refused(tmp_path):
    model = classifier()
    model.automatic_optimization = False
    with pytest.raises(ValueError, match="needs automatic optimization"):
        make_trainer(tmp_path, [blockdrop()]).fit(model, data())


def test_train_skip_needs_ddp_find_unused_parameters():
    plain = SimpleNamespace(strategy=DDPStrategy())
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        blockdrop(train_skip=True)._check_strategy(plain)
    blockdrop(train_skip=True)._check_strategy(
        SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True))
    )
    blockdrop(train_skip=False)._check_strategy(plain)  # soft gating: every parameter is used


# -- DDP ---------------------------------------------------------------------------------------------------


class SavePerRank(L.Callback):
    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, BlockDrop))
        torch.save(
            {
                "net": {k: v.detach().cpu() for k, v in pl_module.net.state_dict().items()},
                "policy": {k: v.detach().cpu() for k, v in cb.policy.state_dict().items()},
                "steps": cb.policy_steps,
                "stats": cb.statistics,
            },
            Path(self.folder) / f"rank{trainer.global_rank}.pt",
        )


def test_two_rank_ddp_keeps_policy_and_backbone_in_sync(tmp_path):
    """Curriculum epoch (policy-only loss: no DDP parameter in the graph) then a joint epoch, plain DDP."""
    torch.manual_seed(0)
    model = ImageClassifier(model="resnet", model_kwargs=NET)
    trainer = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[blockdrop(curriculum_epochs=1), SavePerRank(str(tmp_path))],
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, SyntheticDataModule(num_train=64, num_val=16, input_shape=SHAPE, batch_size=8))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * 4  # 32 images per rank, batches of 8
    assert same(ranks[0]["net"], ranks[1]["net"])
    assert same(ranks[0]["policy"], ranks[1]["policy"])  # gradients and BN statistics averaged
    assert ranks[0]["stats"]["val"] == ranks[1]["stats"]["val"] and ranks[0]["stats"]["val"]["images"] == 16
