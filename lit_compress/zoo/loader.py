"""``zoo.load(name)``: check every file's sha256, decode, rebuild the architecture, load strictly."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lit_compress.zoo.card import Card
from lit_compress.zoo.errors import ZooFormatError, ZooIntegrityError
from lit_compress.zoo.registry import card as read_card
from lit_compress.zoo.registry import entry_dir
from lit_compress.zoo.storage import get_codec, sha256_bytes
from lit_compress.zoo.structure import apply_structure


def read_verified(entry: Path, card: Card) -> dict[str, bytes]:
    """Bytes of every file the card lists, each checked against its recorded sha256 and size."""
    blobs = {}
    for f in card.files:
        path = entry / f.path
        if not path.is_file():
            raise ZooIntegrityError(
                f"zoo entry {card.name!r}: file {path} listed in its card is missing; "
                "the entry is incomplete: re-export it or restore the file from git."
            )
        data = path.read_bytes()
        digest = sha256_bytes(data)
        if digest != f.sha256:
            raise ZooIntegrityError(
                f"zoo entry {card.name!r}: sha256 mismatch for {path}: card records {f.sha256}, "
                f"file has {digest} ({len(data)} bytes, card says {f.bytes}). The file is corrupted or "
                "was replaced; restore it from git or re-export the entry."
            )
        blobs[f.path] = data
    return blobs


def decode_state_dict(entry: Path, card: Card) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    blobs = read_verified(entry, card)
    for f in card.files:
        tensors = get_codec(f.format).decode(blobs[f.path], source=str(entry / f.path))
        overlap = set(state) & set(tensors)
        if overlap:
            raise ZooFormatError(f"zoo entry {card.name!r}: tensors {sorted(overlap)} appear in two files")
        state.update(tensors)
    return state


def build_model(card: Card) -> nn.Module:
    """The card's architecture, reshaped by its structure spec, with freshly initialised weights."""
    from lit_compress.models import create_model

    model = create_model(card.architecture.name, **card.architecture.kwargs)
    return apply_structure(model, card.structure)


def load(name: str, zoo: str | Path | None = None, *, return_card: bool = False):
    """Load zoo entry ``name`` as a ready ``nn.Module`` in eval mode (on the CPU).

    Every file's full sha256 is checked on every load; nothing is unpickled.
    With ``return_card=True`` returns ``(model, card)``.
    """
    card = read_card(name, zoo)
    entry = entry_dir(name, zoo)
    state = decode_state_dict(entry, card)
    model = build_model(card)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ZooFormatError(
            f"zoo entry {name!r}: weights do not fit architecture {card.architecture.name} "
            f"{card.architecture.kwargs} (structure {card.structure}): {err}"
        ) from err
    model.eval()
    return (model, card) if return_card else model
