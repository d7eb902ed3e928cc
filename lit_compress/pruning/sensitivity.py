"""Sensitivity analysis (Distiller-style): prune one layer at a time, measure the error, plan a budget.

Which layers can take how much pruning is the question behind every per-layer sparsity in the literature
(Han et al. keep the first conv denser; Distiller's sensitivity analysis makes it a measurement). Here::

    table = sensitivity_analysis(pl_module, classification_error(val_loader), sparsities=[0.5, 0.8, 0.9])
    table["net.fc1"][0.9]                      # validation error with only net.fc1 pruned to 90%
    plan = plan_from_sensitivity(table, budget=0.9)  # {"net.fc1": 0.91, "net.fc2": 0.85, ...}
    Pruning(sparsity=0.9, layer_sparsity=plan)   # the plan is Pruning's layer_sparsity format
    save_plan(plan, "plan.json")                 # a plain {layer: sparsity} mapping, also valid YAML

1. :func:`sensitivity_analysis`: scores the targeted layers once with any registered criterion on the
   unpruned model, then for each layer alone and each sparsity prunes that layer (layerwise masks, exactly
   the masks :class:`~lit_compress.pruning.callback.Pruning` would choose in a one-shot event) on a copy of
   the model, calls ``evaluate(copy) -> error`` and restores the layer. Criteria that propose compensating
   updates (OBS / WoodFisher) are re-scored per (layer, sparsity) and their update is applied too.
2. :func:`plan_from_sensitivity`: per-layer sparsities for a global budget that minimise the sum of the
   measured single-layer error increases (or equalise them), exact to the weight (algorithm in its
   docstring).
3. :func:`plot_sensitivity`: error vs sparsity per layer (matplotlib, optional dependency).

Run as ``python -m lit_compress.pruning.sensitivity --zoo lenet_300_100-mnist.dense --budget 0.9`` (see
:func:`main`) on a zoo entry or a registered model and a dataset's held-out validation images.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fnmatch
import itertools
import json
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_compress.pruning import neuron_criteria as _neuron_criteria  # noqa: F401  (registers criteria)
from lit_compress.pruning.criteria import Criterion, ScoringContext, get_criterion
from lit_compress.pruning.masks import layerwise_masks
from lit_compress.targets import DEFAULT_TYPES, TargetSpec, select_parameters

__all__ = [
    "ALLOCATIONS",
    "DEFAULT_SPARSITIES",
    "SensitivityTable",
    "classification_error",
    "format_table",
    "lightning_validation_error",
    "load_plan",
    "main",
    "plan_from_sensitivity",
    "plot_sensitivity",
    "save_plan",
    "sensitivity_analysis",
    "sparsity_at_increase",
]

DEFAULT_SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
_JSON_FORMAT = "lit_compress.sensitivity/1"

Evaluate = Callable[[nn.Module], float]


# ----------------------------------------------------------------------------------------- validation


def _fraction(value: Any, what: str, hint: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ValueError(
            f"{what} must be a number in [0, 1) (0.9 = 90% of the weights pruned), got {value!r}."
            + (f" {hint}" if hint else "")
        )
    return float(value)


def _check_sparsities(sparsities: Any) -> list[float]:
    if isinstance(sparsities, (str, bytes)) or not isinstance(sparsities, Iterable):
        raise TypeError(f"sparsities must be a list of numbers in [0, 1), got {sparsities!r}")
    values = sorted({_fraction(s, "each sparsity") for s in sparsities})
    if not any(values):
        raise ValueError(
            f"sparsities must contain at least one value in (0, 1), got {list(sparsities)!r}; "
            f"e.g. {list(DEFAULT_SPARSITIES)}"
        )
    return values


def _as_error(value: Any, what: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"evaluate(model) must return one number (the error), got a tensor of shape "
                f"{tuple(value.shape)} for {what}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(
            f"evaluate(model) must return a finite number (the error, lower is better), got {value!r} for "
            f"{what}. Hint: classification_error(val_loader) returns the misclassified fraction."
        )
    return float(value)


def _layer(fqn: str) -> str:
    return fqn.rsplit(".", 1)[0] if "." in fqn else ""


# -------------------------------------------------------------------------------------------- table


class SensitivityTable(dict):
    """``{layer: {sparsity: error}}``: a plain dict (index it, iterate it, compare it) with metadata.

    Every row starts at sparsity 0.0, the unpruned model's error (measured once: :attr:`baseline`).
    Layers are module FQNs inside the analysed model (``"net.fc1"`` when a LightningModule was analysed,
    ``"fc1"`` for its bare ``net``).

    Attributes:
        baseline: error of the unpruned model.
        sizes: layer -> number of weights in the analysed parameter (for budgets over weights).
        criterion: name of the criterion that chose the pruned weights.
        parameter: ``"weight"`` or ``"bias"``.
    """

    def __init__(
        self,
        errors: Mapping[str, Mapping[float, float]],
        baseline: float,
        sizes: Mapping[str, int],
        criterion: str = "magnitude",
        parameter: str = "weight",
    ) -> None:
        rows = {
            str(layer): {float(s): float(e) for s, e in sorted(row.items())} for layer, row in errors.items()
        }
        super().__init__(rows)
        missing = [layer for layer in rows if layer not in sizes]
        if missing:
            raise ValueError(f"SensitivityTable: sizes has no entry for layers {missing}")
        self.baseline = float(baseline)
        self.sizes = {str(k): int(v) for k, v in sizes.items() if k in rows}
        self.criterion = str(criterion)
        self.parameter = str(parameter)

    def __repr__(self) -> str:
        return (
            f"SensitivityTable({dict(self)!r}, baseline={self.baseline!r}, sizes={self.sizes!r}, "
            f"criterion={self.criterion!r}, parameter={self.parameter!r})"
        )

    def sparsities_at(self, increase: float) -> dict[str, float]:
        """Layer -> :func:`sparsity_at_increase` of its row (what each layer tolerates alone)."""
        return {layer: sparsity_at_increase(row, self.baseline, increase) for layer, row in self.items()}

    def to_json_dict(self) -> dict[str, Any]:
        """JSON-ready data (sparsities become strings: JSON object keys are strings)."""
        return {
            "format": _JSON_FORMAT,
            "criterion": self.criterion,
            "parameter": self.parameter,
            "baseline": self.baseline,
            "sizes": dict(self.sizes),
            "errors": {layer: {repr(s): e for s, e in row.items()} for layer, row in self.items()},
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> SensitivityTable:
        if not isinstance(data, Mapping) or data.get("format") != _JSON_FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(
                f"not a lit_compress sensitivity table: expected format {_JSON_FORMAT!r}, found {found!r}. "
                "Hint: write it with SensitivityTable.save(path)."
            )
        errors = {
            layer: {float(s): float(e) for s, e in row.items()} for layer, row in data["errors"].items()
        }
        return cls(
            errors,
            data["baseline"],
            data["sizes"],
            data.get("criterion", "?"),
            data.get("parameter", "weight"),
        )

    def save(self, path: str | Path) -> Path:
        """Write the table as JSON (floats round-trip exactly)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> SensitivityTable:
        return cls.from_json_dict(json.loads(Path(path).read_text()))


