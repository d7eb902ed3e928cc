"""``lit_compress.plots`` and ``lit-compress report``: valid PNGs whose plotted data equals the cards' data.

Real cards come from the shipped ``zoo/`` folder (read only); synthetic cards and run directories are built in
``tmp_path`` with numbers small enough to check by hand.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

from lit_compress import plots
from lit_compress.cli import main
from lit_compress.gating.blockdrop import summarize_decisions
from lit_compress.zoo.errors import ModelNotFoundError

REPO_ROOT = Path(__file__).resolve().parents[2]
ZOO = REPO_ROOT / "zoo"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_side: int = 300) -> tuple[int, int]:
    """A real PNG: magic bytes, non-empty, decodable, and at 150 dpi larger than ``min_side`` pixels."""
    from matplotlib.image import imread

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 1000
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    height, width = image.shape[:2]
    assert height > min_side and width > min_side
    return height, width


def zoo_card(name: str) -> dict:
    return json.loads((ZOO / name / "card.json").read_text())


def synthetic_card(name: str = "toy-mnist.pruned", **compression) -> dict:
    return {"name": name, "compression": {"methods": ["pruning:magnitude"], "bits": 32, **compression}}


# -- per-layer sparsity -------------------------------------------------------------------------------------


def test_sparsity_bars_equal_the_card_and_overall_is_parameter_weighted(tmp_path):
    card = synthetic_card(
        layers={
            "a": {"params": 100, "nonzero": 10, "sparsity": 0.9},
            "b": {"params": 300, "nonzero": 300, "sparsity": 0.0},
        }
    )
    plot = plots.plot_layer_sparsity(card, tmp_path)
    assert plot.path == tmp_path / "toy-mnist.pruned-sparsity.png"
    assert_png(plot.path)
    assert plot.data["layers"] == ["a", "b"]
    np.testing.assert_allclose(plot.data["sparsity"], [0.9, 0.0])
    # 1 - (10 + 300) / (100 + 300), not the unweighted mean 0.45
    assert plot.data["overall"] == pytest.approx(0.225)


def test_sparsity_of_a_real_zoo_entry_through_the_registry(tmp_path):
    target = plots.load_target("lenet5-mnist.pruned-12x", ZOO)
    plot = plots.plot_layer_sparsity(target.card, tmp_path)
    layers = zoo_card("lenet5-mnist.pruned-12x")["compression"]["layers"]
    assert plot.data["layers"] == list(layers)
    np.testing.assert_allclose(plot.data["sparsity"], [r["sparsity"] for r in layers.values()])
    np.testing.assert_allclose(plot.data["params"], [r["params"] for r in layers.values()])
    assert_png(plot.path)


def test_card_without_layer_data_is_a_clear_error(tmp_path):
    card = zoo_card("lenet5-mnist.int8-qat")  # compression.layers == {}
    with pytest.raises(ValueError, match=r"lenet5-mnist.int8-qat.*compression.layers is empty"):
        plots.plot_layer_sparsity(card, tmp_path)
    with pytest.raises(ValueError, match="without sparsity fields"):
        plots.layer_sparsity(synthetic_card(layers={"a": {"params": 3}}))
    with pytest.raises(TypeError, match="card-like dict"):
        plots.layer_sparsity(["not", "a", "card"])
    assert not list(tmp_path.iterdir())


# -- bit widths ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected", "source"),
    [
        # description: "conv2 and fc1 binary weights"; first and last layer stay fp32
        ("binary_lenet5-mnist.bnn", {"conv1": 32, "conv2": 1, "fc1": 1, "fc2": 32}, "bitpacked"),
        (
            "binary_mlp-mnist.bnn-3x2048",
            {"hidden.0": 1, "hidden.1": 1, "hidden.2": 1, "head": 1},
            "bitpacked",
        ),
        # None: from the description's "shared values per layer: net.conv1 256, ..." (k values: log2 k bits)
        ("lenet5-mnist.deep-compression", None, "deep-compression"),
        ("lenet5-mnist.int8-qat", {"conv1": 8, "conv2": 8, "fc1": 8, "fc2": 8}, "safetensors"),
    ],
)
def test_bit_widths_are_read_from_the_shipped_weight_file(tmp_path, name, expected, source):
    target = plots.load_target(name, ZOO)
    if expected is None:
        shared = re.search(r"shared values per layer: ([^;]+)", target.card["compression"]["description"])
        pairs = [item.strip().split() for item in shared.group(1).split(",")]
        expected = {layer.removeprefix("net."): int(k).bit_length() - 1 for layer, k in pairs}  # 2**b values
    plot = plots.plot_layer_bits(target.card, tmp_path, target.entry_dir)
    assert dict(zip(plot.data["layers"], plot.data["bits"].tolist())) == expected
    assert source in plot.data["source"]
    assert_png(plot.path)


def test_bit_widths_from_card_fields_without_a_weight_file():
    per_layer = synthetic_card(bits=2, layers={"a": {"bits": 4}, "b": {}})
    data = plots.layer_bits(per_layer)
    assert data["layers"] == ["a", "b"] and data["bits"].tolist() == [4, 2]
    card_wide = synthetic_card(bits=1, layers={"x": {"sparsity": 0.0}, "y": {"sparsity": 0.0}})
    assert plots.layer_bits(card_wide)["bits"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="no per-layer bit widths"):
        plots.layer_bits(synthetic_card(layers={}))


# -- zoo summary --------------------------------------------------------------------------------------------


def _entry(name, methods, errors, fp32, file, macs_dense, macs_eff, dataset="mnist"):
    return {
        "name": name,
        "dataset": {"name": dataset},
        "compression": {"methods": methods},
        "metrics": {"errors": errors, "num_examples": 10000},
        "bytes": {"fp32": fp32, "file": file},
        "macs": {"dense": macs_dense, "effective": macs_eff},
    }


def test_zoo_summary_ratios_are_against_the_dense_reference_of_the_group(tmp_path):
    cards = [
        _entry("a-mnist.dense", [], 50, 1000, 1000, 100, 100),
        _entry("a-mnist.pruned", ["pruning:magnitude"], 60, 1000, 100, 100, 25),
        _entry("a-mnist.small", ["structured_pruning:l1"], 70, 250, 250, 50, 50),  # physically smaller
        _entry("b-fashion-mnist.bnn", ["quantization:bnn"], 800, 3200, 100, 40, 40, "fashion-mnist"),
    ]
    plot = plots.plot_zoo_summary(cards, tmp_path)
    assert plot.path.name == "zoo-summary.png"
    assert_png(plot.path)
    d = plot.data
    assert d["groups"] == ["a-mnist", "a-mnist", "a-mnist", "b-fashion-mnist"]
    np.testing.assert_allclose(d["error"], [0.5, 0.6, 0.7, 8.0])
    np.testing.assert_allclose(d["size_ratio"], [1.0, 10.0, 4.0, 32.0])  # b has no reference: own fp32
    np.testing.assert_allclose(d["mac_reduction"], [1.0, 4.0, 2.0, 1.0])
    assert d["reference"] == ["a-mnist.dense"] * 3 + ["b-fashion-mnist.bnn"]
    with pytest.raises(ValueError, match="no zoo cards"):
        plots.zoo_summary_points([])


def test_zoo_summary_of_the_real_zoo_matches_the_cards():
    from lit_compress.zoo.registry import all_cards

    d = plots.zoo_summary_points(all_cards("lenet5-mnist.*", ZOO))  # the CLI test below renders one
    i = d["names"].index("lenet5-mnist.structured-l1")
    dense, entry = zoo_card("lenet5-mnist.dense"), zoo_card("lenet5-mnist.structured-l1")
    assert d["size_ratio"][i] == pytest.approx(dense["bytes"]["fp32"] / entry["bytes"]["file"])
    assert d["mac_reduction"][i] == pytest.approx(dense["macs"]["dense"] / entry["macs"]["effective"])
    assert d["error"][i] == pytest.approx(entry["metrics"]["errors"] / 100)


# -- gating -------------------------------------------------------------------------------------------------


def test_fbs_density_equals_the_card(tmp_path):
    card = zoo_card("cifarnet-fashion-mnist.fbs")
    plot = plots.plot_fbs_density(card, tmp_path)
    assert_png(plot.path)
    np.testing.assert_allclose(plot.data["density"], [13 / 32, 26 / 64, 26 / 64])
    assert plot.data["target"] == 0.4
    stats = card["compression"]["gating"]["statistics"]
    assert plot.data["macs_mean"] == stats["macs_mean"] and plot.data["macs_dense"] == stats["macs_dense"]
    with pytest.raises(ValueError, match="no FBS gating data"):
        plots.fbs_density(zoo_card("lenet5-mnist.dense"))


def blockdrop_card() -> dict:
    """A card-like dict as the BlockDrop callback writes it, from hand-made decisions of 4 images."""
    decisions = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 0], [1, 0, 0], [1, 0, 1]])
    blocks = ["layer1.0", "layer2.0", "layer3.0"]
    return {
        "name": "resnet8-fashion-mnist.blockdrop",
        "compression": {
            "methods": ["blockdrop"],
            "bits": 32,
            "layers": {},
            "gating": {
                "method": "blockdrop",
                "gated_blocks": blocks,
                "always_on": [],
                "statistics": summarize_decisions(decisions, None, blocks),
            },
        },
    }


def test_blockdrop_usage_from_a_synthetic_card(tmp_path):
    plot = plots.plot_blockdrop_usage(blockdrop_card(), tmp_path)
    assert_png(plot.path)
    # blocks used per image: 2, 3, 0, 1, 2
    assert plot.data["images"].tolist() == [1, 1, 2, 1]
    np.testing.assert_allclose(plot.data["fraction"], [0.2, 0.2, 0.4, 0.2])
    assert plot.data["block_names"] == ["layer1.0", "layer2.0", "layer3.0"]
    np.testing.assert_allclose(plot.data["block_usage"], [0.8, 0.2, 0.6])
    assert plot.data["blocks_mean"] == pytest.approx(8 / 5)
    with pytest.raises(ValueError, match="no BlockDrop statistics"):
        plots.blockdrop_usage(zoo_card("cifarnet-fashion-mnist.fbs"))


# -- run directories ----------------------------------------------------------------------------------------


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = sorted({k for r in rows for k in r})
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    run = tmp_path / "runs" / "toy-run"
    _write_csv(
        run / "logs" / "version_0" / "metrics.csv",
        [
            {"step": 0, "pruning/global": 0.0, "pruning/net.fc1.weight": 0.0},
            {"step": 9, "epoch": 0, "val/acc": 0.9},
            {"step": 10, "pruning/global": 0.5, "pruning/net.fc1.weight": 0.6},
        ],
    )
    _write_csv(  # a resumed segment continues the curves
        run / "logs" / "version_1" / "metrics.csv",
        [
            {"step": 20, "pruning/global": 0.8, "pruning/net.fc1.weight": 0.9},
            {"step": 20, "epoch": 1, "val/acc": 0.95},
            {"step": 20, "compression/ratio": 5.0, "compression/mac_reduction": 2.5},
        ],
    )
    report = {
        "format": "lit_compress.compression_report",
        "layers": [
            {"name": "fc1", "type": "Linear", "params": 100, "nonzero": 10, "sparsity": 0.9},
            {"name": "bn", "type": "BatchNorm1d", "params": 20, "nonzero": 20, "sparsity": 0.0},
            {"name": "fc2", "type": "Linear", "params": 50, "nonzero": 25, "sparsity": 0.5},
        ],
    }
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "compression_report.json").write_text(json.dumps(report))
    return run


def test_run_metrics_are_merged_across_versions(run_dir):
    metrics = plots.read_run_metrics(run_dir)
    steps, values = metrics["pruning/global"]
    assert steps.tolist() == [0, 10, 20] and values.tolist() == [0.0, 0.5, 0.8]
    assert metrics["val/acc"][1].tolist() == [0.9, 0.95]


def test_report_of_a_run_dir_plots_curves_and_layer_sparsity(run_dir, tmp_path):
    out = tmp_path / "out"
    written = {p.kind: p for p in plots.report(run_dir, out)}
    assert set(written) == {"curves", "sparsity"}
    curves = written["curves"]
    assert_png(curves.path)
    assert curves.data["panels"] == ["sparsity", "validation error"]
    _, pct = curves.data["series"]["pruning/net.fc1.weight"]
    np.testing.assert_allclose(pct, [0.0, 60.0, 90.0])
    np.testing.assert_allclose(curves.data["series"]["val/acc"][1], [10.0, 5.0])  # error in %
    assert curves.data["final"] == ["mac reduction 2.5x", "ratio 5x"]  # logged once: in the title
    sparsity = written["sparsity"]
    assert sparsity.data["layers"] == ["fc1", "fc2"]  # BatchNorm rows are not layers with weights to prune
    np.testing.assert_allclose(sparsity.data["sparsity"], [0.9, 0.5])


def test_run_dir_without_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no metrics\.csv"):
        plots.read_run_metrics(tmp_path)
    with pytest.raises(ValueError, match=r"neither card\.json nor"):
        plots.load_target(tmp_path)


# -- the command --------------------------------------------------------------------------------------------


def test_cli_report_of_a_card_json_writes_the_gating_plot(tmp_path, capsys):
    card_path = tmp_path / "card.json"
    card_path.write_text(json.dumps(blockdrop_card()))
    assert main(["report", str(card_path), "--out", str(tmp_path / "img")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "img" / "resnet8-fashion-mnist.blockdrop-blockdrop-usage.png")]
    assert_png(Path(printed[0]))


def test_cli_report_of_a_zoo_entry_and_the_zoo_summary(tmp_path, capsys):
    assert main(["report", "lenet5-mnist.deep-compression", "--zoo", str(ZOO), "--out", str(tmp_path)]) == 0
    names = sorted(Path(p).name for p in capsys.readouterr().out.split())
    assert names == ["lenet5-mnist.deep-compression-bits.png", "lenet5-mnist.deep-compression-sparsity.png"]
    args = [
        "report",
        "--zoo-summary",
        "--pattern",
        "lenet_300_100-*",
        "--zoo",
        str(ZOO),
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    assert_png(tmp_path / "zoo-summary.png")


def test_cli_unknown_name_and_bad_usage(tmp_path, capsys):
    assert main(["report", "lenet5-mnist.prunned-12x", "--zoo", str(ZOO), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no zoo entry named 'lenet5-mnist.prunned-12x'" in err and "lenet5-mnist.pruned-12x" in err
    assert main(["report", "runs/does-not-exist", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["report", "--out", str(tmp_path)])  # neither a target nor --zoo-summary
    assert exc.value.code == 2
    assert not list(tmp_path.iterdir())
    with pytest.raises(ModelNotFoundError, match="Did you mean"):
        plots.load_target("lenet5-mnist.dence", ZOO)


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'lit-compress\[bench\]'"):
        plots.plot_layer_sparsity(synthetic_card(layers={"a": {"sparsity": 0.5}}), tmp_path)
