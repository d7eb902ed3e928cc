"""Channel criteria: score every channel of each channel group; higher score = more important = kept.

A channel criterion only *scores*. Choosing how many channels go, masking or physically removing them is the
:class:`~lit_compress.pruning.structured.callback.StructuredPruning` callback's job. The one exception is the
optional :meth:`ChannelCriterion.update_weights` hook, through which ThiNet *proposes* re-weighted consumer
weights that the callback writes right before the channels are removed.

Criteria (registered names):

====================  ===========================================================  ========================
name                  keep-score of channel ``c`` of a group                         paper
====================  ===========================================================  ========================
``l1``                sum over producers of ``||W_p[c]||_1`` (the filter)            Li et al. 2017
``l2``                sum over producers of ``||W_p[c]||_2``                         Li et al. 2017
``bn_scale``          sum over the group's BatchNorms of ``|gamma_c|``               Liu et al. 2017
``group_lasso``       ``||(producer rows, producer bias, BN gamma, BN beta)_c||_2``  Wen et al. 2016 (SSL)
``apoz``              ``1 - APoZ_c`` (average percentage of zeros after the ReLU)    Hu et al. 2016
``mean_activation``   mean over examples and positions of the activation            Molchanov et al. 2017
``taylor_activation`` ``mean_n |mean_pos a * dL_n/da|``, L2-normalised per group     Molchanov et al. 2017
``thinet``            greedy order of least reconstruction error of the consumer     Luo et al. 2017
====================  ===========================================================  ========================

Groups come from :func:`lit_compress.pruning.structured.graph.channel_groups`: each names its producers
(Conv/Linear whose output channels these are, several when tied by a residual add), its BatchNorms, its
consumers and its activation modules (whose forward output is exactly the group's channels). Module names are
fully-qualified names inside ``ctx.model``.

Data-dependent criteria (``needs_data = True``) follow the rules of the weight criteria
(:mod:`lit_compress.pruning.criteria`), whose scoring session they reuse: the model keeps its train/eval mode,
and afterwards module modes, ``requires_grad`` flags, every buffer of ``ctx.owner`` (e.g. BatchNorm running
statistics) and the global RNG state are restored; hooks are removed; ``.grad`` fields are never touched;
every accumulated statistic (sums *and* counts) goes through ``ctx.all_reduce_mean`` before scores are formed,
so every DDP rank chooses the same channels.

Scores are detached 1-D float tensors of ``group.size`` entries, on the CPU or the model's device.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_compress.pruning.criteria import (
    ScoringContext,
    _loss,
    _mixed_seed,
    _reduce,
    _scoring_session,
    _take,
)
from lit_compress.schedules import _registrar

if TYPE_CHECKING:  # the graph module (engineer A) is only needed for type hints here
    from lit_compress.pruning.structured.graph import ChannelGroup, ChannelRef

__all__ = [
    "APoZCriterion",
    "BNScaleCriterion",
    "ChannelCriterion",
    "ChannelScoringContext",
    "GroupLassoCriterion",
    "L1Criterion",
    "L2Criterion",
    "MeanActivationCriterion",
    "TaylorActivationCriterion",
    "ThiNetCriterion",
    "channel_rows",
    "filter_group_parameters",
    "get_channel_criterion",
    "list_channel_criteria",
    "register_channel_criterion",
]


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class ChannelScoringContext:
    """Everything a channel criterion may use to score the channels of ``groups``.

    Attributes:
        model: the network the groups were traced on; every module name in the groups is an FQN inside it.
        groups: exactly these groups are scored.
        alive: group name -> bool tensor of ``group.size``, False for channels already pruned (masked,
            still present, with zero weights). A missing name means "all alive". Criteria may ignore it: the
            callback never keeps a dead channel.
        loss_fn: batch -> scalar loss with an autograd graph, running ``model`` inside; None without data.
        batches: returns a fresh iterable of batches (the callback limits how many); None without data.
        all_reduce_mean: averages a tensor across DDP ranks (identity on one process).
        generator_seed: seed for any randomness (identical on every rank).
        step: optimizer step at which scoring happens.
        owner: the module whose modes and buffers are restored after scoring (the whole LightningModule when
            ``loss_fn`` runs its ``training_step``); None means ``model``.
    """

    model: nn.Module
    groups: Sequence[ChannelGroup]
    alive: Mapping[str, Tensor] = field(default_factory=dict)
    loss_fn: Callable[[Any], Tensor] | None = None
    batches: Callable[[], Iterable[Any]] | None = None
    all_reduce_mean: Callable[[Tensor], Tensor] = _identity
    generator_seed: int = 0
    step: int = 0
    owner: nn.Module | None = None


class ChannelCriterion:
    """Base class: ``scores(ctx)`` maps each group name in ``ctx.groups`` to a 1-D float tensor of its size.

    Subclasses set ``needs_data`` and override :meth:`scores` (``name`` is set by
    :func:`register_channel_criterion`). Scoring must leave the model unchanged.
    """

    name: ClassVar[str] = "channel_criterion"
    needs_data: ClassVar[bool] = False

    def scores(self, ctx: ChannelScoringContext) -> dict[str, Tensor]:
        """Keep-scores per group name (higher = more important = kept)."""
        raise NotImplementedError(f"{type(self).__name__} must implement scores(ctx)")

    def update_weights(
        self, ctx: ChannelScoringContext, keep: Mapping[str, Tensor]
    ) -> dict[str, Tensor] | None:
        """Optional compensating update, given the channels about to be kept.

        ``keep`` maps group name -> sorted long tensor of the kept channel indices (in the group's current
        numbering). Returns parameter FQN (inside ``ctx.model``) -> new value of the same shape, or None.
        The callback calls it right after :meth:`scores` and right before masking/removal.
        """
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def _require_data(self, ctx: ChannelScoringContext) -> None:
        missing = " and ".join(f"{n}=None" for n in ("loss_fn", "batches") if getattr(ctx, n) is None)
        if missing:
            raise ValueError(
                f"channel criterion {self.name!r} needs data: it scores channels from activations on "
                f"training batches, but the scoring context has {missing}. Hint: use l1, l2, bn_scale or "
                "group_lasso, or give the scoring context batches and a loss function."
            )


# --------------------------------------------------------------------------------------------- registry

_C = TypeVar("_C", bound=type[ChannelCriterion])
_CRITERIA: dict[str, type[ChannelCriterion]] = {}


register_channel_criterion: Callable[[str], Callable[[_C], _C]] = _registrar(
    "channel criterion", _CRITERIA, ChannelCriterion
)
register_channel_criterion.__doc__ = "Class decorator registering a ChannelCriterion subclass under a name."


def list_channel_criteria() -> list[str]:
    """Registered channel criterion names, sorted."""
    return sorted(_CRITERIA)


def get_channel_criterion(
    spec: str | ChannelCriterion | type[ChannelCriterion], **kwargs: Any
) -> ChannelCriterion:
    """Build a channel criterion from a registered name, a dotted ``"package.module.Class"`` path, a
    :class:`ChannelCriterion` subclass (instantiated with ``kwargs``) or an instance (then no ``kwargs``)."""
    if isinstance(spec, ChannelCriterion):
        if kwargs:
            raise ValueError(
                f"got a ready channel criterion {spec!r} and also keyword arguments {sorted(kwargs)}; "
                "pass either the instance or a name/class with its arguments."
            )
        return spec
    if isinstance(spec, type):
        if not issubclass(spec, ChannelCriterion):
            raise TypeError(f"{spec.__qualname__} is not a lit_compress ChannelCriterion subclass")
        return spec(**kwargs)
    if not isinstance(spec, str):
        raise TypeError(
            "channel criterion must be a name, a dotted class path, a ChannelCriterion subclass or instance; "
            f"got {spec!r}"
        )
    if spec in _CRITERIA:
        return _CRITERIA[spec](**kwargs)
    if "." in spec:
        return get_channel_criterion(_import_class(spec), **kwargs)
    close = difflib.get_close_matches(spec, list_channel_criteria(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"unknown channel criterion {spec!r}.{hint} Registered channel criteria: "
        f"{', '.join(list_channel_criteria())}; or pass a dotted class path such as "
        "'my_package.my_module.MyChannelCriterion'."
    )


def _import_class(path: str) -> type[ChannelCriterion]:
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"cannot import module {module_name!r} for channel criterion {path!r}: {err}. "
            f"Hint: registered names are {', '.join(list_channel_criteria())}."
        ) from err
    obj = getattr(module, attr, None)
    if not (isinstance(obj, type) and issubclass(obj, ChannelCriterion)):
        found = type(obj).__name__ if obj is not None else "nothing"
        raise ValueError(f"{path!r} does not name a ChannelCriterion subclass (found {found}).")
    return obj


def _is_positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _optional_positive_int(owner: str, arg: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _is_positive_int(value):
        raise ValueError(f"{owner}: {arg} must be a positive int or None, got {value!r}")
    return value


# ------------------------------------------------------------------------------- channel slices of tensors


def channel_rows(tensor: Tensor, ref: ChannelRef, size: int) -> Tensor:
    """The entries of ``tensor`` that carry the ``size`` channels of ``ref``, as a ``[size, k]`` tensor.

    Channel ``c`` occupies indices ``offset + c * repeat .. offset + (c + 1) * repeat - 1`` along ``ref.dim``;
    row ``c`` of the result holds all of them (and everything along the other dims).
    """
    part = tensor.narrow(ref.dim, ref.offset, size * ref.repeat).movedim(ref.dim, 0)
    return part.reshape(size, -1)


def filter_group_parameters(model: nn.Module, group: ChannelGroup) -> list[tuple[nn.Parameter, ChannelRef]]:
    """The parameters whose slices make up each channel's *filter group* (SSL), with the ref locating them.

    A channel is exactly zero when all of these are: each producer's weight rows and bias entries, each
    depthwise convolution's it passes through (``group.passthrough``), and each BatchNorm's ``gamma`` and
    ``beta`` (a channel whose filter is zero but whose ``beta`` is not is constant, not removed). Consumers
    are not part of it.
    """
    out: list[tuple[nn.Parameter, ChannelRef]] = []
    for ref in (*group.producers, *getattr(group, "passthrough", ()), *group.norms):
        module = model.get_submodule(ref.module)
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            out.append((weight, ref))
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter) and ref.dim == 0:
            out.append((bias, ref))
    return out


def _float(t: Tensor) -> Tensor:
    return t.detach().to(torch.promote_types(t.dtype, torch.float32))


# ---------------------------------------------------------------------------------- data-free criteria


class _FilterNorm(ChannelCriterion):
    p: ClassVar[int] = 1

    def scores(self, ctx: ChannelScoringContext) -> dict[str, Tensor]:
        out = {}
        for group in ctx.groups:
            total = None
            for ref in group.producers:
                rows = channel_rows(_float(ctx.model.get_submodule(ref.module).weight), ref, group.size)
                norm = torch.linalg.vector_norm(rows, ord=self.p, dim=1)
                total = norm if total is None else total + norm
            if total is None:
                raise ValueError(f"channel criterion {self.name!r}: group {group.name!r} has no producer")
            out[group.name] = total
        return out


@register_channel_criterion("l1")
class L1Criterion(_FilterNorm):
    """Filter L1 norm: ``sum |W[c]|`` over the producer's kernel weights (bias excluded), summed over the
    producers of a tied group.

    Li, Kadav, Durdanovic, Samet & Graf, "Pruning Filters for Efficient ConvNets", ICLR 2017.
    """

    p = 1


@register_channel_criterion("l2")
class L2Criterion(_FilterNorm):
    """Filter L2 norm ``||W[c]||_2`` (the variant Li et al. compare against), summed over tied producers."""

    p = 2


@register_channel_criterion("bn_scale")
class BNScaleCriterion(ChannelCriterion):
    """Network slimming: ``|gamma_c|`` of the group's BatchNorm (summed over the BatchNorms of a tied group).

    Train with the ``bn_l1`` penalty (:mod:`lit_compress.pruning.structured.penalties`) first so that the
    scales become sparse. A group without an affine BatchNorm cannot be scored: a ValueError names it.

    Liu, Li, Shen, Huang, Yan & Zhang, "Learning Efficient Convolutional Networks through Network
    Slimming", ICCV 2017.
    """

    def scores(self, ctx: ChannelScoringContext) -> dict[str, Tensor]:
        out = {}
        for group in ctx.groups:
            gammas = [getattr(ctx.model.get_submodule(r.module), "weight", None) for r in group.norms]
            gammas = [g for g in gammas if isinstance(g, Tensor)]
            if not gammas:
                raise ValueError(
                    f"channel criterion 'bn_scale': group {group.name!r} has no affine BatchNorm, so it has "
                    "no scale factors to rank. Hint: exclude it (exclude: ['<its name>']) or use 'l1'."
                )
            out[group.name] = sum(_float(g).abs() for g in gammas)
        return out


@register_channel_criterion("group_lasso")
class GroupLassoCriterion(ChannelCriterion):
    """SSL filter-group norm: the L2 norm of everything that makes channel ``c`` non-zero (see
    :func:`filter_group_parameters`: producer rows and bias entries, BatchNorm gamma and beta).

    Pairs with the ``group_lasso`` penalty, which drives exactly these norms to zero.

    Wen, Wu, Wang, Chen & Li, "Learning Structured Sparsity in Deep Neural Networks", NeurIPS 2016.
    """

    def scores(self, ctx: ChannelScoringContext) -> dict[str, Tensor]:
        out = {}
        for group in ctx.groups:
            sq = sum(
                channel_rows(_float(p), ref, group.size).square().sum(1)
                for p, ref in filter_group_parameters(ctx.model, group)
            )
            out[group.name] = torch.as_tensor(sq).sqrt()
        return out


# ------------------------------------------------------------------------------- activation criteria


@contextmanager
def _session(ctx: ChannelScoringContext) -> Iterator[ScoringContext]:
    """The weight criteria's scoring session on ``ctx.owner``: producer weights require grad (so activations
    have a graph); modes, flags, buffers and the RNG are restored afterwards."""
    params = {}
    for group in ctx.groups:
        for ref in group.producers:
            weight = getattr(ctx.model.get_submodule(ref.module), "weight", None)
            if isinstance(weight, nn.Parameter):
                params[f"{ref.module}.weight"] = weight
    wctx = ScoringContext(
        model=ctx.owner if ctx.owner is not None else ctx.model,
        params=params,
        masks={},
        loss_fn=ctx.loss_fn,
        batches=ctx.batches,
        all_reduce_mean=ctx.all_reduce_mean,
        generator_seed=ctx.generator_seed,
        step=ctx.step,
    )
    with _scoring_session(wctx):
        yield wctx


def _channels_last(output: Tensor, module: nn.Module, group: ChannelGroup, owner: str) -> Tensor:
    """``output`` with its channel dim moved last (Linear: already last; conv / BatchNorm: dim 1)."""
    dim = -1 if isinstance(module, nn.Linear) else 1
    if output.ndim < 2 or output.shape[dim] != group.size:
        raise ValueError(
            f"channel criterion {owner!r}: the output of activation module of group {group.name!r} has shape "
            f"{tuple(output.shape)}, expected {group.size} channels in dim {dim}."
        )
    return output.movedim(dim, -1)


class _ActivationCriterion(ChannelCriterion):
    """Shared machinery: forward hooks on every group's activation modules, statistics summed with their
    counts over batches (and over the activation modules of a tied group), then all-reduced."""

    needs_data = True
    uses_gradient: ClassVar[bool] = False

    def __init__(self, num_batches: int | None = None) -> None:
        self.num_batches = _optional_positive_int(self.name, "num_batches", num_batches)

    def _batch_stats(
        self, group: ChannelGroup, outputs: list[tuple[nn.Module, Tensor, Tensor | None]]
    ) -> tuple[Tensor, Tensor]:
        """(sum [size], count) of this batch's statistic for ``group``."""
        raise NotImplementedError

    def _finish(self, total: Tensor, count: Tensor) -> Tensor:
        return total / count.clamp_min(1)

    def scores(self, ctx: ChannelScoringContext) -> dict[str, Tensor]:
        self._require_data(ctx)
        if not ctx.groups:
            return {}
        captured: dict[str, list[tuple[nn.Module, Tensor]]] = {g.name: [] for g in ctx.groups}
        handles = []
        try:
            for group in ctx.groups:
                if not group.activations:
                    raise ValueError(
                        f"channel criterion {self.name!r}: group {group.name!r} has no activation module to "
                        "observe. Hint: exclude it or use a weight criterion such as 'l1'."
                    )
                for name in group.activations:
                    module = ctx.model.get_submodule(name)

                    def hook(mod, args, output, _store=captured[group.name]):
                        # Later in-place ops (ReLU(inplace=True), ``out += identity``) must not change what
                        # was captured: keep a copy, or, for gradients, hand the rest of the net a copy.
                        if not isinstance(output, Tensor):
                            return None
                        if self.uses_gradient and output.requires_grad:
                            _store.append((mod, output))
                            return output.clone()
                        _store.append((mod, output.detach().clone()))
                        return None

                    handles.append(module.register_forward_hook(hook))
            sums: dict[str, Tensor] = {}
            counts: dict[str, Tensor] = {}
            with _session(ctx) as wctx:
                for batch in _take(wctx, self.num_batches, self.name):
                    for store in captured.values():
                        store.clear()
                    if self.uses_gradient:
                        loss = _loss(wctx, batch, self.name)
                        flat = [(n, m, o) for n, s in captured.items() for m, o in s]
                        wanted = [o for _, _, o in flat if o.requires_grad]
                        grads = iter(torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else ())
                        per_group: dict[str, list] = {g.name: [] for g in ctx.groups}
                        for n, m, o in flat:
                            g = next(grads) if o.requires_grad else None
                            per_group[n].append((m, o.detach(), None if g is None else g.detach()))
                    else:
                        with torch.no_grad():
                            cast(Callable[[Any], Tensor], ctx.loss_fn)(batch)
                        per_group = {n: [(m, o.detach(), None) for m, o in s] for n, s in captured.items()}
                    for group in ctx.groups:
                        if not per_group[group.name]:
                            raise ValueError(
                                f"channel criterion {self.name!r}: the activation modules "
                                f"{group.activations} of group {group.name!r} did not run during the loss "
                                "computation."
                            )
                        total, count = self._batch_stats(group, per_group[group.name])
                        sums[group.name] = sums[group.name] + total if group.name in sums else total
                        counts[group.name] = counts[group.name] + count if group.name in counts else count
                    for store in captured.values():
                        store.clear()
        finally:
            for handle in handles:
                handle.remove()
        names = [g.name for g in ctx.groups]
        reduced = _reduce(wctx, [sums[n] for n in names] + [counts[n].reshape(1) for n in names])
        k = len(names)
        return {n: self._finish(reduced[i], reduced[k + i]) for i, n in enumerate(names)}


