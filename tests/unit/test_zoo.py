"""Zoo card schema, storage, registry, loader and atomic writes, on tiny models in a temporary zoo."""

import hashlib
import importlib
import json
import os
import pickle

import pytest
import torch

from lit_compress import zoo
from lit_compress.models import create_model
from lit_compress.zoo.card import Card
from lit_compress.zoo.errors import (
    CardValidationError,
    ModelNotFoundError,
    ZooFormatError,
    ZooIntegrityError,
)
from lit_compress.zoo.storage import SafetensorsCodec, atomic_write_bytes

# The package re-exports functions named like their modules (zoo.export, zoo.card): import the modules.
export_mod = importlib.import_module("lit_compress.zoo.export")


@pytest.fixture
def tiny_entry(tmp_path, monkeypatch):
    """A zoo entry for a small MLP, exported with evaluation stubbed out (no dataset needed)."""
    from lit_compress.zoo.card import Metrics

    monkeypatch.setattr(
        export_mod, "evaluate_on", lambda *a, **k: Metrics(top1=0.9, errors=1000, num_examples=10000)
    )
    torch.manual_seed(0)
    model = create_model("mlp", hidden=[8])
    with torch.no_grad():
        model.hidden[0].weight[:4] = 0  # some zeros so nonzero != dense
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("seed_everything: 0\n")
    card = zoo.export(
        model,
        name="mlp-mnist.tiny",
        architecture="mlp",
        architecture_kwargs={"hidden": [8]},
        dataset="mnist",
        recipe=recipe,
        zoo=tmp_path / "zoo",
    )
    return tmp_path / "zoo", card, model


def test_export_writes_measured_card(tiny_entry):
    root, card, model = tiny_entry
    assert zoo.list_models(zoo=root) == ["mlp-mnist.tiny"]
    assert card.params.dense == sum(p.numel() for p in model.parameters())
    assert card.params.nonzero == card.params.dense - 4 * 784
    assert card.macs.dense == 784 * 8 + 8 * 10
    assert card.macs.effective == card.macs.dense - 4 * 784
    assert card.bytes.fp32 == 4 * card.params.dense
    assert card.bytes.file == (root / card.name / "model.safetensors").stat().st_size
    assert card.compression.layers["hidden.0"]["sparsity"] == pytest.approx(0.5)
    assert card.recipe.sha256 == hashlib.sha256(b"seed_everything: 0\n").hexdigest()
    assert zoo.card("mlp-mnist.tiny", zoo=root) == card


def test_load_round_trips_bit_exactly_in_eval_mode(tiny_entry):
    root, card, model = tiny_entry
    loaded = zoo.load(card.name, zoo=root)
    assert not loaded.training
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_card_schema_round_trip(tiny_entry):
    _, card, _ = tiny_entry
    again = Card.from_json(card.to_json())
    assert again == card
    assert again.to_dict() == json.loads(card.to_json())


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("metrics"), r"missing required field\(s\) \['metrics'\]"),
        (lambda d: d.update(colour="blue"), r"unknown field\(s\) \['colour'\]"),
        (lambda d: d["metrics"].update(top1="high"), r"card.metrics.top1: expected a number, got 'high'"),
        (lambda d: d["params"].update(dense=1.5), r"card.params.dense: expected int"),
        (lambda d: d.update(name="LeNet5"), r"not of the form 'arch-dataset.tag'"),
        (lambda d: d.update(schema_version=99), r"schema_version 99 is not supported"),
        (lambda d: d["files"].append({"path": "x"}), r"card.files\[1\]: missing required field"),
    ],
)
def test_card_validation_errors_are_clear(tiny_entry, edit, message):
    _, card, _ = tiny_entry
    data = card.to_dict()
    edit(data)
    with pytest.raises(CardValidationError, match=message):
        Card.from_dict(data, check_seal=False)


