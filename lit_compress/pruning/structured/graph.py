"""Channel dependency graph: which output channels must be removed together, and who reads them.

Removing output channel ``c`` of a convolution is only valid if every layer that *reads* that channel drops
its input ``c`` too, every batch-norm on the way drops its entry ``c``, and every tensor the channel is
*added* to (a residual) loses the same channel. :func:`channel_groups` traces the model with ``torch.fx``,
runs the traced graph once on ``example_input`` (eval mode, no grad, modes restored) to get concrete
shapes, and propagates a *channel layout* through every node: which producer's channels sit where along
the channel dimension of each tensor. Producers tied by an elementwise op (residual ``add``, ``mul``) are
merged into one :class:`ChannelGroup` (union-find).

Handled (everything else is refused, see below):

* **Producers** (a new group per module): ``nn.Conv1d/2d/3d`` with ``groups == 1`` and ``nn.Linear``
  (exact classes, subclasses that do not override ``forward``, and timm's ``Linear``). A module called
  twice keeps one group.
* **Consumers** (input channels, weight dim 1): the same Conv/Linear. A Linear reads the last dimension;
  ``torch.flatten`` / ``x.view(x.size(0), -1)`` / ``x.reshape`` / ``nn.Flatten`` before it make every
  channel span ``H*W`` input features (``ChannelRef.repeat``), found from the concrete shapes.
* **Norms**: ``nn.BatchNorm1d/2d/3d`` on the channel dimension, and timm's ``BatchNormAct2d`` when its
  ``drop`` and ``act`` are pass-through modules.
* **Depthwise conv** (``groups == in_channels == out_channels``): the channels pass *through* it; it is
  listed in :attr:`ChannelGroup.passthrough` and sliced along dim 0 with its ``groups``.
* **Pass-through**: ReLU, ReLU6, LeakyReLU, ELU, SELU, CELU, GELU, SiLU, Mish, Hardswish, Hardsigmoid,
  Hardtanh, Sigmoid, Tanh, Softplus, PReLU (one parameter), Identity, Dropout* (modules and functional
  forms), max/avg/adaptive pooling, ``F.interpolate`` and ``nn.Upsample`` over the spatial dims,
  ``contiguous``/``clone``/``to``/dtype casts,
  reshapes that keep or flatten the channel dim, ``permute``/``transpose`` (the channel dim is followed),
  ``mean``/``sum``/``amax``/``amin`` over non-channel dims, spatial ``F.pad`` and spatial slicing
  ``x[:, :, ::2, ::2]``, ``split``/``chunk`` along other dims.
* **Elementwise n-ary ops** (``+ - * /``, in-place forms, ``torch.add/mul/sub/div/maximum/minimum/where``):
  operands aligned on the channel dim are *tied* (one group, all producers pruned together; consumers of the
  result are consumers of the group). Operands broadcast along channels (size 1, scalars, per-sample
  masks) do not tie.
* **``torch.cat``** along channels: the result's channels are the operands' channels at offsets
  (``ChannelRef.offset``); along another dim the operands are tied.

Non-prunable groups (``prunable=False`` with a ``reason`` naming the node, op and enclosing module) --
the model stays analysable, those channels are simply kept:

* channels that reach the network output ("feeds the network output");
* channels zero-padded (``F.pad`` on the channel dim, e.g. the option-A shortcut of CIFAR ResNets), sliced
  or indexed along the channel dim, split/chunked along it, reduced over it, reshaped across it (or to a
  hard-coded channel count), broadcast across it, tied to tensors of unknown origin (the network input, a
  parameter read with ``get_attr``, the output of an op above), or tied with misaligned ``cat`` offsets;
* channels read by a grouped conv (``1 < groups``, not depthwise), by any leaf module the analyser does not
  know (LayerNorm, GroupNorm, ConvTranspose, timm's no-trace modules, modules listed in ``leaf_types``,
  custom modules with parameters...), by a Conv/Linear/BN along a non-channel dimension, or by a known
  channel-mixing function (``F.linear``, ``F.conv2d``, ``F.layer_norm``, ``F.batch_norm``, softmax,
  ``matmul``/``einsum``, attention...); the outputs of all these have channels of unknown origin;
* groups whose modules' parameters are also read directly (``get_attr``) or shared with another module.

:class:`UnsupportedGraphError` (a ``ValueError``) is raised when the model cannot be analysed safely at
all: the model is not traceable by ``torch.fx``, or a ``call_function``/``call_method`` the analyser does
not know reads channels of a producer group (declare its semantics with :func:`register_channel_op`).
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ChannelGroup",
    "ChannelRef",
    "UnsupportedGraphError",
    "channel_groups",
    "register_channel_op",
]


class UnsupportedGraphError(ValueError):
    """The model's graph cannot be analysed safely for structured pruning."""


@dataclass(frozen=True)
class ChannelRef:
    """Where a group's channels live in one module's parameters.

    Channel ``c`` of the group occupies indices ``offset + c * repeat + j`` (``0 <= j < repeat``) along
    ``dim`` of the module's weight (and bias / BN statistics for dim 0).
    """

    module: str
    dim: int
    offset: int = 0
    repeat: int = 1


@dataclass(frozen=True)
class ChannelGroup:
    """Output channels that can only be removed together (see module docstring)."""

    name: str
    size: int
    producers: tuple[ChannelRef, ...]
    norms: tuple[ChannelRef, ...]
    consumers: tuple[ChannelRef, ...]
    activations: tuple[str, ...]
    relu_follows: bool
    prunable: bool
    reason: str = ""
    # Depthwise convs the channels pass through (sliced along dim 0, with in/out_channels and groups).
    passthrough: tuple[ChannelRef, ...] = ()


