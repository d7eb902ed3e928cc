"""Sparsity-inducing regularisers for structured pruning, applied as gradient terms.

A penalty ``lambda * R(w)`` pushes whole channels (or whole residual branches) to zero during training, so
that a later criterion (``bn_scale``, ``group_lasso``) finds them unimportant. Instead of adding ``R`` to the
loss (which would need the user's ``training_step`` to be wrapped), :meth:`Penalty.add_gradient` adds its
gradient in place in ``on_before_optimizer_step``, after the backward pass and the DDP gradient all-reduce::

    p.grad += lambda * dR/dp

This is exactly the gradient of ``loss + lambda * R`` for the single backward of the step: the gradient of a
sum is the sum of the gradients. ``R`` is computed from the weights, which are identical on every DDP rank,
so the added term is too (no communication needed). With gradient accumulation the penalty enters once per
optimizer step, as if it were added to the loss of one micro-batch; with AMP, Lightning unscales the
gradients before ``on_before_optimizer_step``, so the term is added at its true scale. :meth:`Penalty.value`
returns the explicit ``lambda * R`` (with autograd) for logging and for tests.

Penalties (registered names):

- ``bn_l1`` (network slimming, Liu et al. 2017): ``R = sum |gamma|`` over the BatchNorm scales of the targeted
  groups; ``dR/dgamma = sign(gamma)`` (the subgradient 0 at 0, so a zero scale stays put).
- ``group_lasso`` (SSL, Wen et al. 2016): ``R = sum_groups sum_c ||w_c||_2`` where ``w_c`` is channel ``c``'s
  filter group (the producers' weight rows and bias entries, the BatchNorm gamma and beta: see
  :func:`~lit_compress.pruning.structured.criteria.filter_group_parameters`); ``dR/dw_c = w_c / ||w_c||``
  (0 for an all-zero group, the subgradient that keeps it zero). With ``depth_branches`` (module FQN globs) it
  adds SSL's depth-wise term ``sum_b ||theta_b||_2`` over each matched module's parameters (a whole residual
  branch), which can switch a branch off; ``filters=False`` keeps only the depth term.

Wen, Wu, Wang, Chen & Li, "Learning Structured Sparsity in Deep Neural Networks", NeurIPS 2016.
Liu, Li, Shen, Huang, Yan & Zhang, "Learning Efficient Convolutional Networks through Network Slimming",
ICCV 2017.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn

from lit_compress.pruning.structured.criteria import channel_rows, filter_group_parameters
from lit_compress.schedules import _registrar

if TYPE_CHECKING:
    from lit_compress.pruning.structured.graph import ChannelGroup, ChannelRef

__all__ = [
    "BNL1Penalty",
    "GroupLassoPenalty",
    "Penalty",
    "get_penalty",
    "list_penalties",
    "register_penalty",
]


class Penalty:
    """Base class of a structured sparsity regulariser ``weight * R(params)``.

    Lifecycle: :meth:`prepare` binds it to a network and its targeted channel groups (again after every
    physical removal); then :meth:`add_gradient` once per optimizer step, :meth:`value` when wanted.
    """

    name: ClassVar[str] = "penalty"

    def __init__(self, weight: float = 1e-4) -> None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ValueError(f"penalty {self.name!r}: weight must be a finite number >= 0, got {weight!r}")
        self.weight = float(weight)

    def prepare(self, model: nn.Module, groups: Sequence[ChannelGroup], prefix: str = "") -> None:
        """Resolve the parameters the penalty acts on. ``prefix`` is how ``model`` is named inside the
        LightningModule (``"net."``); globs may be written with or without it."""
        raise NotImplementedError

    def value(self) -> Tensor:
        """``weight * R``, differentiable w.r.t. the parameters."""
        raise NotImplementedError

    @torch.no_grad()
    def add_gradient(self) -> None:
        """``p.grad += weight * dR/dp`` for every parameter involved (a missing ``.grad`` is created)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


_P = TypeVar("_P", bound=type[Penalty])
_PENALTIES: dict[str, type[Penalty]] = {}