def _envelope(row: Mapping[float, float], baseline: float) -> tuple[list[float], list[float]]:
    """(sparsities, running maximum of the errors), starting at (0, baseline) when the row has no 0.0."""
    points = sorted((float(k), float(v)) for k, v in row.items())
    if not points or points[0][0] > 0.0:
        points.insert(0, (0.0, float(baseline)))
    xs, ys, top = [], [], -math.inf
    for x, y in points:
        top = max(top, y)
        xs.append(x)
        ys.append(top)
    return xs, ys


def sparsity_at_increase(row: Mapping[float, float], baseline: float, increase: float) -> float:
    """The largest sparsity at which one layer's error stays within ``baseline + increase``.

    The error curve is the running maximum of the measured errors over increasing sparsity (a dip after a
    rise, noise of a finite validation set, is not trusted), linearly interpolated between the tested
    sparsities and never extrapolated beyond the largest one. 0.0 when the curve starts above the level.
    """
    xs, ys = _envelope(row, baseline)
    level = float(baseline) + float(increase)
    if ys[0] > level:
        return 0.0
    for i in range(1, len(xs)):
        if ys[i] > level:
            return xs[i - 1] + (level - ys[i - 1]) / (ys[i] - ys[i - 1]) * (xs[i] - xs[i - 1])
    return xs[-1]


# ---------------------------------------------------------------------------------------- evaluators


