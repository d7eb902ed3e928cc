"""Re-measure the latency of existing zoo cards under the current protocol, and nothing else.

The latency protocol improves (channels-last was offered to the dense reference only after several cards
were written), and an old card's speed-up then flatters its model against a reference that was denied a
faster layout. Re-exporting would retrain nothing but needs the training run's checkpoint; re-timing needs
only the entry: the weights are loaded (hash-checked), timed beside the dense reference with
:func:`~lit_compress.zoo.latency.measure_card_latency` at the card's batch sizes and thread count, and the
card is rewritten with the new ``latency`` and a line in ``notes`` saying when it was re-measured and what
it claimed before. Weights, metrics, MACs and recipe are untouched, so ``zoo verify`` still re-measures
them exactly; the card is re-sealed and replaced atomically.

Wall-clock time depends on the machine's load: run it on a quiet machine.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

from lit_compress.zoo.card import Card, Latency
from lit_compress.zoo.errors import ZooError
from lit_compress.zoo.registry import CARD_FILE, entry_dir, list_models
from lit_compress.zoo.storage import atomic_write_bytes

__all__ = ["RetimeResult", "retime", "retime_entry"]


@dataclass
class RetimeResult:
    name: str
    old: list[Latency]
    new: list[Latency]  # empty when the card has no latency to re-measure
    written: bool


def _summary(latency: list[Latency]) -> str:
    return ", ".join(f"batch {lat.batch_size}: {lat.speedup:.2f}x vs {lat.reference}" for lat in latency)


def retime_entry(
    name: str,
    zoo: str | Path | None = None,
    data_dir: str | Path | None = None,
    *,
    rounds: int = 5,
    repeats: int = 20,
    write: bool = True,
) -> RetimeResult:
    """Re-time entry ``name`` (see the module docstring); ``write=False`` only measures."""
    from lit_compress.zoo.evaluate import timing_images
    from lit_compress.zoo.latency import measure_card_latency
    from lit_compress.zoo.loader import load

    model, card = load(name, zoo, return_card=True)
    old = list(card.latency or [])
    if not old:
        return RetimeResult(name, old, [], written=False)
    threads = {lat.threads for lat in old}
    if len(threads) != 1:
        raise ZooError(
            f"zoo entry {name!r}: its latency entries were timed with different thread counts "
            f"{sorted(threads)}; re-export it instead (lit-compress fit --config <its recipe>)"
        )
    new = measure_card_latency(
        model,
        card.architecture.name,
        card.architecture.kwargs,
        card.dataset.input_shape,
        batch_sizes=tuple(lat.batch_size for lat in old),
        threads=threads.pop(),
        rounds=rounds,
        repeats=repeats,
        inputs=timing_images(model, card.dataset.name, data_dir),
    )
    if write:
        _write_card(card, new, zoo)
    return RetimeResult(name, old, new, written=write)


def _write_card(card: Card, new: list[Latency], zoo: str | Path | None) -> None:
    today = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    line = (
        f"Latency re-measured {today} by `lit-compress zoo retime` (current protocol, "
        f"lit_compress.zoo.latency); before: {_summary(card.latency or [])}."
    )
    notes = f"{card.notes}\n{line}" if card.notes else line
    updated = dataclasses.replace(card, latency=new, notes=notes, card_sha256="").seal()
    Card.from_dict(updated.to_dict(), source=f"card {card.name!r}")  # validate before writing
    path = entry_dir(card.name, zoo) / CARD_FILE
    try:
        atomic_write_bytes(path, updated.to_json().encode())
    except OSError as err:  # the card is replaced in one step, so it is still the old one
        raise ZooError(
            f"zoo entry {card.name!r}: cannot rewrite {path} ({err.strerror or err}); the card is unchanged. "
            "Re-time a writable copy of the zoo (--zoo DIR), or measure only (--dry-run)."
        ) from err


def retime(
    pattern: str = "*",
    zoo: str | Path | None = None,
    data_dir: str | Path | None = None,
    *,
    rounds: int = 5,
    repeats: int = 20,
    write: bool = True,
) -> list[RetimeResult]:
    """:func:`retime_entry` for every entry matching ``pattern`` (entries without latency are reported with
    nothing measured); no matching entry is an error."""
    names = list_models(pattern, zoo)
    if not names:
        raise ZooError(f"no zoo entries match {pattern!r}; nothing to re-time")
    return [retime_entry(n, zoo, data_dir, rounds=rounds, repeats=repeats, write=write) for n in names]