register_penalty: Callable[[str], Callable[[_P], _P]] = _registrar("penalty", _PENALTIES, Penalty)
register_penalty.__doc__ = "Class decorator registering a Penalty subclass under a name (sets ``cls.name``)."


def list_penalties() -> list[str]:
    """Registered penalty names, sorted."""
    return sorted(_PENALTIES)


def get_penalty(spec: str | Penalty, **kwargs: Any) -> Penalty:
    """A penalty from a registered name (built with ``kwargs``, e.g. ``weight=1e-4``) or an instance."""
    if isinstance(spec, Penalty):
        if kwargs:
            raise ValueError(f"got a ready penalty {spec!r} and also keyword arguments {sorted(kwargs)}")
        return spec
    if not isinstance(spec, str) or spec not in _PENALTIES:
        close = difflib.get_close_matches(str(spec), list_penalties(), n=2, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown structured-pruning penalty {spec!r}.{hint} Registered: {', '.join(list_penalties())} "
            "(or null for no penalty)."
        )
    try:
        return _PENALTIES[spec](**kwargs)
    except TypeError as err:
        raise ValueError(f"penalty {spec!r}: bad arguments {sorted(kwargs)}: {err}") from err


def _add(param: Tensor, grad: Tensor) -> None:
    if param.grad is None:
        param.grad = grad.clone()
    else:
        param.grad.add_(grad)


def _broadcast_scale(per_channel: Tensor, param: Tensor, ref: ChannelRef) -> Tensor:
    """Per-channel factors shaped to broadcast over the ``size * repeat`` slice of ``param``."""
    shape = [1] * param.ndim
    shape[ref.dim] = per_channel.numel() * ref.repeat
    return per_channel.repeat_interleave(ref.repeat).view(shape)


@register_penalty("bn_l1")
class BNL1Penalty(Penalty):
    """Network slimming: ``weight * sum |gamma|`` over the BatchNorm scales of the targeted groups.

    Gradient ``weight * sign(gamma)``. Groups without an affine BatchNorm are skipped; if none has one,
    :meth:`prepare` raises.
    """

    def __init__(self, weight: float = 1e-4) -> None:
        super().__init__(weight)
        self._gammas: list[nn.Parameter] = []

    def prepare(self, model: nn.Module, groups: Sequence[ChannelGroup], prefix: str = "") -> None:
        gammas: dict[int, nn.Parameter] = {}
        for group in groups:
            for ref in group.norms:
                gamma = getattr(model.get_submodule(ref.module), "weight", None)
                if isinstance(gamma, nn.Parameter):
                    gammas[id(gamma)] = gamma
        if not gammas:
            raise ValueError(
                "penalty 'bn_l1': none of the targeted channel groups "
                f"({[g.name for g in groups]}) is followed by an affine BatchNorm, so there are no scale "
                "factors to sparsify. Hint: use penalty 'group_lasso', or target the BatchNorm'd layers."
            )
        self._gammas = list(gammas.values())

    def value(self) -> Tensor:
        return self.weight * sum(g.abs().sum() for g in self._gammas)

    @torch.no_grad()
    def add_gradient(self) -> None:
        for gamma in self._gammas:
            _add(gamma, self.weight * torch.sign(gamma))


