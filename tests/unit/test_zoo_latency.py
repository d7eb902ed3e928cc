"""The optional latency section of zoo cards: measured beside the dense reference, re-checked by verify."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from lit_compress import zoo
from lit_compress.models import create_model
from lit_compress.zoo.card import Card, Latency, Metrics

export_mod = importlib.import_module("lit_compress.zoo.export")
verify_mod = importlib.import_module("lit_compress.zoo.verify")


@pytest.fixture
def stub_eval(monkeypatch):
    fake = lambda *a, **k: Metrics(top1=0.9, errors=1000, num_examples=10000)  # noqa: E731
    monkeypatch.setattr(export_mod, "evaluate_on", fake)
    monkeypatch.setattr(verify_mod, "evaluate_on", fake)


def _export(tmp_path, model, latency: bool):
    return zoo.export(
        model,
        name="mlp-mnist.lat",
        architecture="mlp",
        architecture_kwargs={"hidden": [64]},
        dataset="mnist",
        recipe=None,
        zoo=tmp_path / "zoo",
        latency=latency,
        overwrite=True,
    )


def test_card_without_latency_has_no_field_and_old_seal(stub_eval, tmp_path):
    card = _export(tmp_path, create_model("mlp", hidden=[64]), latency=False)
    data = json.loads((tmp_path / "zoo" / card.name / "card.json").read_text())
    assert "latency" not in data
    assert Card.from_dict(data).latency is None


def test_latency_is_measured_beside_the_dense_reference_and_round_trips(stub_eval, tmp_path):
    torch.manual_seed(0)
    card = _export(tmp_path, create_model("mlp", hidden=[64]), latency=True)
    assert [lat.batch_size for lat in card.latency] == [1, 256]
    for lat in card.latency:
        assert lat.ms > 0 and lat.reference_ms > 0 and lat.threads == 1
        # Both are rounded on the card (ms to 4 decimals): a tiny model's ratio is only good to a few %.
        assert lat.speedup == pytest.approx(lat.reference_ms / lat.ms, rel=5e-2)
        assert lat.reference == "dense mlp"
    assert zoo.card(card.name, zoo=tmp_path / "zoo") == card


def test_verify_fails_when_a_claimed_speedup_does_not_hold(stub_eval, tmp_path, monkeypatch):
    _export(tmp_path, create_model("mlp", hidden=[64]), latency=False)
    root = tmp_path / "zoo"
    path = root / "mlp-mnist.lat" / "card.json"
    card = Card.from_json(path.read_text())
    card.latency = [Latency(1, 1, ms=0.01, reference_ms=1.0, reference="dense mlp", speedup=100.0)]
    path.write_text(card.seal().to_json())
    (result,) = zoo.verify(zoo=root)
    assert result.ok, result.problems  # wall-clock time is only re-checked on request
    (result,) = zoo.verify(zoo=root, check_latency=True)
    assert not result.ok
    assert any("card claims 100.00x faster" in p for p in result.problems)
    # A claim of no speed-up (dense entries, distilled students) is not re-timed.
    card.latency = [Latency(1, 1, ms=1.0, reference_ms=1.0, reference="dense mlp", speedup=1.0)]
    path.write_text(card.seal().to_json())
    (result,) = zoo.verify(zoo=root, check_latency=True)
    assert result.ok, result.problems