def _rows(output: Tensor, module: nn.Module, group: ChannelGroup, owner: str) -> Tensor:
    """All activation values of ``group`` as ``[examples * positions, size]`` (float64 for exact counts)."""
    return _channels_last(output, module, group, owner).reshape(-1, group.size).to(torch.float64)


@register_channel_criterion("apoz")
class APoZCriterion(_ActivationCriterion):
    """Keep-score ``1 - APoZ``: APoZ_c is the fraction of zeros in channel ``c``'s activation after the ReLU,
    over all examples and spatial positions of the scoring batches.

    The ReLU is applied to the group's activation-module outputs when ``group.relu_follows``; otherwise the
    raw outputs are counted (they are rarely exactly zero, so every channel then scores ~1: APoZ is meant for
    ReLU networks). A tied group (residual add) averages over its activation modules, each with the ReLU
    applied to that module's own output (an approximation: the ReLU really acts on their sum).

    Hu, Peng, Tai & Tang, "Network Trimming: A Data-Driven Neuron Pruning Approach towards Efficient Deep
    Architectures", arXiv:1607.03250, 2016.
    """

    def _batch_stats(self, group, outputs):
        zeros, count = None, 0
        for module, out, _ in outputs:
            rows = _rows(out, module, group, self.name)
            if group.relu_follows:
                rows = rows.relu()
            z = (rows == 0).sum(0).to(torch.float64)
            zeros = z if zeros is None else zeros + z
            count += rows.shape[0]
        return zeros, torch.tensor(float(count), dtype=torch.float64, device=zeros.device)

    def _finish(self, total, count):
        return (1.0 - total / count.clamp_min(1)).float()


