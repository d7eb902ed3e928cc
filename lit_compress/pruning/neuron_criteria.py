"""Neuron-level pruning criteria from activation statistics: maxout win counts and neuron correlations.

Both are weight criteria of the unstructured registry (:mod:`lit_compress.pruning.criteria`), so
``Pruning(criterion="maxout_activity")`` and ``Pruning(criterion="correlation")`` work with every schedule,
scope and ``layer_sparsity`` override. They score from forward activations only (no gradients):

=====================  ==========================================================  =========================
name                   keep-score                                                  paper
=====================  ==========================================================  =========================
``maxout_activity``    how often a piece wins its maxout unit (whole rows)          Moya Rueda et al. 2017
``correlation``        ``|corr(input_i, output_j)|``, sign-consistent first         Sun, Wang & Tang 2016
=====================  ==========================================================  =========================

Shared rules (those of the data-dependent weight criteria):

* the model runs through ``ctx.loss_fn`` on the batches of ``ctx.batches()`` (the callback's training
  batches), under ``torch.no_grad``; forward hooks on the targeted layers collect the statistics;
* by default (``eval_mode=True``) the model is put in eval mode while the statistics are collected:
  dropout noise would blur both the win counts and the correlations, which both papers measure on the
  trained network. ``eval_mode=False`` keeps the caller's mode. Modes, ``requires_grad`` flags, buffers
  and the RNG state are restored afterwards (the scoring session of the weight criteria);
* every statistic (sums *and* counts) goes through ``ctx.all_reduce_mean`` before scores are formed, so
  scores, and hence masks, are identical on every DDP rank.

To use them by name the module must have been imported (``lit_compress.pruning`` does it); a dotted path,
``criterion: lit_compress.pruning.neuron_criteria.CorrelationCriterion``, always works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_compress.pruning.criteria import (
    Criterion,
    ScoringContext,
    _reduce,
    _score_dtype,
    _scoring_session,
    _take,
    register_criterion,
)

__all__ = [
    "CorrelationCriterion",
    "MaxoutActivityCriterion",
    "correlation_scores",
    "maxout_scores",
]

_PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_RANKINGS = ("per_unit", "layer")


def _optional_positive_int(owner: str, arg: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {arg} must be a positive int or None (all batches), got {value!r}")
    return value


def _check_bool(owner: str, arg: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {arg} must be true or false, got {value!r}")
    return value


def _module_name(fqn: str) -> str:
    return fqn.rsplit(".", 1)[0] if "." in fqn else ""


def _rows_alive(ctx: ScoringContext, fqn: str, rows: int) -> Tensor:
    """Per output row, whether any of its weights is still unpruned (True when no mask exists yet)."""
    mask = ctx.masks.get(fqn)
    if mask is None:
        return torch.ones(rows, dtype=torch.bool)
    return mask.detach().reshape(rows, -1).any(dim=1).cpu()


@contextmanager
def _collecting(ctx: ScoringContext, eval_mode: bool) -> Iterator[None]:
    """The weight criteria's scoring session, optionally in eval mode (modes restored afterwards)."""
    with _scoring_session(ctx), torch.no_grad():
        if eval_mode:
            ctx.model.eval()
        yield


def _run_batches(ctx: ScoringContext, num_batches: int | None, owner: str) -> int:
    loss_fn = cast(Callable[[Any], Tensor], ctx.loss_fn)
    count = 0
    for batch in _take(ctx, num_batches, owner):
        loss_fn(batch)
        count += 1
    return count


def _producer(ctx: ScoringContext, fqn: str, owner: str) -> nn.Module:
    module = ctx.model.get_submodule(_module_name(fqn))
    if not isinstance(module, _PRODUCERS):
        raise ValueError(
            f"pruning criterion {owner!r}: target {fqn!r} belongs to a {type(module).__name__}, expected one "
            "of Linear, Conv1d, Conv2d, Conv3d. Hint: restrict types to [Linear] or [Linear, Conv2d]."
        )
    return module


# ------------------------------------------------------------------------------------------ maxout