# ----------------------------------------------------------------------------------------------------------
# Op tables. Modules are matched by class (a subclass counts only if it does not override forward).


def _attrs(namespace: Any, names: str) -> tuple[Any, ...]:
    return tuple(getattr(namespace, n) for n in names.split())


def _names(names: str) -> set[str]:
    return set(names.split())


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LINEAR = (nn.Linear,)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RELU_MODULES = (nn.ReLU,)
_DROPOUT = "Dropout Dropout1d Dropout2d Dropout3d"
_ELEMENTWISE_MODULES = _attrs(
    nn,
    "ReLU ReLU6 LeakyReLU ELU SELU CELU GELU SiLU Mish Hardswish Hardsigmoid Hardtanh Sigmoid Tanh Softplus "
    f"Identity AlphaDropout {_DROPOUT}",
)
_COMMUTES_WITH_RELU_MODULES = _attrs(nn, f"Identity Flatten MaxPool1d MaxPool2d MaxPool3d {_DROPOUT}")
_POOL_MODULES: dict[type, int] = {
    getattr(nn, f"{kind}{k}d"): k
    for kind in ("MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool")
    for k in (1, 2, 3)
}
_RESHAPE_MODULES = (nn.Flatten, nn.Unflatten)

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
_ELEMENTWISE_FUNCTIONS: set[Any] = {
    *_attrs(
        F,
        "relu relu_ relu6 leaky_relu elu selu celu gelu silu mish hardswish hardsigmoid hardtanh sigmoid "
        "tanh softplus dropout dropout1d dropout2d dropout3d alpha_dropout",
    ),
    *_attrs(torch, "relu relu_ sigmoid tanh clamp clip abs neg exp add sub mul div maximum minimum where"),
    *_attrs(operator, "add sub mul truediv iadd isub imul itruediv neg"),
}
_ELEMENTWISE_METHODS = _names(
    "relu relu_ sigmoid sigmoid_ tanh tanh_ clamp clamp_ clamp_min clamp_min_ clamp_max clamp_max_ clip abs "
    "neg exp add add_ sub sub_ mul mul_ div div_"
)
# First argument passes through unchanged; other tensor arguments are only read for metadata.
_CAST_METHODS = _names(
    "contiguous clone detach float half double bfloat16 to type_as cpu cuda requires_grad_"
)
_CAST_FUNCTIONS: set[Any] = {torch.clone}
# Build a new tensor from another's metadata only: the result's channels have no known origin.
_CONSTRUCTOR_METHODS = _names("new_empty new_zeros new_ones new_full new_tensor")
_CONSTRUCTOR_FUNCTIONS = set(_attrs(torch, "zeros_like ones_like empty_like rand_like randn_like full_like"))
_POOL_FUNCTIONS: dict[Any, int] = {
    getattr(F, f"{kind}{k}d"): k
    for kind in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool")
    for k in (1, 2, 3)
}
_COMMUTES_WITH_RELU_FUNCTIONS: set[Any] = {
    *_attrs(F, "dropout dropout1d dropout2d dropout3d max_pool1d max_pool2d max_pool3d"),
    *_attrs(F, "adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d"),
    torch.flatten,
    torch.reshape,
}
_RESHAPE_FUNCTIONS = set(_attrs(torch, "flatten reshape squeeze unsqueeze unflatten"))
_RESHAPE_METHODS = _names("flatten view reshape squeeze unsqueeze unflatten")
_PERMUTE_FUNCTIONS: set[Any] = {torch.permute, torch.transpose}
_PERMUTE_METHODS = {"permute", "transpose"}
_REDUCE_FUNCTIONS = set(_attrs(torch, "mean sum amax amin"))
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_CAT_FUNCTIONS = set(_attrs(torch, "cat concat concatenate"))
_SPLIT_FUNCTIONS: set[Any] = {torch.split, torch.chunk}
_SPLIT_METHODS = {"split", "chunk"}
# Known ops that mix or normalise channels (their parameters, if any, are not sliced): the channels they read
# are kept and their outputs have channels of unknown origin.
_MIXING_FUNCTIONS: set[Any] = {
    *_attrs(F, "linear bilinear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d"),
    *_attrs(F, "layer_norm group_norm batch_norm instance_norm local_response_norm normalize rms_norm"),
    *_attrs(F, "softmax log_softmax embedding scaled_dot_product_attention"),
    *_attrs(torch, "matmul bmm mm einsum softmax log_softmax"),
    operator.matmul,
}
_MIXING_METHODS = _names("matmul bmm mm softmax log_softmax norm")

# User-declared semantics (register_channel_op): target -> "elementwise" | "opaque".
_USER_OPS: dict[Any, str] = {}


def register_channel_op(target: Callable[..., Any] | str, kind: str) -> None:
    """Tell :func:`channel_groups` how an op it does not know treats channels.

    ``target`` is the function fx records (e.g. a function wrapped with ``torch.fx.wrap``) or a tensor
    method name. ``kind="elementwise"``: every output channel depends only on the same channel of each
    tensor argument (tensors aligned on channels are tied). ``kind="opaque"``: the channels it reads are
    kept (their groups become non-prunable) and its output has channels of unknown origin.
    """
    if kind not in ("elementwise", "opaque"):
        raise ValueError(f"kind must be 'elementwise' or 'opaque', got {kind!r}")
    if not (callable(target) or isinstance(target, str)):
        raise TypeError(f"target must be a callable or a tensor method name, got {type(target).__name__}")
    _USER_OPS[target] = kind


def _behaves_as(module: nn.Module, classes: Sequence[type] | type) -> bool:
    """``module`` is one of ``classes``, or a subclass that does not change ``forward``."""
    if isinstance(classes, type):
        classes = (classes,)
    return any(isinstance(module, c) and type(module).forward is c.forward for c in classes)