@register_channel_criterion("mean_activation")
class MeanActivationCriterion(_ActivationCriterion):
    """Keep-score: the mean of channel ``c``'s activation over examples and positions, after the ReLU when
    ``group.relu_follows``, else of its absolute value (so strongly negative channels are not ranked as
    unimportant). Tied groups average over their activation modules, as :class:`APoZCriterion`.

    Molchanov, Tyree, Karras, Aila & Kautz, "Pruning Convolutional Neural Networks for Resource Efficient
    Inference", ICLR 2017 (the "mean activation" baseline).
    """

    def _batch_stats(self, group, outputs):
        total, count = None, 0
        for module, out, _ in outputs:
            rows = _rows(out, module, group, self.name)
            rows = rows.relu() if group.relu_follows else rows.abs()
            s = rows.sum(0)
            total = s if total is None else total + s
            count += rows.shape[0]
        return total, torch.tensor(float(count), dtype=torch.float64, device=total.device)

    def _finish(self, total, count):
        return (total / count.clamp_min(1)).float()


@register_channel_criterion("taylor_activation")
class TaylorActivationCriterion(_ActivationCriterion):
    """First-order Taylor expansion on activations: the loss change from zeroing channel ``c``.

    For each example ``n``: ``theta_nc = | mean over positions of a_c * dL_n/da_c |`` where ``a`` is the
    activation-module output and ``L_n`` example ``n``'s loss; ``dL_n/da = B * dL/da`` for a loss that is the
    mean over the ``B`` examples of the batch (the usual reduction; with a sum reduction the scale differs per
    batch size but the ranking does not). For a tied group the signed terms of all its activation modules are
    summed before the absolute value: that is exactly the first-order change of zeroing the channel in every
    branch. Then ``theta_c = mean_n theta_nc`` (all-reduced) and the group's vector is L2-normalised,
    ``theta / ||theta||_2``, as the paper does per layer before comparing layers.

    Molchanov, Tyree, Karras, Aila & Kautz, "Pruning Convolutional Neural Networks for Resource Efficient
    Inference", ICLR 2017.
    """

    uses_gradient = True

    def _batch_stats(self, group, outputs):
        signed = None
        batch = None
        for module, out, grad in outputs:
            if grad is None:
                continue
            a = _channels_last(out, module, group, self.name)
            g = _channels_last(grad, module, group, self.name)
            batch = a.shape[0]
            term = (a.to(torch.float64) * g.to(torch.float64)).reshape(batch, -1, group.size).mean(1) * batch
            signed = term if signed is None else signed + term
        if signed is None:  # no activation depends on trainable weights: no information, all equal
            device = outputs[0][1].device
            return torch.zeros(group.size, dtype=torch.float64, device=device), torch.zeros(
                (), dtype=torch.float64, device=device
            )
        return signed.abs().sum(0), torch.tensor(float(batch), dtype=torch.float64, device=signed.device)

    def _finish(self, total, count):
        theta = total / count.clamp_min(1)
        norm = torch.linalg.vector_norm(theta)
        return (theta / norm if norm > 0 else theta).float()