def maxout_scores(
    freq: Tensor, pieces: int, alive: Tensor | None = None, ranking: str = "per_unit"
) -> Tensor:
    """Per-row keep-scores of a maxout layer from the win frequencies of its pieces.

    Args:
        freq: ``[units * pieces]`` fraction of (example, position) pairs at which each piece won its unit
            (feature ``u * pieces + p`` is piece ``p`` of unit ``u``).
        pieces: pieces per unit ``k``.
        alive: ``[units * pieces]`` bool, False for pieces already pruned (all their weights masked).
        ranking: ``"per_unit"`` or ``"layer"`` (see :class:`MaxoutActivityCriterion`).

    Returns:
        ``[units * pieces]`` float64 scores; dead pieces get -1 (``layer``) or ``-pieces`` (``per_unit``).
    """
    if ranking not in _RANKINGS:
        raise ValueError(f"maxout_activity: ranking must be one of {_RANKINGS}, got {ranking!r}")
    freq = freq.detach().to(torch.float64).cpu()
    alive = torch.ones_like(freq, dtype=torch.bool) if alive is None else alive.cpu().bool()
    if ranking == "layer":
        return torch.where(alive, freq, torch.full_like(freq, -1.0))
    f = freq.view(-1, pieces)
    a = alive.view(-1, pieces)
    key = torch.where(a, f, torch.full_like(f, -1.0))
    # Rank within the unit, ascending activity; equal counts: the lower piece index ranks lower.
    rank = torch.argsort(torch.argsort(key, dim=1, stable=True), dim=1, stable=True)
    n_alive = a.sum(dim=1, keepdim=True)
    level = n_alive - 1 - (rank - (pieces - n_alive))  # 0 = most active alive piece of the unit
    score = f - level.to(torch.float64)
    return torch.where(a, score, torch.full_like(f, -float(pieces))).reshape(-1)