# Library subclasses whose forward is equivalent to their torch base (checked by qualified class name).
# timm's BatchNormAct2d is a BatchNorm2d followed by its ``drop`` and ``act`` modules (both must be known
# elementwise modules).
_EQUIVALENT_CLASSES: dict[str, type] = {
    "timm.layers.linear.Linear": nn.Linear,
    "timm.layers.norm_act.BatchNormAct2d": nn.BatchNorm2d,
}


def _layer_kind(module: nn.Module) -> type | None:
    """The torch layer class (Conv*/Linear/BatchNorm*) ``module`` behaves as, or None."""
    for base in (*_CONV, *_LINEAR, *_NORM):
        if _behaves_as(module, base):
            return base
    cls = type(module)
    base = _EQUIVALENT_CLASSES.get(f"{cls.__module__}.{cls.__qualname__}")
    if base is None or not isinstance(module, base):
        return None
    for extra in ("drop", "act"):
        sub = getattr(module, extra, None)
        if sub is not None and not _behaves_as(sub, _ELEMENTWISE_MODULES):
            return None
    return base


def _pool_dims(module: nn.Module) -> int | None:
    for cls, k in _POOL_MODULES.items():
        if _behaves_as(module, cls):
            return k
    return None


# ----------------------------------------------------------------------------------------------------------
# Channel layouts.


@dataclass(frozen=True)
class _Seg:
    """``size`` channels of group ``gid`` (None: unknown origin), each spanning ``repeat`` entries."""

    gid: int | None
    size: int
    repeat: int = 1
    origin: str = ""

    @property
    def extent(self) -> int:
        return self.size * self.repeat


@dataclass(frozen=True)
class _Layout:
    """Channel layout of a tensor: ``segs`` concatenated along dim ``cdim``; ``cdim=None``: opaque."""

    cdim: int | None
    segs: tuple[_Seg, ...] = ()
    origin: str = ""

    @property
    def gids(self) -> list[int]:
        return [s.gid for s in self.segs if s.gid is not None]

    def with_cdim(self, cdim: int) -> _Layout:
        return _Layout(cdim, self.segs, self.origin)


def _opaque(origin: str) -> _Layout:
    return _Layout(None, (), origin)


@dataclass(frozen=True)
class _SizeOf:
    """The ``x.size()`` / ``x.shape`` of a tensor with ``layout``: reading its channel entry is tracked."""

    layout: _Layout


@dataclass
class _GroupInfo:
    module: str
    size: int
    producers: list[ChannelRef] = field(default_factory=list)
    producer_nodes: list[tuple[str, fx.Node]] = field(default_factory=list)
    norms: list[ChannelRef] = field(default_factory=list)
    consumers: list[ChannelRef] = field(default_factory=list)
    passthrough: list[ChannelRef] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