# ------------------------------------------------------------------------------------------------ ThiNet


@register_channel_criterion("thinet")
class ThiNetCriterion(ChannelCriterion):
    """ThiNet: prune the channels whose removal changes the *next* layer's output least, then re-weight.

    For a group with exactly one consumer (a ``Conv2d`` with ``groups=1`` and zero padding, or a ``Linear``),
    ``samples_per_batch`` random (example, output position, output channel) triples are drawn per scoring
    batch. For each sample the consumer's output value is ``y = sum_c xhat_c + bias``, where ``xhat_c`` is the
    contribution of input channel ``c`` (its input patch times the consumer's kernel slice). Only the Gram
    matrix ``G = mean xhat xhat^T`` is kept (all-reduced across ranks, so every rank makes the same choice).

    *Selection* is the paper's greedy algorithm: starting from the set ``T`` of channels already pruned,
    repeatedly add the channel ``i`` minimising ``||sum_{j in T + i} xhat_j||^2 = 1_T' G 1_T + 2 (G 1_T)_i +
    G_ii``. The keep-score of a channel is its position in this removal order (higher = removed later), so
    pruning the ``k`` lowest-scored channels is exactly ThiNet's greedy choice of ``k`` channels.

    *Re-weighting* (:meth:`update_weights`): with ``S`` the kept channels, the least-squares scales
    ``w = argmin E(y_hat - w' xhat_S)^2 = (G_SS + damp I)^-1 G_S 1`` (``y_hat = sum_c xhat_c``, the group's
    full contribution) multiply the consumer's input slices of the kept channels.

    Groups with no single supported consumer are scored by ``fallback`` (a channel criterion name, e.g.
    ``"l1"``) without re-weighting; with ``fallback=None`` (default) they raise a ValueError naming them.

    Luo, Wu & Lin, "ThiNet: A Filter Level Pruning Method for Deep Neural Network Compression", ICCV 2017.
    """

    needs_data = True

    def __init__(
        self,
        samples_per_batch: int = 256,
        num_batches: int | None = None,
        damp: float = 1e-6,
        fallback: str | None = None,
    ) -> None:
        if not _is_positive_int(samples_per_batch):
            raise ValueError(f"thinet: samples_per_batch must be a positive int, got {samples_per_batch!r}")
        if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
            raise ValueError(f"thinet: damp must be a number >= 0, got {damp!r}")
        self.samples_per_batch = samples_per_batch
        self.num_batches = _optional_positive_int("thinet", "num_batches", num_batches)
        self.damp = float(damp)
        self.fallback = fallback
        self._fallback = None if fallback is None else get_channel_criterion(fallback)
        if isinstance(self._fallback, ThiNetCriterion):
            raise ValueError("thinet: fallback cannot be 'thinet' itself; use e.g. 'l1'")
        self._gram: dict[str, Tensor] = {}
        self._step: int | None = None

    # -- which groups ThiNet can handle -----------------------------------------------------------------

    @staticmethod
    def unsupported_reason(model: nn.Module, group: ChannelGroup) -> str | None:
        """Why ``group`` cannot be scored by ThiNet, or None when it can."""
        if len(group.consumers) != 1:
            return f"it has {len(group.consumers)} consumers (ThiNet needs exactly one)"
        ref = group.consumers[0]
        module = model.get_submodule(ref.module)
        if isinstance(module, nn.Linear):
            return None
        if type(module) is nn.Conv2d or isinstance(module, nn.Conv2d):
            if module.groups != 1:
                return f"its consumer {ref.module} is a grouped convolution (groups={module.groups})"
            if module.padding_mode != "zeros":
                return f"its consumer {ref.module} uses padding_mode={module.padding_mode!r}"
            if ref.repeat != 1:
                return f"its consumer {ref.module} reads each channel {ref.repeat} times"
            return None
        return f"its consumer {ref.module} is a {type(module).__name__} (ThiNet handles Conv2d and Linear)"

    def scores(self, ctx: ChannelScoringContext) -> dict[str, Tensor]:
        self._require_data(ctx)
        self._gram, self._step = {}, None
        supported, other = [], []
        for group in ctx.groups:
            reason = self.unsupported_reason(ctx.model, group)
            (supported if reason is None else other).append((group, reason))
        out: dict[str, Tensor] = {}
        if other:
            if self._fallback is None:
                listing = "; ".join(f"{g.name}: {r}" for g, r in other)
                raise ValueError(
                    f"thinet cannot score these groups: {listing}. Hint: exclude them, or set "
                    "criterion_args: {fallback: l1} to score them with another criterion (no re-weighting)."
                )
            sub = ChannelScoringContext(**{**vars(ctx), "groups": [g for g, _ in other]})
            out.update(self._fallback.scores(sub))
        if supported:
            grams = self._grams(ctx, [g for g, _ in supported])
            for group, _ in supported:
                gram = grams[group.name]
                self._gram[group.name] = gram
                out[group.name] = _greedy_order(gram, ctx.alive.get(group.name))
        self._step = ctx.step
        return out

    def _grams(self, ctx: ChannelScoringContext, groups: list[ChannelGroup]) -> dict[str, Tensor]:
        """Per group, ``G = mean xhat xhat^T`` over the sampled consumer outputs (float64, reduced, CPU)."""
        gen = torch.Generator().manual_seed(_mixed_seed(ctx.generator_seed, ctx.step, 0x7417))
        stats: dict[str, list[Any]] = {g.name: [None, 0] for g in groups}
        handles = []
        for group in groups:
            consumer = ctx.model.get_submodule(group.consumers[0].module)

            def pre_hook(mod, args, _group=group, _stat=stats[group.name]):
                if not (args and isinstance(args[0], Tensor)):
                    return
                ref = _group.consumers[0]
                xhat = _contributions(mod, ref, _group.size, args[0].detach(), self.samples_per_batch, gen)
                gram = xhat.T @ xhat
                _stat[0] = gram if _stat[0] is None else _stat[0] + gram
                _stat[1] += xhat.shape[0]

            handles.append(consumer.register_forward_pre_hook(pre_hook))
        try:
            with _session(ctx) as wctx, torch.no_grad():
                for batch in _take(wctx, self.num_batches, self.name):
                    cast(Callable[[Any], Tensor], ctx.loss_fn)(batch)
        finally:
            for handle in handles:
                handle.remove()
        for group in groups:
            if stats[group.name][0] is None:
                raise ValueError(
                    f"thinet: the consumer {group.consumers[0].module} of group {group.name!r} did not run "
                    "during the loss computation."
                )
        names = [g.name for g in groups]
        device = stats[names[0]][0].device
        counts = torch.tensor([float(stats[n][1]) for n in names], dtype=torch.float64, device=device)
        reduced = _reduce(wctx, [stats[n][0] for n in names] + [counts])
        return {name: (r / reduced[-1][i]).cpu() for i, (name, r) in enumerate(zip(names, reduced))}

    def update_weights(
        self, ctx: ChannelScoringContext, keep: Mapping[str, Tensor]
    ) -> dict[str, Tensor] | None:
        if self._step is None:
            raise ValueError(
                "thinet.update_weights: no statistics available. Hint: call scores(ctx) right before "
                "update_weights(ctx, keep); each update frees the statistics it used."
            )
        if self._step != ctx.step:
            raise ValueError(
                f"thinet.update_weights: called at step {ctx.step} but the statistics were gathered at step "
                f"{self._step}. Hint: call scores(ctx) right before update_weights(ctx, keep)."
            )
        groups = {g.name: g for g in ctx.groups}
        updates: dict[str, Tensor] = {}
        for name, kept in keep.items():
            gram = self._gram.get(name)
            if gram is None:
                continue
            group = groups[name]
            scales = least_squares_scales(gram, kept.cpu(), self.damp)
            ref = group.consumers[0]
            fqn = f"{ref.module}.weight" if ref.module else "weight"
            weight = updates.get(fqn)
            if weight is None:
                weight = ctx.model.get_submodule(ref.module).weight.detach().clone()
            view = channel_rows_view(weight, ref, group.size)  # [size, repeat, ...] view into `weight`
            idx = kept.to(weight.device)
            factor = scales.to(device=weight.device, dtype=weight.dtype).view(-1, *([1] * (view.ndim - 1)))
            view[idx] = view[idx] * factor
            updates[fqn] = weight
        self._gram, self._step = {}, None
        return updates or None


