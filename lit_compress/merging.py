"""Layer merging: a slimmer inference network with the same outputs (BN folding, DeepRebirth's streamlining).

At inference several layers are linear maps that can be absorbed into the preceding Conv / Linear layer:

- **BatchNorm** in eval mode is a per-channel affine map ``y = s * x + t`` with
  ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``: folded into the layer before it,
  ``W' = s W`` (per output channel) and ``b' = s b + t`` (a bias is added when the layer had none).
  BatchNorm1d after a Linear is folded too.
- **Per-channel affine / scale layers** (timm's ``LayerScale`` / ``LayerScale2d``, a multiplication or
  addition by a constant that varies only along the channel dimension, classes registered with
  :func:`register_affine`) fold the same way.
- **Consecutive Linear layers** with nothing between them but no-ops (Identity, Dropout in eval mode) become
  one: ``W = W2 W1``, ``b = W2 b1 + b2``. This is only smaller when the hidden width is large, so automatic
  merging (``linear_merge="if_smaller"``) only merges when the product has no more weights than the pair.
- **No-ops** at inference (``Identity``, ``Dropout*``, timm's ``DropPath`` / ``DropBlock2d``) are dropped.

The network is traced with ``torch.fx`` so that patterns are found on the real data flow, not on module
order: a BatchNorm whose input is not a Conv / Linear output, or whose layer's output is also read elsewhere
(it needs the un-normalised value), cannot be folded and is listed in the report with the reason. Merging
across a non-linearity is never done; with explicit ``pairs`` it is refused with a ValueError naming the op
in between. The merged network's outputs are checked against the original's on ``example_input``.

DeepRebirth (Li, Wang, Kong, AAAI 2018) also merges across non-tensor layers and retrains the merged layers;
that is approximate and not done here: every merge in this module is exact up to float rounding.
"""

from __future__ import annotations

import copy
import difflib
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["LINEAR_MERGE_MODES", "MergeReport", "MergeStep", "merge_layers", "register_affine"]

LINEAR_MERGE_MODES = ("if_smaller", "always", "never")
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_SHAPE_METHODS = ("view", "reshape", "unsqueeze", "squeeze", "flatten", "expand", "to", "float", "double")
_NOOPS = {
    "torch.nn.modules.linear.Identity",
    "torch.nn.modules.dropout.Dropout",
    "torch.nn.modules.dropout.Dropout1d",
    "torch.nn.modules.dropout.Dropout2d",
    "torch.nn.modules.dropout.Dropout3d",
    "torch.nn.modules.dropout.AlphaDropout",
    "torch.nn.modules.dropout.FeatureAlphaDropout",
    "timm.layers.drop.DropPath",
    "timm.layers.drop.DropBlock2d",
}

# An affine adapter returns (scale or None, shift or None, channel dim: 1 or -1) or a reason it is not affine.
AffineFn = Callable[[nn.Module], "tuple[Tensor | None, Tensor | None, int] | str"]
_AFFINES: dict[str, AffineFn] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_affine(cls: type[nn.Module] | str, fn: AffineFn) -> None:
    """Declare a per-channel affine layer class (exact class, or its qualified name ``"pkg.mod.Class"``).

    ``fn(module)`` returns ``(scale, shift, channel_dim)``: 1-D tensors (or None for 1 / 0) with one entry per
    channel, and the dimension of the input they act along (``1`` for ``[N, C, ...]``, ``-1`` for the last),
    or a string saying why this instance is not affine. Subclasses are not matched (they may add a
    non-linearity, as timm's ``BatchNormAct2d`` does).
    """
    name = cls if isinstance(cls, str) else _qualname(cls)
    if not isinstance(name, str) or "." not in name or not callable(fn):
        raise TypeError(
            "register_affine needs a module class (or 'package.module.Class') and a function, got "
            f"{cls!r}, {fn!r}"
        )
    _AFFINES[name] = fn


def _batchnorm_affine(bn: nn.Module) -> tuple[Tensor, Tensor, int] | str:
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return (
            "it has no running statistics (track_running_stats=False), so it normalises with batch statistics"
        )
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale, shift = scale * bn.weight.double(), shift * bn.weight.double() + bn.bias.double()
    return scale, shift, 1


