"""The Int8QAT callback on real Lightning runs (tiny models, synthetic data), resume, the zoo round trip."""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.quantized as nnq
from safetensors.torch import load_file
from torch.ao.quantization import FakeQuantize
from torch.utils.data import DataLoader, TensorDataset

from lit_compress import zoo
from lit_compress.data import SyntheticDataModule
from lit_compress.models import ImageClassifier
from lit_compress.quantization.int8 import Int8Network, is_int8_qat
from lit_compress.quantization.int8_callback import Int8QAT
from lit_compress.zoo.card import Metrics
from lit_compress.zoo.from_lightning import ZooExport

export_mod = importlib.import_module("lit_compress.zoo.export")
verify_mod = importlib.import_module("lit_compress.zoo.verify")

STEPS_PER_EPOCH = 4  # SyntheticDataModule(num_train=64, batch_size=16)


def lenet(**kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        model="lenet5", optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), **kwargs
    )


def small_resnet() -> ImageClassifier:
    """A ResNet-8 of width 4: conv-BN-ReLU blocks and residual additions, fast on one thread."""
    torch.manual_seed(0)
    return ImageClassifier(
        model="resnet8",
        model_kwargs={"in_chans": 1, "width": 4},
        optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    )


def data(**kwargs) -> SyntheticDataModule:
    return SyntheticDataModule(num_train=64, num_val=32, num_test=32, batch_size=16, **kwargs)


def trainer(tmp_path, callbacks, max_steps=6, **kwargs) -> L.Trainer:
    kwargs.setdefault("limit_val_batches", 0)
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
        **kwargs,
    )


def observer_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if "activation_post_process" in k}