def channel_rows_view(tensor: Tensor, ref: ChannelRef, size: int) -> Tensor:
    """A *view* of ``tensor`` with channel ``c`` of ``ref`` at index ``c`` of dim 0 (writes go through)."""
    part = tensor.narrow(ref.dim, ref.offset, size * ref.repeat).movedim(ref.dim, 0)
    return part.unflatten(0, (size, ref.repeat))


def least_squares_scales(gram: Tensor, kept: Tensor, damp: float = 1e-6) -> Tensor:
    """ThiNet's re-weighting: ``w = (G_SS + damp * mean(diag G_SS) * I)^-1 G_S 1`` for kept channels ``S``.

    ``G`` is the (uncentred) second moment of the per-channel contributions, so this minimises
    ``E(sum_c xhat_c - w' xhat_S)^2``, the reconstruction error of the consumer's output.
    """
    g = gram.to(torch.float64)
    a = g[kept][:, kept]
    b = g[kept].sum(1)
    scale = a.diagonal().mean().clamp_min(1e-30) if a.numel() else torch.tensor(1.0, dtype=torch.float64)
    a = a + damp * scale * torch.eye(len(kept), dtype=torch.float64)
    return torch.linalg.solve(a, b)


def _greedy_order(gram: Tensor, alive: Tensor | None) -> Tensor:
    """Keep-scores from ThiNet's greedy removal order on ``gram`` (dead channels go first, score -inf)."""
    g = gram.to(torch.float64)
    size = g.shape[0]
    removed = torch.zeros(size, dtype=torch.bool)
    scores = torch.full((size,), -torch.inf, dtype=torch.float64)
    if alive is not None:
        removed |= ~alive.cpu().bool()
    v = g[:, removed].sum(1)  # G 1_T
    q = v[removed].sum()  # 1_T' G 1_T
    diag = g.diagonal()
    for position in range(int((~removed).sum())):
        values = (q + 2 * v + diag).masked_fill(removed, torch.inf)
        i = int(torch.argmin(values))
        scores[i] = float(position)
        removed[i] = True
        q = values[i]
        v = v + g[:, i]
    return scores.float()


