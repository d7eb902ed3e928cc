"""Where the zoo lives and which entries it holds.

An entry is a folder ``<zoo>/<name>/`` holding ``card.json`` and the files the card lists. Folders whose
name starts with ``.`` are staging areas of an export in progress and are never listed.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from pathlib import Path

from lit_compress.zoo.card import Card
from lit_compress.zoo.errors import CardValidationError, ModelNotFoundError

CARD_FILE = "card.json"
ENV_VAR = "LIT_COMPRESS_ZOO"
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def zoo_dir(path: str | Path | None = None) -> Path:
    """The zoo folder: ``path``, else ``$LIT_COMPRESS_ZOO``, else the copy shipped in the wheel,
    else the ``zoo/`` folder of a source checkout."""
    if path is not None:
        return Path(path)
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    shipped = _PACKAGE_ROOT / "_zoo_entries"
    if shipped.is_dir():
        return shipped
    return _PACKAGE_ROOT.parent / "zoo"


def entry_dir(name: str, root: str | Path | None = None) -> Path:
    return zoo_dir(root) / name


def _entry_names(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / CARD_FILE).is_file())


def list_models(pattern: str = "*", zoo: str | Path | None = None) -> list[str]:
    """Entry names matching a shell-style ``pattern`` (e.g. ``"*mnist*"``), sorted."""
    return [n for n in _entry_names(zoo_dir(zoo)) if fnmatch.fnmatchcase(n, pattern)]


def card(name: str, zoo: str | Path | None = None) -> Card:
    """The validated card of entry ``name``; a missing name lists the closest existing ones."""
    root = zoo_dir(zoo)
    path = root / name / CARD_FILE
    if not path.is_file():
        names = _entry_names(root)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ModelNotFoundError(
            f"no zoo entry named {name!r} in {root}.{hint} "
            f"Available: {', '.join(names) if names else '(none)'}; see `lit-compress zoo list`."
        )
    loaded = Card.from_json(path.read_bytes(), source=str(path))  # bytes: bad UTF-8 is a card error
    if loaded.name != name:
        raise CardValidationError(
            f"{path}: the card names itself {loaded.name!r} but lives in folder {name!r}; "
            "entries must not be renamed by hand (re-export under the new name)."
        )
    return loaded


def all_cards(pattern: str = "*", zoo: str | Path | None = None) -> list[Card]:
    return [card(n, zoo) for n in list_models(pattern, zoo)]
