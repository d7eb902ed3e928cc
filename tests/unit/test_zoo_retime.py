"""`lit-compress zoo retime`: re-measures only the latency of existing cards, atomically, re-sealed."""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest
import torch

from lit_compress import zoo
from lit_compress.models import create_model
from lit_compress.zoo.card import Card, Latency, Metrics
from lit_compress.zoo.cli import main as zoo_main
from lit_compress.zoo.errors import ZooError
from lit_compress.zoo.retime import retime, retime_entry

export_mod = importlib.import_module("lit_compress.zoo.export")
latency_mod = importlib.import_module("lit_compress.zoo.latency")

NAME = "lenet5-mnist.retime"


@pytest.fixture
def stub_eval(monkeypatch):
    fake = lambda *a, **k: Metrics(top1=0.9, errors=1000, num_examples=10000)  # noqa: E731
    monkeypatch.setattr(export_mod, "evaluate_on", fake)


def _old_latency() -> list[Latency]:
    """What a card written under the NCHW-only protocol says (no layout in the reference label)."""
    return [
        Latency(batch_size=b, threads=1, ms=1.0, reference_ms=2.0, reference="dense lenet5", speedup=2.0)
        for b in (1, 256)
    ]


def _export(tmp_path, latency: list[Latency] | None, name: str = NAME) -> Card:
    """A LeNet-5 entry whose card carries ``latency`` (written as an older export would have)."""
    torch.manual_seed(0)
    card = zoo.export(
        create_model("lenet5"),
        name=name,
        architecture="lenet5",
        dataset="mnist",
        recipe=None,
        zoo=tmp_path / "zoo",
        overwrite=True,
    )
    if latency is None:
        return card
    card = dataclasses.replace(card, latency=latency, card_sha256="").seal()
    (tmp_path / "zoo" / name / "card.json").write_text(card.to_json())
    return card


def _files(tmp_path, name: str = NAME) -> dict[str, bytes]:
    folder = tmp_path / "zoo" / name
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def fake_timing(monkeypatch):
    calls: list[dict] = []

    def measure(model, architecture, kwargs, input_shape, batch_sizes, threads, rounds, repeats, inputs):
        calls.append({"architecture": architecture, "batch_sizes": batch_sizes, "threads": threads})
        return [
            Latency(
                batch_size=b,
                threads=threads,
                ms=1.5,
                reference_ms=1.8,
                reference=f"dense {architecture} (channels_last)",
                speedup=1.2,
                device="cpu (test)",
            )
            for b in batch_sizes
        ]

    monkeypatch.setattr(latency_mod, "measure_card_latency", measure)
    return calls


def test_retime_rewrites_only_the_latency_and_says_so_in_the_notes(stub_eval, tmp_path, fake_timing):
    before = _export(tmp_path, _old_latency())
    weights = _files(tmp_path)["model.safetensors"]
    (result,) = retime(NAME, zoo=tmp_path / "zoo")
    assert result.written and [lat.speedup for lat in result.old] == [2.0, 2.0]
    assert fake_timing == [{"architecture": "lenet5", "batch_sizes": (1, 256), "threads": 1}]
    after = zoo.card(NAME, zoo=tmp_path / "zoo")  # the seal is checked on read
    assert [lat.reference for lat in after.latency] == ["dense lenet5 (channels_last)"] * 2
    assert [lat.speedup for lat in after.latency] == [1.2, 1.2]
    assert "zoo retime" in after.notes and "batch 1: 2.00x vs dense lenet5" in after.notes
    unchanged = {f.name for f in dataclasses.fields(Card)} - {"latency", "notes", "card_sha256"}
    for field in unchanged:
        assert getattr(after, field) == getattr(before, field), field
    assert _files(tmp_path)["model.safetensors"] == weights
    zoo.load(NAME, zoo=tmp_path / "zoo")  # the weights' hash on the card still holds


