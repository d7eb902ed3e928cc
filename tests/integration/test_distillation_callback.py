"""The Distillation callback on real Lightning runs (tiny models, synthetic data)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import lit_compress
from lit_compress.data import SyntheticDataModule
from lit_compress.distillation import Distillation, TeacherLoadError
from lit_compress.distillation.callback import ADAPTERS_ATTR
from lit_compress.models import ImageClassifier, create_model
from lit_compress.pruning import OneShot
from lit_compress.pruning.callback import Pruning

SHAPE = (1, 8, 8)
MLP_KW = {"img_size": 8}


def teacher_file(tmp_path: Path, hidden=(32,), num_classes=10, dropout=0.5) -> dict:
    torch.manual_seed(123)
    kwargs = {**MLP_KW, "hidden": list(hidden), "dropout": dropout, "num_classes": num_classes}
    net = create_model("mlp", **kwargs)
    path = tmp_path / "teacher.safetensors"
    save_file(net.state_dict(), str(path))
    return {"model": "mlp", "model_kwargs": kwargs, "weights": str(path)}


def student(hidden=(16,)) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        model="mlp",
        model_kwargs={**MLP_KW, "hidden": list(hidden)},
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    )


def data(**kwargs) -> SyntheticDataModule:
    return SyntheticDataModule(
        num_train=64, num_val=16, input_shape=SHAPE, batch_size=16, shuffle=False, **kwargs
    )


def make_trainer(tmp_path, callbacks, max_steps=6, **kwargs) -> L.Trainer:
    kwargs.setdefault("limit_val_batches", 0)
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
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        **kwargs,
    )


class RecordLoss(L.Callback):
    def __init__(self):
        self.losses: list[float] = []
        self.metrics: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_loss_is_the_weighted_sum_and_both_terms_are_logged(tmp_path):
    spec = teacher_file(tmp_path)
    record = RecordLoss()
    cb = Distillation(teacher=spec, temperature=3.0, alpha=0.7)
    make_trainer(tmp_path, [cb, record], max_steps=3).fit(student(), data())
    for loss, metrics in zip(record.losses, record.metrics):
        expected = 0.3 * metrics["distill/task_loss"] + 0.7 * metrics["distill/soft_loss"]
        assert loss == pytest.approx(expected, rel=1e-5)
        assert metrics["distill/temperature"] == 3.0 and metrics["distill/alpha"] == pytest.approx(0.7)


def test_soft_loss_matches_the_teacher_on_the_same_batch(tmp_path):
    spec = teacher_file(tmp_path)
    cb = Distillation(teacher=spec, temperature=2.0, alpha=1.0)
    model = student()
    record = RecordLoss()
    dm = data()
    make_trainer(tmp_path, [cb, record], max_steps=1).fit(model, dm)
    # Recompute step 0 by hand from fresh copies of the student and the teacher.
    ref_student = student().net.train()
    x, _ = next(iter(dm.train_dataloader()))
    expected = lit_compress.distillation.soft_target_kl(ref_student(x), cb.teacher(x), 2.0)
    assert record.losses[0] == pytest.approx(expected.item(), rel=1e-5)


def test_alpha_zero_trains_exactly_like_no_distillation(tmp_path):
    spec = teacher_file(tmp_path)
    plain, distilled = student(), student()
    make_trainer(tmp_path, [], max_steps=4).fit(plain, data())
    make_trainer(tmp_path, [Distillation(teacher=spec, alpha=0.0)], max_steps=4).fit(distilled, data())
    for (name, a), b in zip(plain.named_parameters(), distilled.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_distillation_pulls_the_student_towards_the_teacher(tmp_path):
    spec = teacher_file(tmp_path)
    cb = Distillation(teacher=spec, temperature=4.0, alpha=1.0)
    model = student()
    x = torch.randn(64, *SHAPE)
    before = lit_compress.distillation.soft_target_kl(model.net.eval()(x), cb.teacher(x), 4.0).item()
    model.net.train()
    make_trainer(tmp_path, [cb], max_steps=40).fit(model, data())
    after = lit_compress.distillation.soft_target_kl(model.net.eval()(x), cb.teacher(x), 4.0).item()
    assert after < 0.5 * before


class TeacherWatch(L.Callback):
    """Records the teacher's mode whenever it runs, and checks it is outside optimizer and checkpoint."""

    def __init__(self, distillation: Distillation):
        self.modes: list[bool] = []
        distillation.teacher.register_forward_pre_hook(lambda m, a: self.modes.append(m.training))
        self.distillation = distillation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        teacher_params = {id(p) for p in self.distillation.teacher.parameters()}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                assert not teacher_params & {id(p) for p in group["params"]}
        assert all(id(p) not in teacher_params for p in pl_module.parameters())


