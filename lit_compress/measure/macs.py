"""Multiply-accumulate (MAC) counting with forward hooks on a real forward pass.

Convention (Han et al., "Learning both Weights and Connections", 2015): only the multiply-accumulates of
convolutions and fully connected layers are counted -- ``Conv1d/2d/3d`` (any stride, padding, dilation,
groups), ``ConvTranspose1d/2d/3d`` and ``Linear``. Batch norm, pooling, activations, additions, biases and
softmax are not counted. One MAC is one multiply plus one add (FLOPs are often quoted as 2 x MACs).

Per example, with ``nnz(W)`` the number of exactly-nonzero weights (multiplications by zero are skipped):

* Conv: dense = C_out * prod(out spatial) * (C_in / groups) * prod(kernel) = prod(out spatial) * W.numel();
  effective = prod(out spatial) * nnz(W).
* ConvTranspose: every input position is scattered through the kernel: dense = prod(in spatial) * W.numel();
  effective = prod(in spatial) * nnz(W).
* Linear: rows = output.numel() / (batch * out_features) (1 for ``[B, F]``, T for ``[B, T, F]``);
  dense = rows * in_features * out_features; effective = rows * nnz(W).

Values are the **mean per example**: totals over the example batch divided by the batch size (dim 0 of the
first input tensor). A value is an ``int`` when its batch total is an integer divisible by the batch size --
always the case for static nets with the built-in counters, whatever the batch size -- and a ``float``
otherwise (dynamic nets whose work varies from example to example).

Which modules are counted, walking the module tree from the root:

1. a module with a callable ``compression_macs(inputs: tuple, output) -> (dense, effective)`` returning the
   totals for the whole batch (gated and dynamic modules: a skipped block counts dense, not effective);
2. else a module whose type (looked up along its MRO, most specific first) has a counter registered with
   :func:`register_mac_counter`: ``fn(module, inputs, output) -> (dense, effective)`` batch totals;
3. else its children are visited.

A counted module takes over its whole subtree: its descendants are not hooked, and a counted module called
from inside another counted module's forward (a shared layer, say) is not counted a second time. A module
called several times in one forward counts every call. Work done by functional calls (``F.linear``,
``torch.matmul``, the projections inside ``nn.MultiheadAttention``) is invisible to hooks and not counted:
wrap it in a module that defines ``compression_macs`` or register a counter for that module type.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor, nn

from ._util import Number, check_input_shape, eval_mode, random_batch

MacCounter = Callable[[nn.Module, tuple, Any], tuple[Number, Number]]

_MAC_COUNTERS: dict[type, MacCounter] = {}


def register_mac_counter(module_type: type, *, override: bool = False) -> Callable[[MacCounter], MacCounter]:
    """Decorator registering ``fn(module, inputs, output) -> (dense, effective)`` for ``module_type``.

    The counter returns totals for the whole batch; it applies to subclasses too unless a more specific
    type has its own counter. Registering a type twice is an error unless ``override=True``.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_mac_counter expects an nn.Module subclass, got {module_type!r}.")

    def decorator(fn: MacCounter) -> MacCounter:
        if not callable(fn):
            raise TypeError(f"a MAC counter must be callable, got {fn!r} for {module_type.__name__}.")
        if module_type in _MAC_COUNTERS and not override:
            raise ValueError(
                f"a MAC counter is already registered for {module_type.__name__} "
                f"({_MAC_COUNTERS[module_type].__qualname__}). Hint: pass override=True to replace it."
            )
        _MAC_COUNTERS[module_type] = fn
        return fn

    return decorator


def unregister_mac_counter(module_type: type) -> None:
    """Remove the counter registered for exactly ``module_type`` (no-op if there is none)."""
    _MAC_COUNTERS.pop(module_type, None)


def mac_counter_for(module: nn.Module) -> MacCounter | None:
    """The counter that applies to ``module``: its ``compression_macs`` method, else the registry (by MRO)."""
    method = getattr(module, "compression_macs", None)
    if callable(method):
        return lambda m, inputs, output: m.compression_macs(inputs, output)
    for klass in type(module).__mro__:
        if klass in _MAC_COUNTERS:
            return _MAC_COUNTERS[klass]
    return None


def _nnz(weight: Tensor) -> int:
    return int(torch.count_nonzero(weight.detach()))


@register_mac_counter(nn.Conv1d)
@register_mac_counter(nn.Conv2d)
@register_mac_counter(nn.Conv3d)
def _conv_macs(module: nn.Module, inputs: tuple, output: Tensor) -> tuple[int, int]:
    positions = output.numel() // module.out_channels  # batch x output spatial positions
    return positions * module.weight.numel(), positions * _nnz(module.weight)


@register_mac_counter(nn.ConvTranspose1d)
@register_mac_counter(nn.ConvTranspose2d)
@register_mac_counter(nn.ConvTranspose3d)
def _conv_transpose_macs(module: nn.Module, inputs: tuple, output: Tensor) -> tuple[int, int]:
    positions = inputs[0].numel() // module.in_channels  # batch x input spatial positions
    return positions * module.weight.numel(), positions * _nnz(module.weight)


@register_mac_counter(nn.Linear)
def _linear_macs(module: nn.Module, inputs: tuple, output: Tensor) -> tuple[int, int]:
    rows = output.numel() // module.out_features  # batch x leading dims
    return rows * module.weight.numel(), rows * _nnz(module.weight)