class _Groups:
    """Union-find over producer groups; the smaller id (earlier in the graph) is the root."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.info: list[_GroupInfo] = []

    def new(self, module: str, size: int) -> int:
        self.parent.append(len(self.parent))
        self.info.append(_GroupInfo(module, size))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def block(self, gids: Sequence[int], reason: str) -> None:
        for g in gids:
            reasons = self.info[g].reasons
            if reason not in reasons:
                reasons.append(reason)


# ----------------------------------------------------------------------------------------------------------
# Tracing.


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable[..., Any], ...]]:
    timm = sys.modules.get("timm")
    if timm is None:
        return (), ()
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # pragma: no cover - old timm
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class _Tracer(fx.Tracer):
    """fx tracer whose leaves are torch.nn layers, Conv/Linear/BN look-alikes, timm's no-trace modules and
    the user's ``leaf_types``; timm's no-trace functions are recorded as calls, not traced into."""

    def __init__(self, leaf_types: tuple[type, ...], uses_timm: bool):
        modules, functions = _timm_notrace() if uses_timm else ((), ())
        super().__init__(autowrap_functions=functions)
        self.leaf_types = tuple(leaf_types) + modules

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if _layer_kind(m) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module, leaf_types: tuple[type, ...]) -> fx.GraphModule:
    uses_timm = any(type(m).__module__.startswith("timm.") for m in model.modules())
    tracer = _Tracer(leaf_types, uses_timm)
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many types (TraceError, TypeError, RuntimeError...)
        raise UnsupportedGraphError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {err}). Structured "
            "pruning needs a forward without data-dependent control flow; move untraceable code into a "
            "leaf module (channel_groups(..., leaf_types=[...])), whose input channels are then kept."
        ) from err
    return fx.GraphModule(tracer.root, graph)


# ----------------------------------------------------------------------------------------------------------
# The analysis: run the graph once and propagate layouts node by node.


def _tree_leaves(x: Any) -> list[Any]:
    if isinstance(x, (tuple, list)):
        return [leaf for item in x for leaf in _tree_leaves(item)]
    if isinstance(x, dict):
        return [leaf for item in x.values() for leaf in _tree_leaves(item)]
    return [x]


def _op_desc(node: fx.Node, module: nn.Module | None = None) -> str:
    if node.op == "call_module":
        return type(module).__name__ if module is not None else "module"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    name = getattr(target, "__name__", str(target))
    mod = getattr(target, "__module__", None) or ""
    if mod == "torch.nn.functional":
        return f"F.{name}"
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch") or (not mod and hasattr(torch, name)):
        return f"torch.{name}"
    return f"{mod}.{name}" if mod else name


def _enclosing(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if node.op == "call_module":
        return str(node.target)
    keys = list(stack.keys())
    return str(keys[-1]) if keys else ""


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


class _Analyser(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # our errors already name the node; keep messages short
        self.groups = _Groups()
        self.layouts: dict[fx.Node, Any] = {}
        self.module_gid: dict[str, int] = {}
        self.module_input: dict[str, _Layout] = {}
        self.direct_attrs: list[tuple[str, fx.Node]] = []
        self.current: fx.Node | None = None

    # -- helpers --------------------------------------------------------------------------------------------
    def where(self, node: fx.Node, module: nn.Module | None = None) -> str:
        encl = _enclosing(node)
        place = f"in '{encl}'" if encl and node.op != "call_module" else ""
        if node.op == "call_module":
            return f"'{node.target}' ({_op_desc(node, module)})"
        return f"node '{node.name}' ({_op_desc(node)})" + (f" {place}" if place else " in the root module")

    def layout_of(self, value: Any) -> Any:
        return fx.node.map_aggregate(value, lambda a: self.layouts.get(a) if isinstance(a, fx.Node) else None)

    def block(self, layout: Any, reason: str) -> None:
        for leaf in _tree_leaves(layout):
            if isinstance(leaf, _Layout):
                self.groups.block(leaf.gids, reason)

    @staticmethod
    def carries_groups(layout: Any) -> bool:
        return any(isinstance(leaf, _Layout) and leaf.gids for leaf in _tree_leaves(layout))

    def tie(self, layouts: list[_Layout], opaque_origins: list[str], where: str, verb: str) -> None:
        """Channels at equal positions of ``layouts`` (same cdim) are one: union their groups."""
        all_gids = [g for lay in layouts for g in lay.gids]
        for origin in opaque_origins:
            self.groups.block(all_gids, f"{verb} {origin} at {where}")
        if len(layouts) < 2:
            return
        shape0 = [(s.size, s.repeat) for s in layouts[0].segs]
        if any([(s.size, s.repeat) for s in lay.segs] != shape0 for lay in layouts[1:]):
            self.groups.block(all_gids, f"{verb} channels with a different concatenation layout at {where}")
            return
        for segs in zip(*(lay.segs for lay in layouts)):
            gids = [s.gid for s in segs if s.gid is not None]
            for s in segs:
                if s.gid is None:
                    self.groups.block(gids, f"{verb} {s.origin} at {where}")
            for g in gids[1:]:
                self.groups.union(gids[0], g)

    def record_module_input(self, fqn: str, layout: _Layout, where: str) -> None:
        """A module called more than once must see the same channels each time (they are tied)."""
        if fqn in self.module_input:
            self.tie([self.module_input[fqn], layout], [], where, "read by the same module as")
        else:
            self.module_input[fqn] = layout

    # -- the interpreter hook ------------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        result = super().run_node(n)
        if n.op == "placeholder":
            layout: Any = _opaque("the network input")
        elif n.op == "get_attr":
            self.direct_attrs.append((str(n.target), n))
            layout = _opaque(f"parameter/buffer '{n.target}'")
        elif n.op == "output":
            self.block(self.layout_of(n.args), "feeds the network output")
            layout = None
        elif n.op == "call_function" and n.target is operator.setitem:
            self.block(self.layout_of(n.args), f"written in place by {self.where(n)}")
            layout = None
        elif not any(isinstance(leaf, Tensor) for leaf in _tree_leaves(result)):
            layout = self.metadata(n, args, kwargs)  # size(), shape, dim(), numel()
        elif n.op == "call_module":
            layout = self.call_module_layout(n, args, result)
        else:
            layout = self.call_layout(n, args, kwargs, result)
        if isinstance(result, Tensor) and not isinstance(layout, _Layout):
            layout = _opaque(f"the output of {self.where(n)}")
        self.layouts[n] = layout
        return result

    def metadata(self, n: fx.Node, args: tuple, kwargs: dict) -> _SizeOf | None:
        """Ops returning no tensor. Reading a group's channel *count* as a number (``x.size(1)``,
        ``C = x.shape[1]``, ``x.numel()``) makes the model depend on it: those groups are kept."""
        lay0 = self.layout_of(n.args[0]) if n.args else None
        t = n.target
        if isinstance(lay0, _SizeOf) and t is operator.getitem:
            index, cdim = args[1], lay0.layout.cdim
            covered = range(len(args[0]))[index] if isinstance(index, slice) else [index % len(args[0])]
            if cdim in covered and n.users:
                self.block(lay0.layout, f"channel count read by {self.where(n)}")
            return None
        if not isinstance(lay0, _Layout) or lay0.cdim is None or not lay0.gids:
            return None
        x = args[0]
        if (t == "size" and n.op == "call_method") or (t is getattr and args[1:] == ("shape",)):
            dim = _arg(args, kwargs, 1, "dim") if t == "size" else None
            if dim is None:
                return _SizeOf(lay0)
            if _norm_dim(int(dim), x.ndim) == lay0.cdim and n.users:
                self.block(lay0, f"channel count read by {self.where(n)}")
        elif t in ("numel", torch.numel) and n.users:
            self.block(lay0, f"element count read by {self.where(n)}")
        return None

    # -- modules --------------------------------------------------------------------------------------------
    def call_module_layout(self, n: fx.Node, args: tuple, result: Any) -> Any:
        fqn = str(n.target)
        m = self.module.get_submodule(fqn)
        arg_layouts = self.layout_of(n.args)
        lay = arg_layouts[0] if arg_layouts else None
        x = args[0] if args else None
        where = self.where(n, m)
        if not isinstance(lay, _Layout):
            lay = _opaque("a tensor of unknown origin")
        simple = isinstance(x, Tensor) and isinstance(result, Tensor) and len(n.args) == 1 and not n.kwargs
        if not simple:
            return self.unknown_module(n, m, arg_layouts, where)
        kind = _layer_kind(m)
        if kind in _CONV:
            return self.conv(n, m, fqn, lay, x, result, where)
        if kind in _LINEAR:
            return self.linear(n, m, fqn, lay, x, result, where)
        if kind in _NORM:
            if lay.cdim is None:
                return lay
            if lay.cdim != 1:
                self.block(lay, f"normalised along a non-channel dimension by {where}")
                return _opaque(f"the output of {where}")
            self.record_module_input(fqn, lay, where)
            self.add_refs(lay, fqn, "norms")
            return lay
        if _behaves_as(m, _ELEMENTWISE_MODULES) or (_behaves_as(m, nn.PReLU) and m.num_parameters == 1):
            return lay
        if _behaves_as(m, nn.Upsample):
            return self.pool(lay, x, x.ndim - 2, where)
        k = _pool_dims(m)
        if k is not None:
            return self.pool(lay, x, k, where)
        if _behaves_as(m, _RESHAPE_MODULES):
            return self.reshape(n, lay, x, result, where, raw_shape=None)
        return self.unknown_module(n, m, arg_layouts, where)

    def unknown_module(self, n: fx.Node, m: nn.Module, arg_layouts: Any, where: str) -> _Layout:
        has_params = any(True for _ in m.parameters())
        what = "a module with parameters" if has_params else "a module"
        self.block(arg_layouts, f"read by {where}, {what} the channel analysis does not know")
        return _opaque(f"the output of {where}")

    def add_refs(self, lay: _Layout, fqn: str, kind: str, dim: int = 0) -> None:
        offset = 0
        for s in lay.segs:
            if s.gid is not None:
                getattr(self.groups.info[s.gid], kind).append(ChannelRef(fqn, dim, offset, s.repeat))
            offset += s.extent

    def produce(self, n: fx.Node, fqn: str, size: int, cdim: int) -> _Layout:
        gid = self.module_gid.get(fqn)
        if gid is None:
            gid = self.groups.new(fqn, size)
            self.module_gid[fqn] = gid
            self.groups.info[gid].producers.append(ChannelRef(fqn, 0))
        self.groups.info[gid].producer_nodes.append((fqn, n))
        return _Layout(cdim, (_Seg(gid, size),))

    def consume(self, fqn: str, lay: _Layout, cdim: int, where: str) -> None:
        if lay.cdim is None:
            return
        if lay.cdim != cdim:
            self.block(lay, f"read along a non-channel dimension by {where}")
            return
        self.record_module_input(fqn, lay, where)
        self.add_refs(lay, fqn, "consumers", dim=1)

    def conv(self, n, m, fqn, lay, x, result, where) -> _Layout:
        if m.groups == 1:
            self.consume(fqn, lay, 1, where)
            return self.produce(n, fqn, m.out_channels, 1)
        if m.groups == m.in_channels == m.out_channels:  # depthwise: channels pass through
            if lay.cdim is None:
                return _opaque(f"the output of {where}")
            if lay.cdim != 1:
                self.block(lay, f"read along a non-channel dimension by {where}")
                return _opaque(f"the output of {where}")
            self.record_module_input(fqn, lay, where)
            self.add_refs(lay, fqn, "passthrough")
            return lay
        self.block(lay, f"read by grouped conv {where} with groups={m.groups}")
        out = self.produce(n, fqn, m.out_channels, 1)
        self.groups.block(out.gids, f"output of grouped conv {where} with groups={m.groups}")
        return out

    def linear(self, n, m, fqn, lay, x, result, where) -> _Layout:
        self.consume(fqn, lay, x.ndim - 1, where)
        return self.produce(n, fqn, m.out_features, result.ndim - 1)

    # -- functions and methods -----------------------------------------------------------------------------
    def call_layout(self, n: fx.Node, args: tuple, kwargs: dict, result: Any) -> Any:
        t = n.target
        fn = n.op == "call_function"
        where = self.where(n)
        arg_layouts = self.layout_of((n.args, n.kwargs))
        lay0 = self.layout_of(n.args[0]) if n.args else None
        x = args[0] if args else None
        user = _USER_OPS.get(t)
        if user == "opaque":
            self.block(arg_layouts, f"read by {where}, declared opaque")
            return _opaque(f"the output of {where}")
        if t in _MIXING_FUNCTIONS if fn else t in _MIXING_METHODS:
            self.block(arg_layouts, f"read by {where}, which mixes or normalises channels")
            return _opaque(f"the output of {where}")
        if user == "elementwise" or (t in _ELEMENTWISE_FUNCTIONS if fn else t in _ELEMENTWISE_METHODS):
            return self.elementwise(n, args, kwargs, result, where)
        if (t in _CAST_FUNCTIONS if fn else t in _CAST_METHODS) and isinstance(result, Tensor):
            return lay0
        if t in _CONSTRUCTOR_FUNCTIONS if fn else t in _CONSTRUCTOR_METHODS:
            return _opaque(f"the output of {where}")
        if not isinstance(lay0, _Layout) or not isinstance(x, Tensor):
            pass
        elif fn and t in _POOL_FUNCTIONS and isinstance(result, Tensor):
            return self.pool(lay0, x, _POOL_FUNCTIONS[t], where)
        elif (t in _RESHAPE_FUNCTIONS if fn else t in _RESHAPE_METHODS) and isinstance(result, Tensor):
            raw = list(n.args[1:]) if t in ("view", "reshape") or t is torch.reshape else None
            return self.reshape(n, lay0, x, result, where, raw)
        elif (t in _PERMUTE_FUNCTIONS if fn else t in _PERMUTE_METHODS) and isinstance(result, Tensor):
            return self.permute(n, lay0, x, args, kwargs, where)
        elif (t in _REDUCE_FUNCTIONS if fn else t in _REDUCE_METHODS) and isinstance(result, Tensor):
            return self.reduce(lay0, x, args, kwargs, where)
        elif fn and t is F.interpolate and isinstance(result, Tensor):
            return self.pool(lay0, x, x.ndim - 2, where)
        elif fn and t is F.pad:
            return self.pad(lay0, x, args, kwargs, where)
        elif fn and t is operator.getitem:
            return self.getitem(lay0, x, args[1], result, where)
        elif t in _SPLIT_FUNCTIONS if fn else t in _SPLIT_METHODS:
            return self.split(lay0, x, args, kwargs, result, where)
        if fn and t is operator.getitem and isinstance(x, (tuple, list)) and isinstance(lay0, (tuple, list)):
            index = args[1]
            return lay0[index] if isinstance(index, (int, slice)) else _opaque(f"the output of {where}")
        if fn and t in _CAT_FUNCTIONS:
            return self.cat(n, args, kwargs, result, where)
        if self.carries_groups(arg_layouts):
            producers = sorted({self.groups.info[self.groups.find(g)].module for g in self.gids(arg_layouts)})
            raise UnsupportedGraphError(
                f"cannot analyse {where}: it reads the channels of {', '.join(map(repr, producers))} and the "
                "structured-pruning analyser does not know how this op maps channels, so pruning them could "
                "silently change the model. Declare it with lit_compress.pruning.structured."
                f"register_channel_op({_target_repr(n)}, 'elementwise' or 'opaque'), or move it into a leaf "
                "module (channel_groups(..., leaf_types=[...])) so that its input channels are kept."
            )
        return _opaque(f"the output of {where}")

    def gids(self, layout: Any) -> list[int]:
        return [g for leaf in _tree_leaves(layout) if isinstance(leaf, _Layout) for g in leaf.gids]

    def elementwise(self, n: fx.Node, args: tuple, kwargs: dict, result: Any, where: str) -> Any:
        if not isinstance(result, Tensor):
            self.block(self.layout_of((n.args, n.kwargs)), f"read by {where}")
            return _opaque(f"the output of {where}")
        ndim = result.ndim
        pairs = [
            (v, self.layouts.get(a) if isinstance(a, fx.Node) else None)
            for a, v in zip(list(n.args) + list(n.kwargs.values()), list(args) + list(kwargs.values()))
        ]
        tensors = [(v, lay) for v, lay in pairs if isinstance(v, Tensor)]
        aligned: list[_Layout] = []
        for v, lay in tensors:
            if isinstance(lay, _Layout) and lay.cdim is not None:
                ocd = lay.cdim + ndim - v.ndim
                if v.shape[lay.cdim] == 1 and result.shape[ocd] > 1:
                    self.block(lay, f"broadcast across channels at {where}")
                else:
                    aligned.append(lay.with_cdim(ocd))
        cdims = {lay.cdim for lay in aligned}
        if len(cdims) > 1:
            self.block(aligned, f"combined along different dimensions at {where}")
            return _opaque(f"the output of {where}")
        if not aligned:
            origins = [lay.origin for _, lay in tensors if isinstance(lay, _Layout)]
            return _opaque(origins[0] if len(set(origins)) == 1 else f"the output of {where}")
        ocd = aligned[0].cdim
        opaque = []
        for v, lay in tensors:
            if isinstance(lay, _Layout) and lay.cdim is not None:
                continue
            d = ocd - (ndim - v.ndim)
            if d >= 0 and v.shape[d] > 1:
                opaque.append(lay.origin if isinstance(lay, _Layout) else "a tensor of unknown origin")
        self.tie(aligned, opaque, where, "combined with")
        return aligned[0]

    def pool(self, lay: _Layout, x: Tensor, k: int, where: str) -> _Layout:
        if lay.cdim is None or lay.cdim < x.ndim - k:
            return lay
        self.block(lay, f"pooled across channels by {where}")
        return _opaque(f"the output of {where}")

    def reshape(self, n, lay: _Layout, x: Tensor, result: Tensor, where: str, raw_shape) -> _Layout:
        if lay.cdim is None:
            return lay
        c, ins, outs = lay.cdim, tuple(x.shape), tuple(result.shape)
        if raw_shape is not None:
            if len(raw_shape) == 1 and isinstance(raw_shape[0], (tuple, list)):
                raw_shape = list(raw_shape[0])
            if len(raw_shape) > c and isinstance(raw_shape[c], int) and raw_shape[c] != -1:
                self.block(lay, f"reshaped to a hard-coded size {raw_shape[c]} along channels at {where}")
                return _opaque(f"the output of {where}")
        if outs[: c + 1] == ins[: c + 1]:
            return lay
        if outs[:c] == ins[:c] and len(outs) > c:
            for e in range(c + 1, len(ins)):
                if math.prod(ins[c : e + 1]) == outs[c] and outs[c + 1 :] == ins[e + 1 :]:
                    k = math.prod(ins[c + 1 : e + 1])
                    segs = tuple(_Seg(s.gid, s.size, s.repeat * k, s.origin) for s in lay.segs)
                    return _Layout(c, segs)
        self.block(lay, f"reshaped across the channel dimension at {where}")
        return _opaque(f"the output of {where}")

    def permute(self, n, lay: _Layout, x: Tensor, args: tuple, kwargs: dict, where: str) -> _Layout:
        if lay.cdim is None:
            return lay
        nd = x.ndim
        if n.target in ("permute", torch.permute):
            dims = args[1:] if n.op == "call_method" else (args[1],)
            if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
                dims = dims[0]
            if not dims and "dims" in kwargs:
                dims = kwargs["dims"]
            dims = [_norm_dim(int(d), nd) for d in dims]
            return lay.with_cdim(dims.index(lay.cdim))
        d0 = _norm_dim(int(_arg(args, kwargs, 1, "dim0")), nd)
        d1 = _norm_dim(int(_arg(args, kwargs, 2, "dim1")), nd)
        swap = {d0: d1, d1: d0}
        return lay.with_cdim(swap.get(lay.cdim, lay.cdim))

    def reduce(self, lay: _Layout, x: Tensor, args: tuple, kwargs: dict, where: str) -> _Layout:
        if lay.cdim is None:
            return lay
        dim = _arg(args, kwargs, 1, "dim")
        keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
        if dim is None or (isinstance(dim, (tuple, list)) and not dim):
            self.block(lay, f"reduced over all dimensions (channels included) at {where}")
            return _opaque(f"the output of {where}")
        if not isinstance(dim, (int, tuple, list)):
            self.block(lay, f"reduced over {dim!r} at {where}")
            return _opaque(f"the output of {where}")
        dims = {_norm_dim(int(d), x.ndim) for d in (dim if isinstance(dim, (tuple, list)) else [dim])}
        if lay.cdim in dims:
            self.block(lay, f"reduced over channels at {where}")
            return _opaque(f"the output of {where}")
        return lay if keepdim else lay.with_cdim(lay.cdim - sum(d < lay.cdim for d in dims))

    def pad(self, lay: _Layout, x: Tensor, args: tuple, kwargs: dict, where: str) -> _Layout:
        if lay.cdim is None:
            return lay
        pads = list(_arg(args, kwargs, 1, "pad"))
        for i in range(len(pads) // 2):
            d = x.ndim - 1 - i
            if d == lay.cdim and (pads[2 * i] or pads[2 * i + 1]):
                self.block(lay, f"zero-padded along channels by {where}")
                return _opaque(f"the channel-padded output of {where}")
        return lay

    def getitem(self, lay: _Layout, x: Tensor, index: Any, result: Tensor, where: str) -> _Layout:
        if lay.cdim is None:
            return lay
        items = list(index) if isinstance(index, tuple) else [index]
        if any(isinstance(i, (Tensor, list, bool)) for i in items):
            self.block(lay, f"indexed with a tensor/list (advanced indexing) at {where}")
            return _opaque(f"the output of {where}")
        n_consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
        in_dim = out_dim = 0
        for i in items:
            if i is Ellipsis:
                skip = x.ndim - n_consumed
                if in_dim <= lay.cdim < in_dim + skip:
                    return lay.with_cdim(out_dim + lay.cdim - in_dim)
                in_dim, out_dim = in_dim + skip, out_dim + skip
            elif i is None:
                out_dim += 1
            elif isinstance(i, slice):
                if in_dim == lay.cdim:
                    if i != slice(None):
                        self.block(lay, f"sliced along channels by {where}")
                        return _opaque(f"the channel-sliced output of {where}")
                    return lay.with_cdim(out_dim)
                in_dim, out_dim = in_dim + 1, out_dim + 1
            elif isinstance(i, int):
                if in_dim == lay.cdim:
                    self.block(lay, f"indexed along channels by {where}")
                    return _opaque(f"the output of {where}")
                in_dim += 1
            else:
                self.block(lay, f"indexed with {type(i).__name__} at {where}")
                return _opaque(f"the output of {where}")
        return lay.with_cdim(out_dim + lay.cdim - in_dim)

    def split(self, lay: _Layout, x: Tensor, args: tuple, kwargs: dict, result: Any, where: str) -> Any:
        if not isinstance(result, (tuple, list)):
            self.block(lay, f"read by {where}")
            return _opaque(f"the output of {where}")
        if lay.cdim is None:
            return tuple(lay for _ in result)
        dim = _norm_dim(int(_arg(args, kwargs, 2, "dim", 0)), x.ndim)
        if dim == lay.cdim:
            self.block(lay, f"split along channels by {where}")
            return tuple(_opaque(f"a channel split at {where}") for _ in result)
        return tuple(lay for _ in result)

    def cat(self, n: fx.Node, args: tuple, kwargs: dict, result: Tensor, where: str) -> _Layout:
        tensors = list(_arg(args, kwargs, 0, "tensors"))
        nodes = n.args[0] if n.args else n.kwargs["tensors"]
        layouts = [self.layouts.get(a) if isinstance(a, fx.Node) else None for a in nodes]
        dim = _norm_dim(int(_arg(args, kwargs, 1, "dim", 0)), result.ndim)
        known = [lay for lay in layouts if isinstance(lay, _Layout) and lay.cdim is not None]
        if not known:
            return _opaque(f"the output of {where}")
        if len({lay.cdim for lay in known}) > 1:
            self.block(known, f"concatenated with channels along different dimensions at {where}")
            return _opaque(f"the output of {where}")
        cdim = known[0].cdim
        if cdim != dim:
            origins = [
                lay.origin if isinstance(lay, _Layout) else "a tensor of unknown origin"
                for lay, v in zip(layouts, tensors)
                if not (isinstance(lay, _Layout) and lay.cdim is not None) and v.shape[cdim] > 1
            ]
            self.tie(known, origins, where, "concatenated with")
            return known[0]
        segs: list[_Seg] = []
        for lay, v in zip(layouts, tensors):
            if isinstance(lay, _Layout) and lay.cdim is not None:
                segs.extend(lay.segs)
            else:
                origin = lay.origin if isinstance(lay, _Layout) else "a tensor of unknown origin"
                segs.append(_Seg(None, v.shape[dim], 1, origin))
        return _Layout(cdim, tuple(segs))


def _target_repr(n: fx.Node) -> str:
    if n.op == "call_method":
        return repr(str(n.target))
    return getattr(n.target, "__qualname__", getattr(n.target, "__name__", repr(n.target)))


# ----------------------------------------------------------------------------------------------------------
# Post-processing: activations, relu_follows, shared parameters.


def _is_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return _behaves_as(gm.get_submodule(str(node.target)), _RELU_MODULES)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in _RELU_METHODS


def _commutes_with_relu(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        return _behaves_as(m, _COMMUTES_WITH_RELU_MODULES)
    if node.op == "call_function":
        return node.target in _COMMUTES_WITH_RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ({"flatten", "view", "reshape"} | _CAST_METHODS)


def _relu_follows(node: fx.Node, gm: fx.GraphModule, depth: int = 0) -> bool:
    users = list(node.users)
    if not users or depth > 16:
        return False
    for u in users:
        if _is_relu(u, gm):
            continue
        passes = _commutes_with_relu(u, gm) and bool(u.args) and u.args[0] is node
        if not (passes and _relu_follows(u, gm, depth + 1)):
            return False
    return True


def _has_inner_relu(fqn: str, gm: fx.GraphModule) -> bool:
    """A BatchNormAct-style module whose own ``act`` is a ReLU."""
    act = getattr(gm.get_submodule(fqn), "act", None)
    return isinstance(act, nn.Module) and _behaves_as(act, _RELU_MODULES)


def _activation(fqn: str, node: fx.Node, gm: fx.GraphModule, norm_modules: set[str]) -> tuple[str, fx.Node]:
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and str(users[0].target) in norm_modules:
        return str(users[0].target), users[0]
    return fqn, node


def _shared_parameter_owners(model: nn.Module) -> dict[str, list[str]]:
    """Module FQN -> other modules sharing one of its parameters (weight tying)."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(name)
    shared: dict[str, list[str]] = {}
    for names in owners.values():
        if len(set(names)) > 1:
            for nm in names:
                shared.setdefault(nm, []).extend(x for x in names if x != nm)
    return shared


