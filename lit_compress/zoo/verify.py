"""Re-measure zoo entries and compare with their cards.

Tolerances: parameter counts, MACs, file bytes and hashes must match exactly; the test error count may
differ by at most ``error_tolerance`` images (default 0: on the same kind of CPU evaluation is
deterministic; a different BLAS may flip a borderline image, hence the knob). The recipe's sha256 must
match the committed config when that config is present.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lit_compress.zoo.card import Card
from lit_compress.zoo.errors import ZooError
from lit_compress.zoo.evaluate import evaluate_on
from lit_compress.zoo.export import REPO_ROOT, dynamic_macs, measure_entry
from lit_compress.zoo.loader import load
from lit_compress.zoo.registry import list_models
from lit_compress.zoo.storage import sha256_file


@dataclass
class VerifyResult:
    name: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    measured: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0


def _compare(problems: list[str], what: str, card_value, measured) -> None:
    if card_value != measured:
        problems.append(f"{what}: card {card_value}, measured {measured}")


def _recipe_file(card: Card) -> Path | None:
    """The committed recipe: at its repo path in a checkout, under ``lit_compress/_configs`` in a wheel."""
    if not card.recipe.path:
        return None
    shipped = Path(__file__).resolve().parents[1] / "_configs" / Path(card.recipe.path).name
    return next((p for p in (REPO_ROOT / card.recipe.path, shipped) if p.is_file()), None)


def verify_entry(
    name: str,
    zoo: str | Path | None = None,
    data_dir: str | Path | None = None,
    error_tolerance: int = 0,
    check_latency: bool = False,
) -> VerifyResult:
    start = time.perf_counter()
    problems: list[str] = []
    try:
        model, card = load(name, zoo, return_card=True)
    except ZooError as err:
        return VerifyResult(name, False, [str(err)], seconds=time.perf_counter() - start)
    metrics = evaluate_on(model, card.dataset.name, card.dataset.split, data_dir=data_dir)
    params, macs, _ = measure_entry(model, card.dataset.input_shape)
    macs, _ = dynamic_macs(model, macs, card.dataset.name, data_dir)
    if abs(metrics.errors - card.metrics.errors) > error_tolerance:
        problems.append(
            f"test errors: card {card.metrics.errors}, measured {metrics.errors} "
            f"(tolerance {error_tolerance})"
        )
    if abs(metrics.top1 - card.metrics.top1) > (error_tolerance + 0.5) / metrics.num_examples:
        problems.append(f"top-1: card {card.metrics.top1:.4%}, measured {metrics.top1:.4%}")
    _compare(problems, "test examples", card.metrics.num_examples, metrics.num_examples)
    _compare(problems, "params.dense", card.params.dense, params.dense)
    _compare(problems, "params.nonzero", card.params.nonzero, params.nonzero)
    _compare(problems, "macs.dense", card.macs.dense, macs.dense)
    _compare(problems, "macs.effective", card.macs.effective, macs.effective)
    _compare(problems, "bytes.fp32", card.bytes.fp32, 4 * params.dense)
    _compare(problems, "bytes.file", card.bytes.file, sum(f.bytes for f in card.files))
    # Wall-clock time depends on the machine and its load: re-timed only on request (``--latency``).
    claims = (card.latency or []) if check_latency else []
    for claimed in claims:
        _check_speedup(problems, model, card, claimed)
    recipe = _recipe_file(card)
    if recipe is not None:
        _compare(problems, f"recipe sha256 ({card.recipe.path})", card.recipe.sha256, sha256_file(recipe))
    measured = {
        "top1": metrics.top1,
        "errors": metrics.errors,
        "params_nonzero": params.nonzero,
        "macs_effective": macs.effective,
    }
    return VerifyResult(name, not problems, problems, measured, time.perf_counter() - start)


def _check_speedup(problems: list[str], model, card: Card, claimed) -> None:
    """Wall-clock time is not reproducible to the digit: at least half of a claimed speed-up must hold."""
    if claimed.speedup <= 1.0:
        return
    from lit_compress.zoo.evaluate import timing_images
    from lit_compress.zoo.latency import card_layouts, measure_card_latency

    (measured,) = measure_card_latency(
        model,
        card.architecture.name,
        card.architecture.kwargs,
        card.dataset.input_shape,
        batch_sizes=(claimed.batch_size,),
        threads=claimed.threads,
        rounds=3,
        inputs=timing_images(model, card.dataset.name),
        layouts=card_layouts(claimed.reference),
    )
    # At least half of the claimed gain must remain (a claimed 1.6x needs >= 1.3x now).
    required = 1.0 + 0.5 * (claimed.speedup - 1.0)
    if measured.speedup < required:
        problems.append(
            f"latency at batch {claimed.batch_size}: card claims {claimed.speedup:.2f}x faster than the "
            f"dense reference, measured {measured.speedup:.2f}x (at least {required:.2f}x required; "
            f"{measured.ms:.3f} ms vs {measured.reference_ms:.3f} ms)"
        )


def verify(
    pattern: str = "*",
    zoo: str | Path | None = None,
    data_dir: str | Path | None = None,
    error_tolerance: int = 0,
    check_latency: bool = False,
) -> list[VerifyResult]:
    """Verify every entry matching ``pattern``; an empty zoo is an error (nothing was checked)."""
    names = list_models(pattern, zoo)
    if not names:
        raise ZooError(f"no zoo entries match {pattern!r}; nothing to verify")
    return [verify_entry(n, zoo, data_dir, error_tolerance, check_latency) for n in names]