def test_hand_edited_card_is_detected(tiny_entry):
    root, card, _ = tiny_entry
    path = root / card.name / "card.json"
    data = json.loads(path.read_text())
    data["metrics"]["top1"] = 0.999
    path.write_text(json.dumps(data))
    with pytest.raises(CardValidationError, match="edited after export"):
        zoo.load(card.name, zoo=root)


def test_renamed_entry_folder_is_refused(tiny_entry):
    root, card, _ = tiny_entry
    os.rename(root / card.name, root / "mlp-mnist.other")
    with pytest.raises(CardValidationError, match=r"lives in folder 'mlp-mnist\.other'"):
        zoo.load("mlp-mnist.other", zoo=root)


def test_one_flipped_byte_is_a_hash_error_naming_file_and_both_hashes(tiny_entry):
    root, card, _ = tiny_entry
    weights = root / card.name / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ZooIntegrityError) as err:
        zoo.load(card.name, zoo=root)
    text = str(err.value)
    assert "model.safetensors" in text and card.files[0].sha256 in text
    assert hashlib.sha256(bytes(data)).hexdigest() in text


def test_missing_file_is_a_clear_error(tiny_entry):
    root, card, _ = tiny_entry
    (root / card.name / "model.safetensors").unlink()
    with pytest.raises(ZooIntegrityError, match="is missing"):
        zoo.load(card.name, zoo=root)


def test_pickle_payload_is_refused_without_running(tiny_entry, tmp_path):
    root, card, _ = tiny_entry
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for blob in (pickle.dumps({"w": Payload()}), _torch_save_bytes(tmp_path, {"w": Payload()})):
        with pytest.raises(ZooFormatError, match="refusing a pickle"):
            SafetensorsCodec().decode(blob, source="evil")
    # Also through a card that was re-sealed to point at the pickle (hash matches, format refused).
    blob = pickle.dumps({"w": Payload()})
    _replace_weights(root, card, blob)
    with pytest.raises(ZooFormatError, match="refusing a pickle"):
        zoo.load(card.name, zoo=root)
    assert not marker.exists()


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"", "too short"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!", "not a safetensors file|malformed"),
        ((10**9).to_bytes(8, "little") + b"{}", "not a safetensors file"),
        (b"\x02\x00\x00\x00\x00\x00\x00\x00{}extra", "malformed"),
    ],
)
def test_malformed_safetensors_is_refused(blob, message):
    with pytest.raises(ZooFormatError, match=message):
        SafetensorsCodec().decode(blob, source="bad")


def test_truncated_weights_with_matching_hash_are_refused(tiny_entry):
    root, card, _ = tiny_entry
    data = (root / card.name / "model.safetensors").read_bytes()
    _replace_weights(root, card, data[: len(data) - 100])
    with pytest.raises(ZooFormatError, match="malformed safetensors"):
        zoo.load(card.name, zoo=root)


def test_card_describing_another_architecture_is_refused(tiny_entry):
    root, card, _ = tiny_entry
    data = card.to_dict()
    data["architecture"]["kwargs"] = {"hidden": [16]}
    _write_card(root, Card.from_dict(data, check_seal=False).seal())
    with pytest.raises(ZooFormatError, match="do not fit architecture mlp"):
        zoo.load(card.name, zoo=root)


def test_unknown_name_lists_close_names(tiny_entry):
    root, _, _ = tiny_entry
    with pytest.raises(ModelNotFoundError, match=r"Did you mean 'mlp-mnist.tiny'"):
        zoo.load("mlp-mnist.tiyn", zoo=root)
    assert zoo.list_models("*fashion*", zoo=root) == []
    assert zoo.list_models("mlp-*", zoo=root) == ["mlp-mnist.tiny"]


