"""The Quantization callback on real Lightning runs (tiny models, synthetic 8x8 data)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from torch import nn

from lit_compress.data import SyntheticDataModule
from lit_compress.models import ImageClassifier
from lit_compress.pruning.callback import Pruning
from lit_compress.quantization import IdentityQuantizer, QuantConv2d, QuantLinear, is_quantized
from lit_compress.quantization.callback import RELU_WARNING, Quantization

STEPS_PER_EPOCH = 8  # SyntheticDataModule(num_train=256, batch_size=32)
METHODS = [
    dict(method="binaryconnect"),
    dict(method="binaryconnect", stochastic=True),
    dict(method="bnn"),
    dict(method="xnor"),
    dict(method="dorefa", bits=2, activation_bits=3),
    dict(method="dorefa", bits=1),
]


def tiny_mlp(optimizer=None, hidden=(32, 32)) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        model="mlp",
        model_kwargs={"hidden": list(hidden), "img_size": 8},
        optimizer=optimizer or (lambda p: torch.optim.Adam(p, lr=0.01)),
    )


def tiny_lenet() -> ImageClassifier:
    """LeNet-5 without conv ReLUs: convolutions fed by real-signed inputs."""
    torch.manual_seed(0)
    return ImageClassifier(
        model="lenet5", model_kwargs={"widths": [4, 8, 16], "img_size": 16}, optimizer=torch.optim.Adam
    )


def data(**kwargs) -> SyntheticDataModule:
    return SyntheticDataModule(input_shape=kwargs.pop("input_shape", (1, 8, 8)), **kwargs)


def trainer(tmp_path, callbacks, max_steps=10, **kwargs) -> L.Trainer:
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


class Losses(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if n.endswith("weight")}


@pytest.mark.parametrize("kwargs", METHODS, ids=lambda k: "-".join(map(str, k.values())))
def test_each_method_trains_quantized_middle_layer_with_unchanged_keys(tmp_path, kwargs):
    model = tiny_mlp()
    keys, before = list(model.state_dict()), weights(model)
    cb = Quantization(**kwargs, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # bnn / xnor on a ReLU MLP: tested separately
        trainer(tmp_path, [cb]).fit(model, data())
    assert cb.layers == ["net.hidden.1"]  # skip_first_last: hidden.0 and head stay real
    assert type(model.net.hidden[0]) is nn.Linear and type(model.net.head) is nn.Linear
    layer = model.net.hidden[1]
    assert isinstance(layer, QuantLinear)
    assert list(model.state_dict()) == keys  # checkpoints hold the latent weight under the same key
    assert not torch.equal(layer.weight, before["net.hidden.1.weight"])  # trained
    w, q = layer.weight.detach(), layer.quantized_weight().detach()
    if kwargs["method"] in ("binaryconnect", "bnn"):
        assert torch.equal(q, torch.where(w >= 0, 1.0, -1.0))
        assert w.abs().max() <= 1
    elif kwargs["method"] == "xnor":
        assert torch.equal(q, torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(1, keepdim=True))
    elif kwargs["bits"] == 1:
        assert torch.equal(q, torch.where(w >= 0, 1.0, -1.0) * w.abs().mean())
    else:
        levels = (q + 1) / 2 * 3  # 2-bit grid {2i/3 - 1}: integer levels 0..3
        torch.testing.assert_close(levels, levels.round())
        assert q.unique().numel() <= 4 and q.abs().max() == 1


def test_binaryconnect_loss_decreases(tmp_path):
    losses = Losses()
    trainer(tmp_path, [Quantization(method="binaryconnect", verbose=False), losses], max_steps=16).fit(
        tiny_mlp(), data()
    )
    first, last = sum(losses.losses[:3]) / 3, sum(losses.losses[-3:]) / 3
    assert last < 0.5 * first, losses.losses


def test_conv_net_trains_with_xnor_and_no_relu_warning(tmp_path):
    model = tiny_lenet()
    cb = Quantization(method="xnor", verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # conv inputs here have both signs: no warning
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer(tmp_path, [cb], max_steps=3).fit(model, data(input_shape=(1, 16, 16)))
    assert cb.layers == ["net.conv2", "net.fc1"]
    assert isinstance(model.net.conv2, QuantConv2d) and type(model.net.conv1) is nn.Conv2d
    assert not cb.relu_warned


def test_latent_weights_are_clipped_after_every_optimizer_step(tmp_path):
    seen = []

    class Probe(L.Callback):  # runs after Quantization's on_train_batch_end (callback order)
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(pl_module.net.hidden[1].weight.detach().abs().max().item())

    model = tiny_mlp(lambda p: torch.optim.SGD(p, lr=2.0))  # steps far larger than the [-1, 1] box
    trainer(tmp_path, [Quantization(method="binaryconnect", verbose=False), Probe()], max_steps=6).fit(
        model, data()
    )
    assert len(seen) == 6 and max(seen) == 1.0  # at the bound (so clipping acted), never beyond
    assert model.net.head.weight.abs().max() > 1  # the real last layer is not clipped


def test_trainer_test_after_fit_keeps_the_quantized_structure(tmp_path):
    model = tiny_mlp()
    cb = Quantization(method="binaryconnect", verbose=False)
    fit = trainer(tmp_path, [cb], max_steps=2, limit_test_batches=1)
    fit.fit(model, data())
    layer = model.net.hidden[1]
    fit.test(model, data(), verbose=False)  # setup runs again: no second swap, teardown keeps it
    assert model.net.hidden[1] is layer and cb.layers == ["net.hidden.1"]
    # A new callback with the same quantizers adopts the layer; different quantizers are a clash.
    trainer(tmp_path, [Quantization(method="binaryconnect")], limit_test_batches=1).test(
        model, data(), verbose=False
    )
    assert model.net.hidden[1] is layer
    with pytest.raises(ValueError, match=r"'net.hidden.1' is already quantized with weights binary\("):
        trainer(tmp_path, [Quantization(method="bnn")], limit_test_batches=1).test(model, data())


def test_export_equals_the_quantized_eval_output(tmp_path):
    x = torch.randn(16, 1, 8, 8)
    for kwargs in METHODS:
        model = tiny_mlp()
        cb = Quantization(**kwargs, verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            trainer(tmp_path, [cb], max_steps=3).fit(model, data())
        exported = cb.export(model)
        assert not exported.training and list(exported.state_dict()) == list(model.net.state_dict())
        model.eval()
        assert torch.equal(exported(x), model.net(x)), kwargs
        layer = exported.hidden[1]
        if kwargs.get("activation_bits") or kwargs["method"] in ("bnn", "xnor"):
            assert isinstance(layer, QuantLinear) and isinstance(layer.weight_quantizer, IdentityQuantizer)
        else:
            assert type(layer) is nn.Linear  # weights-only: a plain layer with the quantized weight
        assert torch.equal(layer.weight, model.net.hidden[1].quantized_weight())
        assert is_quantized(model.net.hidden[1])  # the trained model itself is untouched


def test_compression_summary(tmp_path):
    model = tiny_mlp()
    cb = Quantization(method="dorefa", bits=4, activation_bits=2, verbose=False)
    trainer(tmp_path, [cb], max_steps=1).fit(model, data())
    summary = cb.compression_summary()
    assert summary["methods"] == ["quantization:dorefa"] and summary["bits"] == 4
    assert summary["activation_bits"] == 2
    assert "DoReFa" in summary["description"] and "dorefa_weight(bits=4" in summary["description"]
    assert summary["quantization"] == {
        "hidden.1": {
            "weight": {"name": "identity", "args": {}},
            "input": {"name": "dorefa_activation", "args": {"bits": 2}},
        }
    }
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(summary["network"](x), model.eval().net(x))
    assert Quantization(method="bnn").compression_summary()["bits"] == 1


@pytest.mark.parametrize("method", ["binaryconnect", "bnn", "xnor"])
@pytest.mark.parametrize("pruning_first", [True, False])
def test_pruned_binary_weights_keep_their_zeros(tmp_path, method, pruning_first):
    model = tiny_mlp()
    pruning = Pruning(sparsity=0.5, verbose=False)
    quant = Quantization(method=method, skip_first_last=False, verbose=False)
    callbacks = [pruning, quant] if pruning_first else [quant, pruning]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        trainer(tmp_path, callbacks, max_steps=4).fit(model, data())
    exported = quant.export(model)
    for name, mask in pruning.masks.items():
        layer = model.get_submodule(name.removesuffix(".weight"))
        q = layer.quantized_weight().detach()
        assert torch.all(q[~mask] == 0) and torch.all(q[mask] != 0), name
        scale = q.abs().amax(1, keepdim=True).expand_as(q)  # kept weights are +-(scale of their row)
        assert torch.equal(q[mask].abs(), scale[mask])
        baked = exported.get_submodule(name.removeprefix("net.").removesuffix(".weight")).weight
        assert torch.equal(baked, q)
        assert (baked == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_without_keep_zeros_sign_would_revive_pruned_weights(tmp_path):
    """The control for the test above: plain sign(0) = +1 turns pruned weights into +1."""
    model = tiny_mlp()
    pruning = Pruning(sparsity=0.5, verbose=False)
    quant = Quantization(
        weight_quantizer="binary", weight_quantizer_args={"keep_zeros": False}, verbose=False
    )
    trainer(tmp_path, [pruning, quant], max_steps=2).fit(model, data())
    mask = pruning.masks["net.hidden.1.weight"]
    assert torch.all(model.net.hidden[1].weight[~mask] == 0)
    assert torch.all(model.net.hidden[1].quantized_weight()[~mask] == 1)


def test_binarised_post_relu_inputs_warn_once(tmp_path):
    model = tiny_mlp(hidden=(32, 32, 32))
    with pytest.warns(UserWarning, match=re.escape(RELU_WARNING)) as record:
        trainer(tmp_path, [Quantization(method="bnn", verbose=False)], max_steps=3).fit(model, data())
    relu = [w for w in record if RELU_WARNING in str(w.message)]
    assert (
        len(relu) == 1 and "net.hidden.1" in str(relu[0].message) and "net.hidden.2" in str(relu[0].message)
    )
    # Binarising the raw (signed) input does not warn.
    cb = Quantization(method="bnn", include=["net.hidden.0"], skip_first_last=False, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer(tmp_path, [cb], max_steps=2).fit(tiny_mlp(), data())
    assert cb.layers == ["net.hidden.0"] and not cb.relu_warned


def test_resume_mid_run_equals_uninterrupted_run(tmp_path):
    """Stochastic BinaryConnect: the callback's generator state travels in the checkpoint."""

    class StopAt(L.Callback):
        def __init__(self, step):
            self.step = step

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= self.step:
                trainer.should_stop = True

    def run(root, extra=(), ckpt_path=None):
        model = tiny_mlp()
        cb = Quantization(method="binaryconnect", stochastic=True, seed=5, verbose=False)
        checkpoint = L.callbacks.ModelCheckpoint(
            dirpath=root, save_top_k=-1, every_n_train_steps=STEPS_PER_EPOCH
        )
        fit = trainer(root, [cb, checkpoint, *extra], max_steps=16, enable_checkpointing=True)
        fit.fit(model, data(shuffle=False), ckpt_path=ckpt_path)
        return model, cb

    full_model, full_cb = run(tmp_path / "full")
    run(tmp_path / "part", extra=[StopAt(STEPS_PER_EPOCH)])  # killed after the first epoch
    (ckpt,) = (tmp_path / "part").glob("*.ckpt")
    resumed_model, resumed_cb = run(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert torch.equal(resumed_cb.generator.get_state(), full_cb.generator.get_state())
    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # Control: a fresh generator (what a resume without the callback state would use) draws differently.
    fresh = Quantization(method="binaryconnect", stochastic=True, seed=5).generator
    assert not torch.equal(fresh.get_state(), full_cb.generator.get_state())


class SavePerRank(L.Callback):
    """ddp_spawn trains in child processes: each rank writes its latent weights and generator state."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        quant = next(cb for cb in trainer.callbacks if isinstance(cb, Quantization))
        layer = pl_module.net.hidden[1]
        torch.save(
            {
                "weights": {n: p.detach().cpu() for n, p in pl_module.named_parameters()},
                "generator": quant.generator.get_state(),
                "quantized": type(layer).__name__,
            },
            Path(self.folder) / f"rank{trainer.global_rank}.pt",
        )


def test_ddp_two_ranks_have_identical_latent_weights_and_draws(tmp_path):
    model = tiny_mlp(torch.optim.Adam)  # picklable for ddp_spawn
    quant = Quantization(method="binaryconnect", stochastic=True, verbose=False)
    initial_state = quant.generator.get_state()
    fit = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[quant, SavePerRank(str(tmp_path))],
        default_root_dir=tmp_path,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    fit.fit(model, data(num_train=128, batch_size=16))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["quantized"] == ranks[1]["quantized"] == "QuantLinear"
    assert torch.equal(ranks[0]["generator"], ranks[1]["generator"])  # same stochastic binary weights
    assert not torch.equal(ranks[0]["generator"], initial_state)  # ... and they were drawn
    for name, w in ranks[0]["weights"].items():
        assert torch.equal(w, ranks[1]["weights"][name]), name


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(), ValueError, r"give method \(one of"),
        (dict(method="xnr"), ValueError, "Did you mean 'xnor'"),
        (dict(method="dorefa"), ValueError, "method 'dorefa' needs bits"),
        (dict(method="dorefa", bits=9), ValueError, r"dorefa_weight: bits must be an int in 2\.\.8.*got 9"),
        (dict(method="dorefa", bits=4, activation_bits=1), ValueError, r"dorefa_activation.*2\.\.8, got 1"),
        (dict(method="bnn", bits=2), ValueError, "method 'bnn' is 1-bit"),
        (dict(method="xnor", stochastic=True), ValueError, "stochastic=True is for method='binaryconnect'"),
        (dict(method="bnn", weight_quantizer="binary"), ValueError, "is a preset"),
        (dict(weight_quantizer="identity"), ValueError, "nothing to quantize"),
        (dict(weight_quantizer="binray"), ValueError, "Did you mean 'binary'"),
        (dict(weight_quantizer="binary", bits=2), ValueError, "weight_quantizer_args"),
        (dict(method="bnn", types=["Conv1d"]), TypeError, r"\['Conv1d'\] are not supported"),
        (dict(method="bnn", types=["ConvTranspose2d", "Linear"]), TypeError, "ConvTranspose2d"),
        (dict(method="bnn", types="Linear"), ValueError, "types must be a non-empty list"),
        (dict(method="bnn", skip_first_last="yes"), ValueError, "skip_first_last must be true or false"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        Quantization(**kwargs)


def test_pattern_matching_nothing_lists_close_names(tmp_path):
    cb = Quantization(method="binaryconnect", include=["net.hiden.*"])
    with pytest.raises(ValueError, match=r"include pattern 'net.hiden.\*' matches no.*net.hidden.1"):
        trainer(tmp_path, [cb]).fit(tiny_mlp(), data())


def test_selection_of_only_first_and_last_layers_is_an_error(tmp_path):
    cb = Quantization(method="binaryconnect", include=["net.head"])
    with pytest.raises(ValueError, match="skip_first_last=True keeps real; set skip_first_last: false"):
        trainer(tmp_path, [cb]).fit(tiny_mlp(), data())


class SubclassedLinearModule(L.LightningModule):
    def __init__(self):
        super().__init__()

        class ScaledLinear(nn.Linear):
            def forward(self, x):
                return 2 * super().forward(x)

        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), ScaledLinear(8, 8), nn.Linear(8, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_layer_subclass_with_its_own_forward_is_refused_by_name(tmp_path):
    with pytest.raises(
        TypeError,
        match=r"1 selected layer\(s\) .* cannot be quantized: 'net.2' \(ScaledLinear\); "
        r"exclude them \(exclude: \['net.2'\]\)",
    ):
        trainer(tmp_path, [Quantization(method="bnn")]).fit(SubclassedLinearModule(), data())
