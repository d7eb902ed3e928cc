"""The documentation runs: docs/quickstart.md executes as written, docs/methods/*.md YAML is real.

The quickstart's ```python blocks are executed in order in one namespace (in a temporary folder, with
``LIT_COMPRESS_DATA`` pointing at the real MNIST files), then the variables the guide defines are checked
against independent computations: the sparsity the pruning schedule promises, the test accuracy, the card's
numbers against a re-count of the exported network, and the reloaded zoo entry against the trained network.
Every ```yaml block of the method pages must parse and every ``class_path`` in it must import (and name a
class), so a renamed callback or schedule breaks this test instead of the docs.
"""

from __future__ import annotations

import importlib
import math
import re
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO_ROOT

DOCS = REPO_ROOT / "docs"
QUICKSTART = DOCS / "quickstart.md"
METHODS = DOCS / "methods"

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def code_blocks(text: str, language: str) -> list[str]:
    """Bodies of the fenced blocks of ``language`` in ``text``, in order."""
    return [body for lang, body in FENCE.findall(text) if lang == language]


def class_paths(node: object) -> list[str]:
    """Every ``class_path`` value anywhere in a parsed YAML document."""
    found: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "class_path" and isinstance(value, str):
                found.append(value)
            found.extend(class_paths(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(class_paths(item))
    return found


def resolve(dotted: str) -> object:
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"class_path {dotted!r} has no module part")
    return getattr(importlib.import_module(module_name), attr)


# ---------------------------------------------------------------------------------------- helper self-tests


def test_code_blocks_finds_fenced_blocks_in_order():
    text = "intro\n```python\na = 1\n```\ntext\n```yaml\nx: 1\n```\n```python\nb = a + 1\n```\n"
    assert code_blocks(text, "python") == ["a = 1\n", "b = a + 1\n"]
    assert code_blocks(text, "yaml") == ["x: 1\n"]
    assert code_blocks(text, "bash") == []


def test_class_paths_walks_nested_yaml():
    doc = yaml.safe_load(
        "trainer:\n  callbacks:\n    - class_path: a.B\n      init_args:\n"
        "        schedule: {class_path: c.D, init_args: {x: 1}}\n"
    )
    assert class_paths(doc) == ["a.B", "c.D"]
    with pytest.raises(ModuleNotFoundError):
        resolve("lit_compress.no_such_module.Thing")
    with pytest.raises(AttributeError):
        resolve("lit_compress.pruning.NoSuchCallback")


# ------------------------------------------------------------------------------------------- method pages


def _method_pages() -> list[Path]:
    return sorted(METHODS.glob("*.md"))


def test_method_pages_exist_and_are_indexed():
    pages = _method_pages()
    assert len(pages) >= 12, [p.name for p in pages]
    index = (METHODS / "README.md").read_text()
    for page in pages:
        if page.name != "README.md":
            assert f"({page.name})" in index, f"{page.name} is not linked from docs/methods/README.md"


# Pages for a method that has no YAML (a function, not a callback); they say so in their YAML section.
NO_YAML = {"README.md", "layer-merging.md"}
FROM_CONFIG = re.compile(r"^# from (configs/[\w.-]+\.yaml)\s*$")


@pytest.mark.parametrize("page", _method_pages(), ids=lambda p: p.name)
def test_method_page_yaml_parses_and_class_paths_import(page):
    blocks = code_blocks(page.read_text(), "yaml")
    if page.name not in NO_YAML:
        assert blocks, f"{page.name} has no ```yaml block"
    for block in blocks:
        doc = yaml.safe_load(block)
        for path in class_paths(doc):
            obj = resolve(path)
            assert isinstance(obj, type), f"{page.name}: class_path {path} is not a class"


@pytest.mark.parametrize("page", _method_pages(), ids=lambda p: p.name)
def test_method_page_yaml_copied_from_configs_matches_them(page):
    """A block starting ``# from configs/X.yaml`` shows callbacks exactly as they are in that recipe."""
    for block in code_blocks(page.read_text(), "yaml"):
        match = FROM_CONFIG.match(block.splitlines()[0])
        if not match:
            continue
        config = yaml.safe_load((REPO_ROOT / match.group(1)).read_text())
        shown = yaml.safe_load(block)["trainer"]["callbacks"]
        assert shown, f"{page.name}: empty callback list for {match.group(1)}"
        for callback in shown:
            assert callback in config["trainer"]["callbacks"], (
                f"{page.name}: this {callback['class_path']} block differs from {match.group(1)}"
            )


@pytest.mark.parametrize("page", _method_pages(), ids=lambda p: p.name)
def test_method_page_python_compiles(page):
    for i, block in enumerate(code_blocks(page.read_text(), "python")):
        compile(block, f"{page.name}[python block {i}]", "exec")


@pytest.mark.parametrize("page", _method_pages(), ids=lambda p: p.name)
def test_method_page_names_real_configs(page):
    """Every ``configs/<file>.yaml`` a page names exists (the YAML blocks are copied from them)."""
    for rel in set(re.findall(r"configs/[\w.-]+\.yaml", page.read_text())):
        assert (REPO_ROOT / rel).is_file(), f"{page.name} names {rel}, which does not exist"


# --------------------------------------------------------------------------------------------- quickstart


@pytest.fixture
def quickstart_namespace(tmp_path, monkeypatch, shared_data_dir):
    """Run every ```python block of the quickstart, in order, in one namespace inside ``tmp_path``."""
    monkeypatch.setenv("LIT_COMPRESS_DATA", str(shared_data_dir))
    monkeypatch.chdir(tmp_path)
    blocks = code_blocks(QUICKSTART.read_text(), "python")
    assert len(blocks) >= 4, "the quickstart lost its code blocks"
    from lit_compress.models import registry

    registered = dict(registry._BUILDERS)
    namespace: dict[str, object] = {"__name__": "quickstart"}
    start = time.process_time()
    try:
        for i, block in enumerate(blocks):
            exec(compile(block, f"{QUICKSTART.name}[python block {i}]", "exec"), namespace)
        namespace["_cpu_s"] = time.process_time() - start
        yield namespace
    finally:  # the guide registers an architecture; leave the registry as it was for other tests
        registry._BUILDERS.clear()
        registry._BUILDERS.update(registered)


def test_quickstart_runs_and_delivers_what_it_says(quickstart_namespace, tmp_path):
    ns = quickstart_namespace
    # CPU time, not wall time: the budget is the guide's work, not the load of a shared machine.
    assert ns["_cpu_s"] < 60, f"the quickstart took {ns['_cpu_s']:.0f} s of CPU time"

    # Pruning reached exactly the promised sparsity per layer: round(s * n) weights are zero.
    pruned = ns["pruned_net"]
    targets = {"conv1": 0.5, "conv2": 0.8, "fc1": 0.8, "fc2": 0.8}
    for name, target in targets.items():
        weight = getattr(pruned, name).weight
        zeros = weight.numel() - int(weight.count_nonzero())
        assert zeros == round(target * weight.numel()), (name, zeros, weight.numel())
        assert math.isclose(ns["sparsity"][name], zeros / weight.numel())
    # ... and the trained module itself holds the same zeros (the export is a copy, not a re-pruning).
    for name in targets:
        assert torch.equal(getattr(ns["model"].net, name).weight, getattr(pruned, name).weight)

    # Distillation really ran on the same steps: its teacher is the zoo LeNet-5 and the run has 300 steps.
    assert ns["trainer"].global_step == ns["STEPS"] == 300
    assert type(ns["distillation"].teacher).__name__ == "LeNet5"

    # The report counts what a hand count gives.
    report = ns["report"]
    total = sum(p.numel() for p in pruned.parameters())
    nonzero = sum(int(p.count_nonzero()) for p in pruned.parameters())
    assert (report.params_total, report.params_nonzero) == (total, nonzero)
    dense_macs = 16 * 25 * 24 * 24 + 32 * 16 * 25 * 8 * 8 + 512 * 64 + 64 * 10
    assert report.macs_dense == dense_macs

    # A short run still learns MNIST; the card's test accuracy is the trainer's on the same 10k images.
    assert ns["test_acc"] > 0.95
    card = ns["card"]
    assert card.metrics.num_examples == 10_000
    assert abs(card.metrics.top1 - ns["test_acc"]) < 1e-3
    assert (card.params.dense, card.params.nonzero) == (total, nonzero)
    assert card.bytes.file < card.bytes.fp32 / 2  # the sparse codec pays for 80% zeros

    # The zoo entry was written where the guide said, and reloads to the very same function.
    entry = tmp_path / "my_zoo" / "quickstart_cnn-mnist.pruned80-distilled"
    assert (entry / "card.json").is_file()
    assert ns["outputs_match"] is True
    reloaded = ns["reloaded"]
    for key, value in pruned.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key

    from lit_compress import zoo

    (result,) = zoo.verify(zoo=tmp_path / "my_zoo")
    assert result.ok, result.problems
