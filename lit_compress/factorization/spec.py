"""Structure specs of factorized networks: plain JSON that rebuilds the factorized layers before loading.

A factorized layer has other ``state_dict`` keys than the dense one (``fc1.weight`` becomes ``fc1.0.weight``,
``fc1.1.weight``, ``fc1.1.bias``): that is inherent to the architecture change. Its zoo card therefore carries
a spec, applied by :func:`lit_compress.zoo.structure.apply_structure` to the freshly built architecture::

    {"kind": "lowrank", "version": 1,
     "modules": {"fc1": {"type": "Linear", "rank": 47},
                 "conv2": {"type": "Conv2d", "scheme": "channel", "rank": 12}},
     "inner": null}
    {"kind": "depthwise", "version": 1, "modules": {"conv2": {"multiplier": 1}}, "inner": null}

``inner`` is another structure spec applied first (e.g. the other factorization kind when a run used both,
or ``null``). Every listed layer is replaced by a :class:`~lit_compress.factorization.lowrank.LowRankLinear`,
:class:`~lit_compress.factorization.lowrank.LowRankConv2d` or
:class:`~lit_compress.factorization.depthwise.DepthwiseSeparableConv2d` built from the fresh layer's own
arguments (shape, stride, padding, dilation, bias, padding mode), with fresh weights: load the checkpoint
afterwards.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from lit_compress.factorization.depthwise import DepthwiseSeparableConv2d, check_separable_target
from lit_compress.factorization.lowrank import (
    CONV_SCHEMES,
    LowRankConv2d,
    LowRankLinear,
    check_factorizable,
    max_rank,
)
from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.structure import apply_structure, register_structure

__all__ = [
    "DEPTHWISE_KIND",
    "LOWRANK_KIND",
    "VERSION",
    "apply_factorization",
    "build_depthwise",
    "build_lowrank",
    "dense_reference",
    "factorization_spec",
    "factorized_modules",
    "verify_spec",
]

LOWRANK_KIND = "lowrank"
DEPTHWISE_KIND = "depthwise"
VERSION = 1
FACTORIZED_TYPES = (LowRankLinear, LowRankConv2d, DepthwiseSeparableConv2d)


def factorized_modules(net: nn.Module) -> dict[str, nn.Module]:
    """FQN -> every factorized pair inside ``net`` (outermost only), in module order."""
    found: dict[str, nn.Module] = {}
    for name, module in net.named_modules():
        if isinstance(module, FACTORIZED_TYPES) and not any(name.startswith(f"{p}.") for p in found):
            found[name] = module
    return found


def _entry(module: nn.Module) -> tuple[str, dict[str, Any]]:
    if isinstance(module, LowRankLinear):
        return LOWRANK_KIND, {"type": "Linear", "rank": module.rank}
    if isinstance(module, LowRankConv2d):
        return LOWRANK_KIND, {"type": "Conv2d", "scheme": module.scheme, "rank": module.rank}
    return DEPTHWISE_KIND, {"multiplier": module.multiplier}


def factorization_spec(net: nn.Module, kind: str = LOWRANK_KIND) -> dict[str, Any] | None:
    """The spec of every factorized pair in ``net``: ``kind``'s layers outside, the other kind as ``inner``.

    None when ``net`` holds no factorized pair. Both kinds touch disjoint layers, so the nesting order does
    not matter; ``kind`` only picks the outer one.
    """
    if kind not in (LOWRANK_KIND, DEPTHWISE_KIND):
        raise ValueError(f"kind must be {LOWRANK_KIND!r} or {DEPTHWISE_KIND!r}, got {kind!r}")
    by_kind: dict[str, dict[str, Any]] = {LOWRANK_KIND: {}, DEPTHWISE_KIND: {}}
    for name, module in factorized_modules(net).items():
        k, entry = _entry(module)
        by_kind[k][name] = entry
    other = DEPTHWISE_KIND if kind == LOWRANK_KIND else LOWRANK_KIND
    inner = {"kind": other, "version": VERSION, "modules": by_kind[other], "inner": None}
    if not by_kind[kind]:
        return inner if by_kind[other] else None
    return {
        "kind": kind,
        "version": VERSION,
        "modules": by_kind[kind],
        "inner": inner if by_kind[other] else None,
    }


def dense_reference(net: nn.Module) -> nn.Module:
    """A weightless (meta) copy of ``net`` with every factorized pair turned back into its dense layer."""
    reference = copy.deepcopy(net).to("meta")
    for name, module in factorized_modules(reference).items():
        _replace(reference, name, module.dense_like(device="meta"))
    return reference


def verify_spec(net: nn.Module, spec: dict[str, Any] | None) -> None:
    """Raise ValueError unless applying ``spec`` to :func:`dense_reference` gives ``net``'s tensor shapes."""
    rebuilt = apply_factorization(dense_reference(net), spec)
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ValueError(
            f"the factorization spec does not rebuild the network: {diff[:5]} have shapes "
            f"{[want.get(k) for k in diff[:5]]} in the network but {[got.get(k) for k in diff[:5]]} after "
            "rebuilding (was a factorized layer changed afterwards, e.g. by channel pruning?)"
        )


