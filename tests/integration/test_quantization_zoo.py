"""Quantized networks through the zoo: binary activations on the card, bit-packed weights, exact reload."""

from __future__ import annotations

import importlib

import lightning.pytorch as L
import pytest
import torch

from lit_compress import zoo
from lit_compress.data import SyntheticDataModule
from lit_compress.models import ImageClassifier
from lit_compress.quantization.callback import Quantization
from lit_compress.zoo.card import Metrics
from lit_compress.zoo.from_lightning import ZooExport

export_mod = importlib.import_module("lit_compress.zoo.export")
verify_mod = importlib.import_module("lit_compress.zoo.verify")


@pytest.fixture
def stub_eval(monkeypatch):
    fake = lambda *a, **k: Metrics(top1=0.5, errors=5000, num_examples=10000)  # noqa: E731
    monkeypatch.setattr(export_mod, "evaluate_on", fake)
    monkeypatch.setattr(verify_mod, "evaluate_on", fake)


@pytest.mark.parametrize("method", ["bnn", "binaryconnect", "xnor"])
def test_quantized_entry_round_trips_through_the_zoo(tmp_path, stub_eval, method):
    torch.manual_seed(0)
    model = ImageClassifier(model="mlp", model_kwargs={"hidden": [64, 64, 64]})
    quant = Quantization(method=method, verbose=False)
    export = ZooExport(name=f"mlp-mnist.{method}-test", dataset="mnist", zoo=str(tmp_path), codec="bitpacked")
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[quant, export],
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, SyntheticDataModule(num_train=64, batch_size=16))
    card = export.card
    assert card.compression.bits == 1
    if method == "binaryconnect":  # binary weights, real activations: a plain architecture
        assert card.structure is None
    else:  # activations are binarised at inference: recorded on the card, rebuilt by the loader
        assert card.structure["kind"] == "quantized"
        assert set(card.structure["modules"]) == {"hidden.1", "hidden.2"}
    # Hidden 64x64 layers are stored at 1 bit per weight: the file is far below fp32 of those layers.
    assert card.bytes.file < card.bytes.fp32
    loaded = zoo.load(card.name, zoo=tmp_path)
    reference = quant.export(model)
    x = torch.randn(8, 1, 28, 28)
    torch.testing.assert_close(loaded(x), reference(x), rtol=0, atol=0)
    (result,) = zoo.verify(zoo=tmp_path)
    assert result.ok, result.problems