@register_criterion("maxout_activity")
class MaxoutActivityCriterion(Criterion):
    """Maxout neuron pruning: keep the pieces that win their maxout unit most often.

    Every targeted layer (Linear or Conv, ``k * units`` outputs) must feed a
    :class:`~lit_compress.models.maxout.Maxout` module directly (its output tensor is the maxout's input);
    otherwise scoring raises a ValueError naming the layer. Over the scoring batches each forward pass
    counts, per (example, position), which piece ``p`` wins ``max_p x[u * k + p]`` of every unit ``u``
    (``argmax``: on exact ties the lowest piece index wins). ``freq = wins / positions`` per piece, after
    all-reducing wins and positions across DDP ranks.

    A piece is a neuron: a row of the layer's weight (Linear ``[out, in]`` row, conv filter). All weights
    (or the bias entry, with ``parameter="bias"``) of a row share the row's score, so ranking drops whole
    rows; pick a sparsity of ``j / k`` of the layer (``layerwise``) to drop exactly ``j`` pieces per unit
    with ``ranking="per_unit"``; other sparsities cut one row partially at the boundary (ties are pruned
    lowest index first).

    ``ranking``:

    * ``"per_unit"`` (default; the paper's procedure "remove the least active neurons of each maxout
      unit"): within each unit the alive pieces are ranked by ``freq``; ``score = freq - level`` where
      ``level`` is 0 for the unit's most active piece, 1 for the next, ... So the ranking removes the
      least active piece of every unit that has the most alive pieces first, and each unit keeps its most
      active piece until all other pieces of the layer are gone (a unit is never emptied early). With ``k``
      alive pieces everywhere, sparsity ``1/k`` removes exactly the least active piece of every unit.
    * ``"layer"``: ``score = freq`` ranked over the whole layer (least-winning pieces anywhere go first).

    Pieces pruned by an earlier event are excluded from the ranks (they stay pruned through the masks).
    With ``parameter="weight"`` a dropped piece keeps its bias, so it outputs a constant and can still win
    when every other piece of its unit is below it; removing the rows physically (and the bias) is an
    export step, not done here.

    Args:
        num_batches: how many of ``ctx.batches()`` to use; None = all that the callback provides
            (``Pruning(data_batches=...)``). The paper counts over the whole training set.
        ranking: ``"per_unit"`` or ``"layer"`` (above).
        eval_mode: count with the model in eval mode (dropout off), restored afterwards.

    Moya Rueda, Grzeszick & Fink, "Neuron Pruning for Compressing Deep Networks using Maxout
    Architectures", GCPR 2017.
    """

    needs_data = True

    def __init__(self, num_batches: int | None = None, ranking: str = "per_unit", eval_mode: bool = True):
        self.num_batches = _optional_positive_int("maxout_activity", "num_batches", num_batches)
        if ranking not in _RANKINGS:
            raise ValueError(
                f"maxout_activity: ranking must be one of {_RANKINGS}, got {ranking!r}. 'per_unit' drops "
                "the least active piece of each unit first (the paper); 'layer' ranks all pieces together."
            )
        self.ranking = ranking
        self.eval_mode = _check_bool("maxout_activity", "eval_mode", eval_mode)

    def win_frequencies(self, ctx: ScoringContext) -> tuple[dict[str, Tensor], dict[str, int]]:
        """(target FQN -> ``[rows]`` float64 win frequency per piece, target FQN -> pieces per unit)."""
        self._require_data(ctx)
        from lit_compress.models.maxout import Maxout  # lazy: keeps the pruning package import-light

        # Keyed by module name: a layer targeted twice (weight and bias) is hooked and counted once.
        producers = {_module_name(fqn): _producer(ctx, fqn, self.name) for fqn in ctx.params}
        maxouts = {name: m for name, m in ctx.model.named_modules() if isinstance(m, Maxout)}
        if not maxouts:
            raise ValueError(
                f"maxout_activity: the model has no Maxout module (lit_compress.models.maxout.Maxout or a "
                f"subclass), so no targeted layer ({', '.join(producers)}) feeds a maxout. "
                "Hint: use a maxout network such as create_model('maxout_mlp'), or another criterion."
            )
        outputs: dict[int, tuple[str, Tensor]] = {}  # id(output) -> (layer, output) for the current batch
        wins: dict[str, Tensor] = {}
        positions: dict[str, Tensor] = {}
        linked: dict[str, int] = {}  # layer -> pieces of the maxout it feeds
        ran: set[str] = set()

        def producer_hook(layer: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if isinstance(output, Tensor):
                    outputs[id(output)] = (layer, output)
                    ran.add(layer)

            return hook

        def maxout_hook(name: str) -> Callable[..., None]:
            def hook(module: Maxout, args: Any) -> None:
                x = args[0] if args else None
                entry = outputs.get(id(x)) if isinstance(x, Tensor) else None
                if entry is None or entry[1] is not x:
                    return
                layer = entry[0]
                self._count(layer, producers[layer], name, module, x, wins, positions)
                linked[layer] = module.pieces

            return hook

        handles = [m.register_forward_hook(producer_hook(n)) for n, m in producers.items()]
        handles += [m.register_forward_pre_hook(maxout_hook(n)) for n, m in maxouts.items()]
        try:
            with _collecting(ctx, self.eval_mode):
                for batch in _take(ctx, self.num_batches, self.name):
                    outputs.clear()
                    cast(Callable[[Any], Tensor], ctx.loss_fn)(batch)
                outputs.clear()
        finally:
            for handle in handles:
                handle.remove()
        for layer in producers:
            if layer not in ran:
                raise ValueError(
                    f"maxout_activity: layer {layer!r} did not run during the loss computation. "
                    "Hint: exclude it from the targets."
                )
        unlinked = [layer for layer in producers if layer not in linked]
        if unlinked:
            feeding = list(linked)
            raise ValueError(
                f"maxout_activity: layer {unlinked[0]!r} is not followed by a maxout: its output is not the "
                f"input of any Maxout module (Maxout modules: {sorted(maxouts)}). Targeted layers that do "
                f"feed a maxout: {feeding or 'none'}. Hint: target only those, e.g. "
                f"include: {feeding or ['<layers before a Maxout>']} or exclude: {unlinked}."
            )
        layers = list(producers)
        reduced = _reduce(ctx, [wins[n] for n in layers] + [positions[n] for n in layers])
        k = len(layers)
        freq = {n: (reduced[i] / reduced[k + i].clamp_min(1)).cpu() for i, n in enumerate(layers)}
        return (
            {fqn: freq[_module_name(fqn)] for fqn in ctx.params},
            {fqn: linked[_module_name(fqn)] for fqn in ctx.params},
        )

    @staticmethod
    def _count(
        layer: str,
        producer: nn.Module,
        maxout_name: str,
        maxout: nn.Module,
        x: Tensor,
        wins: dict[str, Tensor],
        positions: dict[str, Tensor],
    ) -> None:
        pieces = int(maxout.pieces)
        d = int(maxout.dim) % x.ndim
        want = x.ndim - 1 if isinstance(producer, nn.Linear) else 1
        rows = producer.weight.shape[0]
        if d != want or x.shape[d] != rows:
            raise ValueError(
                f"maxout_activity: Maxout {maxout_name!r} (dim={maxout.dim}) takes the max over dim {d} of "
                f"the output of {layer!r} (shape {tuple(x.shape)}), but that layer's "
                f"{rows} output features are in dim {want}. Hint: set Maxout(dim={want - x.ndim})."
            )
        if rows % pieces:
            raise ValueError(
                f"maxout_activity: layer {layer!r} has {rows} outputs, not a multiple of the "
                f"{pieces} pieces of Maxout {maxout_name!r}."
            )
        units = rows // pieces
        flat = x.detach().movedim(d, -1).reshape(-1, units, pieces)
        winner = flat.argmax(dim=-1) + torch.arange(units, device=x.device) * pieces
        counts = torch.bincount(winner.reshape(-1), minlength=rows).to(torch.float64)
        n = torch.tensor([float(flat.shape[0])], dtype=torch.float64, device=x.device)
        wins[layer] = wins[layer] + counts if layer in wins else counts
        positions[layer] = positions[layer] + n if layer in positions else n

    def scores(self, ctx: ScoringContext) -> dict[str, Tensor]:
        freq, pieces = self.win_frequencies(ctx)
        out = {}
        for fqn, p in ctx.params.items():
            rows = p.shape[0]
            row_scores = maxout_scores(freq[fqn], pieces[fqn], _rows_alive(ctx, fqn, rows), self.ranking)
            shape = (rows,) + (1,) * (p.ndim - 1)
            out[fqn] = row_scores.view(shape).expand(p.shape).to(p.device, _score_dtype(p)).clone()
        return out


# ------------------------------------------------------------------------------------- correlation


def _patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``[N * L, C_in * kh * kw]``: every receptive field of ``conv`` on ``x``, in the weight's layout."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    pad = conv._reversed_padding_repeated_twice  # also set for padding="same" (asymmetric when odd)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class _Moments:
    """Running float64 sums for the correlation of every input feature with every output feature."""

    def __init__(self) -> None:
        self.stats: list[Tensor] | None = None  # n, sum x, sum x^2, sum z, sum z^2, sum z x^T

    def add(self, x: Tensor, z: Tensor) -> None:
        x = x.detach().to(torch.float64)
        z = z.detach().to(torch.float64)
        new = [
            torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device),
            x.sum(0),
            x.square().sum(0),
            z.sum(0),
            z.square().sum(0),
            z.T @ x,
        ]
        self.stats = new if self.stats is None else [a + b for a, b in zip(self.stats, new)]


