"""The Pruning callback on real Lightning runs (tiny models, synthetic data)."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.data import SyntheticDataModule
from lit_compress.models import ImageClassifier
from lit_compress.pruning import DenseSparseDense, Iterative, LotteryTicket, OneShot
from lit_compress.pruning.callback import Pruning

STEPS_PER_EPOCH = 8  # SyntheticDataModule(num_train=256, batch_size=32)


def tiny_classifier(optimizer=None, hidden=(32, 16)) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        model="mlp",
        model_kwargs={"hidden": list(hidden)},
        optimizer=optimizer or (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    )


def trainer(tmp_path, callbacks, max_steps=16, **kwargs) -> L.Trainer:
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


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if n.endswith("weight")}


def test_one_shot_magnitude_prunes_smallest_and_keeps_them_zero(tmp_path):
    model = tiny_classifier()
    before = weights(model)
    keys = list(model.state_dict())
    cb = Pruning(sparsity=0.75, schedule="one_shot")
    trainer(tmp_path, [cb]).fit(model, SyntheticDataModule())
    assert list(model.state_dict()) == keys  # no weight_orig / weight_mask reparametrisation
    for name, w in weights(model).items():
        mask = cb.masks[name]
        assert int((~mask).sum()) == round(0.75 * w.numel())
        assert torch.all(w[~mask] == 0)
        # Step-0 magnitude: every pruned weight was no larger than every kept one.
        assert before[name][~mask].abs().max() <= before[name][mask].abs().min()


def test_momentum_and_adam_moments_cannot_revive_pruned_weights(tmp_path):
    for optimizer in (
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
        lambda p: torch.optim.Adam(p, lr=0.01),
    ):
        model = tiny_classifier(optimizer)
        # Prune at step 5: the optimizer state is already full of non-zero momentum by then.
        cb = Pruning(sparsity=0.8, schedule=OneShot(step=5))
        fit = trainer(tmp_path, [cb], max_steps=16)
        fit.fit(model, SyntheticDataModule())
        for name, p in model.named_parameters():
            if name in cb.masks:
                assert torch.all(p[~cb.masks[name]] == 0)
                for value in fit.optimizers[0].state[p].values():
                    if isinstance(value, torch.Tensor) and value.shape == p.shape:
                        assert torch.all(value[~cb.masks[name]] == 0)


def test_global_scope_and_per_layer_override(tmp_path):
    model = tiny_classifier()
    cb = Pruning(sparsity=0.9, scope="global", layer_sparsity={"net.head": 0.5})
    trainer(tmp_path, [cb], max_steps=2).fit(model, SyntheticDataModule())
    head = cb.masks["net.head.weight"]
    assert int((~head).sum()) == round(0.5 * head.numel())
    rest = [m for n, m in cb.masks.items() if n != "net.head.weight"]
    total = sum(m.numel() for m in rest)
    assert sum(int((~m).sum()) for m in rest) == round(0.9 * total)
    per_layer = [1 - m.float().mean().item() for m in rest]
    assert max(per_layer) - min(per_layer) > 0.01  # one global ranking, not equal per-layer sparsities


def test_iterative_schedule_reaches_cumulative_targets(tmp_path):
    model = tiny_classifier()
    cb = Pruning(sparsity=0.875, schedule=Iterative(rounds=3, steps_per_round=4, growth="geometric"))
    trainer(tmp_path, [cb], max_steps=12).fit(model, SyntheticDataModule())
    fractions = [h["sparsity/global"] for h in cb.history]
    assert [h["step"] for h in cb.history] == [0, 4, 8]
    assert fractions == pytest.approx([0.5, 0.75, 0.875], abs=2e-3)  # 1 - (1 - 0.875) ** (k / 3)


def test_lottery_ticket_rewinds_survivors_to_initialisation(tmp_path):
    model = tiny_classifier()
    init = weights(model)
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                seen.update(weights(pl_module))

    cb = Pruning(sparsity=0.5, schedule=LotteryTicket(rounds=1, steps_per_round=4, rewind_step=0))
    trainer(tmp_path, [cb, Probe()], max_steps=8).fit(model, SyntheticDataModule())
    for name, mask in cb.masks.items():
        assert torch.equal(seen[name], init[name] * mask)
    assert not torch.equal(weights(model)["net.head.weight"], seen["net.head.weight"])  # then retrained


def test_lottery_ticket_random_reinit_control_differs_from_rewind(tmp_path):
    model = tiny_classifier()
    init = weights(model)
    cb = Pruning(sparsity=0.5, schedule=LotteryTicket(rounds=1, steps_per_round=4, reinit=True))
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                seen.update(weights(pl_module))

    trainer(tmp_path, [cb, Probe()], max_steps=5).fit(model, SyntheticDataModule())
    name = "net.hidden.0.weight"
    assert torch.all(seen[name][~cb.masks[name]] == 0)
    assert not torch.equal(seen[name], init[name] * cb.masks[name])


def test_dense_sparse_dense_releases_masks(tmp_path):
    model = tiny_classifier()
    cb = Pruning(sparsity=0.9, schedule=DenseSparseDense(sparse_step=2, release_step=6))
    trainer(tmp_path, [cb], max_steps=12).fit(model, SyntheticDataModule())
    assert cb.masks == {} and cb.released
    assert [h["step"] for h in cb.history] == [2, 6]
    w = model.net.hidden[0].weight
    assert (w == 0).float().mean() < 0.5  # pruned weights trained back to non-zero values


@pytest.mark.parametrize("criterion", ["random", "snip", "taylor", "obd", "grasp", "woodfisher"])
def test_every_criterion_prunes_inside_a_fit(tmp_path, criterion):
    model = tiny_classifier(hidden=(16,))
    cb = Pruning(sparsity=0.6, criterion=criterion, schedule=OneShot(step=1), data_batches=2)
    trainer(tmp_path, [cb], max_steps=3).fit(model, SyntheticDataModule())
    for name, p in model.named_parameters():
        if name in cb.masks:
            assert (p == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)


def test_resume_mid_schedule_equals_uninterrupted_run(tmp_path):
    class StopAt(L.Callback):
        """Ends the run at an optimizer step, as a kill would, without changing max_steps."""

        def __init__(self, step):
            self.step = step

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= self.step:
                trainer.should_stop = True

    # Checkpoints at epoch ends: Lightning does not restore a plain DataLoader's position mid-epoch, so an
    # exact comparison needs the resumed run to see the same batches as the uninterrupted one.
    def run(root, extra=(), ckpt_path=None):
        model = tiny_classifier()
        cb = Pruning(
            sparsity=0.9, schedule="gradual", schedule_args=dict(start_step=0, end_step=20, frequency=4)
        )
        checkpoint = L.callbacks.ModelCheckpoint(
            dirpath=root, save_top_k=-1, every_n_train_steps=STEPS_PER_EPOCH
        )
        fit = trainer(root, [cb, checkpoint, *extra], max_steps=24, enable_checkpointing=True)
        fit.fit(model, SyntheticDataModule(shuffle=False), ckpt_path=ckpt_path)
        return model, cb

    full_model, full_cb = run(tmp_path / "full")
    _, part_cb = run(tmp_path / "part", extra=[StopAt(STEPS_PER_EPOCH)])  # killed mid-schedule
    assert part_cb.last_event_step == 4
    (ckpt,) = (tmp_path / "part").glob("*.ckpt")
    resumed_model, resumed_cb = run(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert [h["step"] for h in resumed_cb.history] == [h["step"] for h in full_cb.history]
    assert resumed_cb.masks.keys() == full_cb.masks.keys()
    for name in full_cb.masks:
        assert torch.equal(resumed_cb.masks[name], full_cb.masks[name])
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=1.0), r"sparsity must be a number in \[0, 1\)"),
        (dict(sparsity=-0.1), r"sparsity must be a number in \[0, 1\)"),
        (dict(sparsity=0.5, criterion="magnitud"), "magnitude"),
        (dict(sparsity=0.5, scope="per-layer"), "scope must be one of"),
        (dict(sparsity=0.5, layer_sparsity={"fc1": 1.5}), r"layer_sparsity\['fc1'\]"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Pruning(**kwargs)


def test_pattern_matching_nothing_lists_close_names(tmp_path):
    cb = Pruning(sparsity=0.5, include=["net.hiden.*"])
    with pytest.raises(ValueError, match=r"include pattern 'net.hiden.\*' matches no.*net.hidden.0"):
        trainer(tmp_path, [cb]).fit(tiny_classifier(), SyntheticDataModule())


def test_schedule_longer_than_the_run_fails_before_training(tmp_path):
    model = tiny_classifier()
    before = weights(model)
    cb = Pruning(sparsity=0.5, schedule=Iterative(rounds=4, steps_per_round=10))
    with pytest.raises(ValueError, match="acts until optimizer step 30, but the run has only 16 steps"):
        trainer(tmp_path, [cb], max_steps=16).fit(model, SyntheticDataModule())
    assert all(torch.equal(before[n], w) for n, w in weights(model).items())  # nothing trained


class TimmBackboneModule(L.LightningModule):
    """A user's own module: the network lives under an arbitrary attribute and is a timm model."""

    def __init__(self):
        super().__init__()
        from lit_compress.models import create_model

        self.backbone = create_model("timm:resnet10t", num_classes=10, in_chans=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.backbone(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_prunes_a_timm_model_under_any_attribute(tmp_path):
    module = TimmBackboneModule()
    cb = Pruning(
        sparsity=0.5, criterion="snip", include=["backbone.layer*"], types=["Conv2d"], data_batches=1
    )
    data = SyntheticDataModule(num_train=16, batch_size=8, input_shape=[1, 32, 32])
    trainer(tmp_path, [cb], max_steps=2).fit(module, data)
    assert cb.masks and all(n.startswith("backbone.layer") for n in cb.masks)
    for name, p in module.named_parameters():
        if name in cb.masks:
            assert (p == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_pytorch_lightning_flavour(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from lit_compress.pl import Pruning as PLPruning

    class PLModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    module = PLModule()
    cb = PLPruning(sparsity=0.7, criterion="taylor", data_batches=2)
    pl.Trainer(
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[cb],
        num_sanity_val_steps=0,
    ).fit(module, _loader())
    assert (module.net[1].weight == 0).float().mean().item() == pytest.approx(0.7, abs=0.01)


def _loader():
    data = SyntheticDataModule()
    data.setup("fit")
    return data.train_dataloader()


def test_summary_reports_before_and_after_pruning(tmp_path):
    from lit_compress.measure import CompressionSummary

    summary = CompressionSummary()
    trainer(tmp_path, [Pruning(sparsity=0.75), summary], max_steps=2).fit(
        tiny_classifier(), SyntheticDataModule()
    )
    before, after = summary.start_report, summary.last_report
    assert before.params_nonzero == before.params_total
    pruned = sum(round(0.75 * n) for n in (784 * 32, 32 * 16, 16 * 10))  # each targeted weight matrix
    assert before.params_nonzero - after.params_nonzero == pruned
    assert before.macs_effective - after.macs_effective == pruned  # one MAC per weight for an MLP


def test_pruned_run_exports_a_sparse_zoo_entry(tmp_path, shared_data_dir, monkeypatch):
    from lit_compress import zoo

    monkeypatch.setenv("LIT_COMPRESS_DATA", str(shared_data_dir))
    model = ImageClassifier(model="lenet_300_100")
    export = zoo.ZooExport(
        name="lenet_300_100-mnist.test-sparse",
        dataset="mnist",
        zoo=str(tmp_path / "zoo"),
        use_best_checkpoint=False,
        codec="sparse-safetensors",
    )
    trainer(tmp_path, [Pruning(sparsity=0.9), export], max_steps=2).fit(model, SyntheticDataModule())
    card = export.card
    assert card.compression.methods == ["pruning:magnitude"]
    assert "magnitude pruning to 90.0%" in card.compression.description
    assert card.files[0].format == "sparse-safetensors"
    assert card.bytes.file < card.bytes.fp32 / 4  # really smaller on disk
    loaded = zoo.load(card.name, zoo=tmp_path / "zoo")
    for (name, a), (_, b) in zip(model.net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert zoo.verify_entry(card.name, zoo=tmp_path / "zoo").ok


def test_zoo_card_of_a_resumed_run_does_not_claim_the_last_segment_as_training_time(
    tmp_path, shared_data_dir, monkeypatch
):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_compress import zoo

    monkeypatch.setenv("LIT_COMPRESS_DATA", str(shared_data_dir))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    first = trainer(tmp_path / "a", [checkpoint], max_steps=2, enable_checkpointing=True)
    first.fit(ImageClassifier(model="lenet_300_100"), SyntheticDataModule())
    export = zoo.ZooExport(name="lenet_300_100-mnist.resumed", dataset="mnist", zoo=str(tmp_path / "zoo"))
    resumed = trainer(tmp_path / "b", [export], max_steps=3)
    resumed.fit(
        ImageClassifier(model="lenet_300_100"), SyntheticDataModule(), ckpt_path=tmp_path / "ck" / "last.ckpt"
    )
    training = export.card.training
    assert training["wall_time_s"] is None and training["resumed_from"] == "last.ckpt"
    assert training["last_segment_s"] >= 0 and training["steps"] == 3


def test_export_returns_a_plain_network_with_zeros(tmp_path):
    model = tiny_classifier()
    cb = Pruning(sparsity=0.6)
    trainer(tmp_path, [cb], max_steps=2).fit(model, SyntheticDataModule())
    plain = cb.export(model)
    assert type(plain) is type(model.net) and not plain.training
    assert list(plain.state_dict()) == list(model.net.state_dict())
    for name, mask in cb.masks.items():
        w = plain.get_parameter(name.removeprefix("net."))
        assert torch.all(w[~mask] == 0) and torch.equal(w, model.get_parameter(name))


class ManualOptimisationModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(F.cross_entropy(self.net(x), y))
        optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_data_criterion_without_a_loss_fails_before_training(tmp_path):
    module = ManualOptimisationModule()
    before = module.net[1].weight.detach().clone()
    snip = Pruning(sparsity=0.5, criterion="snip")
    with pytest.raises(
        ValueError, match=r"criterion 'snip' needs the loss of training_step.*manual optimization"
    ):
        trainer(tmp_path, [snip], max_steps=2).fit(module, SyntheticDataModule())
    assert torch.equal(module.net[1].weight, before)
    # Data-free criteria work with manual optimization.
    cb = Pruning(sparsity=0.5)
    trainer(tmp_path, [cb], max_steps=2).fit(module, SyntheticDataModule())
    assert (module.net[1].weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_han_dropout_rescaling_follows_kept_connections(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(model="mlp", model_kwargs={"hidden": [32], "dropout": 0.5})
    cb = Pruning(sparsity=0.75, schedule=Iterative(rounds=2, steps_per_round=2), rescale_dropout=True)
    trainer(tmp_path, [cb], max_steps=4).fit(model, SyntheticDataModule())
    # D_r = D_o * sqrt(C_r / C_o) with C_r / C_o = 0.25 kept after the last round.
    assert model.net.dropout.p == pytest.approx(0.5 * 0.25**0.5)


def test_scoring_batches_do_not_leak_into_training_metrics(tmp_path):
    model = tiny_classifier()
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:  # after the step-0 SNIP prune, before the first real step
                seen["updates"] = pl_module.train_acc._update_count
                seen["total"] = int(pl_module.train_acc.tp.sum() + pl_module.train_acc.fn.sum())

    cb = Pruning(sparsity=0.5, criterion="snip", criterion_args={"num_batches": 2}, data_batches=2)
    trainer(tmp_path, [cb, Probe()], max_steps=1).fit(model, SyntheticDataModule())
    assert seen == {"updates": 0, "total": 0}
