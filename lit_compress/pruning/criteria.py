"""Pruning criteria: score every targeted weight; higher score = more important = kept.

A criterion only *scores*. It never chooses masks and never changes parameters: choosing the top-k, applying
masks and zeroing weights are the mask mechanism's and the callback's job. The one exception is the optional
:meth:`Criterion.update_weights` hook, through which second-order criteria (OBS / WoodFisher) *propose* a
compensating update that the callback applies.

Criteria (registered names):

=============  =====================================================================  =====================
name           keep-score of weight ``w`` (``g`` = gradient of the loss)               paper
=============  =====================================================================  =====================
``magnitude``  ``|w|``                                                                Han et al. 2015
``random``     seeded ``U[0, 1)``, identical on every rank and run                    Mittal et al. 2018
``snip``       ``|w * mean_b g_b|``                                                   Lee et al. 2019
``taylor``     ``mean_b |w * g_b|``                                                   Molchanov et al. 2019
``obd``        ``0.5 * h_ii * w^2``, ``h_ii`` empirical-Fisher or Hutchinson diagonal  LeCun et al. 1990
``grasp``      ``w * (H g)``                                                          Wang et al. 2020
``woodfisher`` ``w_q^2 / (2 [F^-1]_qq)``, block-diagonal inverse empirical Fisher      Singh & Alistarh 2020
=============  =====================================================================  =====================

Data-dependent criteria (``needs_data = True``) share these rules:

* gradients are taken only w.r.t. ``ctx.params`` with :func:`torch.autograd.grad`, so the ``.grad`` fields
  that the training loop owns are never read or written;
* the model keeps its current train/eval mode while the loss is evaluated, so scoring during training sees
  dropout and batch-norm batch statistics exactly as training does (as in the SNIP and GraSP reference
  code). Scoring leaves no trace: module modes, ``requires_grad`` flags and every buffer of ``ctx.model``
  (e.g. batch-norm running statistics) are restored, and the global RNG state is forked. A caller that wants
  eval-mode scores puts the model in eval mode before calling;
* every accumulated statistic goes through ``ctx.all_reduce_mean`` before scores are formed, so scores (and
  hence masks) are identical on every DDP rank;
* ``loss_fn`` receives the batches exactly as ``ctx.batches()`` yields them, or, for per-microbatch
  statistics, slices of them along dim 0 (see :func:`split_batch`);
* a targeted parameter that the loss does not use gets a zero gradient.

Scores are detached tensors with the parameter's shape, on its device, in the parameter's dtype promoted to
at least float32. Already-pruned weights get no special value: the callback excludes them.
"""

from __future__ import annotations

import difflib
import importlib
import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, cast

import torch
from torch import Tensor, nn

__all__ = [
    "Criterion",
    "GraSPCriterion",
    "MagnitudeCriterion",
    "OBDCriterion",
    "RandomCriterion",
    "SNIPCriterion",
    "ScoringContext",
    "TaylorCriterion",
    "WoodFisherCriterion",
    "get_criterion",
    "list_criteria",
    "register_criterion",
    "split_batch",
]


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class ScoringContext:
    """Everything a criterion may use to score ``params``.

    Attributes:
        model: the network (a whole LightningModule is fine); its modes and buffers are restored after
            scoring.
        params: fully-qualified name (e.g. ``"net.fc1.weight"``) -> parameter; exactly these are scored.
        masks: current bool masks (True = kept) per FQN; already-pruned weights are zero in ``params``.
            A missing FQN means "nothing pruned yet".
        loss_fn: batch -> scalar loss with an autograd graph; None when no data is available.
        batches: returns a fresh iterable of batches (the callback limits how many); None without data.
        all_reduce_mean: averages a tensor across DDP ranks (identity on one process).
        generator_seed: seed for any randomness; identical on every rank.
        step: optimizer step at which scoring happens.
    """

    model: nn.Module
    params: dict[str, nn.Parameter]
    masks: dict[str, Tensor]
    loss_fn: Callable[[Any], Tensor] | None = None
    batches: Callable[[], Iterable[Any]] | None = None
    all_reduce_mean: Callable[[Tensor], Tensor] = _identity
    generator_seed: int = 0
    step: int = 0