def _correlation(stats: list[Tensor]) -> Tensor:
    """Pearson correlation ``[out, in]`` from reduced sums; 0 where either side has (near) zero variance."""
    n, sx, sxx, sz, szz, szx = stats
    mx, mz = sx / n, sz / n
    vx = (sxx / n - mx.square()).clamp_min(0)
    vz = (szz / n - mz.square()).clamp_min(0)
    cov = szx / n - mz[:, None] * mx[None, :]
    # Constant features (e.g. always-zero border pixels, dead units) carry no correlation: r = 0.
    ok_x = vx > 1e-12 * (1.0 + mx.square())
    ok_z = vz > 1e-12 * (1.0 + mz.square())
    denom = torch.sqrt(torch.where(ok_z, vz, 1.0)[:, None] * torch.where(ok_x, vx, 1.0)[None, :])
    r = (cov / denom).clamp(-1.0, 1.0)
    return torch.where(ok_z[:, None] & ok_x[None, :], r, torch.zeros_like(r))


def _group_quantiles(values: Tensor, groups: Tensor) -> Tensor:
    """Rank of each entry among its group, ascending ``values`` (ties: lower index first), divided by the
    group's size: in ``[0, 1)``. ``groups`` are non-negative int64 ids; both tensors flat."""
    by_value = torch.argsort(values, stable=True)
    order = by_value[torch.argsort(groups[by_value], stable=True)]  # lexicographic (group, value, index)
    counts = torch.bincount(groups, minlength=int(groups.max()) + 1 if groups.numel() else 1)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(groups)
    ranks[order] = torch.arange(groups.numel()) - starts[groups[order]]
    return ranks.to(torch.float64) / counts[groups].to(torch.float64)