def test_dry_run_and_cards_without_latency_write_nothing(stub_eval, tmp_path, fake_timing):
    _export(tmp_path, _old_latency())
    _export(tmp_path, None, name="lenet5-mnist.nolatency")
    before = {n: _files(tmp_path, n) for n in (NAME, "lenet5-mnist.nolatency")}
    results = {r.name: r for r in retime("lenet5-*", zoo=tmp_path / "zoo", write=False)}
    assert not results[NAME].written and results[NAME].new[0].speedup == 1.2
    assert results["lenet5-mnist.nolatency"].new == [] and len(fake_timing) == 1
    assert {n: _files(tmp_path, n) for n in before} == before
    (skipped,) = retime("lenet5-mnist.nolatency", zoo=tmp_path / "zoo")
    assert (
        not skipped.written and _files(tmp_path, "lenet5-mnist.nolatency") == before["lenet5-mnist.nolatency"]
    )


def test_a_failed_measurement_leaves_the_card_as_it_was(stub_eval, tmp_path, monkeypatch):
    _export(tmp_path, _old_latency())
    before = _files(tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("timing failed")

    monkeypatch.setattr(latency_mod, "measure_card_latency", broken)
    with pytest.raises(RuntimeError, match="timing failed"):
        retime_entry(NAME, zoo=tmp_path / "zoo")
    assert _files(tmp_path) == before


def test_an_unwritable_card_is_a_clear_error_and_stays_as_it_was(
    stub_eval, tmp_path, fake_timing, monkeypatch
):
    _export(tmp_path, _old_latency())
    before = _files(tmp_path)

    def read_only(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("lit_compress.zoo.retime.atomic_write_bytes", read_only)
    with pytest.raises(
        ZooError, match=r"cannot rewrite .*card.json \(Permission denied\); the card is unchanged"
    ):
        retime_entry(NAME, zoo=tmp_path / "zoo")
    assert _files(tmp_path) == before


def test_mixed_thread_counts_are_refused(stub_eval, tmp_path, fake_timing):
    mixed = _old_latency()
    mixed[1] = dataclasses.replace(mixed[1], threads=2)
    _export(tmp_path, mixed)
    with pytest.raises(ZooError, match=r"different thread counts \[1, 2\]"):
        retime_entry(NAME, zoo=tmp_path / "zoo")
    assert fake_timing == []


def test_cli_prints_old_and_new_claims_and_rejects_bad_input(stub_eval, tmp_path, fake_timing, capsys):
    _export(tmp_path, _old_latency())
    root = str(tmp_path / "zoo")
    assert zoo_main(["--zoo", root, "retime", NAME, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would write {NAME}" in out
    assert "2.00x vs dense lenet5 -> 1.20x vs dense lenet5 (channels_last)" in out
    assert zoo_main(["--zoo", root, "retime", "nothing-*"]) == 2
    assert "no zoo entries match 'nothing-*'" in capsys.readouterr().err
    assert zoo_main(["--zoo", root, "retime", NAME, "--rounds", "0"]) == 2
    assert "--rounds must be at least 1, got 0" in capsys.readouterr().err


def test_cli_warns_when_the_machine_is_busy(stub_eval, tmp_path, fake_timing, capsys, monkeypatch):
    _export(tmp_path, _old_latency())
    root = str(tmp_path / "zoo")
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.2, 0.2))
    assert zoo_main(["--zoo", root, "retime", NAME, "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().err
    monkeypatch.setattr("os.getloadavg", lambda: (1.9, 1.0, 0.5))
    assert zoo_main(["--zoo", root, "retime", NAME, "--dry-run"]) == 0
    assert "load average 1.90 on 2 CPU cores" in capsys.readouterr().err


def test_real_retime_offers_the_reference_both_layouts(stub_eval, tmp_path):
    _export(tmp_path, _old_latency())
    (result,) = retime(NAME, zoo=tmp_path / "zoo", rounds=1, repeats=2)
    card = json.loads((tmp_path / "zoo" / NAME / "card.json").read_text())
    assert [lat["batch_size"] for lat in card["latency"]] == [1, 256]
    for lat in card["latency"]:
        assert lat["reference"] in ("dense lenet5 (NCHW)", "dense lenet5 (channels_last)")
        assert lat["ms"] > 0 and lat["reference_ms"] > 0
        assert lat["speedup"] == pytest.approx(lat["reference_ms"] / lat["ms"], rel=5e-2)
    assert result.new[0].reference == card["latency"][0]["reference"]
