"""The FBS callback on real Lightning runs (tiny CifarNet, synthetic data)."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from lit_compress.data import SyntheticDataModule
from lit_compress.gating.fbs import FBSConv2d, fbs_layers, saliency_l1
from lit_compress.gating.fbs_callback import FBS
from lit_compress.models import ImageClassifier
from lit_compress.schedules import Linear

SHAPE = (1, 8, 8)
NET_KW = {"in_chans": 1, "img_size": 8, "width": 4, "hidden": 16}
STEPS_PER_EPOCH = 4  # num_train=64, batch_size=16
# Per-image MACs of the tiny CifarNet at d = 0.5 without boosting (see tests/unit/test_fbs.py).
HAND_MACS = 2304 + (4608 + 16) + (1152 + 16) + (2304 + 32) + (512 + 160)
DENSE_MACS = 2304 + 9216 + 4608 + 9216 + 512 + 160


def classifier() -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        model="cifarnet",
        model_kwargs=dict(NET_KW),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    )


def data(**kwargs) -> SyntheticDataModule:
    kwargs.setdefault("shuffle", False)
    return SyntheticDataModule(
        num_train=64, num_val=16, num_test=16, input_shape=SHAPE, batch_size=16, **kwargs
    )


def make_trainer(tmp_path, callbacks, max_steps=4, **kwargs) -> L.Trainer:
    kwargs.setdefault("limit_val_batches", 0)
    kwargs.setdefault("num_sanity_val_steps", 0)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_fit_gates_trains_predictors_and_anneals_density(tmp_path):
    model = classifier()
    dense_keys = set(model.state_dict())
    cb = FBS(density=Linear(1.0, 0.5, 0, 4), l1=1e-3, verbose=False)
    seen: dict[str, object] = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            params = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
            layers = fbs_layers(pl_module.net)
            seen["in_optimizer"] = all(
                id(p) in params for m in layers.values() for p in m.predictor.parameters()
            )
            seen["predictor_before"] = layers["features.3.0"].predictor.weight.detach().clone()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault("densities", []).append(next(iter(fbs_layers(pl_module.net).values())).density)

    make_trainer(tmp_path, [cb, Probe()], max_steps=6).fit(model, data())
    assert seen["in_optimizer"] is True
    assert seen["densities"] == [1.0, 0.875, 0.75, 0.625, 0.5, 0.5]
    layer = model.net.features[3][0]
    assert isinstance(layer, FBSConv2d) and layer.density == 0.5
    assert not torch.equal(layer.predictor.weight, seen["predictor_before"])  # the predictors learn
    keys = set(model.state_dict())
    assert keys - dense_keys == {
        f"net.features.{i}.0.predictor.{p}" for i in (1, 3, 4) for p in ("weight", "bias")
    }
    assert dense_keys <= keys
    assert "training_step" not in model.__dict__  # the wrapper is undone at teardown
    assert isinstance(model.net.features[1][0], FBSConv2d)  # the gates stay for trainer.test


def test_wrapped_training_step_adds_l1_times_saliency_norm(tmp_path):
    model = classifier()
    cb = FBS(density=0.5, l1=0.25, verbose=False)
    trainer = make_trainer(tmp_path, [cb])
    cb.setup(trainer, model, "fit")
    try:
        datamodule = data()
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        model.train()
        torch.manual_seed(0)
        total = model.training_step(batch, 0)
        plain = model.training_step.__lit_compress_wrapped__(batch, 0)  # same weights, same batch
        l1 = saliency_l1(fbs_layers(model.net).values())
        torch.testing.assert_close(total, plain + 0.25 * l1)
        assert l1.item() > 0
    finally:
        cb.teardown(trainer, model, "fit")
    assert "training_step" not in model.__dict__


def test_validation_reports_per_image_macs_from_decisions(tmp_path):
    model = classifier()
    cb = FBS(density=0.5, boost=False, l1=1e-3, verbose=False)
    trainer = make_trainer(tmp_path, [cb], max_steps=2, limit_val_batches=1.0, val_check_interval=2)
    trainer.fit(model, data())
    stats = cb.mac_stats
    assert stats is not None and stats.images == 16
    assert (stats.mean, stats.std, stats.dense) == (
        HAND_MACS,
        0.0,
        DENSE_MACS,
    )  # boost off: k per layer fixed
    summary = cb.compression_summary()
    assert summary["methods"] == ["fbs"] and summary["density"] == 0.5
    assert summary["macs_per_image"]["mean"] == HAND_MACS
    assert summary["structure"]["kind"] == "fbs"
    exported = summary["network"]
    assert not exported.training and len(fbs_layers(exported)) == 3
    x = torch.randn(2, *SHAPE)
    model.eval()
    torch.testing.assert_close(exported(x), model.net(x))
    result = trainer.test(model, data(), verbose=False)  # the gated net after fit
    assert "test/acc" in result[0]


def test_resume_equals_uninterrupted_run(tmp_path):
    class StopAt(L.Callback):
        def __init__(self, step):
            self.step = step

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= self.step:
                trainer.should_stop = True

    def run(root, extra=(), ckpt_path=None):
        model = classifier()
        cb = FBS(density=Linear(1.0, 0.5, 0, 6), l1=1e-2, verbose=False)
        checkpoint = L.callbacks.ModelCheckpoint(
            dirpath=root, save_top_k=-1, every_n_train_steps=STEPS_PER_EPOCH
        )
        fit = make_trainer(root, [cb, checkpoint, *extra], max_steps=8, enable_checkpointing=True)
        fit.fit(model, data(), ckpt_path=ckpt_path)
        return model, cb

    full_model, full_cb = run(tmp_path / "full")
    _, part_cb = run(tmp_path / "part", extra=[StopAt(STEPS_PER_EPOCH)])
    assert part_cb.step == STEPS_PER_EPOCH - 1  # stopped mid-annealing
    (ckpt,) = (tmp_path / "part").glob("*.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    assert any("predictor" in k for k in saved["state_dict"])
    (fbs_state,) = [v for k, v in saved["callbacks"].items() if k.startswith("FBS")]
    assert fbs_state["step"] == STEPS_PER_EPOCH - 1 and fbs_state["layers"] == [
        "features.1.0",
        "features.3.0",
        "features.4.0",
    ]
    resumed_model, resumed_cb = run(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert (resumed_cb.step, resumed_cb.current_density) == (full_cb.step, full_cb.current_density)
    full, resumed = full_model.state_dict(), resumed_model.state_dict()
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-5, atol=1e-6, msg=name)


def test_resume_with_other_targets_is_refused():
    cb = FBS(density=0.5, verbose=False)
    cb.layer_names = ["features.1.0"]
    cb._layers = {"features.3.0": None}  # what setup found
    with pytest.raises(ValueError, match="gated the layers"):
        cb.load_state_dict({"step": 3, "density": 0.5, "layers": ["features.1.0"]})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"density": 0}, r"\(0, 1\]"),
        ({"density": 1.5}, r"\(0, 1\]"),
        ({"density": Linear(1.5, 0.5, 0, 10)}, r"step 0"),
        ({"l1": -1.0}, "l1"),
        ({"inject": "magic"}, "inject"),
        ({"include": "net.*"}, "list"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FBS(**kwargs)


def test_schedule_leaving_the_unit_interval_fails_at_that_step(tmp_path):
    cb = FBS(density=Linear(1.0, -1.0, 0, 2), verbose=False)
    with pytest.raises(ValueError, match=r"step 1.*\(0, 1\]"):
        make_trainer(tmp_path, [cb], max_steps=3).fit(classifier(), data())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"include": ["net.nothing*"]}, "matches no"),
        ({"include": ["net.features.0.0"]}, "features.0.0.*predecessor"),
        ({"network": "backbone"}, "no submodule 'backbone'"),
    ],
)
def test_bad_targets_fail_in_setup(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, [FBS(verbose=False, **kwargs)], max_steps=1).fit(classifier(), data())


def test_explicit_targets_and_excludes(tmp_path):
    model = classifier()
    cb = FBS(include=["net.features.[34].*"], verbose=False)
    make_trainer(tmp_path, [cb], max_steps=1).fit(model, data())
    assert list(fbs_layers(model.net)) == ["features.3.0", "features.4.0"]
    assert model.net.features[4][0].fbs_source_name == "features.3.0"
    model = classifier()
    make_trainer(tmp_path, [FBS(exclude=["net.features.4.0"], verbose=False)], max_steps=1).fit(model, data())
    assert list(fbs_layers(model.net)) == ["features.1.0", "features.3.0"]
    assert type(model.net.features[4][0]) is nn.Conv2d


def test_ddp_refuses_a_configuration_with_parameters_that_never_get_gradients():
    cb = FBS(density=0.5, boost=False, l1=0.0, verbose=False)

    class FakeDDP:
        _ddp_kwargs: dict = {}

    class FakeTrainer:
        strategy = FakeDDP()

    with pytest.raises(ValueError, match="find_unused_parameters"):
        cb._check_ddp(FakeTrainer())
    FakeDDP._ddp_kwargs = {"find_unused_parameters": True}
    cb._check_ddp(FakeTrainer())
    FBS(density=0.5, boost=True, l1=0.0, verbose=False)._check_ddp(FakeTrainer())


def test_fbs_entry_round_trips_through_the_zoo(tmp_path, monkeypatch, shared_data_dir):
    import importlib

    monkeypatch.setenv("LIT_COMPRESS_DATA", str(shared_data_dir))  # per-image MACs: over the real test set

    from lit_compress import zoo
    from lit_compress.gating import fbs_structure  # noqa: F401  registers the "fbs" structure kind
    from lit_compress.zoo.card import Metrics
    from lit_compress.zoo.from_lightning import ZooExport

    fake = lambda *a, **k: Metrics(top1=0.5, errors=5000, num_examples=10000)  # noqa: E731
    monkeypatch.setattr(importlib.import_module("lit_compress.zoo.export"), "evaluate_on", fake)
    monkeypatch.setattr(importlib.import_module("lit_compress.zoo.verify"), "evaluate_on", fake)
    torch.manual_seed(0)
    model = ImageClassifier(model="cifarnet", model_kwargs={**NET_KW, "img_size": 28})
    cb = FBS(density=0.5, verbose=False)
    export = ZooExport(name="cifarnet-fashion-mnist.fbs-test", dataset="fashion-mnist", zoo=str(tmp_path))
    datamodule = SyntheticDataModule(num_train=32, input_shape=(1, 28, 28), batch_size=16)
    make_trainer(tmp_path, [cb, export], max_steps=2).fit(model, datamodule)
    card = export.card
    assert card.structure["kind"] == "fbs" and set(card.structure["layers"]) == {
        "features.1.0",
        "features.3.0",
        "features.4.0",
    }
    assert card.macs.effective < card.macs.dense  # measured on the FBS net (batch 1, kept channels only)
    stats = card.compression.gating["statistics"]
    assert stats["images"] == 10000 and card.macs.effective == round(stats["macs_mean"])
    loaded = zoo.load(card.name, zoo=tmp_path)
    reference = cb.export(model)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x), reference(x), rtol=0, atol=0)
    (result,) = zoo.verify(zoo=tmp_path)
    assert result.ok, result.problems


def test_gates_that_cost_more_than_they_save_are_named_once(tmp_path):
    import torch.nn.functional as F

    class Head(nn.Module):  # a 1x1 conv on the 1x1 map after global pooling (squeeze-excitation-like)
        def __init__(self):
            super().__init__()
            self.conv0, self.bn0 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.head = nn.Conv2d(8, 10, 1)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(F.relu(self.bn0(self.conv0(x))))))
            return self.head(F.adaptive_avg_pool2d(x, 1)).flatten(1)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = Head()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    with pytest.warns(
        UserWarning,
        match=r"FBS: gating these convs adds work at density 0.5.*net\.head "
        r"\(predictor 80 vs saved 40 MACs\).*exclude: \['net\.head'\]",
    ) as caught:
        make_trainer(tmp_path, [FBS(density=0.5, verbose=False)], max_steps=3).fit(Module(), data())
    assert sum("adds work" in str(w.message) for w in caught) == 1  # once, not every step
