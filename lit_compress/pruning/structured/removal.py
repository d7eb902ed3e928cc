"""Physical channel removal: slice weights in place so the pruned network is really smaller and faster.

:func:`remove_channels` turns "channels ``c`` of group ``g`` are gone" into smaller modules: every producer
loses output rows, every batch-norm loses entries, every depthwise conv the channels pass through loses
filters, every consumer loses input columns (``repeat`` columns per channel after a flatten). All slicing
is planned against the *original* indexing first and applied once per module, so groups that share a
module (a conv that consumes one group and produces another, a conv reading a ``cat`` of several groups)
are handled in one call. Nothing is modified unless every request is valid.

:func:`rebuild_optimizer` then points an existing optimizer at the new parameters and slices their
per-parameter state (momentum, Adam moments) with the same kept indices, so training continues as if the
removed channels had never existed. :func:`zero_channels` zeroes channels without removing them (the
exact-equivalence reference for removal: a zeroed channel contributes nothing downstream).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_compress.pruning.structured.graph import ChannelGroup, ChannelRef

__all__ = ["SliceInfo", "rebuild_optimizer", "remove_channels", "slice_tensor", "zero_channels"]

# (dim, kept indices) for a parameter sliced along one dim; ((0, 1), (kept0, kept1)) when sliced along both
# (a conv that loses output channels of one group and input channels of another).
SliceInfo = tuple[int, Tensor] | tuple[tuple[int, ...], tuple[Tensor, ...]]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def slice_tensor(t: Tensor, info: SliceInfo) -> Tensor:
    """Apply a :func:`remove_channels` slice record to a tensor shaped like the old parameter."""
    dims, indices = info
    if isinstance(dims, int):
        dims, indices = (dims,), (indices,)
    for d, idx in zip(dims, indices):
        t = t.index_select(d, idx.to(t.device))
    return t


def _as_index(name: str, value: Any, size: int) -> Tensor:
    try:
        idx = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"keep[{name!r}] must be a 1-D integer tensor of kept channel indices, got {type(value).__name__}"
        ) from err
    if idx.dtype in (torch.bool,) or idx.is_floating_point() or idx.is_complex():
        raise TypeError(
            f"keep[{name!r}] must hold integer channel indices, got dtype {idx.dtype}; for a boolean mask "
            "pass mask.nonzero().flatten()"
        )
    idx = idx.detach().to("cpu", torch.long).flatten() if idx.ndim <= 1 else None
    if idx is None:
        raise ValueError(f"keep[{name!r}] must be 1-D, got shape {tuple(torch.as_tensor(value).shape)}")
    if idx.numel() == 0:
        raise ValueError(
            f"keep[{name!r}] is empty: that would remove every channel of {name!r}; keep at least 1 "
            "(min_channels)"
        )
    if int(idx.min()) < 0 or int(idx.max()) >= size:
        raise ValueError(
            f"keep[{name!r}] has indices outside [0, {size}) (min {int(idx.min())}, max {int(idx.max())}); "
            f"group {name!r} has {size} channels"
        )
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise ValueError(
            f"keep[{name!r}] must be sorted ascending without duplicates, got {idx.tolist()[:20]}"
            f"{'...' if idx.numel() > 20 else ''}; use torch.unique(indices) (it sorts)"
        )
    return idx


def _entries(ref: ChannelRef, channels: Tensor) -> Tensor:
    """Indices along ``ref.dim`` occupied by ``channels`` of the group."""
    base = ref.offset + channels * ref.repeat
    return (base[:, None] + torch.arange(ref.repeat)[None, :]).flatten()


def _refs(group: ChannelGroup) -> list[tuple[ChannelRef, str]]:
    return (
        [(r, "producer") for r in group.producers]
        + [(r, "norm") for r in group.norms]
        + [(r, "passthrough") for r in group.passthrough]
        + [(r, "consumer") for r in group.consumers]
    )


def _check_module(model: nn.Module, group: ChannelGroup, ref: ChannelRef, role: str) -> nn.Module:
    try:
        m = model.get_submodule(ref.module)
    except AttributeError as err:
        raise ValueError(
            f"group {group.name!r} names module {ref.module!r}, which is not in the model; the groups must "
            "come from channel_groups() on this model"
        ) from err
    dense = isinstance(m, nn.Linear) or (isinstance(m, _CONV) and m.groups == 1)
    ok = {
        "producer": dense and ref.dim == 0,
        "consumer": dense and ref.dim == 1,
        "norm": isinstance(m, _NORM) and ref.dim == 0,
        "passthrough": isinstance(m, _CONV) and ref.dim == 0 and m.groups == m.in_channels == m.out_channels,
    }[role]
    if not ok:
        raise ValueError(
            f"group {group.name!r} lists {type(m).__name__} {ref.module!r} as {role} along dim {ref.dim}, "
            "which remove_channels cannot slice; recompute the groups with channel_groups()"
        )
    return m


def _dim_size(m: nn.Module, dim: int) -> int:
    if isinstance(m, _NORM):
        return m.num_features
    if isinstance(m, nn.Linear):
        return m.out_features if dim == 0 else m.in_features
    return m.out_channels if dim == 0 else m.in_channels


def remove_channels(
    model: nn.Module, groups: Sequence[ChannelGroup], keep: Mapping[str, Tensor]
) -> dict[str, SliceInfo]:
    """Physically slice, IN PLACE, every producer/norm/passthrough/consumer of each group named in ``keep``.

    ``keep`` maps a group name to the sorted, duplicate-free long tensor of kept channel indices (at least
    one). Modules get new, smaller ``nn.Parameter`` objects (``requires_grad`` kept) and updated
    ``in/out_channels``, ``in/out_features``, ``num_features`` (and ``groups`` for depthwise convs).
    Returns param FQN -> ``(dim, kept indices along dim)`` for every replaced parameter, or
    ``((0, 1), (kept0, kept1))`` when a parameter lost entries along both dims (see :func:`slice_tensor`).
    """
    by_name = {g.name: g for g in groups}
    # (module FQN, dim) -> removed indices (original indexing); module FQN -> module
    removed: dict[tuple[str, int], set[int]] = {}
    modules: dict[str, nn.Module] = {}
    for name, value in keep.items():
        if name not in by_name:
            raise ValueError(
                f"keep names group {name!r}, which is not among the groups given "
                f"({', '.join(sorted(by_name)) or 'none'})"
            )
        group = by_name[name]
        if not group.prunable:
            raise ValueError(f"group {name!r} is not prunable: {group.reason}")
        kept = _as_index(name, value, group.size)
        mask = torch.ones(group.size, dtype=torch.bool)
        mask[kept] = False
        gone = mask.nonzero().flatten()
        for ref, role in _refs(group):
            m = _check_module(model, group, ref, role)
            if role == "producer" and _dim_size(m, 0) != group.size:
                raise ValueError(
                    f"group {name!r} has {group.size} channels but its producer {ref.module!r} now has "
                    f"{_dim_size(m, 0)}: the groups are stale; call channel_groups() again after each removal"
                )
            if not len(gone):
                continue
            entries = _entries(ref, gone)
            if int(entries.max()) >= _dim_size(m, ref.dim):
                raise ValueError(
                    f"group {name!r} reaches index {int(entries.max())} of {ref.module!r} (dim {ref.dim}) "
                    f"of size {_dim_size(m, ref.dim)}: the groups are stale; call channel_groups() again"
                )
            modules[ref.module] = m
            removed.setdefault((ref.module, ref.dim), set()).update(entries.tolist())

    sliced: dict[str, SliceInfo] = {}
    for fqn, m in modules.items():
        kept = {}
        for dim in (0, 1):
            if (fqn, dim) in removed:
                size = _dim_size(m, dim)
                mask = torch.ones(size, dtype=torch.bool)
                mask[list(removed[(fqn, dim)])] = False
                kept[dim] = mask.nonzero().flatten()
        _slice_module(m, kept)
        for pname in ("weight", "bias"):
            p = getattr(m, pname, None)
            if p is None:
                continue
            dims = tuple(d for d in kept if d == 0 or pname == "weight")
            if dims:
                key = f"{fqn}.{pname}" if fqn else pname
                both = (dims, tuple(kept[d] for d in dims))
                sliced[key] = (dims[0], kept[dims[0]]) if len(dims) == 1 else both
    return sliced


def _new_param(p: nn.Parameter, kept: Mapping[int, Tensor], dims: Sequence[int]) -> nn.Parameter:
    t = p.detach()
    for d in dims:
        t = t.index_select(d, kept[d].to(t.device))
    return nn.Parameter(t.clone(), requires_grad=p.requires_grad)


def _slice_module(m: nn.Module, kept: Mapping[int, Tensor]) -> None:
    with torch.no_grad():
        if m.weight is not None:
            m.weight = _new_param(m.weight, kept, sorted(kept))
        if getattr(m, "bias", None) is not None and 0 in kept:
            m.bias = _new_param(m.bias, kept, [0])
        if isinstance(m, _NORM):
            for buf in ("running_mean", "running_var"):
                if getattr(m, buf, None) is not None:
                    setattr(m, buf, getattr(m, buf).index_select(0, kept[0].to(getattr(m, buf).device)))
            m.num_features = len(kept[0])
        elif isinstance(m, nn.Linear):
            if 0 in kept:
                m.out_features = len(kept[0])
            if 1 in kept:
                m.in_features = len(kept[1])
        elif m.groups > 1:  # depthwise: filters pass channels through
            m.in_channels = m.out_channels = m.groups = len(kept[0])
        else:
            if 0 in kept:
                m.out_channels = len(kept[0])
            if 1 in kept:
                m.in_channels = len(kept[1])


def zero_channels(model: nn.Module, group: ChannelGroup, channels: Tensor) -> None:
    """Set ``channels`` of ``group`` to exactly zero without removing them (in place, no autograd).

    Zeroes the producers' output rows and biases, the batch-norms' weight and bias entries (so the
    normalised output is 0 whatever the statistics) and the depthwise filters and biases on the way.
    Consumers are untouched: they read zeros. Followed by :func:`remove_channels` this leaves every output
    unchanged when each op between the group's modules maps 0 to 0 (ReLU, pooling, add, ...).
    """
    channels = torch.as_tensor(channels, dtype=torch.long).flatten()
    if channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= group.size):
        raise ValueError(f"channels must lie in [0, {group.size}) for group {group.name!r}")
    with torch.no_grad():
        for ref in (*group.producers, *group.norms, *group.passthrough):
            m = model.get_submodule(ref.module)
            entries = _entries(ref, channels)
            for pname in ("weight", "bias"):
                p = getattr(m, pname, None)
                if p is not None:
                    p.index_fill_(0, entries.to(p.device), 0.0)


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    inner = getattr(optimizer, "optimizer", None)  # LightningOptimizer wraps the torch optimizer
    if not isinstance(optimizer, torch.optim.Optimizer) and isinstance(inner, torch.optim.Optimizer):
        return inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def rebuild_optimizer(
    optimizer: torch.optim.Optimizer,
    old_params: Mapping[str, nn.Parameter],
    model: nn.Module,
    sliced: Mapping[str, SliceInfo],
) -> None:
    """Point ``optimizer``'s param_groups at the model's new parameters (by FQN) and slice per-parameter
    state tensors of the old parameter's shape (momentum, Adam moments) with the kept indices; scalar
    state (``step``) is kept. No stale parameters remain.

    ``old_params`` is ``dict(model.named_parameters())`` taken *before* :func:`remove_channels`.
    Parameters of the optimizer that are not in ``old_params`` are left as they are.
    """
    opt = _unwrap(optimizer)
    fqn_of = {id(p): name for name, p in old_params.items()}
    new_params = dict(model.named_parameters())
    for group in opt.param_groups:
        params = []
        for p in group["params"]:
            name = fqn_of.get(id(p))
            if name is None:
                params.append(p)
                continue
            if name not in new_params:
                raise ValueError(
                    f"optimizer parameter {name!r} is no longer in the model; old_params must be "
                    "dict(model.named_parameters()) of the same model, taken before remove_channels()"
                )
            new = new_params[name]
            if new is not p:
                state = opt.state.pop(p, None)
                if state is not None:
                    opt.state[new] = _slice_state(state, p, name, sliced)
            params.append(new)
        group["params"] = params


def _slice_state(state: dict, old: Tensor, name: str, sliced: Mapping[str, SliceInfo]) -> dict:
    out = {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.shape == old.shape and value.ndim > 0 and name in sliced:
            value = slice_tensor(value, sliced[name]).clone()
        out[key] = value
    return out
