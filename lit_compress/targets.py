"""Selecting layers by name: fully-qualified-name globs plus layer types, all writable in YAML.

Every compression callback selects what it acts on through :func:`select_parameters`, so the same
``include`` / ``exclude`` / ``types`` options mean the same thing everywhere. A pattern that matches
nothing is an error that lists close names.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

DEFAULT_TYPES = ("Conv1d", "Conv2d", "Conv3d", "Linear")


@dataclass(frozen=True)
class TargetSpec:
    """Which parameters a callback targets.

    Args:
        include: FQN glob patterns of modules to target (``fnmatch`` syntax: ``"features.*"``, ``"fc?"``).
        exclude: FQN glob patterns removed from the selection (applied after ``include``).
        types: module class names (``"Conv2d"``, ``"Linear"``, also matching subclasses).
        parameter: the parameter of each module to target, ``"weight"`` or ``"bias"``.
    """

    include: Sequence[str] = ("*",)
    exclude: Sequence[str] = ()
    types: Sequence[str] = DEFAULT_TYPES
    parameter: str = "weight"

    def __post_init__(self) -> None:
        for field_name in ("include", "exclude", "types"):
            value = getattr(self, field_name)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ValueError(
                    f'{field_name} must be a list of strings, got {value!r}; e.g. {field_name}: ["fc*"]'
                )
            object.__setattr__(self, field_name, tuple(value))
        if not self.include:
            raise ValueError("include is empty: nothing would be targeted; use ['*'] for every layer")
        if self.parameter not in ("weight", "bias"):
            raise ValueError(f"parameter must be 'weight' or 'bias', got {self.parameter!r}")


def _type_matches(module: nn.Module, types: Sequence[str]) -> bool:
    names = {cls.__name__ for cls in type(module).__mro__}
    return any(t in names for t in types)


def select_parameters(model: nn.Module, spec: TargetSpec) -> dict[str, nn.Parameter]:
    """FQN of each targeted parameter (e.g. ``"net.fc1.weight"``) -> the parameter, in module order.

    Raises ValueError when an include/exclude pattern matches no module of the wanted types, or when
    the selection is empty, listing the candidate names.
    """
    candidates = {
        name: module
        for name, module in model.named_modules()
        if name
        and _type_matches(module, spec.types)
        and isinstance(getattr(module, spec.parameter, None), nn.Parameter)
    }
    if not candidates:
        raise ValueError(
            f"the model has no modules of types {list(spec.types)} with a {spec.parameter!r} parameter; "
            f"its layer types are {sorted({type(m).__name__ for m in model.modules()})}"
        )
    for kind, patterns in (("include", spec.include), ("exclude", spec.exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
                close = difflib.get_close_matches(pattern, list(candidates), n=4, cutoff=0.3)
                raise ValueError(
                    f"{kind} pattern {pattern!r} matches no {'/'.join(spec.types)} layer. "
                    f"Close names: {close or 'none'}; all candidates: {list(candidates)}"
                )
    selected = {
        f"{name}.{spec.parameter}": getattr(module, spec.parameter)
        for name, module in candidates.items()
        if any(fnmatch.fnmatchcase(name, p) for p in spec.include)
        and not any(fnmatch.fnmatchcase(name, p) for p in spec.exclude)
    }
    if not selected:
        raise ValueError(f"include {list(spec.include)} minus exclude {list(spec.exclude)} selects nothing")
    return selected


def network_of(pl_module: nn.Module, model_attr: str | None, owner: str) -> nn.Module:
    """``pl_module.<model_attr>`` (the whole module for ``None``): the network a callback works on.

    ``owner`` names the callback in the error raised when the attribute is missing or not a module.
    """
    if model_attr is None:
        return pl_module
    net = getattr(pl_module, model_attr, None)
    if not isinstance(net, nn.Module):
        children = [n for n, _ in pl_module.named_children()]
        raise ValueError(
            f"{owner}(model_attr={model_attr!r}): the LightningModule has no nn.Module attribute "
            f"{model_attr!r}; its submodules are {children}. Set model_attr to the network's attribute, or "
            "null for the whole module."
        )
    return net