@dataclass(frozen=True)
class LayerMacs:
    """Mean MACs per example of one counted module (``name`` as in ``named_modules``)."""

    name: str
    type: str
    dense: Number
    effective: Number


@dataclass(frozen=True)
class MacReport:
    """Per-layer and total mean MACs per example, measured on a batch of ``batch_size`` examples."""

    layers: list[LayerMacs] = field(default_factory=list)
    dense: Number = 0
    effective: Number = 0
    batch_size: int = 1

    @property
    def reduction(self) -> float:
        """``dense / effective``; ``inf`` when no effective MACs remain."""
        return self.dense / self.effective if self.effective else float("inf")

    def by_name(self) -> dict[str, LayerMacs]:
        return {layer.name: layer for layer in self.layers}


def _counted_modules(model: nn.Module) -> list[tuple[str, nn.Module, MacCounter]]:
    """Counted modules top-down, in ``named_modules`` order; a counted module's subtree is not visited."""
    found: list[tuple[str, nn.Module, MacCounter]] = []
    seen: set[int] = set()

    def visit(module: nn.Module, name: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        counter = mac_counter_for(module)
        if counter is not None:
            found.append((name, module, counter))
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return found


def _check_pair(result: object, name: str, module: nn.Module) -> tuple[Number, Number]:
    if isinstance(result, Sequence):  # accept one-element tensors, e.g. from torch.count_nonzero
        result = tuple(v.item() if isinstance(v, Tensor) and v.numel() == 1 else v for v in result)
    ok = (
        isinstance(result, Sequence)
        and len(result) == 2
        and all(isinstance(v, Real) and not isinstance(v, bool) and v >= 0 for v in result)
    )
    if not ok:
        raise TypeError(
            f"the MAC counter of {name or '<root>'!r} ({type(module).__name__}) returned {result!r}; "
            "expected a (dense, effective) pair of non-negative numbers, totals for the whole batch."
        )
    return tuple(int(v) if isinstance(v, Integral) else float(v) for v in result)  # unwraps numpy scalars


def per_example(total: Number, batch_size: int) -> Number:
    """``total / batch_size`` as an exact ``int`` when possible, else a ``float``."""
    if isinstance(total, int) or (isinstance(total, float) and math.isfinite(total) and total.is_integer()):
        whole = int(total)
        if whole % batch_size == 0:
            return whole // batch_size
    return total / batch_size


def resolve_example(
    model: nn.Module, example_input: object, input_shape: Sequence[int] | None
) -> tuple[tuple[Tensor, ...], int]:
    """Positional forward args and batch size from an example tensor/tuple of tensors or a shape."""
    if (example_input is None) == (input_shape is None):
        raise ValueError(
            "pass exactly one of example_input (a batched tensor, or a tuple of them for a multi-input "
            "forward) or input_shape (per-example shape, e.g. [1, 28, 28]); "
            f"got example_input={type(example_input).__name__}, input_shape={input_shape!r}."
        )
    if input_shape is None and not isinstance(example_input, Tensor | tuple | list):
        raise TypeError(f"example_input must be a Tensor or a tuple of Tensors, got {type(example_input)}.")
    if isinstance(example_input, tuple | list) and not all(isinstance(t, Tensor) for t in example_input):
        input_shape, example_input = example_input, None  # a shape given positionally
    if input_shape is not None:
        return (random_batch(model, check_input_shape(input_shape), 1),), 1
    args = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    if not args or args[0].dim() == 0:
        raise ValueError("example_input needs a leading batch dimension, e.g. shape [B, 1, 28, 28].")
    return args, int(args[0].shape[0])


def count_macs(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...] | Sequence[int] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
) -> MacReport:
    """Count dense and effective MACs per example with one forward pass (see the module docstring).

    ``example_input`` is a batched tensor (or a tuple of tensors passed as positional args); alternatively
    ``input_shape`` (or a shape given as ``example_input``) is the per-example shape, and a seeded random
    batch of one is made on the model's device and dtype. The forward runs under ``torch.no_grad()`` in eval
    mode; every module's mode is restored and all hooks are removed afterwards, even on error.
    """
    args, batch_size = resolve_example(model, example_input, input_shape)
    counted = _counted_modules(model)
    totals: dict[str, list[Number]] = {name: [0, 0] for name, _, _ in counted}
    depth = 0  # > 0 while inside a counted module's forward

    def pre_hook(module: nn.Module, inputs: tuple) -> None:
        nonlocal depth
        depth += 1

    def make_hook(name: str, counter: MacCounter) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            nonlocal depth
            depth -= 1
            if depth == 0:  # only the outermost counted module counts
                dense, effective = _check_pair(counter(module, inputs, output), name, module)
                totals[name][0] += dense
                totals[name][1] += effective

        return hook

    handles = []
    with eval_mode(model), torch.no_grad():
        try:
            for name, module, counter in counted:
                handles.append(module.register_forward_pre_hook(pre_hook))
                handles.append(module.register_forward_hook(make_hook(name, counter)))
            model(*args)
        finally:
            for handle in handles:
                handle.remove()

    layers = [
        LayerMacs(name, type(module).__name__, *(per_example(v, batch_size) for v in totals[name]))
        for name, module, _ in counted
    ]
    return MacReport(
        layers=layers,
        dense=per_example(sum(t[0] for t in totals.values()), batch_size),
        effective=per_example(sum(t[1] for t in totals.values()), batch_size),
        batch_size=batch_size,
    )
