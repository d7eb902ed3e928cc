"""timm coverage matrix: every compression method on a handful of timm families, fit -> zoo -> reload.

Each cell (see :mod:`tests.integration._timm_cells`) fits two optimizer steps on random 1x28x28 tensors,
checks that the method took effect against a hand computation, exports through ``ZooExport`` to a temporary
zoo and compares ``zoo.load``'s output with the trained network's. Cells that lit_compress refuses on purpose
must raise their documented error; cells that hit a known bug are strict xfails. ``benchmarks/timm_matrix.py``
runs the same cells and writes the table in ``docs/timm_matrix.md``.
"""

from __future__ import annotations

import pytest

from tests.integration import _timm_cells as cells


def _params():
    for family in cells.FAMILIES:
        for method in cells.METHODS:
            bug = cells.KNOWN_BUGS.get((family, method))
            marks = [pytest.mark.xfail(strict=True, reason=f"{bug.failure} | fix: {bug.fix}")] if bug else []
            yield pytest.param(family, method, id=f"{family}-{method}", marks=marks)


@pytest.mark.parametrize("family, method", list(_params()))
def test_cell(family, method, tmp_path):
    refusal = cells.REFUSED.get((family, method))
    if refusal is not None:
        with pytest.raises(refusal.error, match=refusal.match):
            cells.run_cell(family, method, tmp_path)
        return
    result = cells.run_cell(family, method, tmp_path)
    assert result.card.name == cells.entry_name(family, method)
    assert result.notes  # every effect check records what it verified


def test_conv2d_same_refusal_advice_works(tmp_path):
    """The Conv2dSame refusal lists every offending layer as a ready exclude list: using it makes the cell
    work."""
    import ast
    import re

    import timm.layers

    net = timm.create_model("tf_mobilenetv3_small_minimal_100", in_chans=1, num_classes=10)
    same = [f"net.{n}" for n, m in net.named_modules() if isinstance(m, timm.layers.Conv2dSame)]
    assert len(same) == 5  # the stem (kept real by skip_first_last) and four strided depthwise convs
    with pytest.raises(TypeError) as refused:
        cells.run_cell("tf_mobilenetv3_small_minimal_100", "binaryconnect", tmp_path / "refused")
    advice = ast.literal_eval(re.search(r"exclude: (\[.*?\])", str(refused.value)).group(1))
    assert sorted(advice) == sorted(same[1:])
    result = cells.run_cell(
        "tf_mobilenetv3_small_minimal_100", "binaryconnect", tmp_path, overrides={"exclude": advice}
    )
    assert result.card.compression.bits == 1


def test_refusal_and_bug_lists_name_cells_of_the_matrix():
    matrix = {(f, m) for f in cells.FAMILIES for m in cells.METHODS}
    assert set(cells.REFUSED) <= matrix
    assert set(cells.KNOWN_BUGS) <= matrix
    assert not set(cells.REFUSED) & set(cells.KNOWN_BUGS)


def test_classify_reports_refusals_and_unexpected_failures(tmp_path, monkeypatch):
    outcome = cells.classify("vit_tiny_patch16_224", "fbs", tmp_path)
    assert (outcome.status, outcome.detail) == (
        "refused",
        cells.REFUSED[("vit_tiny_patch16_224", "fbs")].reason,
    )

    def broken(*args, **kwargs):
        raise cells.CellCheckError("reloaded output differs")

    monkeypatch.setattr(cells, "run_cell", broken)
    outcome = cells.classify("resnet10t", "pruning", tmp_path)
    assert (outcome.status, outcome.detail) == ("fails", "CellCheckError: reloaded output differs")
    # A refused cell that fails with another error is a failure, not a refusal.
    assert cells.classify("vit_tiny_patch16_224", "fbs", tmp_path).status == "fails"


def test_check_raises_even_under_python_O():
    with pytest.raises(cells.CellCheckError, match="boom"):
        cells.check(False, "boom")


def test_fake_test_split_feeds_the_zoo_evaluation():
    import torch

    from lit_compress.zoo.evaluate import evaluate_on

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = torch.zeros(x.shape[0], cells.NUM_CLASSES)
            logits[:, 3] = 1.0
            return logits + 0 * self.w

    with cells.fake_test_split(count=8, seed=0):
        from lit_compress.data import load_split

        _, labels = load_split("mnist", "test")
        metrics = evaluate_on(Constant(), "mnist", "test")
    assert metrics.num_examples == 8
    assert metrics.errors == int((labels != 3).sum())


def test_fbs_without_the_convs_on_1x1_maps_saves_macs(tmp_path):
    """The workaround the matrix suggests for FBS on mobilenetv3 at 28x28: leave the squeeze-excitation
    convs and the head (1x1 maps, where a predictor costs as much as the conv) ungated."""
    result = cells.run_cell(
        "mobilenetv3_small_050", "fbs", tmp_path, overrides={"exclude": ["net.*.se.*", "net.conv_head"]}
    )
    macs = result.card.macs
    assert macs.effective < macs.dense


def test_readme_holds_the_matrix_the_cells_define():
    """README's matrix (written by benchmarks/timm_matrix.py) says "works" exactly where the cells above must
    work and "refused: ..." exactly where they must raise their documented error."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text.split("<!-- timm-matrix:start -->", 1)[1].split("<!-- timm-matrix:end -->", 1)[0]
    rows = [line for line in block.strip().splitlines() if line.startswith("| `")]
    header = [h.strip() for h in block.strip().splitlines()[0].strip("|").split("|")][1:]
    assert header == list(cells.METHODS)
    assert len(rows) == len(cells.FAMILIES)
    for family, row in zip(cells.FAMILIES, rows):
        name, _ = cells.FAMILIES[family]
        label, *cells_text = [c.strip() for c in row.strip().strip("|").split("|")]
        assert label.startswith(f"`{name}`")
        for method, text_ in zip(cells.METHODS, cells_text):
            expected = "refused: " if (family, method) in cells.REFUSED else "works"
            assert text_.startswith(expected), (family, method, text_)