def _contributions(
    consumer: nn.Module, ref: ChannelRef, size: int, x: Tensor, samples: int, gen: torch.Generator
) -> Tensor:
    """``[samples, size]`` per-channel contributions ``xhat`` to random consumer outputs (float64)."""
    weight = consumer.weight.detach()
    if isinstance(consumer, nn.Linear):
        x = x.reshape(-1, x.shape[-1])
        rows = torch.randint(0, x.shape[0], (samples,), generator=gen).to(x.device)
        outs = torch.randint(0, weight.shape[0], (samples,), generator=gen).to(x.device)
        xs = channel_rows_view(x[rows], _shifted(ref), size)  # [size, repeat, samples]
        ws = channel_rows_view(weight[outs], _shifted(ref), size)
        return (xs.to(torch.float64) * ws.to(torch.float64)).sum(1).T
    conv = cast(nn.Conv2d, consumer)
    xg = x.narrow(1, ref.offset, size)
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    if isinstance(conv.padding, str):  # "valid" or "same" (stride 1)
        if conv.padding == "valid":
            pads = (0, 0, 0, 0)
        else:
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = conv.padding
        pads = (pw, pw, ph, ph)
    xp = F.pad(xg, pads)
    ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    b = torch.randint(0, xp.shape[0], (samples,), generator=gen)
    i = torch.randint(0, ho, (samples,), generator=gen)
    j = torch.randint(0, wo, (samples,), generator=gen)
    o = torch.randint(0, weight.shape[0], (samples,), generator=gen)
    rows = (i * sh)[:, None] + torch.arange(kh) * dh  # [samples, kh]
    cols = (j * sw)[:, None] + torch.arange(kw) * dw
    dev = xp.device
    patch = xp[
        b.to(dev)[:, None, None, None],
        torch.arange(size, device=dev)[None, :, None, None],
        rows.to(dev)[:, None, :, None],
        cols.to(dev)[:, None, None, :],
    ]  # [samples, size, kh, kw]
    kernels = weight[o.to(dev)].narrow(1, ref.offset, size)
    return (patch.to(torch.float64) * kernels.to(torch.float64)).sum((2, 3))


def _shifted(ref: ChannelRef) -> ChannelRef:
    """``ref`` with ``dim`` moved to 1 for a ``[samples, features]`` slice (Linear inputs / weight rows)."""
    return type(ref)(module=ref.module, dim=1, offset=ref.offset, repeat=ref.repeat)