def correlation_scores(
    corr: Tensor,
    weight: Tensor,
    alive: Tensor | None = None,
    sign_consistent: bool = True,
    per_neuron: bool = True,
) -> Tensor:
    """Keep-scores of connections from their correlations (see :class:`CorrelationCriterion`).

    Args:
        corr: ``r`` with the weight's shape (row ``j`` = output neuron ``j``).
        weight: the current weights (only their signs are used).
        alive: bool mask of unpruned weights (None = all).
        sign_consistent: tier 1 (``sign(w) == sign(r) != 0``) outranks tier 0.
        per_neuron: within-(row, sign of r, tier) rank quantiles instead of raw ``|r|``.

    Returns:
        float64 scores with the weight's shape, in ``[0, 3)``; pruned entries get 0.
    """
    shape = weight.shape
    r = corr.detach().to(torch.float64).cpu().reshape(shape[0], -1)
    w = weight.detach().to(torch.float64).cpu().reshape(shape[0], -1)
    live = (
        torch.ones_like(r, dtype=torch.bool)
        if alive is None
        else alive.detach().cpu().bool().reshape(r.shape)
    )
    tier = (
        (torch.sign(w) * torch.sign(r) > 0).to(torch.int64) if sign_consistent else torch.zeros_like(r).long()
    )
    if per_neuron:
        sign_class = (torch.sign(r).to(torch.int64) + 1).clamp(0, 2)  # 0: r<0, 1: r=0, 2: r>0
        rows = torch.arange(r.shape[0]).unsqueeze(1).expand_as(r)
        groups = (rows * 3 + sign_class) * 2 + tier
        groups = torch.where(live, groups, torch.full_like(groups, r.shape[0] * 6))  # pruned: own group
        quality = _group_quantiles(r.abs().reshape(-1), groups.reshape(-1)).view_as(r)
    else:
        quality = r.abs() / 2.0  # in [0, 0.5]: tiers below stay separated by a margin
    score = torch.where(live, quality + 2.0 * tier.to(torch.float64), torch.zeros_like(r))
    return score.reshape(shape)