def classification_error(
    dataloader: Iterable[Any], max_batches: int | None = None, device: torch.device | str | None = None
) -> Evaluate:
    """``evaluate(model)`` = misclassified fraction of ``(x, y)`` batches: ``model(x).argmax(1) != y``.

    Works for any module whose forward returns logits, a LightningModule such as
    :class:`~lit_compress.models.ImageClassifier` included. The model runs in eval mode under
    ``torch.inference_mode`` (its mode is restored); batches move to ``device`` (default: the device of the
    model's first parameter). ``max_batches`` limits the batches per evaluation.
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(
            f"classification_error: max_batches must be a positive int or None, got {max_batches!r}"
        )

    def evaluate(model: nn.Module) -> float:
        target = torch.device(device) if device is not None else next(model.parameters()).device
        was_training = model.training
        model.eval()
        wrong = total = 0
        try:
            with torch.inference_mode():
                for batch in itertools.islice(dataloader, max_batches):
                    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                        raise ValueError(
                            "classification_error: batches must be (inputs, labels) pairs, got "
                            f"{type(batch).__name__}. Hint: write your own evaluate(model) -> error."
                        )
                    x, y = batch[0].to(target), batch[1].to(target)
                    wrong += int((model(x).argmax(dim=1) != y).sum())
                    total += int(y.numel())
        finally:
            model.train(was_training)
        if total == 0:
            raise ValueError("classification_error: the dataloader yielded no examples")
        return wrong / total

    return evaluate


def lightning_validation_error(
    dataloader: Any,
    metric: str = "val/acc",
    higher_is_better: bool = True,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> Evaluate:
    """``evaluate(model)`` through the LightningModule's own ``validation_step``: a fresh
    ``Trainer(**trainer_kwargs).validate(model, dataloaders=dataloader)``, returning ``1 - metric`` when
    ``higher_is_better`` (an accuracy) or ``metric`` itself (a loss, an error rate).

    Slower than :func:`classification_error` (one Trainer per evaluation) but any logged metric works.
    Defaults: CPU, one device, no logger, checkpoints, progress bar or model summary.
    """
    if not isinstance(metric, str) or not metric:
        raise ValueError(f"lightning_validation_error: metric must be a logged metric name, got {metric!r}")

    def evaluate(model: nn.Module) -> float:
        import lightning.pytorch as L

        kwargs: dict[str, Any] = {
            "accelerator": "cpu",
            "devices": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        }
        kwargs.update(trainer_kwargs or {})
        results = L.Trainer(**kwargs).validate(model, dataloaders=dataloader, verbose=False)
        logged = results[0] if results else {}
        if metric not in logged:
            raise ValueError(
                f"lightning_validation_error: validation logged no {metric!r}; logged: {sorted(logged)}. "
                "Hint: pass metric= one of those (and higher_is_better=False for a loss)."
            )
        value = float(logged[metric])
        return 1.0 - value if higher_is_better else value

    return evaluate


# ------------------------------------------------------------------------------------------ analysis


def _batches_factory(batches: Any, count: int) -> Callable[[], Iterable[Any]]:
    if callable(batches):
        return lambda: itertools.islice(batches(), count)
    if isinstance(batches, Iterable):
        return lambda: itertools.islice(iter(batches), count)
    raise TypeError(
        f"batches must be a DataLoader, a list of batches or a zero-argument callable returning an iterable, "
        f"got {type(batches).__name__}"
    )


def _scoring_context(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    criterion: Criterion,
    loss_fn: Callable[[Any], Tensor] | None,
    batches: Any,
    data_batches: int,
    seed: int,
) -> ScoringContext:
    factory = None
    if criterion.needs_data:
        if batches is None:
            raise ValueError(
                f"criterion {criterion.name!r} needs data: pass batches= (a DataLoader of training batches "
                "or a callable returning one) and loss_fn= (batch -> scalar loss). Hint: or use magnitude."
            )
        if loss_fn is None:
            if not callable(getattr(model, "training_step", None)):
                raise ValueError(
                    f"criterion {criterion.name!r} needs loss_fn= (batch -> scalar loss): the model has no "
                    "training_step to take the loss from."
                )
            from lit_compress.pruning.callback import scoring_loss_fn

            loss_fn = scoring_loss_fn(model)
        factory = _batches_factory(batches, data_batches)
    return ScoringContext(
        model=model, params=params, masks={}, loss_fn=loss_fn, batches=factory, generator_seed=seed, step=0
    )


def sensitivity_analysis(
    model: nn.Module,
    evaluate: Evaluate,
    sparsities: Sequence[float] = DEFAULT_SPARSITIES,
    criterion: str | Criterion = "magnitude",
    criterion_args: Mapping[str, Any] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    types: Sequence[str] | None = None,
    parameter: str = "weight",
    loss_fn: Callable[[Any], Tensor] | None = None,
    batches: Any = None,
    data_batches: int = 8,
    seed: int = 0,
    inplace: bool = False,
    verbose: bool = False,
) -> SensitivityTable:
    """Error of ``model`` with each targeted layer alone pruned to each sparsity.

    Args:
        model: the trained network (a LightningModule is fine; layer names are FQNs inside it). Never
            modified unless ``inplace``.
        evaluate: ``evaluate(model) -> error`` (lower is better), e.g. :func:`classification_error` or
            :func:`lightning_validation_error` on held-out validation data (not the test set).
        sparsities: sparsities in [0, 1) to try per layer (sorted; 0.0 is always in the table).
        criterion, criterion_args: any registered pruning criterion (name, dotted path or instance).
        include, exclude, types, parameter: the targets, as in ``Pruning``
            (:class:`~lit_compress.targets.TargetSpec`).
        loss_fn, batches, data_batches: data for data-dependent criteria: ``batches`` is a DataLoader, a
            list or a callable returning an iterable (its first ``data_batches`` batches are used, already
            on the model's device); ``loss_fn`` defaults to the module's ``training_step`` loss.
        seed: the scoring context's generator seed (the random criterion).
        inplace: prune ``model``'s own parameters and restore them bit-exactly after each layer instead of
            working on a deep copy (for models too large to copy; ``evaluate`` then sees ``model`` itself).
        verbose: print one line per layer.

    Returns:
        :class:`SensitivityTable` ``{layer: {sparsity: error}}`` with the baseline and layer sizes.

    Scores come from the unpruned model, computed once for every target (a criterion scores each weight
    with the rest of the network dense, which is exactly the single-layer setting); criteria with a
    compensating update are re-scored for each (layer, sparsity) because their update consumes the
    scoring state.
    """
    if not callable(evaluate):
        raise TypeError(
            f"evaluate must be a callable model -> error, got {type(evaluate).__name__}. "
            "Hint: evaluate=classification_error(val_loader)."
        )
    values = _check_sparsities(sparsities)
    if isinstance(data_batches, bool) or not isinstance(data_batches, int) or data_batches < 1:
        raise ValueError(f"data_batches must be a positive int, got {data_batches!r}")
    crit = get_criterion(criterion, **dict(criterion_args or {}))
    spec = TargetSpec(
        include=tuple(include or ("*",)),
        exclude=tuple(exclude or ()),
        types=tuple(types or DEFAULT_TYPES),
        parameter=parameter,
    )
    params = select_parameters(model, spec)
    ctx = _scoring_context(model, params, crit, loss_fn, batches, data_batches, seed)
    compensates = type(crit).update_weights is not Criterion.update_weights
    work = model if inplace else copy.deepcopy(model)
    work_params = dict(work.named_parameters())
    baseline = _as_error(evaluate(work), "the unpruned model")
    if verbose:
        print(f"[lit_compress] sensitivity: baseline error {baseline:.6g} ({crit.name})", file=sys.stderr)
    scores = None if compensates else crit.scores(ctx)
    errors: dict[str, dict[float, float]] = {}
    for fqn, param in params.items():
        layer = _layer(fqn)
        target = work_params[fqn]
        original = target.detach().clone()
        row = {0.0: baseline}
        try:
            for sparsity in values:
                if sparsity == 0.0:
                    continue
                with torch.no_grad():
                    target.copy_(original)
                if compensates:
                    single = dataclasses.replace(ctx, params={fqn: param})
                    score = crit.scores(single)[fqn]
                else:
                    single, score = ctx, scores[fqn]  # type: ignore[index]
                mask = layerwise_masks({fqn: score}, {fqn: sparsity})[fqn].to(target.device)
                with torch.no_grad():
                    if compensates:
                        updated = crit.update_weights(single, {fqn: mask})
                        if updated and fqn in updated:
                            target.copy_(updated[fqn].to(target.device, target.dtype))
                    target.masked_fill_(~mask, 0.0)
                row[sparsity] = _as_error(evaluate(work), f"{layer!r} at sparsity {sparsity}")
        finally:
            with torch.no_grad():
                target.copy_(original)
        errors[layer] = row
        if verbose:
            cells = ", ".join(f"{s:g}: {e:.4g}" for s, e in row.items())
            print(f"[lit_compress] sensitivity: {layer} -> {cells}", file=sys.stderr)
    sizes = {_layer(fqn): p.numel() for fqn, p in params.items()}
    return SensitivityTable(errors, baseline, sizes, crit.name, parameter)


# ---------------------------------------------------------------------------------------------- plan


def _escape_glob(name: str) -> str:
    """A glob matching exactly ``name`` (``Pruning.layer_sparsity`` keys are fnmatch patterns)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _allocate(lo: list[float], hi: list[float], limits: list[int], target: int) -> list[int]:
    """Integer counts with sum ``target``, each in ``[floor(lo_l), limits_l]``, as close to ``hi`` as the
    total allows: the remainder after ``floor(lo)`` is shared in proportion to what each layer is owed
    (``hi_l - floor(lo_l)``), then the last few weights go by largest fractional share."""
    counts = [math.floor(x) for x in lo]
    remaining = target - sum(counts)
    owed = [max(h - c, 0.0) for h, c in zip(hi, counts)]
    total_owed = sum(owed)
    if remaining <= 0 or total_owed <= 0:
        return counts
    shares = [o * remaining / total_owed for o in owed]
    for i, share in enumerate(shares):
        add = min(math.floor(share), limits[i] - counts[i])
        counts[i] += add
        remaining -= add
    order = sorted(range(len(counts)), key=lambda i: (-(shares[i] - math.floor(shares[i])), -owed[i], i))
    while remaining > 0:
        progressed = False
        for i in order:
            if remaining and counts[i] < limits[i]:
                counts[i] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # pragma: no cover - excluded by the reachability check
            raise RuntimeError("plan_from_sensitivity: could not distribute the budget")
    return counts


ALLOCATIONS = ("min_total_increase", "equal_increase")


def _error_at(xs: list[float], ys: list[float], sparsity: float) -> float:
    """The interpolated curve ``(xs, ys)`` at ``sparsity`` (``xs[0] <= sparsity <= xs[-1]``)."""
    for i in range(1, len(xs)):
        if sparsity <= xs[i]:
            span = xs[i] - xs[i - 1]
            return ys[i] if span == 0 else ys[i - 1] + (sparsity - xs[i - 1]) / span * (ys[i] - ys[i - 1])
    return ys[-1]


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of points sorted by x (collinear middle points dropped)."""
    hull: list[tuple[float, float]] = []
    for p in points:
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (y1 - y0) * (p[0] - x0) >= (p[1] - y0) * (x1 - x0):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _min_total_increase(
    curves: list[tuple[list[float], list[float]]], limit: list[float], n: list[int], target: int
) -> list[float]:
    """Pruned weights per layer minimising the sum of the layers' (convexified) error increases."""
    segments = []  # (increase per pruned weight, layer, weights in the segment)
    for i, (xs, ys) in enumerate(curves):
        points = [(x * n[i], y) for x, y in zip(xs, ys) if x < limit[i]]
        points.append((limit[i] * n[i], _error_at(xs, ys, limit[i])))
        for (w0, c0), (w1, c1) in itertools.pairwise(_lower_hull(points)):
            if w1 > w0:
                segments.append(((c1 - c0) / (w1 - w0), i, w1 - w0))
    segments.sort(key=lambda seg: seg[0])  # stable: a layer's segments keep their order
    taken = [0.0] * len(curves)
    remaining = float(target)
    for _, group in itertools.groupby(segments, key=lambda seg: seg[0]):
        group = list(group)
        length = sum(seg[2] for seg in group)
        share = min(1.0, remaining / length)  # equal marginal cost: shared in proportion to length
        for _, i, size in group:
            taken[i] += size * share
        remaining -= length * share
        if remaining <= 0:
            break
    return taken


def plan_from_sensitivity(
    table: Mapping[str, Mapping[float, float]],
    budget: float,
    *,
    allocation: str = "min_total_increase",
    max_increase: float | None = None,
    sizes: Mapping[str, int] | None = None,
    baseline: float | None = None,
    max_sparsity: float = 0.99,
    caps: Mapping[str, float] | None = None,
    prefix: str = "",
) -> dict[str, float]:
    """Per-layer sparsities that prune exactly ``budget`` of the table's weights.

    Each layer's curve is its measured error vs sparsity made non-decreasing (running maximum: a dip after
    a rise, noise of a finite validation set, is not trusted) and linearly interpolated between the tested
    sparsities; ``increase_l(s)`` is that curve minus the baseline. No layer goes beyond its **limit**: the
    largest tested sparsity (the plan never extrapolates), its cap (first matching ``caps`` glob, else
    ``max_sparsity``) and, with ``max_increase``, the sparsity at which it alone costs ``max_increase``.

    ``allocation``:

    * ``"min_total_increase"`` (default): minimise ``sum_l increase_l(s_l)`` subject to
      ``sum_l n_l s_l = budget * N`` (``n_l`` weights per layer, ``N`` their total), treating single-layer
      increases as additive. With each curve replaced by its lower convex hull over *pruned weights*
      ``n_l s_l``, the optimum is greedy: take curve segments in increasing order of error increase per
      pruned weight (segments of equal cost shared in proportion to their length). Big, robust layers
      take most of the budget, as in a global magnitude ranking, but small layers are protected by their
      measured cost, not by the size of their weights.
    * ``"equal_increase"``: every layer pruned until it alone costs the same increase ``d*``, the smallest
      ``d`` with ``sum_l n_l s_l(d) >= budget * N`` (bisection). Ignores layer sizes: a small layer gets
      as far as a big one, which often costs more accuracy than ``min_total_increase`` for the same
      number of weights (see ``benchmarks/sensitivity.py``).

    **Exact count**: weights per layer ``k_l`` rounded so that ``sum k_l = round(budget * N)`` (largest
    remainders). The plan is ``k_l / n_l``: the ``Pruning`` callback prunes ``round(s * n) = k_l`` weights
    per layer, so the total is ``round(budget * N)``, within half a weight of the budget.

    Single-layer increases do not add up exactly when all layers are pruned together: the plan ranks and
    shares the budget; measure the pruned network (and fine-tune it) to know its error.

    Args:
        table: ``{layer: {sparsity: error}}``, e.g. a :class:`SensitivityTable`.
        budget: global sparsity in [0, 1) over the table's layers' weights.
        allocation: ``"min_total_increase"`` or ``"equal_increase"`` (above).
        max_increase: optional per-layer bound (error units of the table) on what a layer alone may cost.
        sizes: weights per layer; taken from a :class:`SensitivityTable` when omitted.
        baseline: unpruned error; default the table's baseline (or its rows' smallest 0.0 entry).
        max_sparsity: cap for every layer (< 1).
        caps: per-layer caps, layer-name glob -> max sparsity (first match wins; e.g. ``{"conv1": 0.5}``).
        prefix: prepended to every layer name in the plan, e.g. ``"net."`` when the analysis ran on the
            bare network and ``Pruning`` runs on the LightningModule that holds it as ``net``.

    Returns:
        ``{prefix + layer: sparsity}`` for every layer (glob characters in names escaped), ready for
        ``Pruning(layer_sparsity=...)`` and :func:`save_plan`.

    Raises:
        ValueError: the budget exceeds what the layers' limits allow (the message gives the largest
            reachable budget and the limits).
    """
    if not table:
        raise ValueError("plan_from_sensitivity: the table is empty")
    budget = _fraction(budget, "budget")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if max_increase is not None and (
        isinstance(max_increase, bool) or not isinstance(max_increase, numbers.Real) or max_increase < 0
    ):
        raise ValueError(
            f"max_increase must be None or a non-negative number (error units), got {max_increase!r}"
        )
    max_sparsity = _fraction(max_sparsity, "max_sparsity")
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string such as 'net.', got {prefix!r}")
    layers = list(table)
    sizes = sizes if sizes is not None else getattr(table, "sizes", None)
    if sizes is None:
        raise ValueError(
            "plan_from_sensitivity: pass sizes= {layer: number of weights} (a SensitivityTable carries them)"
        )
    missing = [layer for layer in layers if layer not in sizes]
    if missing:
        raise ValueError(
            f"plan_from_sensitivity: sizes has no entry for layers {missing}; it has {list(sizes)}"
        )
    if baseline is None:
        baseline = getattr(table, "baseline", None)
    if baseline is None:
        rows_without = [layer for layer in layers if 0.0 not in table[layer]]
        if rows_without:
            raise ValueError(
                f"plan_from_sensitivity: no baseline: pass baseline= or give every row a 0.0 entry "
                f"(missing in {rows_without})"
            )
        baseline = min(float(table[layer][0.0]) for layer in layers)
    baseline = float(baseline)
    caps = dict(caps or {})
    for pattern, value in caps.items():
        _fraction(value, f"caps[{pattern!r}]")
        if not any(fnmatch.fnmatchcase(layer, pattern) for layer in layers):
            raise ValueError(f"caps pattern {pattern!r} matches no layer of the table; layers: {layers}")

    def limit_of(layer: str) -> float:
        glob_cap = next((float(v) for p, v in caps.items() if fnmatch.fnmatchcase(layer, p)), max_sparsity)
        limit = min(glob_cap, max((float(s) for s in table[layer]), default=0.0))
        if max_increase is not None:
            limit = min(limit, sparsity_at_increase(table[layer], baseline, float(max_increase)))
        return limit

    n = [int(sizes[layer]) for layer in layers]
    limit = [limit_of(layer) for layer in layers]
    limits = [math.floor(s * k + 1e-9) for s, k in zip(limit, n)]  # 1e-9: float noise of s * k
    total = sum(n)
    target = round(budget * total)
    if target > sum(limits):
        bound = "" if max_increase is None else f", max_increase={max_increase:g}"
        raise ValueError(
            f"plan_from_sensitivity: budget {budget:.4g} ({target} of {total} weights) is out of reach: the "
            f"largest tested sparsities, the caps{bound} allow at most {sum(limits) / total:.4g} (limit per "
            f"layer: {dict(zip(layers, (round(x, 4) for x in limit)))}). Hint: test higher sparsities, raise "
            "max_sparsity/caps/max_increase, or lower the budget."
        )
    curves = [_envelope(table[layer], baseline) for layer in layers]
    curves = [(xs, [y - baseline for y in ys]) for xs, ys in curves]
    if allocation == "min_total_increase":
        lo = hi = _min_total_increase(curves, limit, n, target)
    else:
        lo, hi = _equal_increase(table, layers, baseline, limit, n, target)
    counts = _allocate(lo, hi, limits, target)
    return {prefix + _escape_glob(layer): k / size for layer, k, size in zip(layers, counts, n)}


def _equal_increase(
    table: Mapping[str, Mapping[float, float]],
    layers: list[str],
    baseline: float,
    limit: list[float],
    n: list[int],
    target: int,
) -> tuple[list[float], list[float]]:
    """Pruned weights per layer just below and at the smallest common increase that meets ``target``."""

    def pruned(d: float) -> list[float]:
        return [min(sparsity_at_increase(table[x], baseline, d), c) * k for x, c, k in zip(layers, limit, n)]

    if target == 0 or sum(pruned(0.0)) >= target:
        return [0.0] * len(layers), pruned(0.0)
    lo_d = 0.0
    hi_d = max(max(_envelope(table[x], baseline)[1]) for x in layers) - baseline + 1.0
    for _ in range(200):
        mid = 0.5 * (lo_d + hi_d)
        if sum(pruned(mid)) >= target:
            hi_d = mid
        else:
            lo_d = mid
    return pruned(lo_d), pruned(hi_d)


def save_plan(plan: Mapping[str, float], path: str | Path) -> Path:
    """Write a plan as a plain JSON object ``{layer: sparsity}`` (valid YAML too: paste it under
    ``layer_sparsity:`` in a recipe)."""
    checked = _check_plan(plan)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(checked, indent=2) + "\n")
    return path