def _dedup(refs: list[ChannelRef]) -> tuple[ChannelRef, ...]:
    return tuple(dict.fromkeys(refs))


def _finalise(analyser: _Analyser, model: nn.Module) -> list[ChannelGroup]:
    gm, table = analyser.module, analyser.groups
    members: dict[int, list[int]] = {}
    for g in range(len(table.parent)):
        members.setdefault(table.find(g), []).append(g)
    shared = _shared_parameter_owners(model)
    direct: dict[str, list[tuple[str, fx.Node]]] = {}
    for target, node in analyser.direct_attrs:
        direct.setdefault(target.rsplit(".", 1)[0] if "." in target else "", []).append((target, node))

    groups = []
    for root in sorted(members):
        infos = [table.info[g] for g in members[root]]
        producers = _dedup([r for i in infos for r in i.producers])
        norms = _dedup([r for i in infos for r in i.norms])
        consumers = _dedup([r for i in infos for r in i.consumers])
        passthrough = _dedup([r for i in infos for r in i.passthrough])
        reasons = list(dict.fromkeys(r for i in infos for r in i.reasons))
        modules = {r.module for r in producers + norms + consumers + passthrough}
        for mod in sorted(modules):
            for target, node in direct.get(mod, []):
                reasons.append(f"parameter '{target}' is also read directly by node '{node.name}'")
            if mod in shared:
                reasons.append(f"'{mod}' shares a parameter with {sorted(set(shared[mod]))}")
        norm_modules = {r.module for r in norms}
        acts = [_activation(fqn, node, gm, norm_modules) for i in infos for fqn, node in i.producer_nodes]
        activations = tuple(dict.fromkeys(name for name, _ in acts))
        relu = bool(acts) and all(
            _relu_follows(node, gm) or (name in norm_modules and _has_inner_relu(name, gm))
            for name, node in acts
        )
        groups.append(
            ChannelGroup(
                name=table.info[root].module,
                size=table.info[root].size,
                producers=producers,
                norms=norms,
                consumers=consumers,
                activations=activations,
                relu_follows=relu,
                prunable=not reasons,
                reason="; ".join(reasons),
                passthrough=passthrough,
            )
        )
    return groups