@register_penalty("group_lasso")
class GroupLassoPenalty(Penalty):
    """SSL group lasso over filter groups (``filters=True``) and/or residual branches (``depth_branches``).

    Args:
        weight: ``lambda``.
        filters: penalise ``sum_c ||w_c||_2`` over the channels of every targeted group.
        depth_branches: module FQN globs (fnmatch); each matched module (the outermost, when matches nest) is
            one branch whose parameters together form one group ``||theta_b||_2``. For a ResNet block that
            contains its shortcut convolution, add ``depth_exclude: ["*.shortcut*"]``.
        depth_exclude: module FQN globs whose parameters are left out of every branch.
    """

    def __init__(
        self,
        weight: float = 1e-4,
        filters: bool = True,
        depth_branches: list[str] | None = None,
        depth_exclude: list[str] | None = None,
    ) -> None:
        super().__init__(weight)
        for arg, value in (("depth_branches", depth_branches), ("depth_exclude", depth_exclude)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ValueError(f"penalty 'group_lasso': {arg} must be a list of FQN globs, got {value!r}")
        if not isinstance(filters, bool):
            raise ValueError(f"penalty 'group_lasso': filters must be true or false, got {filters!r}")
        if not filters and not depth_branches:
            raise ValueError(
                "penalty 'group_lasso': filters=False and no depth_branches leaves nothing to penalise; "
                "give depth_branches (e.g. ['net.layer*.*']) or keep filters=True."
            )
        self.filters = filters
        self.depth_branches = list(depth_branches or [])
        self.depth_exclude = list(depth_exclude or [])
        self._groups: list[tuple[int, list[tuple[nn.Parameter, ChannelRef]]]] = []
        self._branches: dict[str, list[nn.Parameter]] = {}

    def prepare(self, model: nn.Module, groups: Sequence[ChannelGroup], prefix: str = "") -> None:
        self._groups = [(g.size, filter_group_parameters(model, g)) for g in groups] if self.filters else []
        self._branches = (
            depth_branch_parameters(model, self.depth_branches, self.depth_exclude, prefix)
            if self.depth_branches
            else {}
        )

    def value(self) -> Tensor:
        terms = []
        for size, params in self._groups:
            sq = sum(channel_rows(p, ref, size).square().sum(1) for p, ref in params)
            terms.append(torch.as_tensor(sq).sqrt().sum())
        for params in self._branches.values():
            terms.append(torch.sqrt(sum(p.square().sum() for p in params)))
        return self.weight * sum(terms) if terms else torch.zeros(())

    @torch.no_grad()
    def add_gradient(self) -> None:
        for size, params in self._groups:
            sq = sum(channel_rows(p, ref, size).float().square().sum(1) for p, ref in params)
            norm = torch.as_tensor(sq).sqrt()
            inv = torch.where(norm > 0, self.weight / norm.clamp_min(1e-30), torch.zeros_like(norm))
            for p, ref in params:
                n = size * ref.repeat
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                scale = _broadcast_scale(inv.to(p.dtype), p, ref)
                p.grad.narrow(ref.dim, ref.offset, n).add_(p.narrow(ref.dim, ref.offset, n) * scale)
        for params in self._branches.values():
            norm = torch.sqrt(sum(p.float().square().sum() for p in params))
            if norm > 0:
                for p in params:
                    _add(p, p * (self.weight / norm).to(p.dtype))


def depth_branch_parameters(
    model: nn.Module, patterns: Sequence[str], exclude: Sequence[str] = (), prefix: str = ""
) -> dict[str, list[nn.Parameter]]:
    """Branch FQN -> its parameters, for the outermost modules of ``model`` matching any of ``patterns``.

    Globs are matched against each module's FQN inside ``model`` and against ``prefix + FQN``. A pattern that
    matches no module raises a ValueError listing close names.
    """
    names = [n for n, _ in model.named_modules() if n]

    def matches(name: str, globs: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(prefix + name, g) for g in globs)

    for pattern in [*patterns, *exclude]:
        if not any(matches(n, [pattern]) for n in names):
            close = difflib.get_close_matches(pattern.removeprefix(prefix), names, n=4, cutoff=0.3)
            raise ValueError(
                f"penalty 'group_lasso': depth pattern {pattern!r} matches no module. Close names: "
                f"{close or 'none'}; modules: {names[:40]}{' ...' if len(names) > 40 else ''}"
            )
    branches: dict[str, list[nn.Parameter]] = {}
    for name in names:
        if not matches(name, patterns):
            continue
        if any(name.startswith(outer + ".") for outer in branches):
            continue  # nested inside a branch already taken
        subs = list(model.get_submodule(name).named_modules(prefix=name))
        excluded = [n for n, _ in subs if matches(n, exclude)]
        params = [
            p
            for sub_name, sub in subs
            if not any(sub_name == e or sub_name.startswith(e + ".") for e in excluded)
            for p in sub.parameters(recurse=False)
        ]
        if params:
            branches[name] = params
    if not branches:
        raise ValueError(f"penalty 'group_lasso': depth_branches {list(patterns)} select no parameters")
    return branches