def load_plan(path: str | Path) -> dict[str, float]:
    """Read a plan written by :func:`save_plan` (or any ``{layer glob: sparsity}`` JSON object)."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not a JSON pruning plan ({err})") from err
    return _check_plan(data, str(path))


def _check_plan(plan: Any, source: str = "plan") -> dict[str, float]:
    if not isinstance(plan, Mapping):
        raise ValueError(f"{source}: a plan is a mapping {{layer glob: sparsity}}, got {type(plan).__name__}")
    out = {}
    for key, value in plan.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{source}: layer names must be non-empty strings, got {key!r}")
        out[key] = _fraction(value, f"{source}[{key!r}]")
    return out


# ---------------------------------------------------------------------------------------------- plot


def plot_sensitivity(
    table: Mapping[str, Mapping[float, float]],
    path: str | Path,
    max_increase: float | None = None,
    title: str | None = None,
    ylabel: str = "validation error",
) -> Path:
    """Error vs sparsity, one line per layer, the baseline (and ``baseline + max_increase``) dotted.

    Needs matplotlib (``pip install 'lit-compress[bench]'``); raises ImportError with that hint otherwise.
    """
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(
            "plot_sensitivity needs matplotlib: pip install 'lit-compress[bench]' (or print format_table)"
        ) from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = getattr(table, "baseline", None)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for layer, row in table.items():
        xs = sorted(row)
        ax.plot([100 * s for s in xs], [row[s] for s in xs], "-o", ms=3, label=layer or "(root)")
    if baseline is not None:
        ax.axhline(baseline, color="grey", lw=1, ls=":", label=f"unpruned ({baseline:.4g})")
        if max_increase is not None:
            ax.axhline(
                baseline + max_increase, color="red", lw=1, ls="--", label=f"+{max_increase:g} tolerance"
            )
    ax.set_xlabel("sparsity of the layer alone, %")
    ax.set_ylabel(ylabel)
    criterion = getattr(table, "criterion", None)
    ax.set_title(title or f"per-layer sensitivity ({criterion or 'pruning'})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_table(table: Mapping[str, Mapping[float, float]], digits: int = 4, percent: bool = False) -> str:
    """A markdown table: one row per layer, one column per sparsity (errors as given, or x100 with %)."""
    columns = sorted({s for row in table.values() for s in row})
    sizes = getattr(table, "sizes", {})
    header = ["layer", "weights", *(f"{100 * s:g}%" for s in columns)]
    rows = []
    for layer, row in table.items():
        cells = [
            f"{100 * row[s]:.{digits}g}" if percent else f"{row[s]:.{digits}g}" if s in row else ""
            for s in columns
        ]
        rows.append([layer or "(root)", str(sizes.get(layer, "")), *cells])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in [header, *rows]]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- CLI


def _datamodule(dataset: str, args: argparse.Namespace):
    from lit_compress.data import FashionMNISTDataModule, MNISTDataModule

    modules = {"mnist": MNISTDataModule, "fashion-mnist": FashionMNISTDataModule}
    if dataset not in modules:
        raise ValueError(f"--dataset must be one of {sorted(modules)}, got {dataset!r}")
    dm = modules[dataset](
        data_dir=None if args.data_dir is None else str(args.data_dir),
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        val_size=args.val_size,
        split_seed=args.split_seed,
        download=False,
    )
    dm.setup("fit")
    return dm


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lit_compress.pruning.sensitivity",
        description="Per-layer pruning sensitivity on held-out validation images, and a plan for a budget.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--zoo", help="zoo entry to analyse, e.g. lenet_300_100-mnist.dense")
    source.add_argument("--model", help="registered model name (see lit_compress.models.list_models())")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="JSON constructor arguments")
    parser.add_argument("--weights", help="state_dict file for --model (.safetensors)")
    parser.add_argument("--dataset", help="mnist or fashion-mnist (default: the zoo card's dataset)")
    parser.add_argument("--data-dir", type=Path, default=None, help="data root ($LIT_COMPRESS_DATA if unset)")
    parser.add_argument("--val-size", type=int, default=5000, help="held-out training images used")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(DEFAULT_SPARSITIES))
    parser.add_argument("--criterion", default="magnitude")
    parser.add_argument("--criterion-args", type=json.loads, default={}, help="JSON criterion arguments")
    parser.add_argument("--data-batches", type=int, default=8, help="training batches for data criteria")
    parser.add_argument("--include", nargs="+", default=None)
    parser.add_argument("--exclude", nargs="+", default=None)
    parser.add_argument("--types", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, help="write the table as JSON")
    parser.add_argument("--plot", type=Path, help="write error vs sparsity as a PNG (needs matplotlib)")
    parser.add_argument("--budget", type=float, help="global sparsity to plan for")
    parser.add_argument(
        "--max-increase",
        type=float,
        default=None,
        help="refuse plans whose per-layer error increase is larger",
    )
    parser.add_argument(
        "--allocation", choices=ALLOCATIONS, default=ALLOCATIONS[0], help="plan_from_sensitivity"
    )
    parser.add_argument("--max-sparsity", type=float, default=0.99)
    parser.add_argument("--prefix", default="net.", help="prefix of plan keys ('net.' for ImageClassifier)")
    parser.add_argument("--plan", type=Path, help="write the plan as JSON (with --budget)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m lit_compress.pruning.sensitivity --zoo ENTRY [--budget B --plan plan.json]``.

    Errors are misclassified fractions of the ``--val-size`` images held out of the training split (the
    datamodules' seeded split, so never the test set). Prints the table (and the plan with ``--budget``).
    """
    args = _parse_args(argv)
    import torch.nn.functional as F

    from lit_compress.models import create_model

    if args.zoo:
        from lit_compress import zoo

        net = zoo.load(args.zoo)
        dataset = args.dataset or zoo.card(args.zoo).dataset.name
    else:
        net = create_model(args.model, weights=args.weights, **args.model_kwargs)
        dataset = args.dataset or "mnist"
    net.eval()
    dm = _datamodule(dataset, args)
    torch.manual_seed(args.seed)
    table = sensitivity_analysis(
        net,
        classification_error(dm.val_dataloader()),
        sparsities=args.sparsities,
        criterion=args.criterion,
        criterion_args=args.criterion_args,
        include=args.include,
        exclude=args.exclude,
        types=args.types,
        loss_fn=lambda batch: F.cross_entropy(net(batch[0]), batch[1]),
        batches=dm.train_dataloader,
        data_batches=args.data_batches,
        seed=args.seed,
        verbose=True,
    )
    print(
        f"Validation error (fraction of {args.val_size} held-out {dataset} training images), "
        f"one layer pruned at a time with {table.criterion}; unpruned {table.baseline:.4f}\n"
    )
    print(format_table(table))
    if args.output:
        print(f"\ntable: {table.save(args.output)}")
    if args.plot:
        try:
            print(f"plot: {plot_sensitivity(table, args.plot, args.max_increase)}")
        except ImportError as err:
            print(f"no plot: {err}")
    if args.budget is not None:
        plan = plan_from_sensitivity(
            table,
            args.budget,
            allocation=args.allocation,
            max_increase=args.max_increase,
            max_sparsity=args.max_sparsity,
            prefix=args.prefix,
        )
        print(f"\nplan for budget {args.budget} ({args.allocation}):")
        print(json.dumps(plan, indent=2))
        if args.plan:
            print(f"plan: {save_plan(plan, args.plan)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