# ----------------------------------------------------------------------------------------------------------


def channel_groups(
    model: nn.Module,
    example_input: Tensor | Sequence[Tensor],
    *,
    leaf_types: Sequence[type] = (),
) -> list[ChannelGroup]:
    """Trace ``model`` (torch.fx) and return every channel group, in graph order.

    ``example_input`` (a tensor, or a tuple of positional inputs) is run once through the traced graph in
    eval mode without gradients (train/eval modes are restored; batch-norm statistics are not touched) to
    find flatten sizes. ``leaf_types`` are extra module classes not to trace into: their input channels
    are kept. Raises :class:`UnsupportedGraphError` naming the node/op/layer when the graph cannot be
    analysed safely.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    inputs = (example_input,) if isinstance(example_input, Tensor) else tuple(example_input)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError(
            "example_input must be a tensor (or a tuple of the forward's positional tensors), e.g. "
            f"torch.randn(1, 3, 32, 32); got {type(example_input).__name__}"
        )
    leaf = tuple(leaf_types)
    if not all(isinstance(t, type) and issubclass(t, nn.Module) for t in leaf):
        raise TypeError(f"leaf_types must be nn.Module subclasses, got {leaf!r}")
    gm = _trace(model, leaf)
    analyser = _Analyser(gm)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            analyser.run(*inputs)
    except UnsupportedGraphError:
        raise
    except Exception as err:
        node = analyser.current.name if analyser.current is not None else "?"
        raise ValueError(
            f"running {type(model).__name__} on example_input of shape {[tuple(t.shape) for t in inputs]} "
            f"failed at node {node!r} ({type(err).__name__}: {err}); pass an input the "
            "model accepts (same channels, image size and device)."
        ) from err
    finally:
        for m, mode in modes.items():
            m.training = mode
    return _finalise(analyser, model)
