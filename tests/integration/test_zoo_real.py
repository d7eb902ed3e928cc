"""The shipped zoo, re-measured on the real MNIST test set."""

import shutil
import time

import pytest

from lit_compress import zoo
from lit_compress.zoo.card import Card
from lit_compress.zoo.table import readme_is_current
from tests.conftest import REPO_ROOT

SHIPPED = REPO_ROOT / "zoo"


@pytest.fixture
def data_env(shared_data_dir, monkeypatch):
    monkeypatch.setenv("LIT_COMPRESS_DATA", str(shared_data_dir))


def test_shipped_zoo_has_the_dense_references():
    names = zoo.list_models(zoo=SHIPPED)
    assert "lenet_300_100-mnist.dense" in names
    for name in names:
        card = zoo.card(name, zoo=SHIPPED)
        assert card.recipe.path.startswith("configs/") and (REPO_ROOT / card.recipe.path).is_file()


@pytest.mark.parametrize("name", zoo.list_models(zoo=SHIPPED))
def test_shipped_entry_loads_fast_and_verifies(name, data_env):
    start = time.perf_counter()
    model = zoo.load(name, zoo=SHIPPED)
    assert time.perf_counter() - start < 1.0
    assert not model.training
    result = zoo.verify_entry(name, zoo=SHIPPED)
    assert result.ok, result.problems


def test_published_error_targets_are_met():
    """Han et al. 2015, Table 1 dense references: LeNet-300-100 1.64%, LeNet-5 0.80% test error."""
    targets = {"lenet_300_100-mnist.dense": 164, "lenet5-mnist.dense": 80}
    for name in zoo.list_models(zoo=SHIPPED):
        if name in targets:
            assert zoo.card(name, zoo=SHIPPED).metrics.errors <= targets[name]


def test_verify_fails_when_card_accuracy_is_edited(tmp_path, data_env):
    name = "lenet_300_100-mnist.dense"
    shutil.copytree(SHIPPED / name, tmp_path / name)
    assert all(r.ok for r in zoo.verify(zoo=tmp_path))

    path = tmp_path / name / "card.json"
    data = Card.from_json(path.read_text()).to_dict()
    data["metrics"]["errors"] -= 5
    data["metrics"]["top1"] += 0.0005
    # Re-sealed (as a careless tool would): the seal passes, re-measurement does not.
    path.write_text(Card.from_dict(data, check_seal=False).seal().to_json())
    (result,) = zoo.verify(zoo=tmp_path)
    assert not result.ok
    assert any("test errors: card" in p for p in result.problems)
    # Edited by hand without re-sealing: refused before measuring.
    data["params"]["nonzero"] -= 1
    path.write_text(Card.from_dict(data, check_seal=False).to_json())
    (result,) = zoo.verify(zoo=tmp_path)
    assert not result.ok and "edited after export" in result.problems[0]


def test_verify_cli_exit_codes(tmp_path, data_env, capsys):
    from lit_compress.zoo.cli import main

    name = "lenet_300_100-mnist.dense"
    shutil.copytree(SHIPPED / name, tmp_path / name)
    assert main(["--zoo", str(tmp_path), "verify"]) == 0
    weights = tmp_path / name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert main(["--zoo", str(tmp_path), "verify"]) == 1
    assert "sha256 mismatch" in capsys.readouterr().out


def test_readme_zoo_table_matches_cards():
    from lit_compress.zoo.registry import all_cards

    cards = all_cards(zoo=SHIPPED)
    assert readme_is_current(REPO_ROOT / "README.md", cards), "run `lit-compress zoo readme`, commit README"