def test_teacher_frozen_in_eval_and_outside_optimizer_and_checkpoint(tmp_path):
    spec = teacher_file(tmp_path)
    cb = Distillation(teacher=spec)
    before = {k: v.clone() for k, v in cb.teacher.state_dict().items()}
    watch = TeacherWatch(cb)
    model = student()
    cb.teacher.train()  # even if someone flips it, the callback runs the teacher in eval mode
    trainer = make_trainer(tmp_path, [cb, watch], max_steps=4, limit_val_batches=1, val_check_interval=2)
    trainer.fit(model, data())
    trainer.validate(model, data(), verbose=False)
    assert watch.modes and not any(watch.modes)
    assert all(p.grad is None and not p.requires_grad for p in cb.teacher.parameters())
    for k, v in cb.teacher.state_dict().items():
        torch.testing.assert_close(v, before[k])
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    assert all(k.startswith("net.") for k in saved["state_dict"])
    assert "training_step" not in model.__dict__  # the wrapper is undone at teardown


class DictStep(ImageClassifier):
    def training_step(self, batch, batch_idx):
        return {"loss": super().training_step(batch, batch_idx), "extra": 1}


class CallsSelfModel(L.LightningModule):
    """No ``net`` attribute: calls ``self.model(x)``."""

    def __init__(self, explicit: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.model = create_model("mlp", hidden=[16], **MLP_KW)
        self.explicit = explicit

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        return lit_compress.compression_loss(self, loss) if self.explicit else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_dict_returning_training_step(tmp_path):
    spec = teacher_file(tmp_path)
    torch.manual_seed(0)
    model = DictStep(model="mlp", model_kwargs={**MLP_KW, "hidden": [16]})
    record = RecordLoss()
    make_trainer(tmp_path, [Distillation(teacher=spec, alpha=0.5), record], max_steps=2).fit(model, data())
    m = record.metrics[-1]
    assert record.losses[-1] == pytest.approx(
        0.5 * m["distill/task_loss"] + 0.5 * m["distill/soft_loss"], rel=1e-5
    )


def test_student_module_is_configurable_and_auto_fails_clearly(tmp_path):
    spec = teacher_file(tmp_path)
    with pytest.raises(RuntimeError, match="student_module"):
        make_trainer(tmp_path, [Distillation(teacher=spec)], max_steps=1).fit(CallsSelfModel(), data())
    record = RecordLoss()
    make_trainer(tmp_path, [Distillation(teacher=spec, student_module="model"), record], max_steps=2).fit(
        CallsSelfModel(), data()
    )
    assert "distill/soft_loss" in record.metrics[-1]


def test_explicit_compression_loss(tmp_path):
    spec = teacher_file(tmp_path)
    record = RecordLoss()
    cb = Distillation(teacher=spec, student_module="model", inject="explicit", alpha=0.5)
    model = CallsSelfModel(explicit=True)
    make_trainer(tmp_path, [cb, record], max_steps=2).fit(model, data())
    m = record.metrics[-1]
    assert record.losses[-1] == pytest.approx(
        0.5 * m["distill/task_loss"] + 0.5 * m["distill/soft_loss"], rel=1e-5
    )
    assert "training_step" not in model.__dict__
    with pytest.raises(RuntimeError, match=r"never called lit_compress\.compression_loss"):
        make_trainer(tmp_path, [Distillation(teacher=spec, student_module="model", inject="explicit")]).fit(
            CallsSelfModel(explicit=False), data()
        )


def test_feature_hints_create_trainable_adapters_and_attention_needs_none(tmp_path):
    torch.manual_seed(1)
    teacher = create_model("lenet5")  # conv1 20 channels, conv2 50
    torch.manual_seed(0)
    model = ImageClassifier(model="lenet5_small")
    # A student whose conv layer has a different channel count from the teacher's: an adapter is needed.
    hints = [
        {"student": "net.conv1", "teacher": "conv1", "weight": 0.5},
        {"student": "net.conv1", "teacher": "conv1", "kind": "attention", "weight": 10.0},
    ]
    cb = Distillation(teacher=teacher, hints=hints, alpha=0.5)
    record = RecordLoss()
    dm = SyntheticDataModule(num_train=32, input_shape=(1, 28, 28), batch_size=8, shuffle=False)
    trainer = make_trainer(tmp_path, [cb, record], max_steps=3)
    try:
        trainer.fit(model, dm)
    except ValueError as err:  # the student's conv1 output size differs from LeNet-5's
        pytest.fail(str(err))
    adapters = getattr(model, ADAPTERS_ATTR)
    assert list(adapters) == ["0"]
    adapter = adapters["0"]
    assert isinstance(adapter, nn.Conv2d) and adapter.out_channels == 20
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(adapter.weight) in in_optimizer
    m = record.metrics[-1]
    assert m["distill/hint_loss"] > 0
    assert record.losses[-1] == pytest.approx(
        0.5 * m["distill/task_loss"] + 0.5 * m["distill/soft_loss"] + m["distill/hint_loss"], rel=1e-4
    )


class StopAt(L.Callback):
    """Ends the run at an optimizer step, as a kill would, without changing max_steps."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_resume_mid_run_matches_uninterrupted(tmp_path):
    spec = teacher_file(tmp_path)

    def run(root, extra=(), ckpt_path=None, teacher=spec):
        model = student()
        # Checkpoints at epoch ends (4 batches): the resumed run then sees the same batches.
        ckpt = L.callbacks.ModelCheckpoint(dirpath=root, save_top_k=-1, every_n_train_steps=4)
        cbs = [Distillation(teacher=teacher, temperature=3.0), ckpt, *extra]
        make_trainer(root, cbs, max_steps=12, enable_checkpointing=True).fit(
            model, data(), ckpt_path=ckpt_path
        )
        return model

    full = run(tmp_path / "full")
    run(tmp_path / "part", extra=[StopAt(4)])
    (ckpt,) = (tmp_path / "part").glob("*.ckpt")
    resumed = run(tmp_path / "resumed", ckpt_path=str(ckpt))
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # Resuming with a different teacher is refused, naming the problem.
    (tmp_path / "other").mkdir()
    other = teacher_file(tmp_path / "other", hidden=(24,))
    with pytest.raises(ValueError, match="different teacher"):
        run(tmp_path / "again", ckpt_path=str(ckpt), teacher=other)


def test_composes_with_pruning_including_data_dependent_scoring(tmp_path):
    spec = teacher_file(tmp_path)
    pruning = Pruning(
        sparsity=0.75, criterion="snip", schedule=OneShot(step=2), data_batches=2, verbose=False
    )
    record = RecordLoss()
    model = student()
    make_trainer(tmp_path, [pruning, Distillation(teacher=spec), record], max_steps=6).fit(model, data())
    w = model.net.hidden[0].weight
    assert (w == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert "distill/soft_loss" in record.metrics[-1]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5"),
        ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
        ({"temperature": 0.0}, r"temperature must be in > 0|temperature must be"),
        ({"temperature": -2}, "temperature"),
        ({"loss": "cosine"}, "loss must be one of"),
        ({"inject": "magic"}, "inject must be one of"),
        ({"hints": [{"student": "net.hidden.0", "teacher": "hiden.0"}]}, r"close names: \['hidden.0'"),
        ({"hints": [{"student": "a"}]}, "keys student, teacher"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Distillation(teacher=teacher_file(tmp_path), **kwargs)


def test_teacher_that_fails_to_load(tmp_path):
    with pytest.raises(TeacherLoadError, match="no-such-entry"):
        Distillation(teacher="zoo:no-such-entry.dense")
    with pytest.raises(TeacherLoadError, match="does not exist"):
        Distillation(teacher=str(tmp_path / "missing.ckpt"))
    with pytest.raises(TeacherLoadError, match="not understood"):
        Distillation(teacher={"weights": "x.safetensors"})
    bad = teacher_file(tmp_path)
    bad["model_kwargs"]["hidden"] = [99]  # weights do not fit the architecture
    with pytest.raises(TeacherLoadError, match="size mismatch"):
        Distillation(teacher=bad)


def test_teacher_output_shape_mismatch_names_both_shapes(tmp_path):
    spec = teacher_file(tmp_path, num_classes=5)
    with pytest.raises(ValueError, match=r"\(16, 10\).*\(16, 5\)"):
        make_trainer(tmp_path, [Distillation(teacher=spec)], max_steps=1).fit(student(), data())


def test_hint_student_layer_missing_is_reported_at_setup(tmp_path):
    spec = teacher_file(tmp_path)
    cb = Distillation(teacher=spec, hints=[{"student": "net.hiden.0", "teacher": "hidden.0"}])
    with pytest.raises(ValueError, match=r"close names: \['net.hidden.0'"):
        make_trainer(tmp_path, [cb], max_steps=1).fit(student(), data())


def test_terms_are_logged_only_on_logging_steps(tmp_path):
    spec = teacher_file(tmp_path)
    record = RecordLoss()
    trainer = make_trainer(tmp_path, [Distillation(teacher=spec), record], max_steps=4)
    trainer.log_every_n_steps = (
        3  # the loggers write at steps 2 (and the last); self.log is skipped elsewhere
    )
    trainer.fit(student(), data())
    assert ["distill/soft_loss" in m for m in record.metrics] == [False, False, True, True]


def test_temperature_and_alpha_schedules_follow_the_step(tmp_path):
    from lit_compress.schedules import Linear

    spec = teacher_file(tmp_path)
    record = RecordLoss()
    cb = Distillation(
        teacher=spec,
        temperature=Linear(start_value=8.0, end_value=2.0, start_step=0, end_step=3),
        alpha=Linear(start_value=0.9, end_value=0.3, start_step=0, end_step=3),
    )
    make_trainer(tmp_path, [cb, record], max_steps=4).fit(student(), data())
    temps = [m["distill/temperature"] for m in record.metrics]
    alphas = [m["distill/alpha"] for m in record.metrics]
    assert temps == pytest.approx([8.0, 6.0, 4.0, 2.0])
    assert alphas == pytest.approx([0.9, 0.7, 0.5, 0.3])


def test_composes_with_quantization_apprentice(tmp_path):
    """Apprentice (Mishra & Marr 2018): a low-precision student distilled from a full-precision teacher."""
    from lit_compress.quantization.callback import Quantization

    spec = teacher_file(tmp_path)
    record = RecordLoss()
    model = student(hidden=(16, 16))
    quant = Quantization(method="binaryconnect", verbose=False)
    make_trainer(tmp_path, [quant, Distillation(teacher=spec, alpha=0.7), record], max_steps=4).fit(
        model, data()
    )
    hidden = model.net.hidden[1]
    assert torch.equal(
        hidden.quantized_weight().abs(), torch.ones_like(hidden.weight)
    )  # binary in the forward
    assert hidden.weight.abs().max() <= 1.0  # latent weights clipped
    m = record.metrics[-1]
    assert record.losses[-1] == pytest.approx(
        0.3 * m["distill/task_loss"] + 0.7 * m["distill/soft_loss"], rel=1e-5
    )