@register_criterion("correlation")
class CorrelationCriterion(Criterion):
    """Correlation-based connection pruning: keep connections between strongly correlated neurons.

    For a targeted layer with input activations ``x`` (what the layer receives) and pre-activation outputs
    ``z`` (what it returns, bias included), the connection ``w_ji`` from input ``i`` to output ``j`` gets
    the Pearson correlation over the scoring samples::

        r_ji = cov(z_j, x_i) / (std(z_j) * std(x_i))

    accumulated in float64 as sums (``n``, ``sum x``, ``sum x^2``, ``sum z``, ``sum z^2``, ``sum z x^T``)
    over all batches and all-reduced across DDP ranks before dividing. ``r = 0`` where a neuron is
    constant (variance below ``1e-12 * (1 + mean^2)``), e.g. an always-black border pixel or a dead unit.

    * ``Linear``: a sample is an example (leading dims of ``[N, ..., F]`` inputs are flattened).
    * ``Conv2d`` (weights shared over positions): a sample is an (example, output position) pair; ``x_i``
      is input channel ``c`` at kernel offset ``(u, v)`` of that position's receptive field (padding
      included, as the conv sees it) and ``z_j`` output channel ``j`` there: the correlation pooled over
      positions, one ``r`` per weight of the filter. Grouped convs use each filter's own input channels.
      (Sun et al. average ``|r|`` over positions for conv layers; pooling the samples instead keeps one
      pass and the same cost as Linear.) Conv1d/Conv3d are refused with an error.

    Keep-score, per row ``j`` (output neuron), as ranked by the layerwise / global masks:

    1. **sign consistency** (``sign_consistent=True``): a connection is *consistent* when its weight and
       its correlation have the same sign (``w > 0`` and ``r > 0``, or ``w < 0`` and ``r < 0``): the
       connection pushes ``z_j`` the way ``x_i`` and ``z_j`` actually co-vary. Every consistent connection
       of the layer scores above every inconsistent one (``+2``), so inconsistent connections (including
       ``r = 0``) are pruned first, as the brief of this project reads Sun et al.;
    2. **per-neuron proportional selection** (``per_neuron=True``): within each (row ``j``, sign of
       ``r``, consistency tier) group of alive connections, the score is the rank quantile of ``|r|``
       (``rank / group size`` in ``[0, 1)``, ascending, ties by index). A layerwise mask at sparsity
       ``s`` then removes about the same fraction ``s`` of every group: each output neuron keeps the same
       share of its positively and of its negatively correlated inputs, strongest first (Sun et al. select
       a fraction of each neuron's connections, positive and negative correlations separately). With
       ``per_neuron=False`` the score is ``|r| / 2``: one ranking over the whole layer.

    So ``score = 2 * consistent + (quantile of |r| in its group  or  |r| / 2)``. Already-pruned weights are
    left out of the groups (score 0; the masks keep them pruned). Scores are the same for the ``global``
    scope, where consistent connections of every layer outrank the inconsistent ones of all layers.

    Args:
        num_batches: how many of ``ctx.batches()`` to use; None = all the callback provides.
        sign_consistent: rank sign-consistent connections first (above).
        per_neuron: per-(neuron, sign) rank quantiles instead of raw ``|r|`` (above).
        eval_mode: collect with the model in eval mode (dropout off), restored afterwards.
        max_chunk_elements: conv receptive fields are unfolded in chunks of at most this many values.

    Sun, Wang & Tang, "Sparsifying Neural Network Connections for Face Recognition", CVPR 2016.
    """

    needs_data = True

    def __init__(
        self,
        num_batches: int | None = None,
        sign_consistent: bool = True,
        per_neuron: bool = True,
        eval_mode: bool = True,
        max_chunk_elements: int = 2**24,
    ):
        self.num_batches = _optional_positive_int("correlation", "num_batches", num_batches)
        self.sign_consistent = _check_bool("correlation", "sign_consistent", sign_consistent)
        self.per_neuron = _check_bool("correlation", "per_neuron", per_neuron)
        self.eval_mode = _check_bool("correlation", "eval_mode", eval_mode)
        if (
            isinstance(max_chunk_elements, bool)
            or not isinstance(max_chunk_elements, int)
            or max_chunk_elements < 1
        ):
            raise ValueError(
                f"correlation: max_chunk_elements must be a positive int, got {max_chunk_elements!r}"
            )
        self.max_chunk_elements = max_chunk_elements

    def _check_target(self, fqn: str, module: nn.Module) -> None:
        if not fqn.endswith(".weight"):
            raise ValueError(
                f"correlation: target {fqn!r} is not a weight; the criterion scores connections (weights), "
                "a bias has none. Hint: use parameter: weight."
            )
        if isinstance(module, (nn.Conv1d, nn.Conv3d)):
            raise ValueError(
                f"correlation: layer {_module_name(fqn)!r} is a {type(module).__name__}; only Linear and "
                "Conv2d are supported. Hint: restrict types to [Linear, Conv2d] or exclude the layer."
            )

    def correlations(self, ctx: ScoringContext) -> dict[str, Tensor]:
        """Target FQN -> ``r`` (float64, CPU) with the weight's shape."""
        self._require_data(ctx)
        modules = {fqn: _producer(ctx, fqn, self.name) for fqn in ctx.params}
        for fqn, module in modules.items():
            self._check_target(fqn, module)
        moments = {fqn: _Moments() for fqn in ctx.params}

        def hook_for(fqn: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if not (args and isinstance(args[0], Tensor) and isinstance(output, Tensor)):
                    return
                self._accumulate(fqn, module, args[0], output, moments[fqn])

            return hook

        handles = [modules[f].register_forward_hook(hook_for(f)) for f in modules]
        try:
            with _collecting(ctx, self.eval_mode):
                _run_batches(ctx, self.num_batches, self.name)
        finally:
            for handle in handles:
                handle.remove()
        names = list(ctx.params)
        for fqn in names:
            if moments[fqn].stats is None:
                raise ValueError(
                    f"correlation: layer {_module_name(fqn)!r} did not run during the loss computation. "
                    "Hint: exclude it from the targets."
                )
        sizes = [len(cast(list, moments[n].stats)) for n in names]
        flat = _reduce(ctx, [s for n in names for s in cast(list, moments[n].stats)])
        out, pos = {}, 0
        for fqn, size in zip(names, sizes):
            r = _correlation(flat[pos : pos + size]).cpu()
            pos += size
            out[fqn] = self._to_weight_layout(r, modules[fqn], ctx.params[fqn].shape)
        return out

    def _accumulate(self, fqn: str, module: nn.Module, x: Tensor, z: Tensor, moments: _Moments) -> None:
        if isinstance(module, nn.Linear):
            moments.add(x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1]))
            return
        conv = cast(nn.Conv2d, module)
        if x.ndim != 4:
            raise ValueError(
                f"correlation: Conv2d {_module_name(fqn)!r} got an input of shape {tuple(x.shape)}; expected "
                "a batched [N, C, H, W] input."
            )
        per_example = max(1, z.shape[2] * z.shape[3] * x.shape[1] * conv.kernel_size[0] * conv.kernel_size[1])
        step = max(1, self.max_chunk_elements // per_example)
        for start in range(0, x.shape[0], step):
            xs, zs = x[start : start + step], z[start : start + step]
            cols = _patches(conv, xs)
            outs = zs.flatten(2).transpose(1, 2).reshape(-1, zs.shape[1])
            if cols.shape[0] != outs.shape[0]:
                raise ValueError(
                    f"correlation: could not align the receptive fields of Conv2d {_module_name(fqn)!r} with "
                    f"its output ({cols.shape[0]} fields vs {outs.shape[0]} positions)."
                )
            moments.add(cols, outs)

    @staticmethod
    def _to_weight_layout(r: Tensor, module: nn.Module, shape: torch.Size) -> Tensor:
        if isinstance(module, nn.Linear):
            return r.view(shape)
        conv = cast(nn.Conv2d, module)
        out_ch, per_filter = shape[0], int(torch.Size(shape[1:]).numel())
        groups = conv.groups
        blocks = r.view(out_ch, groups, per_filter)  # full input = groups x (C_in/groups * kh * kw)
        group_of = torch.arange(out_ch) // (out_ch // groups)
        return blocks[torch.arange(out_ch), group_of].reshape(shape)

    def scores(self, ctx: ScoringContext) -> dict[str, Tensor]:
        corr = self.correlations(ctx)
        out = {}
        for fqn, p in ctx.params.items():
            score = correlation_scores(
                corr[fqn],
                p,
                ctx.masks.get(fqn),
                sign_consistent=self.sign_consistent,
                per_neuron=self.per_neuron,
            )
            out[fqn] = score.to(p.device, _score_dtype(p))
        return out