def test_callback_trains_the_qat_network_and_exports_int8(tmp_path):
    model = lenet()
    cb = Int8QAT(verbose=False)
    fit = trainer(tmp_path, [cb])
    fit.fit(model, data())
    assert is_int8_qat(model.net)
    # The optimizer was built on the QAT network's parameters (the swap happened before it).
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.net.parameters()}
    assert cb.example_input_shape == [1, 28, 28]  # from the datamodule's first batch

    int8 = cb.export(model)
    assert isinstance(int8, Int8Network) and not int8.training
    assert type(int8.model.conv1) is nnq.Conv2d and isinstance(int8.model.fc2, nnq.Linear)
    x = torch.randn(8, 1, 28, 28)
    assert int8(x).shape == (8, 10) and torch.isfinite(int8(x)).all()
    summary = cb.compression_summary()
    assert summary["methods"] == ["int8_qat"] and summary["bits"] == 8
    assert summary["structure"]["kind"] == "int8"
    assert summary["structure"]["example_input_shape"] == [1, 28, 28]
    assert torch.equal(summary["network"](x), int8(x))
    assert "per-channel symmetric int8 weights" in summary["description"]

    # trainer.test after fit adopts the QAT network and leaves its observers where training put them.
    before = observer_state(model.net)
    fit.test(model, data(), verbose=False)
    after = observer_state(model.net)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class Probe(L.Callback):
    """Records, at each training batch (after Int8QAT's hook), whether BN and observers are frozen."""

    def __init__(self):
        self.rows: list[tuple[int, bool, bool, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        net = pl_module.net
        fused = [m for m in net.modules() if isinstance(m, nniqat.ConvBn2d | nniqat.ConvBnReLU2d)]
        quantizers = [m for m in net.modules() if isinstance(m, FakeQuantize)]
        self.rows.append(
            (
                trainer.global_step,
                all(m.freeze_bn and not m.bn.training for m in fused),
                all(int(m.observer_enabled) == 0 for m in quantizers),
                fused[0].bn.running_mean.clone(),
            )
        )


def test_batchnorm_and_observers_freeze_at_their_steps(tmp_path):
    model = small_resnet()
    probe = Probe()
    cb = Int8QAT(freeze_bn_step=2, freeze_observer_step=4, verbose=False)
    trainer(tmp_path, [cb, probe]).fit(model, data())
    assert [(s, bn, obs) for s, bn, obs, _ in probe.rows] == [
        (0, False, False),
        (1, False, False),
        (2, True, False),
        (3, True, False),
        (4, True, True),
        (5, True, True),
    ]
    means = [m for *_, m in probe.rows]
    assert not torch.equal(means[1], means[2])  # updated until the freeze ...
    assert all(torch.equal(means[2], m) for m in means[3:])  # ... then fixed
    assert cb.folded == ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2",
                         "layer3.0.conv1", "layer3.0.conv2"]  # fmt: skip


def test_validation_does_not_move_the_observers(tmp_path):
    model = lenet()
    cb = Int8QAT(verbose=False)
    fit = trainer(tmp_path, [cb], max_steps=4)
    fit.fit(model, data())
    before = observer_state(model.net)
    fit.validate(model, data(), verbose=False)
    after = observer_state(model.net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(int(m.observer_enabled) == 1 for m in model.net.modules() if isinstance(m, FakeQuantize))


def test_sanity_check_validation_before_any_training_step_runs(tmp_path):
    """Per-channel fake-quantizers cannot run before they have observed once: the first eval pass observes."""
    model = lenet()
    fit = trainer(tmp_path, [Int8QAT(verbose=False)], max_steps=2, limit_val_batches=1)
    fit.num_sanity_val_steps = 1
    fit.fit(model, data())
    assert fit.global_step == 2
    assert all(int(m.observer_enabled) == 1 for m in model.net.modules() if isinstance(m, FakeQuantize))


def test_resume_mid_run_equals_uninterrupted_run(tmp_path):
    class StopAt(L.Callback):
        """Ends the run at an optimizer step, as a kill would, without changing max_steps."""

        def __init__(self, step):
            self.step = step

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= self.step:
                trainer.should_stop = True

    def run(root, extra=(), ckpt_path=None):
        model = small_resnet()
        cb = Int8QAT(freeze_bn_step=5, freeze_observer_step=6, verbose=False)
        checkpoint = L.callbacks.ModelCheckpoint(
            dirpath=root, save_top_k=-1, every_n_train_steps=STEPS_PER_EPOCH
        )
        fit = trainer(root, [cb, checkpoint, *extra], max_steps=8, enable_checkpointing=True)
        fit.fit(model, data(shuffle=False), ckpt_path=ckpt_path)
        return model, cb

    full_model, full_cb = run(tmp_path / "full")
    run(tmp_path / "part", extra=[StopAt(STEPS_PER_EPOCH)])  # killed before either freeze
    (ckpt,) = (tmp_path / "part").glob("*.ckpt")
    assert any("activation_post_process" in k for k in torch.load(ckpt, weights_only=True)["state_dict"])
    resumed_model, resumed_cb = run(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert resumed_cb.bn_frozen and resumed_cb.observers_frozen
    full, resumed = full_model.state_dict(), resumed_model.state_dict()
    assert full.keys() == resumed.keys()
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=1e-5, atol=1e-6, msg=name)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        resumed_cb.export(resumed_model)(x), full_cb.export(full_model)(x), rtol=0, atol=1e-6
    )


def test_zoo_round_trip_without_pickle(tmp_path, monkeypatch):
    fake = lambda *a, **k: Metrics(top1=0.5, errors=5000, num_examples=10000)  # noqa: E731
    monkeypatch.setattr(export_mod, "evaluate_on", fake)
    monkeypatch.setattr(verify_mod, "evaluate_on", fake)
    model = small_resnet()
    cb = Int8QAT(verbose=False)
    export = ZooExport(name="resnet8-mnist.int8-test", dataset="mnist", zoo=str(tmp_path))
    trainer(tmp_path, [cb, export], max_steps=3).fit(model, data())
    card = export.card
    assert card.compression.bits == 8 and card.compression.methods == ["int8_qat"]
    assert card.structure["kind"] == "int8" and card.structure["backend"] == "x86"
    float_params = sum(p.numel() for p in small_resnet().net.parameters())
    bn_channels = sum(
        m.num_features for m in small_resnet().net.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )
    assert card.params.dense == float_params - bn_channels  # BN folded into conv biases
    # Weights are stored one byte each (a net this tiny is dominated by per-channel scales and the header).
    stored = load_file(tmp_path / card.name / card.files[0].path)
    weights = [t for k, t in stored.items() if k.endswith(".weight")]
    assert weights and all(t.dtype == torch.int8 for t in weights)
    assert card.bytes.file < card.bytes.fp32
    loaded = zoo.load(card.name, zoo=tmp_path)
    assert isinstance(loaded, Int8Network)
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(loaded(x), cb.export(model)(x))
    (result,) = zoo.verify(zoo=tmp_path)
    assert result.ok, result.problems


def test_example_input_shape_sources(tmp_path):
    loader = DataLoader(TensorDataset(torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))), batch_size=16)
    with pytest.raises(ValueError, match=r"cannot tell the network's input shape.*example_input_shape"):
        trainer(tmp_path, [Int8QAT(verbose=False)], max_steps=1).fit(lenet(), train_dataloaders=loader)

    class Broken(L.LightningDataModule):
        def train_dataloader(self):
            raise RuntimeError("no data here")

    with pytest.raises(ValueError, match=r"train_dataloader\(\) raised RuntimeError: no data here"):
        trainer(tmp_path, [Int8QAT(verbose=False)], max_steps=1).fit(lenet(), Broken())
    model = lenet()
    model.example_input_array = torch.zeros(2, 1, 28, 28)
    cb = Int8QAT(verbose=False)
    trainer(tmp_path, [cb], max_steps=1).fit(model, train_dataloaders=loader)
    assert cb.example_input_shape == [1, 28, 28]
    cb = Int8QAT(example_input_shape=[1, 28, 28], verbose=False)
    trainer(tmp_path, [cb], max_steps=1).fit(lenet(), train_dataloaders=loader)
    assert is_int8_qat(cb._module.net)


def test_shape_from_the_datamodule_leaves_the_global_rng_alone():
    dm = data()
    dm.setup("fit")
    model = lenet()
    cb = Int8QAT(verbose=False)
    state = torch.random.get_rng_state()
    cb.setup(SimpleNamespace(datamodule=dm, is_global_zero=True), model, "fit")  # a shuffled loader's batch
    assert torch.equal(torch.random.get_rng_state(), state)
    assert cb.example_input_shape == [1, 28, 28] and is_int8_qat(model.net)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="tpu"), r"backend must be one of \[.*\].*got 'tpu'"),
        (dict(freeze_bn_step=-1), r"freeze_bn_step must be an optimizer step \(int >= 0\) or null, got -1"),
        (dict(freeze_observer_step=1.5), "freeze_observer_step must be an optimizer step"),
        (dict(example_input_shape=[0, 28, 28]), r"example_input_shape must be the per-example input shape"),
        (dict(example_input_shape="1x28x28"), r"example_input_shape must be the per-example input shape"),
        (dict(qconfig="per_tensor"), r"qconfig must be one of \['default'\]"),
        (dict(model_attr=""), "model_attr must be an attribute name"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Int8QAT(**kwargs)


def test_missing_network_attribute_fails_in_setup(tmp_path):
    with pytest.raises(ValueError, match=r"has no submodule 'backbone'; set model_attr"):
        trainer(tmp_path, [Int8QAT(model_attr="backbone", verbose=False)]).fit(lenet(), data())