def apply_factorization(model: nn.Module, spec: dict[str, Any] | None) -> nn.Module:
    """Apply a lowrank / depthwise spec (and its ``inner`` chain) to ``model``; other kinds go through
    :func:`lit_compress.zoo.structure.apply_structure`."""
    if spec is None:
        return model
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == LOWRANK_KIND:
        return build_lowrank(model, spec)
    if kind == DEPTHWISE_KIND:
        return build_depthwise(model, spec)
    return apply_structure(model, spec)


def _replace(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _entries(spec: Any, kind: str) -> dict[str, dict[str, Any]]:
    if not isinstance(spec, dict) or spec.get("kind") != kind:
        raise ZooFormatError(f"expected a structure spec of kind {kind!r}, got {spec!r:.200}")
    if spec.get("version") != VERSION:
        raise ZooFormatError(
            f"{kind} structure spec version {spec.get('version')!r} is not supported (this lit_compress "
            f"reads version {VERSION}); upgrade lit_compress"
        )
    extra = set(spec) - {"kind", "version", "modules", "inner"}
    if extra:
        raise ZooFormatError(
            f"{kind} structure spec has unknown keys {sorted(extra)} (allowed: kind, version, modules, inner)"
        )
    entries = spec.get("modules")
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise ZooFormatError(
            f"{kind} structure spec 'modules' must be an object {{fqn: {{...}}}}, got {entries!r:.200}"
        )
    return entries


def _layer(model: nn.Module, fqn: str, kind: str) -> nn.Module:
    if not isinstance(fqn, str) or not fqn:
        raise ZooFormatError(f"{kind} structure spec: module names must be non-empty strings, got {fqn!r}")
    try:
        return model.get_submodule(fqn)
    except AttributeError as err:
        raise ZooFormatError(
            f"{kind} structure spec names module {fqn!r}, which {type(model).__name__} does not have; the "
            "card's architecture and its structure spec do not match"
        ) from err


def _positive_int(fqn: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ZooFormatError(f"structure spec: {fqn!r}.{key} must be a positive integer, got {value!r}")
    return value


def _factory(layer: nn.Module) -> dict[str, Any]:
    return {"device": layer.weight.device, "dtype": layer.weight.dtype}


@register_structure(LOWRANK_KIND)
def build_lowrank(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Replace each layer listed in a ``lowrank`` spec of a freshly built ``model`` by its factorized pair."""
    entries = _entries(spec, LOWRANK_KIND)
    model = apply_factorization(model, spec.get("inner"))
    for fqn, entry in entries.items():
        layer = _layer(model, fqn, LOWRANK_KIND)
        kind = entry.get("type")
        expected = {"Linear": {"type", "rank"}, "Conv2d": {"type", "scheme", "rank"}}.get(kind)
        if expected is None or set(entry) != expected:
            raise ZooFormatError(
                f"lowrank structure spec entry {fqn!r} must be {{type: Linear, rank}} or {{type: Conv2d, "
                f"scheme, rank}}, got {entry!r:.200}"
            )
        base = nn.Linear if kind == "Linear" else nn.Conv2d
        if type(layer) is not base:
            raise ZooFormatError(
                f"lowrank structure spec says {fqn!r} is a {kind} but {type(model).__name__} has a "
                f"{type(layer).__name__} there"
            )
        scheme = entry.get("scheme", "channel")
        if scheme not in CONV_SCHEMES:
            raise ZooFormatError(
                f"lowrank structure spec entry {fqn!r}: scheme must be one of {CONV_SCHEMES}"
            )
        rank = _positive_int(fqn, "rank", entry["rank"])
        try:
            check_factorizable(layer, fqn, scheme)
            bound = max_rank(layer, scheme)
        except (ValueError, TypeError) as err:
            raise ZooFormatError(f"lowrank structure spec entry {fqn!r}: {err}") from err
        if rank > bound:
            raise ZooFormatError(
                f"lowrank structure spec entry {fqn!r}: rank {rank} exceeds the bound {bound}"
            )
        if isinstance(layer, nn.Linear):
            new: nn.Module = LowRankLinear(
                layer.in_features, layer.out_features, rank, layer.bias is not None, **_factory(layer)
            )
        else:
            new = LowRankConv2d(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                rank,
                scheme,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.bias is not None,
                layer.padding_mode,
                **_factory(layer),
            )
        _replace(model, fqn, new)
    return model


@register_structure(DEPTHWISE_KIND)
def build_depthwise(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Replace each conv listed in a ``depthwise`` spec of a freshly built ``model`` by a depthwise pair."""
    entries = _entries(spec, DEPTHWISE_KIND)
    model = apply_factorization(model, spec.get("inner"))
    for fqn, entry in entries.items():
        layer = _layer(model, fqn, DEPTHWISE_KIND)
        if set(entry) != {"multiplier"}:
            raise ZooFormatError(
                f"depthwise structure spec entry {fqn!r} must be {{multiplier: int}}, got {entry!r:.200}"
            )
        multiplier = _positive_int(fqn, "multiplier", entry["multiplier"])
        if type(layer) is not nn.Conv2d:
            raise ZooFormatError(
                f"depthwise structure spec names {fqn!r}, a {type(layer).__name__}; expected an nn.Conv2d"
            )
        try:
            check_separable_target(layer, fqn, multiplier)
        except ValueError as err:
            raise ZooFormatError(f"depthwise structure spec entry {fqn!r}: {err}") from err
        new = DepthwiseSeparableConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            multiplier,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.bias is not None,
            layer.padding_mode,
            **_factory(layer),
        )
        _replace(model, fqn, new)
    return model