class Criterion:
    """Base class: ``scores(ctx)`` maps each FQN in ``ctx.params`` to a float tensor of its shape.

    Subclasses set ``name`` (done by :func:`register_criterion`) and ``needs_data``, and override
    :meth:`scores`. Scores must be read-only with respect to the model.
    """

    name: ClassVar[str] = "criterion"
    needs_data: ClassVar[bool] = False

    def scores(self, ctx: ScoringContext) -> dict[str, Tensor]:
        """Keep-scores per FQN (higher = more important = kept)."""
        raise NotImplementedError(f"{type(self).__name__} must implement scores(ctx)")

    def update_weights(self, ctx: ScoringContext, new_masks: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """Optional compensating update given the masks about to be applied; None means "no update"."""
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def _require_data(self, ctx: ScoringContext) -> None:
        missing = " and ".join(f"{n}=None" for n in ("loss_fn", "batches") if getattr(ctx, n) is None)
        if missing:
            raise ValueError(
                f"pruning criterion {self.name!r} needs data: it scores weights from gradients of the loss "
                f"on training batches, but the scoring context has {missing}."
                " Hint: use magnitude or random, or give the callback batches (a datamodule/dataloader "
                "to draw scoring batches from)."
            )


# --------------------------------------------------------------------------------------------- registry

_C = TypeVar("_C", bound=type[Criterion])
_CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(name: str) -> Callable[[_C], _C]:
    """Class decorator registering a :class:`Criterion` subclass under ``name`` (also sets ``cls.name``)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"criterion name must be a non-empty string, got {name!r}")

    def decorator(cls: _C) -> _C:
        if not (isinstance(cls, type) and issubclass(cls, Criterion)):
            raise TypeError(f"@register_criterion({name!r}) expects a Criterion subclass, got {cls!r}")
        if name in _CRITERIA and _CRITERIA[name] is not cls:
            raise ValueError(
                f"pruning criterion name {name!r} is already registered by {_CRITERIA[name].__qualname__}; "
                "choose another name."
            )
        cls.name = name
        _CRITERIA[name] = cls
        return cls

    return decorator


def list_criteria() -> list[str]:
    """Registered criterion names, sorted."""
    return sorted(_CRITERIA)


def get_criterion(spec: str | Criterion | type[Criterion], **kwargs: Any) -> Criterion:
    """Build a criterion from a registered name, a dotted ``"package.module.Class"`` path, a Criterion
    subclass (instantiated with ``kwargs``) or an instance (returned as is; ``kwargs`` must be empty)."""
    if isinstance(spec, Criterion):
        if kwargs:
            raise ValueError(
                f"got a ready criterion instance {spec!r} and also keyword arguments {sorted(kwargs)}; "
                "pass either the instance or a name/class with its arguments."
            )
        return spec
    if isinstance(spec, type):
        if not issubclass(spec, Criterion):
            raise TypeError(f"{spec.__qualname__} is not a lit_compress pruning Criterion subclass")
        return spec(**kwargs)
    if not isinstance(spec, str):
        raise TypeError(
            f"criterion must be a name, a dotted class path, a Criterion subclass or instance; got {spec!r}"
        )
    if spec in _CRITERIA:
        return _CRITERIA[spec](**kwargs)
    if "." in spec:
        return get_criterion(_import_class(spec), **kwargs)
    close = difflib.get_close_matches(spec, list_criteria(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"unknown pruning criterion {spec!r}.{hint} Registered criteria: {', '.join(list_criteria())}; "
        "or pass a dotted class path such as 'my_package.my_module.MyCriterion'."
    )


def _import_class(path: str) -> type[Criterion]:
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"cannot import module {module_name!r} for pruning criterion {path!r}: {err}. "
            f"Hint: registered names are {', '.join(list_criteria())}."
        ) from err
    obj = getattr(module, attr, None)
    if not (isinstance(obj, type) and issubclass(obj, Criterion)):
        raise ValueError(
            f"{path!r} does not name a Criterion subclass (found {type(obj).__name__ if obj else 'nothing'})."
        )
    return obj


# ----------------------------------------------------------------------------------------- validation


def _positive_int(owner: str, arg: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {arg} must be a positive int, got {value!r}")
    return value


def _positive_float(owner: str, arg: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{owner}: {arg} must be a positive finite number, got {value!r}")
    return float(value)


# ------------------------------------------------------------------------------------------- helpers


def _score_dtype(p: Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


def _weights(ctx: ScoringContext) -> list[Tensor]:
    return [p.detach().to(_score_dtype(p)) for p in ctx.params.values()]


def _mixed_seed(*parts: int) -> int:
    """Hash-free, stable mix of integers into a non-negative 63-bit seed."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + int(part)) % (2**63)
    return seed


def _reduce(ctx: ScoringContext, stats: list[Tensor]) -> list[Tensor]:
    """``all_reduce_mean`` over a list of tensors through a single flat collective per dtype/device."""
    if len({(s.dtype, s.device) for s in stats}) != 1:  # empty, or mixed dtypes/devices
        return [ctx.all_reduce_mean(s) for s in stats]
    flat = ctx.all_reduce_mean(torch.cat([s.reshape(-1) for s in stats]))
    return [chunk.view_as(s) for chunk, s in zip(flat.split([s.numel() for s in stats]), stats)]


@contextmanager
def _scoring_session(ctx: ScoringContext) -> Iterator[list[Tensor]]:
    """Enable grads on the targets; afterwards restore modes, ``requires_grad``, buffers and RNG state."""
    params = list(ctx.params.values())
    modes = [(m, m.training) for m in ctx.model.modules()]
    requires = [p.requires_grad for p in params]
    buffers = [(b, b.detach().clone()) for b in ctx.model.buffers()]
    cuda = sorted(
        {
            torch.cuda.current_device() if p.device.index is None else p.device.index
            for p in params
            if p.device.type == "cuda"
        }
    )
    try:
        with torch.random.fork_rng(devices=cuda), torch.inference_mode(False), torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            yield params
    finally:
        for p, flag in zip(params, requires):
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _take(ctx: ScoringContext, n: int | None, owner: str) -> Iterator[Any]:
    batches = cast(Callable[[], Iterable[Any]], ctx.batches)  # checked by Criterion._require_data
    count = 0
    for batch in itertools.islice(batches(), n):
        count += 1
        yield batch
    if count == 0:
        raise ValueError(
            f"pruning criterion {owner!r}: ctx.batches() yielded no batches. "
            "Hint: check that the scoring dataloader is not empty."
        )


def _loss(ctx: ScoringContext, batch: Any, owner: str) -> Tensor:
    loss_fn = cast(Callable[[Any], Tensor], ctx.loss_fn)  # checked by Criterion._require_data
    loss = loss_fn(batch)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"pruning criterion {owner!r}: loss_fn must return a scalar tensor, got {shape}. "
            "Hint: reduce the per-example losses with .mean()."
        )
    if not loss.requires_grad:
        raise ValueError(
            f"pruning criterion {owner!r}: the loss has no autograd graph. Hint: loss_fn must not run under "
            "torch.no_grad()/inference_mode, and the loss must depend on the targeted parameters."
        )
    return loss.reshape(())


