"""Structure spec of a channel-pruned network: plain JSON data, never pickled modules.

A physically pruned network has smaller layers than the architecture its zoo card names. The spec records,
for each layer whose shape changed, the layer type and its new shape arguments::

    {"kind": "channels", "version": 1,
     "modules": {"layer1.0.conv1": {"type": "Conv2d", "in_channels": 16, "out_channels": 9, "groups": 1},
                 "layer1.0.bn1": {"type": "BatchNorm2d", "num_features": 9},
                 "fc": {"type": "Linear", "in_features": 57, "out_features": 10}}}

The builder registered for kind ``"channels"`` (``lit_compress.zoo.structure``) re-creates those layers in a
freshly built architecture (same class; kernel size, stride, padding, dilation, bias presence, padding mode,
eps, momentum, affine and running-stat tracking taken from the fresh layer) before the weights are loaded.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.structure import register_structure

__all__ = ["STRUCTURE_KIND", "STRUCTURE_VERSION", "build_channels", "structure_spec"]

STRUCTURE_KIND = "channels"  # "type" names the torch layer class (a library subclass is reshaped in place)
STRUCTURE_VERSION = 1

_TYPES: dict[str, type[nn.Module]] = {
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "Linear": nn.Linear,
    "BatchNorm1d": nn.BatchNorm1d,
    "BatchNorm2d": nn.BatchNorm2d,
    "BatchNorm3d": nn.BatchNorm3d,
}
_SHAPE_ARGS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv1d: ("in_channels", "out_channels", "groups"),
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Conv3d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm1d: ("num_features",),
    nn.BatchNorm2d: ("num_features",),
    nn.BatchNorm3d: ("num_features",),
}


def _base_type(m: nn.Module) -> type[nn.Module] | None:
    """The supported torch layer class of ``m`` (its own class or a base class), or None."""
    return next((cls for cls in _TYPES.values() if isinstance(m, cls)), None)


def _shape(m: nn.Module) -> dict[str, int]:
    return {k: int(getattr(m, k)) for k in _SHAPE_ARGS[_base_type(m)]}


def structure_spec(model: nn.Module, reference: nn.Module) -> dict[str, Any]:
    """Plain-JSON spec ``{"kind": "channels", "version": 1, "modules": {fqn: {"type": ..., shape args}}}``
    listing every Conv/Linear/BatchNorm of ``model`` whose shape differs from ``reference`` (the freshly
    built architecture). Raises ValueError when ``model`` differs from ``reference`` in a way the spec
    cannot express (another layer type, a layer missing, an unsupported layer with a changed shape).
    """
    ref_modules = dict(reference.named_modules())
    modules: dict[str, dict[str, Any]] = {}
    for fqn, m in model.named_modules():
        ref = ref_modules.get(fqn)
        if ref is None or type(ref) is not type(m):
            found = "nothing" if ref is None else type(ref).__name__
            raise ValueError(
                f"model has {type(m).__name__} {fqn!r} where the reference architecture has {found}; "
                "structure_spec only describes changed channel counts of the same architecture"
            )
        base = _base_type(m)
        if base is not None:
            shape = _shape(m)
            if shape != _shape(ref):
                modules[fqn] = {"type": base.__name__, **shape}
    spec = {"kind": STRUCTURE_KIND, "version": STRUCTURE_VERSION, "modules": modules}
    # The spec must fully explain the difference: rebuild the reference and compare every tensor shape.
    rebuilt = build_channels(copy.deepcopy(reference), spec)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    if want != got:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ValueError(
            f"structure_spec cannot express how the model differs from the reference: {diff[:5]} have shapes "
            f"{[want.get(k) for k in diff[:5]]} in the model but {[got.get(k) for k in diff[:5]]} after "
            "rebuilding; only Conv/Linear/BatchNorm channel counts may change"
        )
    return spec


def _positive_int(fqn: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ZooFormatError(f"structure spec: {fqn!r}.{key} must be a positive integer, got {value!r}")
    return value


def _resize(old: nn.Module, base: type[nn.Module], entry: dict[str, int]) -> nn.Module:
    """Library subclasses (e.g. timm's BatchNormAct2d) keep their own constructor arguments: reshape the
    fresh module's tensors in place and re-initialise them."""
    for key, value in entry.items():
        setattr(old, key, value)
    if base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        shapes = {"weight": (old.out_channels, old.in_channels // old.groups, *old.kernel_size)}
        shapes["bias"] = (old.out_channels,)
    elif base is nn.Linear:
        shapes = {"weight": (old.out_features, old.in_features), "bias": (old.out_features,)}
    else:
        shapes = {k: (old.num_features,) for k in ("weight", "bias", "running_mean", "running_var")}
    for name, shape in shapes.items():
        t = getattr(old, name, None)
        if isinstance(t, nn.Parameter):
            setattr(old, name, nn.Parameter(t.new_empty(shape), requires_grad=t.requires_grad))
        elif t is not None:
            setattr(old, name, t.new_empty(shape))
    old.reset_parameters()
    return old


def _new_module(fqn: str, old: nn.Module, entry: dict[str, Any]) -> nn.Module:
    cls = type(old)
    if cls not in _SHAPE_ARGS:
        return _resize(old, _base_type(old), entry)
    params = list(old.parameters()) + list(old.buffers())
    factory = {"device": params[0].device, "dtype": params[0].dtype} if params else {}
    if params and not params[0].is_floating_point():
        factory.pop("dtype")
    if cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return cls(
            entry["in_channels"],
            entry["out_channels"],
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            dilation=old.dilation,
            groups=entry["groups"],
            bias=old.bias is not None,
            padding_mode=old.padding_mode,
            **factory,
        )
    if cls is nn.Linear:
        return cls(entry["in_features"], entry["out_features"], bias=old.bias is not None, **factory)
    return cls(
        entry["num_features"],
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        **factory,
    )


@register_structure(STRUCTURE_KIND)
def build_channels(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Replace every module listed in ``spec["modules"]`` of the freshly built ``model`` by a new module of
    the same class with the spec's shape (weights freshly initialised: load the checkpoint afterwards)."""
    if not isinstance(spec, dict) or spec.get("kind") != STRUCTURE_KIND:
        raise ZooFormatError(f"expected a structure spec of kind {STRUCTURE_KIND!r}, got {spec!r:.200}")
    if spec.get("version") != STRUCTURE_VERSION:
        raise ZooFormatError(
            f"structure spec version {spec.get('version')!r} is not supported (this lit_compress reads "
            f"version {STRUCTURE_VERSION}); upgrade lit_compress"
        )
    extra = set(spec) - {"kind", "version", "modules"}
    if extra:
        raise ZooFormatError(
            f"structure spec has unknown keys {sorted(extra)} (allowed: kind, version, modules)"
        )
    entries = spec.get("modules")
    if not isinstance(entries, dict):
        raise ZooFormatError(
            f"structure spec 'modules' must be an object {{fqn: {{...}}}}, got {entries!r:.200}"
        )
    for fqn, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise ZooFormatError(
                f"structure spec entry {fqn!r} must be an object with a 'type', got {entry!r:.200}"
            )
        kind = entry["type"]
        if kind not in _TYPES:
            raise ZooFormatError(
                f"structure spec entry {fqn!r} has unknown module type {kind!r} "
                f"(supported: {', '.join(_TYPES)})"
            )
        try:
            old = model.get_submodule(fqn)
        except AttributeError as err:
            raise ZooFormatError(
                f"structure spec names module {fqn!r}, which {type(model).__name__} does not have; the "
                "card's architecture and its structure spec do not match"
            ) from err
        if not isinstance(old, _TYPES[kind]):
            raise ZooFormatError(
                f"structure spec says {fqn!r} is a {kind} but {type(model).__name__} builds a "
                f"{type(old).__name__} there"
            )
        keys = set(entry) - {"type"}
        expected = set(_SHAPE_ARGS[_TYPES[kind]])
        if keys != expected:
            raise ZooFormatError(
                f"structure spec entry {fqn!r} ({kind}) must have exactly {sorted(expected)}, "
                f"got {sorted(keys)}"
            )
        shape = {k: _positive_int(fqn, k, entry[k]) for k in expected}
        try:
            new = _new_module(fqn, old, shape)
        except ValueError as err:  # e.g. channels not divisible by groups
            raise ZooFormatError(f"structure spec entry {fqn!r} is not a valid {kind}: {err}") from err
        if fqn == "":
            model = new
        else:
            parent_name, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)
    return model
