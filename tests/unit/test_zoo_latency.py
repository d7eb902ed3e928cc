"""The optional latency section of zoo cards: measured beside the dense reference, re-checked by verify."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lit_compress import zoo
from lit_compress.models import create_model
from lit_compress.zoo.card import Card, Latency, Metrics

export_mod = importlib.import_module("lit_compress.zoo.export")
verify_mod = importlib.import_module("lit_compress.zoo.verify")
latency = importlib.import_module("lit_compress.zoo.latency")
measure_mod = importlib.import_module("lit_compress.measure")


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


# ------------------------------------------------------------------------------------ memory layouts


def small_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))


class LayoutSensitive(nn.Module):
    """A conv net with a layer that misreads channels-last input (as a kernel written for NCHW would)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_convnet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net[0](x)
        return self.net[1:](y if y.is_contiguous() else 2 * y)


class RejectsChannelsLast(LayoutSensitive):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[3](self.net[1](self.net[0](x)).view(x.shape[0], -1))  # view needs NCHW strides


def fake_measure(ms: dict[tuple[str, str], float], calls: list):
    """A stand-in for measure_latency: ``ms[(tag, layout)]`` for the model it is given (``tag``: an attribute
    that the channels-last deep copy keeps)."""

    def measure(net, input_shape, batch_sizes, repeats, threads, inputs):
        if isinstance(net, latency.ChannelsLast):
            key = (net.model.tag, latency.CHANNELS_LAST)
        else:
            key = (net.tag, latency.NCHW)
        calls.append(key)
        return {b: SimpleNamespace(median_ms=ms[key]) for b in batch_sizes}

    return measure


@pytest.mark.parametrize("faster", [latency.NCHW, latency.CHANNELS_LAST])
def test_both_layouts_are_timed_in_alternating_rounds_and_the_faster_is_kept(monkeypatch, faster):
    """Reference and model are each timed in NCHW and channels-last, round after round, and each keeps its
    faster median: a reference timed in only one layout would fail this test."""
    model, reference = small_convnet(), small_convnet()
    model.tag, reference.tag = "model", "reference"
    slow = latency.CHANNELS_LAST if faster == latency.NCHW else latency.NCHW
    ms = {("model", faster): 1.0, ("model", slow): 3.0, ("reference", faster): 4.0, ("reference", slow): 9.0}
    calls: list = []
    monkeypatch.setattr(latency, "reference_model", lambda arch, kwargs: reference)
    monkeypatch.setattr(measure_mod, "measure_latency", fake_measure(ms, calls))
    (lat,) = latency.measure_card_latency(model, "x", {}, (1, 8, 8), batch_sizes=(1,), rounds=3)
    layouts = [latency.NCHW, latency.CHANNELS_LAST]
    assert calls == [(name, layout) for name in ("model", "reference") for layout in layouts] * 3
    assert (lat.ms, lat.reference_ms, lat.speedup) == (1.0, 4.0, 4.0)
    assert lat.reference == f"dense x ({faster})"


def test_channels_last_copy_is_the_same_model():
    net = small_convnet().eval()
    x = torch.randn(2, 1, 8, 8)
    variants = latency.layout_variants(net, (1, 8, 8), [x])
    assert set(variants) == {latency.NCHW, latency.CHANNELS_LAST} and variants[latency.NCHW] is net
    converted = variants[latency.CHANNELS_LAST]
    assert converted.model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert net[0].weight.is_contiguous()  # the model itself is left as it was
    with torch.no_grad():
        torch.testing.assert_close(converted(x), net(x))
    assert set(latency.layout_variants(net, (1, 8, 8), [x], layouts=(latency.NCHW,))) == {latency.NCHW}


@pytest.mark.parametrize("cls", [LayoutSensitive, RejectsChannelsLast])
def test_model_that_cannot_run_channels_last_stays_in_nchw(cls):
    net = cls().eval()
    assert set(latency.layout_variants(net, (1, 8, 8), [torch.randn(1, 1, 8, 8)])) == {latency.NCHW}


def test_models_without_conv_weights_are_timed_as_loaded_only():
    net = create_model("mlp", hidden=[64])
    assert set(latency.layout_variants(net, (1, 28, 28), [torch.randn(1, 1, 28, 28)])) == {latency.NCHW}


def test_channels_last_copy_failing_while_timed_is_dropped(monkeypatch):
    real = measure_mod.measure_latency

    def measure(net, *args, **kwargs):
        if isinstance(net, latency.ChannelsLast):
            raise RuntimeError("kernel needs NCHW")
        return real(net, *args, **kwargs)

    monkeypatch.setattr(measure_mod, "measure_latency", measure)
    timed = latency.time_side_by_side(
        {"net": small_convnet()}, (1, 8, 8), batch_sizes=(1,), rounds=2, repeats=2
    )
    assert set(timed["net"][1].ms) == {latency.NCHW} and timed["net"][1].layout == latency.NCHW


def test_real_timing_of_a_conv_net_tries_both_layouts():
    timed = latency.time_side_by_side(
        {"net": small_convnet()}, (1, 8, 8), batch_sizes=(1, 4), rounds=1, repeats=2
    )
    for b in (1, 4):
        assert set(timed["net"][b].ms) == {latency.NCHW, latency.CHANNELS_LAST}
        assert timed["net"][b].best_ms == min(timed["net"][b].ms.values()) > 0


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("dense cifarnet", ("NCHW",)),  # written before channels-last was offered: re-timed as it was made
        ("dense cifarnet (NCHW)", ("NCHW", "channels_last")),
        ("dense cifarnet (channels_last)", ("NCHW", "channels_last")),
    ],
)
def test_verify_retimes_a_claim_under_the_protocol_it_was_made_with(
    stub_eval, tmp_path, monkeypatch, reference, expected
):
    _export(tmp_path, create_model("mlp", hidden=[64]), latency=False)
    root = tmp_path / "zoo"
    path = root / "mlp-mnist.lat" / "card.json"
    card = Card.from_json(path.read_text())
    card.latency = [Latency(1, 1, ms=0.5, reference_ms=1.0, reference=reference, speedup=2.0)]
    path.write_text(card.seal().to_json())
    offered = []

    def fake_measure(*args, layouts, **kwargs):
        offered.append(tuple(layouts))
        return [Latency(1, 1, ms=0.5, reference_ms=1.0, reference=reference, speedup=2.0)]

    monkeypatch.setattr(latency, "measure_card_latency", fake_measure)
    (result,) = zoo.verify(zoo=root, check_latency=True)
    assert result.ok, result.problems
    assert offered == [expected]