for _bn in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"):
    register_affine(f"torch.nn.modules.batchnorm.{_bn}", _batchnorm_affine)
register_affine("timm.layers.layer_scale.LayerScale", lambda m: (m.gamma.double(), None, -1))
register_affine("timm.layers.layer_scale.LayerScale2d", lambda m: (m.gamma.double(), None, 1))


@dataclass(frozen=True)
class MergeStep:
    """One merge: ``absorbed`` (a layer or op) now lives inside layer ``into``."""

    kind: str  # "fold" (affine into the preceding layer), "linear" (two Linears into one), "drop" (no-op)
    into: str
    absorbed: str


@dataclass
class MergeReport:
    """What :func:`merge_layers` did, what it left and why, and how close the outputs stayed."""

    steps: list[MergeStep] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not merged
    params_before: int = 0
    params_after: int = 0
    max_abs_error: float = 0.0
    output_scale: float = 0.0  # max |output| of the original on example_input (for a relative error)

    def __str__(self) -> str:
        lines = [
            f"merged {len(self.steps)} layer(s): params {self.params_before:,} -> {self.params_after:,}, "
            f"max |output difference| {self.max_abs_error:.3g}"
        ]
        lines += [
            f"  drop   {s.absorbed} (a no-op at inference)"
            if s.kind == "drop"
            else f"  {s.kind:6s} {s.absorbed} -> {s.into}"
            for s in self.steps
        ]
        lines += [f"  kept   {what}: {why}" for what, why in self.skipped.items()]
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    """``fx.Tracer`` that remembers the innermost submodule being traced when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # Registered affine layers and no-ops stay whole, so they can be recognised and folded by class.
        name = _qualname(type(m))
        return name in _AFFINES or name in _NOOPS or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m) or "<root>"
            raise


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:
        where = tracer.failed_in
        inside = f" (in submodule {where!r})" if where not in (None, "<root>") else ""
        raise ValueError(
            f"merge_layers: cannot trace {type(model).__name__} with torch.fx{inside}: {type(err).__name__}: "
            f"{err}. Merging needs a forward without Python control flow on tensor values (if/for over data, "
            ".item(), data-dependent shapes)."
        ) from err
    return fx.GraphModule(tracer.root, graph, f"{type(model).__name__}Merged")


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} {node.target!r}"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}(...)"
    if node.op == "call_method":
        return f"Tensor.{node.target}()"
    if node.op == "placeholder":
        return f"the network input {node.target!r}"
    return f"{node.op} {node.target!r}"


def _as_example(example_input: Any) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)


def _flat_tensors(out: Any) -> list[Tensor]:
    from torch.utils._pytree import tree_flatten

    return [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]


class _Merger:
    def __init__(self, gm: fx.GraphModule, linear_merge: str) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.linear_merge = linear_merge
        self.report = MergeReport()
        self.absorbed_attrs: set[str] = set()

    # -- helpers ---------------------------------------------------------------------------------------

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None

    def calls(self, target: str) -> int:
        return sum(1 for n in self.graph.nodes if n.op == "call_module" and n.target == target)

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def set_module(self, target: str, module: nn.Module) -> None:
        parent, _, child = target.rpartition(".")
        setattr(self.gm.get_submodule(parent), child, module)

    def layer_problem(self, node: fx.Node, consumer: fx.Node) -> str | None:
        """Why ``node`` is not a layer that ``consumer`` can be folded into (None: it is)."""
        m = self.module(node)
        if m is None or not isinstance(m, _LAYERS):
            return f"its input is {_describe(node, self.gm)}, not a Conv / Linear layer"
        if type(m) not in _LAYERS:
            return (
                f"its input layer {node.target!r} is a {type(m).__name__} (a subclass that may transform its "
                "weights in forward), not a plain Conv / Linear"
            )
        others = [u.name for u in node.users if u is not consumer]
        if others:
            return f"the output of {_describe(node, self.gm)} also feeds {others}, which need it unchanged"
        if self.calls(node.target) > 1:
            return f"layer {node.target!r} is called {self.calls(node.target)} times (shared weights)"
        if self.shape(node) is None:
            return f"the output shape of {node.target!r} is unknown"
        return None

    # -- no-ops ----------------------------------------------------------------------------------------

    def drop_noops(self) -> None:
        for node in list(self.graph.nodes):
            m = self.module(node)
            is_noop = (
                m is not None and _qualname(type(m)) in _NOOPS and len(node.args) == 1 and not node.kwargs
            )
            if node.op == "call_function" and node.target in (
                F.dropout,
                F.dropout1d,
                F.dropout2d,
                F.dropout3d,
            ):
                training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
                is_noop = training is False
            if is_noop and isinstance(node.args[0], fx.Node):
                node.replace_all_uses_with(node.args[0])
                self.graph.erase_node(node)
                self.report.steps.append(MergeStep("drop", "", _describe_erased(node, m)))

    # -- affine folding --------------------------------------------------------------------------------

    def affine_of(
        self, node: fx.Node
    ) -> tuple[fx.Node, Tensor | None, Tensor | None, int | None] | str | None:
        """(input node, scale, shift, channel dim or None for a raw constant) of an affine node, a reason
        string when it looks affine but is not usable, or None when it is not an affine op at all."""
        m = self.module(node)
        if m is not None:
            fn = _AFFINES.get(_qualname(type(m)))
            if fn is None or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                return None
            got = fn(m)
            if isinstance(got, str):
                return got
            scale, shift, dim = got
            return node.args[0], scale, shift, dim
        ops = {
            operator.mul: "mul",
            torch.mul: "mul",
            operator.add: "add",
            torch.add: "add",
            operator.sub: "sub",
            torch.sub: "sub",
            operator.truediv: "div",
            torch.div: "div",
        }
        kind = ops.get(node.target) if node.op == "call_function" else None
        if node.op == "call_method" and node.target in ("mul", "add", "sub", "div"):
            kind = node.target
        if kind is None or len(node.args) != 2 or node.kwargs:
            return None
        a, b = node.args
        if isinstance(a, fx.Node) and not self.is_constant(a):
            x, c, x_first = a, b, True
        elif isinstance(b, fx.Node) and not self.is_constant(b) and kind in ("mul", "add"):
            x, c, x_first = b, a, False
        else:
            return None
        if not x_first and kind not in ("mul", "add"):
            return None
        const = self.constant(c)
        if const is None:
            return None
        if kind == "mul":
            return x, const, None, None
        if kind == "add":
            return x, None, const, None
        if kind == "sub":
            return x, None, -const, None
        return x, 1.0 / const, None, None

    def is_constant(self, node: fx.Node) -> bool:
        """A get_attr, or a shape op (view, reshape, ...) of constants: a value fixed at inference."""
        if node.op == "get_attr":
            return True
        if node.op == "call_method" and node.target in _SHAPE_METHODS:
            return all(self.is_constant(a) for a in node.all_input_nodes) and bool(node.all_input_nodes)
        return False

    def constant(self, value: Any) -> Tensor | None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return torch.tensor(float(value), dtype=torch.float64)
        if not isinstance(value, fx.Node) or not self.is_constant(value):
            return None
        if value.op == "get_attr":
            t = _get_attr(self.gm, value.target)
            return t.detach().double() if isinstance(t, Tensor) else None
        args = [self.constant(a) if isinstance(a, fx.Node) else a for a in value.args]
        if args and not isinstance(args[0], Tensor):
            return None
        return getattr(args[0], value.target)(*args[1:], **value.kwargs)

    def constant_attrs(self, node: fx.Node) -> set[str]:
        """The get_attr targets a constant expression reads."""
        if node.op == "get_attr":
            return {node.target}
        return (
            set().union(*(self.constant_attrs(a) for a in node.all_input_nodes))
            if node.all_input_nodes
            else set()
        )

    def per_channel(
        self, value: Tensor | None, out_shape: tuple[int, ...], axis: int, dim: int | None, what: str
    ) -> Tensor | str | None:
        """``value`` as a vector over the ``out_shape[axis]`` channels, or a reason it is not per-channel."""
        if value is None:
            return None
        channels = out_shape[axis]
        if dim is not None:  # a registered affine module acting along ``dim`` of its input
            acts_on = dim % len(out_shape)
            if acts_on != axis:
                return (
                    f"{what} acts on dim {acts_on} of a {len(out_shape)}-D output whose channels are on "
                    f"dim {axis}"
                )
            if value.numel() not in (1, channels):
                return f"{what} has {value.numel()} entries for {channels} channels"
            return value.reshape(-1).expand(channels).clone()
        if value.ndim > len(out_shape):
            return f"{what} has more dimensions than the layer output"
        full = (1,) * (len(out_shape) - value.ndim) + tuple(value.shape)
        for d, (size, out) in enumerate(zip(full, out_shape)):
            if d != axis and size != 1:
                return (
                    f"{what} of shape {tuple(value.shape)} varies along dim {d}, not only along the channels"
                )
            if d == axis and size not in (1, out):
                return f"{what} of shape {tuple(value.shape)} does not broadcast to {out_shape}"
        return value.reshape(-1).expand(channels).clone()

    def try_fold(self, node: fx.Node, strict: bool = False) -> bool:
        got = self.affine_of(node)
        if got is None:
            if strict:
                raise ValueError(f"{_describe(node, self.gm)} is not a per-channel affine layer")
            return False
        what = _describe(node, self.gm)
        if isinstance(got, str):
            return self.refuse(what, got, strict)
        source, scale, shift, dim = got
        if dim is None and not isinstance(self.module(source), _LAYERS):
            return False  # arithmetic on something other than a layer output: not a merging candidate
        problem = self.layer_problem(source, node)
        if problem is not None:
            return self.refuse(what, problem, strict)
        layer = self.module(source)
        out_shape = self.shape(source)
        axis = 1 if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else len(out_shape) - 1
        scale = self.per_channel(scale, out_shape, axis, dim, what)
        shift = self.per_channel(shift, out_shape, axis, dim, what)
        for part in (scale, shift):
            if isinstance(part, str):
                return self.refuse(what, part, strict)
        self.set_module(source.target, _fold(layer, scale, shift))
        for arg in node.args:
            if isinstance(arg, fx.Node) and self.is_constant(arg):
                self.absorbed_attrs |= self.constant_attrs(arg)
        node.replace_all_uses_with(source)
        self.graph.erase_node(node)
        self.report.steps.append(MergeStep("fold", source.target, what))
        self.report.skipped.pop(what, None)
        return True

    def refuse(self, what: str, reason: str, strict: bool) -> bool:
        if strict:
            raise ValueError(f"cannot merge {what}: {reason}")
        self.report.skipped[what] = reason
        return False

    # -- Linear + Linear -------------------------------------------------------------------------------

    def try_merge_linear(self, node: fx.Node, strict: bool = False) -> bool:
        second = self.module(node)
        if type(second) is not nn.Linear or len(node.args) != 1 or node.kwargs:
            return False
        source = node.args[0]
        if not isinstance(source, fx.Node) or type(self.module(source)) is not nn.Linear:
            if strict:
                raise ValueError(
                    f"cannot merge into {_describe(node, self.gm)}: its input is not a Linear layer"
                )
            return False
        what = f"Linear {source.target!r} + Linear {node.target!r}"
        problem = self.layer_problem(source, node)
        if problem is None and self.calls(node.target) > 1:
            problem = f"layer {node.target!r} is called {self.calls(node.target)} times (shared weights)"
        if problem is not None:
            return self.refuse(what, problem, strict)
        first = self.module(source)
        hidden, n_in, n_out = first.out_features, first.in_features, second.out_features
        if not strict:
            if self.linear_merge == "never":
                return False
            if self.linear_merge == "if_smaller" and n_in * n_out > hidden * (n_in + n_out):
                return self.refuse(
                    what,
                    f"one {n_in}x{n_out} layer would have more weights ({n_in * n_out:,}) than the pair "
                    f"({hidden * (n_in + n_out):,}); pass linear_merge='always' to merge anyway",
                    strict,
                )
        self.set_module(node.target, _compose(first, second))
        node.args = (source.args[0],)
        self.graph.erase_node(source)
        self.report.steps.append(MergeStep("linear", node.target, f"Linear {source.target!r}"))
        self.report.skipped.pop(what, None)
        return True

    # -- drivers ---------------------------------------------------------------------------------------

    def run_automatic(self) -> None:
        changed = True
        while changed:
            changed = False
            for node in list(self.graph.nodes):
                if getattr(node, "_erased", False):
                    continue
                changed |= self.try_fold(node) or self.try_merge_linear(node)

    def run_pairs(self, pairs: Sequence[tuple[str, str]]) -> None:
        for pair in pairs:
            if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise ValueError(f"each pair must be two module names [first, second], got {pair!r}")
            first, second = (self.node_of(name) for name in pair)
            if second.args and second.args[0] is not first:
                between = self.path_between(first, second)
                if between is None:
                    source = second.args[0]
                    source = _describe(source, self.gm) if isinstance(source, fx.Node) else "a constant"
                    raise ValueError(
                        f"cannot merge {pair[0]!r} into {pair[1]!r}: the input of {pair[1]!r} is {source}, "
                        f"which is not computed from {pair[0]!r}"
                    )
                ops = ", ".join(_describe(n, self.gm) for n in between)
                raise ValueError(
                    f"cannot merge {pair[0]!r} into {pair[1]!r}: between them is {ops}; merging across it "
                    "would change what the network computes (only Identity / Dropout may sit between merged "
                    "layers)"
                )
            if type(self.module(second)) is nn.Linear and type(self.module(first)) is nn.Linear:
                self.try_merge_linear(second, strict=True)
            else:
                self.try_fold(second, strict=True)

    def node_of(self, name: str) -> fx.Node:
        nodes = [n for n in self.graph.nodes if n.op == "call_module" and n.target == name]
        if len(nodes) != 1:
            called = sorted({n.target for n in self.graph.nodes if n.op == "call_module"})
            if nodes:
                raise ValueError(
                    f"module {name!r} is called {len(nodes)} times; shared layers cannot be merged"
                )
            close = difflib.get_close_matches(name, called, n=4, cutoff=0.3)
            raise ValueError(
                f"module {name!r} is not called by the traced network. Close names: {close or 'none'}; "
                f"called modules: {called[:40]}"
            )
        return nodes[0]

    def path_between(self, first: fx.Node, second: fx.Node) -> list[fx.Node] | None:
        """Nodes on the first-argument chain from ``second`` back to ``first`` (None: not reached)."""
        path, node = [], second.args[0] if second.args else None
        for _ in range(64):
            if not isinstance(node, fx.Node) or node.op in ("placeholder", "get_attr"):
                return None
            if node is first:
                return list(reversed(path))
            path.append(node)
            node = node.args[0] if node.args else None
        return None

    def finish(self) -> None:
        self.graph.eliminate_dead_code()
        called = {n.target for n in self.graph.nodes if n.op == "call_module"}
        for target in self.absorbed_attrs:
            if any(n.op == "get_attr" and n.target == target for n in self.graph.nodes):
                continue
            owner, _, attr = target.rpartition(".")
            if any(owner == t or owner.startswith(t + ".") for t in called):
                continue  # a module that is still called may read it in its own forward
            mod = self.gm.get_submodule(owner)
            if hasattr(mod, attr):
                delattr(mod, attr)
        self.gm.delete_all_unused_submodules()
        self.graph.lint()
        self.gm.recompile()


def _describe_erased(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return f"{type(module).__name__} {node.target!r}"
    return f"{getattr(node.target, '__name__', node.target)}(training=False)"


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


@torch.no_grad()
def _fold(layer: nn.Module, scale: Tensor | None, shift: Tensor | None) -> nn.Module:
    """A copy of Conv/Linear ``layer`` computing ``scale * layer(x) + shift`` per output channel."""
    new = copy.deepcopy(layer)
    w = new.weight.double()
    b = new.bias.double() if new.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if scale is not None:
        scale = scale.to(w.device)
        w = w * scale.view(-1, *([1] * (w.ndim - 1)))
        b = b * scale.to(b.device)
    if shift is not None:
        b = b + shift.to(b.device)
    new.weight = nn.Parameter(w.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    new.bias = nn.Parameter(b.to(layer.weight.dtype), requires_grad=layer.weight.requires_grad)
    return new


@torch.no_grad()
def _compose(first: nn.Linear, second: nn.Linear) -> nn.Linear:
    """One Linear computing ``second(first(x))``."""
    w1, w2 = first.weight.double(), second.weight.double()
    b1 = first.bias.double() if first.bias is not None else torch.zeros(w1.shape[0], dtype=torch.float64)
    b2 = second.bias.double() if second.bias is not None else torch.zeros(w2.shape[0], dtype=torch.float64)
    merged = nn.Linear(first.in_features, second.out_features, device=w2.device, dtype=second.weight.dtype)
    merged.weight.copy_(w2 @ w1)
    merged.bias.copy_(w2 @ b1 + b2)
    return merged


def merge_layers(
    model: nn.Module,
    example_input: Any,
    pairs: Sequence[Sequence[str]] | None = None,
    linear_merge: str = "if_smaller",
    check: bool = True,
) -> tuple[fx.GraphModule, MergeReport]:
    """A new inference network (``torch.fx.GraphModule``, eval mode) with its foldable layers merged.

    Args:
        model: the network; it is copied (never modified) and put in eval mode (BatchNorm running statistics).
        example_input: an input tensor (or a tuple of them) used to learn the layers' output shapes and to
            check that the merged network computes the same outputs.
        pairs: explicit ``[first, second]`` module names to merge (``["conv1", "bn1"]``,
            ``["fc1", "fc2"]``); only these are merged, and any that cannot be (a non-linearity or another
            op in between, a layer whose output is also used elsewhere) raises a ValueError saying why.
            None merges every exact pattern found (no-ops are dropped in both cases).
        linear_merge: automatic merging of consecutive Linear layers: ``"if_smaller"`` (only when the merged
            layer has no more weights than the pair), ``"always"`` or ``"never"``.
        check: compare the outputs on ``example_input`` (relative tolerance 1e-4 of the output scale) and
            raise RuntimeError if they differ.

    Returns:
        ``(merged, report)``: kept layers keep their names (``merged.state_dict()`` keys are a subset of the
        original's, plus biases added by folding); ``report`` lists every merge, every candidate left alone
        with the reason, the parameter counts and the largest output difference on ``example_input``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if linear_merge not in LINEAR_MERGE_MODES:
        close = difflib.get_close_matches(str(linear_merge), LINEAR_MERGE_MODES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"linear_merge must be one of {LINEAR_MERGE_MODES}, got {linear_merge!r}.{hint}")
    if pairs is not None and (isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence)):
        raise ValueError(f"pairs must be a list of [first, second] module names, got {pairs!r}")
    example = _as_example(example_input)
    if not example or not all(isinstance(t, Tensor) for t in example):
        raise TypeError(
            f"example_input must be a tensor or a tuple of tensors (e.g. torch.zeros(1, 3, 32, 32)), got "
            f"{type(example_input).__name__}"
        )
    original = copy.deepcopy(model).eval()
    gm = _trace(copy.deepcopy(original)).eval()
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*example)
        reference = original(*example)
    merger = _Merger(gm, linear_merge)
    merger.report.params_before = sum(p.numel() for p in original.parameters())
    merger.drop_noops()
    if pairs is None:
        merger.run_automatic()
    else:
        merger.run_pairs([tuple(p) for p in pairs])
    merger.finish()
    report = merger.report
    report.params_after = sum(p.numel() for p in gm.parameters())
    with torch.no_grad():
        merged_out = gm(*example)
    want, got = _flat_tensors(reference), _flat_tensors(merged_out)
    if len(want) != len(got) or any(w.shape != g.shape for w, g in zip(want, got)):
        raise RuntimeError(
            "merge_layers: the merged network's outputs have other shapes (a bug; please report)"
        )
    report.max_abs_error = max(
        ((w - g).abs().max().item() for w, g in zip(want, got) if w.numel()), default=0.0
    )
    scale = max((w.abs().max().item() for w in want if w.numel() and w.is_floating_point()), default=1.0)
    report.output_scale = scale
    if check and report.max_abs_error > 1e-4 * max(1.0, scale):
        raise RuntimeError(
            f"merge_layers: the merged network differs from the original by up to {report.max_abs_error:.3g} "
            f"(outputs up to {scale:.3g}); this is a bug, please report it with the model. Merges: {report}"
        )
    return gm, report