def test_export_refuses_to_overwrite_unless_asked(tiny_entry):
    root, card, model = tiny_entry
    kwargs = dict(
        name=card.name,
        architecture="mlp",
        architecture_kwargs={"hidden": [8]},
        dataset="mnist",
        recipe=None,
        zoo=root,
    )
    with pytest.raises(FileExistsError, match="overwrite=True"):
        zoo.export(model, **kwargs)
    zoo.export(model, overwrite=True, **kwargs)
    assert zoo.list_models(zoo=root) == [card.name]
    assert [p.name for p in root.iterdir()] == [card.name]  # no staging or retired folders left


def test_crash_during_export_leaves_no_entry(tiny_entry, monkeypatch):
    root, card, model = tiny_entry
    calls = []

    def crash_on_card(path, data):
        calls.append(path)
        if path.name == "card.json":
            raise OSError(28, "No space left on device")
        atomic_write_bytes(path, data)

    monkeypatch.setattr(export_mod, "atomic_write_bytes", crash_on_card)
    with pytest.raises(OSError, match="No space left"):
        zoo.export(
            model,
            name="mlp-mnist.crashed",
            architecture="mlp",
            architecture_kwargs={"hidden": [8]},
            dataset="mnist",
            recipe=None,
            zoo=root,
        )
    assert len(calls) == 2  # weights were written before the crash
    assert zoo.list_models(zoo=root) == [card.name]
    assert sorted(p.name for p in root.iterdir()) == [card.name]


def test_atomic_write_keeps_old_content_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def boom(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(target, b"new content")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_half_written_staging_folder_is_never_listed(tiny_entry):
    root, card, _ = tiny_entry
    staging = root / ".staging-mlp-mnist.half-abc"
    staging.mkdir()
    (staging / "card.json").write_text(card.to_json())
    assert zoo.list_models(zoo=root) == [card.name]


def test_unknown_codec_and_structure_are_clear(tiny_entry):
    root, card, _ = tiny_entry
    data = card.to_dict()
    data["files"][0]["format"] = "huffman-v9"
    _write_card(root, Card.from_dict(data, check_seal=False).seal())
    with pytest.raises(ZooFormatError, match="unknown weight format 'huffman-v9'"):
        zoo.load(card.name, zoo=root)
    data = card.to_dict()
    data["structure"] = {"kind": "channels-v9"}
    _write_card(root, Card.from_dict(data, check_seal=False).seal())
    with pytest.raises(ZooFormatError, match="structure kind 'channels-v9' is not known"):
        zoo.load(card.name, zoo=root)


def test_registered_codec_is_used_by_the_loader(tiny_entry):
    """A later codec (e.g. fp16) plugs in through register_codec and round-trips through zoo.load."""
    root, card, model = tiny_entry

    class Float16Codec(SafetensorsCodec):
        name = "test-fp16"

        def encode(self, tensors, metadata):
            return super().encode({k: v.half() for k, v in tensors.items()}, metadata)

        def decode(self, data, source):
            return {k: v.float() for k, v in super().decode(data, source).items()}

    zoo.register_codec(Float16Codec())
    blob = Float16Codec().encode(model.state_dict(), {})
    _replace_weights(root, card, blob, fmt="test-fp16")
    loaded = zoo.load(card.name, zoo=root)
    assert torch.equal(loaded.head.weight, model.head.weight.half().float())


# helpers -----------------------------------------------------------------------------------------


def _torch_save_bytes(tmp_path, obj) -> bytes:
    path = tmp_path / "obj.pt"
    torch.save(obj, path)
    return path.read_bytes()


def _write_card(root, card: Card) -> None:
    (root / card.name / "card.json").write_text(card.to_json())


def _replace_weights(root, card: Card, blob: bytes, fmt: str = "safetensors") -> None:
    """Replace the weights and re-seal the card with their hash, as an attacker or a buggy tool would."""
    (root / card.name / "model.safetensors").write_bytes(blob)
    data = card.to_dict()
    data["files"][0].update(sha256=hashlib.sha256(blob).hexdigest(), bytes=len(blob), format=fmt)
    _write_card(root, Card.from_dict(data, check_seal=False).seal())