def _grad(
    out: Tensor | int, params: list[Tensor], create_graph: bool = False, retain_graph: bool | None = None
) -> list[Tensor]:
    """d out / d params (zeros for parameters ``out`` does not depend on, or for a constant ``out``)."""
    if not isinstance(out, Tensor) or not out.requires_grad:
        return [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(
        out, params, create_graph=create_graph, retain_graph=retain_graph, allow_unused=True
    )
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def _leading_dim(obj: Any) -> int | None:
    if isinstance(obj, Tensor):
        return obj.shape[0] if obj.ndim else None
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
    for v in values:
        n = _leading_dim(v)
        if n is not None:
            return n
    return None


def _slice(obj: Any, start: int, stop: int, n: int) -> Any:
    if isinstance(obj, Tensor):
        return obj[start:stop] if obj.ndim and obj.shape[0] == n else obj
    if isinstance(obj, Mapping):
        return type(obj)({k: _slice(v, start, stop, n) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_slice(v, start, stop, n) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_slice(v, start, stop, n) for v in obj)
    return obj


def split_batch(batch: Any, microbatch_size: int) -> list[Any]:
    """Split ``batch`` into consecutive microbatches of ``microbatch_size`` examples (last may be smaller).

    A batch is a tensor or a (nested) tuple/list/dict of tensors. The batch size is dim 0 of the first tensor
    found; every tensor with that leading size is sliced, everything else (scalars, tensors of another
    leading size such as class weights, strings) is passed unchanged to each microbatch.
    """
    n = _leading_dim(batch)
    if n is None:
        raise ValueError(
            f"cannot split a batch of type {type(batch).__name__} into microbatches: no tensor with a batch "
            "dimension found. Expected a tensor, or a tuple/list/dict of tensors such as (x, y)."
        )
    return [_slice(batch, i, min(i + microbatch_size, n), n) for i in range(0, n, microbatch_size)]


def _rademacher(p: Tensor, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Uniform +-1 entries with ``p``'s shape, drawn on the CPU generator ``gen`` (device-independent)."""
    return (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(device=p.device, dtype=dtype)


def _microbatches(ctx: ScoringContext, n_batches: int | None, size: int, owner: str) -> Iterator[Any]:
    for batch in _take(ctx, n_batches, owner):
        yield from split_batch(batch, size)


def _check_count(count: int, owner: str) -> int:
    if count == 0:
        raise ValueError(
            f"pruning criterion {owner!r}: the scoring batches contained no examples (batch size 0). "
            "Hint: check the scoring dataloader."
        )
    return count


# ---------------------------------------------------------------------------------- data-free criteria


@register_criterion("magnitude")
class MagnitudeCriterion(Criterion):
    """Magnitude pruning: score ``|w|`` (L1).

    Han, Pool, Tran & Dally, "Learning both Weights and Connections for Efficient Neural Networks",
    NeurIPS 2015.
    """

    def scores(self, ctx: ScoringContext) -> dict[str, Tensor]:
        return {fqn: w.abs() for fqn, w in zip(ctx.params, _weights(ctx))}


@register_criterion("random")
class RandomCriterion(Criterion):
    """Random pruning: seeded ``U[0, 1)`` scores, the baseline of Mittal et al.

    Each parameter draws from its own CPU ``torch.Generator`` seeded with a hash-free mix of
    ``ctx.generator_seed`` and the parameter's index in sorted-FQN order, so the scores are identical on
    every rank, across runs and across pruning events (gradual random pruning removes weights in one fixed
    random order), and change with the seed. They do not depend on the step or on the weights.

    Mittal, Bhardwaj, Khapra & Ravindran, "Recovering from Random Pruning: On the Plasticity of Deep
    Convolutional Neural Networks", WACV 2018.
    """

    def scores(self, ctx: ScoringContext) -> dict[str, Tensor]:
        index = {fqn: i for i, fqn in enumerate(sorted(ctx.params))}
        out = {}
        for fqn, p in ctx.params.items():
            gen = torch.Generator().manual_seed(_mixed_seed(ctx.generator_seed, index[fqn]))
            out[fqn] = torch.rand(p.shape, generator=gen, dtype=_score_dtype(p)).to(p.device)
        return out


# ----------------------------------------------------------------------------------- gradient criteria


def _mean_over_batches(
    ctx: ScoringContext, num_batches: int, name: str, term: Callable[[Tensor, Tensor], Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """(weights, per-parameter mean over batches of ``term(w, dL_b/dw)``), not yet reduced across ranks."""
    w = _weights(ctx)
    acc = [torch.zeros_like(x) for x in w]
    with _scoring_session(ctx) as params:
        count = 0
        for batch in _take(ctx, num_batches, name):
            for a, wi, g in zip(acc, w, _grad(_loss(ctx, batch, name), params)):
                a.add_(term(wi, g.detach()))
            count += 1
    return w, [a / count for a in acc]


@register_criterion("snip")
class SNIPCriterion(Criterion):
    """SNIP connection sensitivity: ``|w * g|`` with ``g = mean_b dL_b/dw`` over ``num_batches`` batches.

    ``g`` is averaged (and all-reduced) before the absolute value, i.e. the sensitivity of the mean loss.
    SNIP's normalisation by the sum of all scores is a global constant and is omitted.

    Lee, Ajanthan & Torr, "SNIP: Single-shot Network Pruning based on Connection Sensitivity", ICLR 2019.
    """

    needs_data = True

    def __init__(self, num_batches: int = 1) -> None:
        self.num_batches = _positive_int("snip", "num_batches", num_batches)

    def scores(self, ctx: ScoringContext) -> dict[str, Tensor]:
        self._require_data(ctx)
        w, g_mean = _mean_over_batches(ctx, self.num_batches, self.name, lambda wi, g: g)
        g_mean = _reduce(ctx, g_mean)
        return {fqn: (wi * gi).abs() for fqn, wi, gi in zip(ctx.params, w, g_mean)}


@register_criterion("taylor")
class TaylorCriterion(Criterion):
    """First-order Taylor importance, weight variant: ``mean_b |w * g_b|`` over ``num_batches`` batches.

    ``g_b = dL_b/dw`` is the gradient of batch ``b``'s loss; the absolute value is taken per batch before
    averaging (so gradients of opposite sign do not cancel, unlike SNIP). ``|w * g_b|`` estimates the loss
    change from removing ``w`` to first order. (Molchanov et al. 2019 use the squared variant
    ``(w * g)^2``; the ranking within a batch is the same.)

    Molchanov, Tyree, Karras, Aila & Kautz, "Pruning Convolutional Neural Networks for Resource Efficient
    Inference", ICLR 2017; Molchanov, Mallya, Tyree, Frosio & Kautz, "Importance Estimation for Neural
    Network Pruning", CVPR 2019.
    """

    needs_data = True

    def __init__(self, num_batches: int = 8) -> None:
        self.num_batches = _positive_int("taylor", "num_batches", num_batches)

    def scores(self, ctx: ScoringContext) -> dict[str, Tensor]:
        self._require_data(ctx)
        _, mean = _mean_over_batches(ctx, self.num_batches, self.name, lambda wi, g: (wi * g).abs())
        return dict(zip(ctx.params, _reduce(ctx, mean)))


_HESSIANS = ("fisher", "hutchinson")


@register_criterion("obd")
class OBDCriterion(Criterion):
    """Optimal Brain Damage saliency ``0.5 * h_ii * w_i^2`` with a diagonal curvature estimate ``h_ii``.

    At a minimum the loss increase from deleting ``w_i`` is, to second order with a diagonal Hessian,
    ``0.5 * h_ii * w_i^2``. The diagonal is estimated over ``num_batches`` batches by:

    * ``hessian="fisher"`` (default): the empirical Fisher diagonal ``h_ii = (1/m) sum_j g_ij^2`` over ``m``
      per-microbatch gradients ``g_j`` (each batch sliced along dim 0 into microbatches of
      ``microbatch_size``; 1 = per-example gradients, the textbook empirical Fisher; larger microbatches are
      cheaper but shrink the estimate by roughly their size). Costs one backward pass per microbatch.
    * ``hessian="hutchinson"``: the unbiased estimate ``E_v[v * (H v)]`` with Rademacher ``v`` (Bekas et al.
      2007), ``hutchinson_samples`` double-backward products per batch; ``v`` comes from a generator seeded
      with ``ctx.generator_seed`` and ``ctx.step``. The Hessian diagonal can be negative (and the estimate
      noisy); negative values are **clamped to 0**: OBD's quadratic model then predicts no loss increase from
      deleting the weight, so it is among the first to go. (The Fisher diagonal is never negative.)

    LeCun, Denker & Solla, "Optimal Brain Damage", NeurIPS 1990.
    """

    needs_data = True

    def __init__(
        self,
        hessian: str = "fisher",
        num_batches: int = 8,
        microbatch_size: int = 1,
        hutchinson_samples: int = 8,
    ) -> None:
        if hessian not in _HESSIANS:
            close = difflib.get_close_matches(str(hessian), _HESSIANS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"obd: hessian must be one of {_HESSIANS}, got {hessian!r}.{hint}")
        self.hessian = hessian
        self.num_batches = _positive_int("obd", "num_batches", num_batches)
        self.microbatch_size = _positive_int("obd", "microbatch_size", microbatch_size)
        self.hutchinson_samples = _positive_int("obd", "hutchinson_samples", hutchinson_samples)

    def scores(self, ctx: ScoringContext) -> dict[str, Tensor]:
        self._require_data(ctx)
        w = _weights(ctx)
        diag = self._fisher(ctx, w) if self.hessian == "fisher" else self._hutchinson(ctx, w)
        diag = _reduce(ctx, diag)
        return {fqn: 0.5 * h.clamp_min(0) * wi.square() for fqn, wi, h in zip(ctx.params, w, diag)}

    def _fisher(self, ctx: ScoringContext, w: list[Tensor]) -> list[Tensor]:
        acc = [torch.zeros_like(x) for x in w]
        count = 0
        with _scoring_session(ctx) as params:
            for micro in _microbatches(ctx, self.num_batches, self.microbatch_size, self.name):
                for a, g in zip(acc, _grad(_loss(ctx, micro, self.name), params)):
                    a.add_(g.detach().to(a.dtype).square())
                count += 1
        return [a / _check_count(count, self.name) for a in acc]

    def _hutchinson(self, ctx: ScoringContext, w: list[Tensor]) -> list[Tensor]:
        acc = [torch.zeros_like(x) for x in w]
        gen = torch.Generator().manual_seed(_mixed_seed(ctx.generator_seed, ctx.step, 0x0BD))
        count = 0
        with _scoring_session(ctx) as params:
            for batch in _take(ctx, self.num_batches, self.name):
                grads = _grad(_loss(ctx, batch, self.name), params, create_graph=True)
                for _ in range(self.hutchinson_samples):
                    vs = [_rademacher(p, g.dtype, gen) for p, g in zip(params, grads)]
                    gv = sum((g * v).sum() for g, v in zip(grads, vs) if g.requires_grad)
                    hv = _grad(gv, params, retain_graph=True)
                    for a, v, h in zip(acc, vs, hv):
                        a.add_((v * h.detach()).to(a.dtype))
                    count += 1
        return [a / count for a in acc]


@register_criterion("grasp")
class GraSPCriterion(Criterion):
    """GraSP (Gradient Signal Preservation): keep-score ``w * (H g)``.

    ``g = mean_b dL_b/dw`` is the gradient over the ``num_batches`` batches (all-reduced), and
    ``H g = mean_b d(stop_grad(g) . g_b)/dw`` the Hessian-gradient product by double backprop (the same
    batches are reused, as in the reference code). GraSP's score ``S(-w) = -w * H g`` estimates how much the
    gradient norm ``g^T g`` (the "gradient flow") *increases* when ``w`` is removed, and GraSP removes the
    weights with the LARGEST ``S(-w)``. Since higher means kept here, the keep-score is its negation
    ``w * H g``: weights whose removal would reduce gradient flow most score highest. Scores are signed.
    The optional logits temperature of the paper is the loss function's business.

    Wang, Zhang & Grosse, "Picking Winning Tickets Before Training by Preserving Gradient Flow", ICLR 2020.
    """

    needs_data = True

    def __init__(self, num_batches: int = 1) -> None:
        self.num_batches = _positive_int("grasp", "num_batches", num_batches)

    def scores(self, ctx: ScoringContext) -> dict[str, Tensor]:
        self._require_data(ctx)
        w = _weights(ctx)
        with _scoring_session(ctx) as params:
            batches = list(_take(ctx, self.num_batches, self.name))  # reused by both passes
            single = len(batches) == 1
            # Pass 1: g over all batches (kept with its graph when there is a single batch, to reuse it).
            g_sum = [torch.zeros_like(x) for x in w]
            graph_grads: list[Tensor] = []
            for batch in batches:
                grads = _grad(_loss(ctx, batch, self.name), params, create_graph=single)
                graph_grads = grads if single else []
                for a, g in zip(g_sum, grads):
                    a.add_(g.detach())
            g = _reduce(ctx, [a / len(batches) for a in g_sum])
            # Pass 2: H g = d(stop_grad(g) . g_b)/dw, averaged over batches.
            hg = [torch.zeros_like(x) for x in w]
            for batch in batches:
                grads = graph_grads or _grad(_loss(ctx, batch, self.name), params, create_graph=True)
                dot = sum((gb * gi.to(gb.dtype)).sum() for gb, gi in zip(grads, g) if gb.requires_grad)
                for a, h in zip(hg, _grad(dot, params)):
                    a.add_(h.detach())
                graph_grads = []
        hg = _reduce(ctx, [a / len(batches) for a in hg])
        return {fqn: wi * h for fqn, wi, h in zip(ctx.params, w, hg)}


@register_criterion("woodfisher")
class WoodFisherCriterion(Criterion):
    """Optimal Brain Surgeon with the WoodFisher block-diagonal inverse empirical Fisher.

    Each targeted parameter is flattened and cut into consecutive blocks of ``min(block_size, numel)``
    weights (the last block zero-padded). Per block, the empirical Fisher over ``m = num_gradients``
    per-microbatch gradients ``g_j`` (batches sliced into microbatches of ``microbatch_size``) is::

        F = damp * I + (1/m) sum_j g_j g_j^T

    and is inverted exactly (batched Cholesky in float64). The OBS saliency (loss increase from deleting
    ``w_q`` and optimally adjusting the rest of its block) is the keep-score::

        rho_q = w_q^2 / (2 [F^-1]_qq)

    :meth:`update_weights` returns the OBS compensating update for the weights pruned in this event
    (``ctx.masks`` True, ``new_masks`` False), per block, with the independence approximation (each weight's
    optimal update computed alone, then summed)::

        delta_w = - sum_{q pruned now} (w_q / [F^-1]_qq) F^-1 e_q

    and the pruned entries set exactly to 0. Gradients are multiplied by the current mask, so already-pruned
    coordinates decouple (their Fisher rows are ``damp * e_q``): the saliency and update are exact OBS on the
    surviving weights, and pruned weights are never revived. The inverse computed by :meth:`scores` is kept
    until the next :meth:`update_weights` call (which frees it), so call the two back to back.

    **Memory limit.** The inverse blocks take ``num_blocks * block_size^2 * 4`` bytes per parameter, i.e.
    about ``numel * block_size * 4`` bytes (512 bytes per weight at ``block_size=128``: ~2M weights fit in
    the default 1024 MB). If the total over the targeted parameters exceeds ``max_memory_mb``,
    :meth:`scores` raises a ValueError before computing anything, naming the largest parameter; use a smaller
    ``block_size``, a larger ``max_memory_mb`` or fewer targets. The DDP all-reduce works on the Fisher
    blocks, i.e. moves the same amount of data.

    Singh & Alistarh, "WoodFisher: Efficient Second-Order Approximation for Neural Network Compression",
    NeurIPS 2020; Hassibi & Stork, "Second order derivatives for network pruning: Optimal Brain Surgeon",
    NeurIPS 1992.
    """

    needs_data = True

    def __init__(
        self,
        block_size: int = 128,
        num_gradients: int = 64,
        microbatch_size: int = 1,
        damp: float = 1e-4,
        max_memory_mb: int = 1024,
    ) -> None:
        self.block_size = _positive_int("woodfisher", "block_size", block_size)
        self.num_gradients = _positive_int("woodfisher", "num_gradients", num_gradients)
        self.microbatch_size = _positive_int("woodfisher", "microbatch_size", microbatch_size)
        self.damp = _positive_float("woodfisher", "damp", damp)
        self.max_memory_mb = _positive_int("woodfisher", "max_memory_mb", max_memory_mb)
        self._inverse: dict[str, Tensor] = {}
        self._step: int | None = None

    def _layout(self, p: Tensor) -> tuple[int, int]:
        """(num_blocks, block size) for parameter ``p``."""
        bs = min(self.block_size, p.numel())
        return -(-p.numel() // bs), bs

    def _check_memory(self, ctx: ScoringContext) -> None:
        sizes = {}
        for fqn, p in ctx.params.items():
            nb, bs = self._layout(p)
            sizes[fqn] = nb * bs * bs * 4
        total = sum(sizes.values())
        limit = self.max_memory_mb * 2**20
        if total <= limit:
            return
        worst = max(sizes, key=sizes.__getitem__)
        nb, bs = self._layout(ctx.params[worst])
        numel = sum(p.numel() for p in ctx.params.values())
        fit = limit // (4 * numel)
        suggestion = f"block_size={2 ** int(math.log2(fit))} would fit" if fit >= 1 else "even 1 won't fit"
        raise ValueError(
            f"woodfisher: the block-diagonal inverse Fisher needs {total / 2**20:.1f} MB, more than "
            f"max_memory_mb={self.max_memory_mb}. The largest part is parameter {worst!r} "
            f"({ctx.params[worst].numel()} weights -> {nb} blocks of {bs}x{bs}, "
            f"{sizes[worst] / 2**20:.1f} MB). "
            f"Hint: storage is about numel * block_size * 4 bytes; use a smaller block_size ({suggestion}), "
            "raise max_memory_mb, or target fewer layers."
        )

    def _blocks(self, t: Tensor, nb: int, bs: int) -> Tensor:
        flat = t.reshape(-1)
        pad = nb * bs - flat.numel()
        return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(nb, bs)

    def scores(self, ctx: ScoringContext) -> dict[str, Tensor]:
        self._require_data(ctx)
        self._check_memory(ctx)
        self._inverse, self._step = {}, None
        w = _weights(ctx)
        layouts = [self._layout(p) for p in ctx.params.values()]
        masks = [ctx.masks.get(fqn) for fqn in ctx.params]
        fisher = [torch.zeros(nb, bs, bs, dtype=x.dtype, device=x.device) for x, (nb, bs) in zip(w, layouts)]
        count = 0
        with _scoring_session(ctx) as params:
            micro = _microbatches(ctx, None, self.microbatch_size, self.name)
            for batch in itertools.islice(micro, self.num_gradients):
                grads = _grad(_loss(ctx, batch, self.name), params)
                for f, g, m, (nb, bs) in zip(fisher, grads, masks, layouts):
                    g = g.detach().to(f.dtype)
                    if m is not None:
                        g = g * m.to(device=g.device, dtype=g.dtype)
                    gb = self._blocks(g, nb, bs)
                    f.baddbmm_(gb.unsqueeze(2), gb.unsqueeze(1))
                count += 1
        if _check_count(count, self.name) < self.num_gradients:
            warnings.warn(
                f"woodfisher: only {count} of num_gradients={self.num_gradients} microbatch gradients were "
                "available from the scoring batches; the Fisher estimate is noisier.",
                stacklevel=2,
            )
        out = {}
        for fqn, x, f in zip(ctx.params, w, fisher):
            f = ctx.all_reduce_mean(f.div_(count))
            f.diagonal(dim1=1, dim2=2).add_(self.damp)
            inv = _spd_inverse_(f)
            self._inverse[fqn] = inv
            diag = self._unblock(inv.diagonal(dim1=1, dim2=2), x)
            out[fqn] = x.square() / (2 * diag)
        self._step = ctx.step
        return out

    @staticmethod
    def _unblock(blocks: Tensor, like: Tensor) -> Tensor:
        return blocks.reshape(-1)[: like.numel()].view_as(like)

    def update_weights(self, ctx: ScoringContext, new_masks: dict[str, Tensor]) -> dict[str, Tensor] | None:
        if self._step is None:
            raise ValueError(
                "woodfisher.update_weights: no inverse Fisher available. Hint: call scores(ctx) right "
                "before update_weights(ctx, new_masks); each update frees the inverse it used."
            )
        if self._step != ctx.step:
            raise ValueError(
                f"woodfisher.update_weights: called at step {ctx.step} but the inverse Fisher was computed "
                f"at step {self._step}. Hint: call scores(ctx) right before update_weights(ctx, new_masks)."
            )
        updates = {}
        for fqn, new in new_masks.items():
            if fqn not in self._inverse:
                continue
            p = ctx.params[fqn]
            w = p.detach().to(_score_dtype(p))
            new = new.to(device=w.device, dtype=torch.bool)
            old = ctx.masks.get(fqn)
            old = torch.ones_like(new) if old is None else old.to(device=w.device, dtype=torch.bool)
            pruned_now = old & ~new
            if not pruned_now.any():
                continue
            inv = self._inverse[fqn]
            nb, bs = inv.shape[0], inv.shape[1]
            diag = self._unblock(inv.diagonal(dim1=1, dim2=2), w)
            u = torch.where(pruned_now, w / diag, torch.zeros_like(w))
            delta = -torch.bmm(inv, self._blocks(u, nb, bs).unsqueeze(2)).squeeze(2)
            new_w = (w + self._unblock(delta, w)).masked_fill(~new, 0.0)
            updates[fqn] = new_w.to(p.dtype)
        self._inverse, self._step = {}, None
        return updates or None


def _spd_inverse_(f: Tensor, chunk_bytes: int = 64 * 2**20) -> Tensor:
    """Invert a batch of symmetric positive-definite matrices in place (float64 Cholesky, chunked)."""
    nb, bs = f.shape[0], f.shape[1]
    step = max(1, chunk_bytes // (bs * bs * 8))
    work = f.device if f.device.type != "mps" else torch.device("cpu")  # MPS has no float64
    for start in range(0, nb, step):
        block = f[start : start + step].to(device=work, dtype=torch.float64)
        chol, info = torch.linalg.cholesky_ex(block)
        inv = torch.cholesky_inverse(chol) if not bool(info.any()) else torch.linalg.inv(block)
        f[start : start + step] = inv.to(device=f.device, dtype=f.dtype)
    return f
