"""int8 quantization-aware training with BatchNorm folding, exported to PyTorch's int8 CPU backend.

Built on torch.ao's FX graph mode (``prepare_qat_fx`` / ``convert_fx``), which traces the network, fuses
``Conv -> BatchNorm (-> ReLU)``, ``Linear (-> ReLU)`` and ``Linear -> BatchNorm1d`` patterns and places
fake-quantizers on the graph's edges (residual additions included), so no model needs ``QuantStub`` /
``FloatFunctional`` rewrites:

- :func:`prepare_int8_qat`: the QAT model (a ``torch.fx.GraphModule``). Conv+BN pairs become torch.ao's
  ``ConvBn2d`` / ``ConvBnReLU2d``: during training the BN scale is folded into the weight *before* its
  fake-quantizer (Krishnamoorthi 2018 / Jacob et al. 2018), so the int8 weights learned are the folded ones.
  ``qconfig="default"`` is torch.ao's default QAT qconfig mapping for the backend: for ``x86`` / ``fbgemm`` /
  ``onednn`` per-output-channel symmetric ``qint8`` weights and per-tensor affine ``quint8`` activations
  (``x86`` / ``fbgemm`` use ``reduce_range``, 7-bit activation codes, so that their AVX2 kernels cannot
  saturate int16 accumulators); for ``qnnpack`` per-tensor symmetric weights. Its version-0 form (observer +
  ``FakeQuantize``) is used, not the fused fake-quantizer of version 1, whose per-channel symmetric scale is
  ``max|w| / 128`` while ``convert_fx`` quantizes with the observer's ``max|w| / 127.5``: every int8 weight
  would then differ from the trained fake-quantized one by up to 0.4%.
- Where torch.ao shares one fake-quantizer between an op's input and output (pooling, flatten, identity),
  the output's call only fake-quantizes (:class:`SharedRangeFakeQuantize`) instead of observing too, which
  would shrink the shared range (see its docstring). With both, the int8 network reproduces the QAT
  network's output to an output quantization step or two (rounding), except where QAT clips an activation
  at the 7-bit ``reduce_range`` limit: the int8 kernels requantize to the full 8-bit range and do not.
- :func:`convert_int8`: the real int8 network (``torch.ao.nn.quantized`` / ``intrinsic.quantized`` modules,
  BN folded into the conv weights and bias) wrapped in :class:`Int8Network`, which takes and returns float
  tensors and runs under its backend's quantized engine.
- :func:`int8_state` / :func:`load_int8_state`: quantized state dicts hold ``qint8`` tensors and packed
  parameter tuples that safetensors cannot store; these turn them into plain tensors (the weights as
  ``int8`` -- one byte per weight -- plus their float64 scales and int64 zero points) and back, bit-exactly.
  :class:`Int8Network` uses them as its own ``state_dict`` / ``load_state_dict``, so the zoo saves it as plain
  safetensors and loads it with an unchanged ``model.load_state_dict(tensors)``.
- The ``int8`` structure kind (:func:`int8_structure`): plain data on a zoo card from which the loader
  prepares and converts a freshly built float architecture into an int8 template with the same modules.

**BatchNorm that cannot be folded.** torch.ao folds a BN only when it directly follows a Conv (or a Linear,
for ``BatchNorm1d``) whose output has no other user; any other BN (after a ReLU or a pooling, at the
input, after a conv whose output also feeds a skip connection) would stay a separate quantized BatchNorm:
correct, but an extra pass over the activations and not what "BN folding" promises. :func:`prepare_int8_qat`
therefore raises a ``ValueError`` naming every such BN and why it cannot be folded, unless
``allow_unfolded_bn=True`` keeps them (as standalone quantized BatchNorms, recorded in the structure spec).

torch.ao.quantization is deprecated upstream in favour of torchao's pt2e flow; it still ships (and is the
only int8 CPU inference path without torchao) in torch 2.x. Its deprecation warnings are silenced inside
these helpers only.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.structure import apply_structure, register_structure

__all__ = [
    "KIND",
    "QCONFIGS",
    "Int8Network",
    "Int8StateError",
    "SharedRangeFakeQuantize",
    "convert_int8",
    "describe_qconfig",
    "int8_backends",
    "int8_config",
    "int8_state",
    "int8_structure",
    "is_int8_qat",
    "load_int8_state",
    "prepare_int8_qat",
    "quantized_engine",
]

KIND = "int8"
VERSION = 1
QCONFIGS = ("default",)
_META_KEY = "lit_compress_int8"  # GraphModule.meta survives deepcopy (plain attributes do not)
_PACKED = "_packed_params._packed_params"  # nnq.Linear's (weight, bias) tuple in its state_dict
_PACKED_DTYPE = "_packed_params.dtype"
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)
_INT_DTYPES = {torch.qint8: torch.int8, torch.quint8: torch.uint8, torch.qint32: torch.int32}
_QUIET = (
    "torch.ao.quantization is deprecated",
    "Please use quant_min and quant_max to specify the range for observers",
    "torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation",
    "must run observer before calling calculate_qparams",  # templates are converted before any forward
)


class Int8StateError(ValueError, RuntimeError):
    """A state that does not fit the int8 model: a ValueError (bad input), and a RuntimeError like the one
    ``nn.Module.load_state_dict`` raises, so callers that catch that (the zoo loader) see it too."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{message}")
        yield


def int8_backends() -> tuple[str, ...]:
    """The quantized engines this torch build supports (``x86``, ``fbgemm``, ``qnnpack``, ``onednn``)."""
    return tuple(e for e in torch.backends.quantized.supported_engines if e != "none")


def _check_backend(backend: object) -> str:
    supported = int8_backends()
    if not isinstance(backend, str) or backend not in supported:
        raise ValueError(
            f"int8 backend must be one of {list(supported)} (the quantized engines of this torch build), "
            f"got {backend!r}; use 'x86' on x86 CPUs, 'qnnpack' on ARM"
        )
    return backend


@contextlib.contextmanager
def quantized_engine(backend: str) -> Iterator[None]:
    """Run with ``torch.backends.quantized.engine = backend``, then restore the previous engine.

    Weights are packed for the engine current when a quantized module is built or loaded, and must run
    under the same engine: every packing and forward here goes through this context.
    """
    previous = torch.backends.quantized.engine
    if previous == backend:
        yield
        return
    torch.backends.quantized.engine = backend
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@contextlib.contextmanager
def _deterministic_check_off() -> Iterator[None]:
    """torch.ao's int8 CPU kernels are not flagged deterministic (``quantized_resize_cpu_``), so a run with
    ``Trainer(deterministic=True)`` would refuse them; integer inference has no float-reduction-order
    nondeterminism, so the check is lifted around the int8 forward and restored afterwards."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        if enabled:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)


def _qconfig_mapping(backend: str, qconfig: object):
    from torch.ao.quantization import get_default_qat_qconfig_mapping

    if qconfig not in QCONFIGS:
        raise ValueError(f"int8 qconfig must be one of {list(QCONFIGS)}, got {qconfig!r}")
    return get_default_qat_qconfig_mapping(backend, version=0)


def describe_qconfig(backend: str, qconfig: str = "default") -> str:
    """One line saying what ``qconfig`` quantizes how on ``backend`` (for cards and logs)."""
    _check_backend(backend)
    weights = "per-tensor" if backend == "qnnpack" else "per-channel"
    activations = " (7-bit codes: reduce_range)" if backend in ("x86", "fbgemm") else ""
    return (
        f"{weights} symmetric int8 weights, per-tensor affine uint8 activations{activations}, "
        f"torch.ao {qconfig} QAT qconfig for backend {backend}"
    )


# -- preparation ---------------------------------------------------------------------------------------------


class _RecordingTracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` that remembers the innermost submodule being traced when tracing fails."""

    def __init__(self) -> None:
        super().__init__()
        self.failed_in: str | None = None

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m) or "<root>"
            raise


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    tracer = _RecordingTracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:
        where = tracer.failed_in
        inside = (
            f" (in submodule {where!r}, a {type(model.get_submodule(where)).__name__})"
            if where not in (None, "<root>")
            else ""
        )
        raise ValueError(
            f"int8 QAT: cannot trace {type(model).__name__} with torch.fx{inside}: {type(err).__name__}: "
            f"{err}. FX graph-mode quantization needs a forward without Python control flow on tensor "
            "values (if/for over data, .item(), data-dependent shapes); move such logic out of forward or "
            "into a module that does not need quantizing"
        ) from err
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


_FOLDS = {
    nn.BatchNorm1d: (nn.Conv1d, nn.Linear),
    nn.BatchNorm2d: (nn.Conv2d,),
    nn.BatchNorm3d: (nn.Conv3d,),
}


def _describe(node: torch.fx.Node, traced: torch.fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(traced.get_submodule(node.target)).__name__} {node.target!r}"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}(...)"
    if node.op == "call_method":
        return f"Tensor.{node.target}()"
    if node.op == "placeholder":
        return f"the network's input {node.target!r}"
    return f"{node.op} {node.target!r}"


def _why_not_folded(name: str, traced: torch.fx.GraphModule) -> str:
    """Why BN ``name`` (a call_module target of the float graph) cannot be folded into a preceding layer."""
    node = next((n for n in traced.graph.nodes if n.op == "call_module" and n.target == name), None)
    if node is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return "it is not applied to a layer's output"
    bn = traced.get_submodule(name)
    source = node.args[0]
    if source.op == "call_module":
        layer = traced.get_submodule(source.target)
        foldable = _FOLDS.get(type(bn), ())
        if type(layer) in foldable:
            others = sorted(u.name for u in source.users if u is not node)
            if others:
                return (
                    f"the output of {type(layer).__name__} {source.target!r} also feeds {others}, "
                    "which need it without the BatchNorm"
                )
            return f"torch.ao did not fuse {type(layer).__name__} {source.target!r} with it"
        if isinstance(layer, nn.Conv2d | nn.Conv1d | nn.Conv3d | nn.Linear):
            return f"torch.ao has no fusion of {type(layer).__name__} followed by {type(bn).__name__}"
    return f"its input is {_describe(source, traced)}, not a Conv / Linear layer"


def _unfolded_batchnorms(prepared: torch.fx.GraphModule) -> list[str]:
    """Targets of the BatchNorm modules that the prepared graph still calls on their own."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [
        str(n.target)
        for n in prepared.graph.nodes
        if n.op == "call_module" and isinstance(prepared.get_submodule(n.target), _BatchNorm)
    ] + [
        n.name
        for n in prepared.graph.nodes
        if n.op == "call_function" and n.target is torch.nn.functional.batch_norm
    ]


class SharedRangeFakeQuantize(torch.ao.quantization.FakeQuantizeBase):
    """Fake-quantizes with another (per-tensor) fake-quantizer's qparams and never observes.

    torch.ao gives an op that keeps its input's quantization (pooling, flatten, identity, slicing, ``cat``)
    the *same* fake-quantizer object for its output as for its input, called on both. With moving-average
    observers the extra observations of outputs that lie inside the input's range (a max- or average-pooled,
    flattened tensor) pull the shared range inwards: QAT then clips the input to a range narrower than
    itself, while the int8 kernels do not clip it again, so the int8 network departs from the trained one
    (ResNets' last feature map was clipped to a third of its range). :func:`prepare_int8_qat` therefore
    replaces each such *derived* call (whose op's inputs all come from calls of the same fake-quantizer)
    by this follower of the shared one: same qparams in QAT and in the int8 conversion, no observation.
    """

    def __init__(self, leader: torch.ao.quantization.FakeQuantizeBase) -> None:
        super().__init__()
        object.__setattr__(self, "leader", leader)  # not a submodule: its state stays under its own name

    @property
    def _observer(self) -> Any:
        return self.leader.activation_post_process

    dtype = property(lambda self: self._observer.dtype)
    qscheme = property(lambda self: self._observer.qscheme)
    quant_min = property(lambda self: self._observer.quant_min)
    quant_max = property(lambda self: self._observer.quant_max)
    is_dynamic = property(lambda self: getattr(self._observer, "is_dynamic", False))

    def calculate_qparams(self, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return self.leader.calculate_qparams(**kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if self.leader.fake_quant_enabled[0] == 1 and self.fake_quant_enabled[0] == 1:
            return torch.fake_quantize_per_tensor_affine(
                x, self.leader.scale, self.leader.zero_point, self.quant_min, self.quant_max
            )
        return x

    def extra_repr(self) -> str:
        return "shares the qparams of the fake-quantizer of its op's input"


def _separate_derived_observations(prepared: torch.fx.GraphModule) -> list[str]:
    """Swap derived calls of shared activation fake-quantizers for followers (see SharedRangeFakeQuantize)."""
    from torch.ao.quantization import FakeQuantize

    groups: dict[int, list[torch.fx.Node]] = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and isinstance(prepared.get_submodule(node.target), FakeQuantize):
            groups.setdefault(id(prepared.get_submodule(node.target)), []).append(node)
    swapped = []
    for calls in groups.values():
        leader = prepared.get_submodule(calls[0].target)
        if len(calls) < 2 or leader.qscheme not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            continue
        for node in calls:
            producer = node.args[0] if node.args else None
            inputs = (
                [n for n in producer.all_input_nodes if n.op != "get_attr"]
                if isinstance(producer, torch.fx.Node)
                else []
            )
            if inputs and all(n in calls for n in inputs):
                prepared.add_submodule(str(node.target), SharedRangeFakeQuantize(leader))
                swapped.append(str(node.target))
    return swapped


def _as_example(example_input: object) -> tuple[Tensor, ...]:
    if isinstance(example_input, Tensor):
        args: tuple = (example_input,)
    elif isinstance(example_input, tuple | list):
        args = tuple(example_input)
    else:
        args = ()
    if not args or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in args):
        raise TypeError(
            "example_input must be a batched tensor (e.g. torch.zeros(1, 1, 28, 28)) or a tuple of them, "
            f"got {type(example_input).__name__}"
        )
    return args


def prepare_int8_qat(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...],
    backend: str = "x86",
    *,
    qconfig: str = "default",
    allow_unfolded_bn: bool = False,
    inplace: bool = False,
) -> torch.fx.GraphModule:
    """The int8 QAT version of ``model``: fused Conv+BN(+ReLU) / Linear(+ReLU), fake-quantized, in train mode.

    ``example_input`` is a batched example (its values are not used; no forward is run, so no observer or
    BN statistic moves, and the global RNG is left as it was). Unless ``inplace``, ``model`` is deep-copied
    first, so it keeps its own parameters. The result's submodules keep the float model's names (a fused
    ``conv1`` + ``bn1`` is ``conv1``; ``bn1`` disappears); its state_dict adds BN, observer and
    fake-quantizer entries.

    Raises ``ValueError`` for an unknown backend / qconfig, a model torch.fx cannot trace (naming the
    submodule), or a BatchNorm that cannot be folded (naming it and why) unless ``allow_unfolded_bn``.
    """
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    backend = _check_backend(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_int8_qat expects an nn.Module, got {type(model).__name__}")
    if not isinstance(allow_unfolded_bn, bool):
        raise TypeError(f"allow_unfolded_bn must be true or false, got {allow_unfolded_bn!r}")
    if is_int8_qat(model):
        raise ValueError(
            f"prepare_int8_qat: {type(model).__name__} already has int8 fake-quantizers (prepared twice?)"
        )
    args = _as_example(example_input)
    mapping = _qconfig_mapping(backend, qconfig)
    model = model if inplace else copy.deepcopy(model)
    model.train()
    traced = _trace(model)  # clear errors for untraceable models, and the float graph for BN diagnostics
    # torch.ao builds its QAT modules with freshly initialised weights before copying the float ones in:
    # keep the global RNG where it was, so training draws the same numbers with or without int8 QAT.
    with _quiet(), quantized_engine(backend), torch.random.fork_rng(devices=[]):
        prepared = prepare_qat_fx(model, mapping, args)
    _separate_derived_observations(prepared)
    unfolded = _unfolded_batchnorms(prepared)
    if unfolded and not allow_unfolded_bn:
        reasons = "; ".join(f"{name!r}: {_why_not_folded(name, traced)}" for name in unfolded)
        raise ValueError(
            f"int8 QAT: cannot fold BatchNorm layer(s) of {type(model).__name__} into a preceding layer: "
            f"{reasons}. torch.ao folds a BatchNorm only directly after a Conv (or a Linear, for "
            "BatchNorm1d) whose output nothing else uses. Reorder the layers, or pass "
            "allow_unfolded_bn=True to keep them as separate quantized BatchNorms (not folded)"
        )
    prepared.meta[_META_KEY] = {
        "backend": backend,
        "qconfig": qconfig,
        "example_input_shape": list(args[0].shape[1:]) if len(args) == 1 else None,
        "allow_unfolded_bn": allow_unfolded_bn,
    }
    return prepared


def is_int8_qat(model: nn.Module) -> bool:
    """Whether ``model`` carries torch.ao fake-quantizers (i.e. was prepared for QAT)."""
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    return any(isinstance(m, FakeQuantizeBase) for m in model.modules())


def int8_config(model: nn.Module) -> dict[str, Any]:
    """The options a model was prepared with (backend, qconfig, example_input_shape, allow_unfolded_bn)."""
    if isinstance(model, Int8Network):
        return dict(model.config)
    meta = getattr(model, "meta", None)
    if not isinstance(meta, dict) or _META_KEY not in meta:
        raise TypeError(
            f"expected a model returned by prepare_int8_qat or convert_int8, got {type(model).__name__}"
        )
    return dict(meta[_META_KEY])


# -- conversion ----------------------------------------------------------------------------------------------


def convert_int8(qat_model: nn.Module) -> Int8Network:
    """The real int8 network of a :func:`prepare_int8_qat` model (left unchanged), in eval mode.

    BatchNorms are folded into the conv weights and biases with their running statistics; weights are
    quantized with the fake-quantizers' final scales and activations with the observers' ranges.
    """
    from torch.ao.quantization.quantize_fx import convert_fx

    config = int8_config(qat_model)
    model = copy.deepcopy(qat_model).eval()
    with _quiet(), quantized_engine(config["backend"]):
        converted = convert_fx(model)
    converted.meta[_META_KEY] = dict(config)
    return Int8Network(converted, config).eval()


class Int8Network(nn.Module):
    """A converted int8 network (``self.model``) with float inputs and outputs and a plain-tensor state.

    - ``forward`` runs ``self.model`` under the backend's quantized engine (``self.config["backend"]``).
    - ``state_dict()`` is :func:`int8_state` (int8 weights, float64 scales, int64 zero points, float
      biases) and ``load_state_dict()`` is :func:`load_int8_state` (bit-exact), so safetensors can store
      it. Only as the top-level module: a parent module's ``load_state_dict`` would not reach them.
    - ``named_parameters()`` yields read-only copies of each quantized layer's effective weight
      (dequantized, frozen) and bias, which torch.ao keeps packed rather than as parameters: parameter
      counts, nonzero counts and "which device is the model on" see the real int8 layers.
    """

    def __init__(self, model: nn.Module, config: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.config = dict(config)
        _check_backend(self.config.get("backend"))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with quantized_engine(self.config["backend"]), _deterministic_check_off():
            return self.model(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"backend={self.config['backend']!r}"

    def state_dict(self, *args: Any, destination=None, prefix: str = "", keep_vars: bool = False):
        if args:
            raise TypeError("Int8Network.state_dict takes keyword arguments only")
        out = destination if destination is not None else {}
        for key, value in int8_state(self.model).items():
            out[prefix + key] = value
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        from torch.nn.modules.module import _IncompatibleKeys

        missing, unexpected = load_int8_state(self, state_dict, strict=strict)
        return _IncompatibleKeys(missing, unexpected)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, module in _weighted_layers(self.model):
            weight, bias = _weight_bias(module)
            base = f"{prefix}{'.' if prefix else ''}{name}"
            yield f"{base}.weight", nn.Parameter(weight.dequantize(), requires_grad=False)
            if bias is not None:
                yield f"{base}.bias", nn.Parameter(bias.detach().clone(), requires_grad=False)


def _weighted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    import torch.ao.nn.quantized as nnq

    for name, module in model.named_modules():
        if isinstance(module, nnq.Linear | nnq.Conv1d | nnq.Conv2d | nnq.Conv3d):
            yield name, module


def _weight_bias(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    import torch.ao.nn.quantized as nnq

    if isinstance(module, nnq.Linear):
        return module._weight_bias()
    return module.weight(), module.bias()


# -- plain-tensor state --------------------------------------------------------------------------------------


def _quantized_model(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, Int8Network) else model


def _put(out: dict[str, Tensor], key: str, value: Tensor) -> None:
    if key in out:
        raise Int8StateError(f"int8 state: two entries would be named {key!r}; rename the layer")
    out[key] = value


def _put_quantized(out: dict[str, Tensor], key: str, q: Tensor) -> None:
    _put(out, key, q.int_repr().contiguous())
    if q.qscheme() in _PER_CHANNEL:
        _put(out, f"{key}_scale", q.q_per_channel_scales().to(torch.float64).contiguous())
        _put(out, f"{key}_zero_point", q.q_per_channel_zero_points().to(torch.int64).contiguous())
        _put(out, f"{key}_axis", torch.tensor(q.q_per_channel_axis(), dtype=torch.int64))
    elif q.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        _put(out, f"{key}_scale", torch.tensor(q.q_scale(), dtype=torch.float64))
        _put(out, f"{key}_zero_point", torch.tensor(q.q_zero_point(), dtype=torch.int64))
    else:
        raise Int8StateError(f"int8 state: {key!r} uses quantization scheme {q.qscheme()}, not supported")


def int8_state(model: nn.Module) -> dict[str, Tensor]:
    """Plain tensors (no quantized dtypes, no tuples) that :func:`load_int8_state` restores bit-exactly.

    From the converted model's own state_dict: a quantized tensor ``k`` becomes ``k`` (its integer codes:
    ``int8`` for weights) + ``k_scale`` (float64, per channel or 0-d) + ``k_zero_point`` (int64) and, per
    channel, ``k_axis``; a quantized Linear's packed ``(weight, bias)`` becomes ``<layer>.weight`` /
    ``<layer>.bias`` like a conv's; float tensors (biases, activation scales) stay as they are.
    """
    import torch.ao.nn.quantized as nnq

    quantized = _quantized_model(model)
    out: dict[str, Tensor] = {}
    with _quiet():
        state = quantized.state_dict()
    for key, value in state.items():
        if key.endswith(_PACKED):
            weight, bias = value
            layer = key[: -len(_PACKED)]
            _put_quantized(out, f"{layer}weight", weight)
            if bias is not None:
                _put(out, f"{layer}bias", bias.detach().clone())
        elif key.endswith(_PACKED_DTYPE) or value is None:
            if value not in (None, torch.qint8):
                raise Int8StateError(f"int8 state: {key!r} packs {value} weights; only qint8 is supported")
        elif isinstance(value, Tensor) and value.is_quantized:
            _put_quantized(out, key, value)
        elif isinstance(value, Tensor):
            _put(out, key, value.detach().clone())
        else:
            raise Int8StateError(
                f"int8 state: {key!r} holds a {type(value).__name__}, not a tensor; modules of "
                f"{sorted({type(m).__name__ for m in quantized.modules() if not isinstance(m, nnq.Linear)})} "
                "cannot all be stored as plain tensors"
            )
    return out


class _Reader:
    """Takes entries out of a plain-tensor state, checking dtype and shape against the template's."""

    def __init__(self, tensors: Mapping[str, Any], strict: bool) -> None:
        self.tensors, self.strict = tensors, strict
        self.used: set[str] = set()
        self.missing: list[str] = []

    def take(self, key: str, dtype: torch.dtype, shape: Sequence[int]) -> Tensor | None:
        if key not in self.tensors:
            self.missing.append(key)
            return None
        value = self.tensors[key]
        self.used.add(key)
        if not isinstance(value, Tensor) or value.is_quantized:
            raise Int8StateError(f"int8 state: {key!r} must be a plain tensor, got {type(value).__name__}")
        if value.dtype != dtype or tuple(value.shape) != tuple(shape):
            raise Int8StateError(
                f"int8 state: {key!r} is {value.dtype} of shape {list(value.shape)}, the model expects "
                f"{dtype} of shape {list(shape)} (a state of another architecture or backend?)"
            )
        return value

    def quantized(self, key: str, like: Tensor) -> Tensor | None:
        codes = self.take(key, _INT_DTYPES[like.dtype], like.shape)
        if like.qscheme() in _PER_CHANNEL:
            channels = like.shape[like.q_per_channel_axis()]
            scale = self.take(f"{key}_scale", torch.float64, (channels,))
            zero = self.take(f"{key}_zero_point", torch.int64, (channels,))
            axis = self.take(f"{key}_axis", torch.int64, ())
            if codes is None or scale is None or zero is None or axis is None:
                return None
            if int(axis) != like.q_per_channel_axis():
                raise Int8StateError(
                    f"int8 state: {key!r} is quantized along axis {int(axis)}, the model along "
                    f"{like.q_per_channel_axis()}"
                )
            return torch._make_per_channel_quantized_tensor(codes, scale, zero, int(axis))
        scale = self.take(f"{key}_scale", torch.float64, ())
        zero = self.take(f"{key}_zero_point", torch.int64, ())
        if codes is None or scale is None or zero is None:
            return None
        return torch._make_per_tensor_quantized_tensor(codes, float(scale), int(zero))


def load_int8_state(
    model_template: nn.Module, tensors: Mapping[str, Any], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load :func:`int8_state` tensors into a converted int8 model of the same architecture, bit-exactly.

    ``model_template`` is a converted model (or :class:`Int8Network`) with the same modules, e.g. from
    :func:`convert_int8` of a freshly prepared float architecture; its weights are re-packed for its
    backend. Returns ``(missing, unexpected)`` keys; with ``strict`` either raises :class:`Int8StateError`
    (a ``ValueError`` and a ``RuntimeError``), as does a dtype or shape that does not fit.
    """
    quantized = _quantized_model(model_template)
    meta = getattr(quantized, "meta", None)
    backend = meta[_META_KEY]["backend"] if isinstance(meta, dict) and _META_KEY in meta else None
    with _quiet():
        template = quantized.state_dict()
    reader = _Reader(tensors, strict)
    full: dict[str, Any] = {}
    for key, like in template.items():
        if key.endswith(_PACKED):
            layer = key[: -len(_PACKED)]
            weight = reader.quantized(f"{layer}weight", like[0])
            bias = like[1]
            if bias is not None:
                bias = reader.take(f"{layer}bias", bias.dtype, bias.shape)
            if weight is None or (like[1] is not None and bias is None):
                continue
            full[key] = (weight, bias)
        elif key.endswith(_PACKED_DTYPE) or like is None:
            full[key] = like
        elif isinstance(like, Tensor) and like.is_quantized:
            value = reader.quantized(key, like)
            if value is not None:
                full[key] = value
        elif isinstance(like, Tensor):
            value = reader.take(key, like.dtype, like.shape)
            if value is not None:
                full[key] = value
        else:
            raise Int8StateError(f"int8 state: the model's {key!r} holds a {type(like).__name__}")
    unexpected = sorted(set(tensors) - reader.used)
    missing = sorted(set(reader.missing))
    if strict and (missing or unexpected):
        raise Int8StateError(
            f"Error(s) in loading the int8 state of {type(quantized).__name__}: missing keys {missing}, "
            f"unexpected keys {unexpected}; the state was saved from another architecture or structure"
        )
    for key, like in template.items():  # strict=False: keep the template's values for what is missing
        full.setdefault(key, like)
    ordered: OrderedDict[str, Any] = OrderedDict((key, full[key]) for key in template)
    # Module versions: without them torch.ao's Linear would read the state as its version-1 layout.
    ordered._metadata = getattr(template, "_metadata", None)  # type: ignore[attr-defined]
    with _quiet(), quantized_engine(backend or torch.backends.quantized.engine):
        quantized.load_state_dict(ordered, strict=True)
    return missing, unexpected


# -- the zoo's structure spec --------------------------------------------------------------------------------


def int8_structure(model: nn.Module, inner: dict[str, Any] | None = None) -> dict[str, Any]:
    """The zoo card's structure spec of a prepared or converted model: plain data, no pickle.

    ``{"kind": "int8", "version": 1, "backend": ..., "qconfig": ..., "example_input_shape": [...],
    "allow_unfolded_bn": ..., "inner": <spec applied to the float architecture first, or None>}``.
    """
    config = int8_config(model)
    if config.get("example_input_shape") is None:
        raise ValueError(
            "int8 structure specs describe single-input networks; this model was prepared with a tuple of "
            "example inputs"
        )
    return {
        "kind": KIND,
        "version": VERSION,
        "backend": config["backend"],
        "qconfig": config["qconfig"],
        "example_input_shape": list(config["example_input_shape"]),
        "allow_unfolded_bn": bool(config["allow_unfolded_bn"]),
        "inner": inner,
    }


@register_structure(KIND)
def build_int8(model: nn.Module, spec: dict[str, Any]) -> Int8Network:
    """An int8 template of the float architecture ``model`` (weights still to be loaded)."""
    shape = spec.get("example_input_shape")
    if spec.get("version") != VERSION or not (
        isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)
    ):
        raise ZooFormatError(
            f"int8 structure spec must be version {VERSION} with a per-example 'example_input_shape' list, "
            f"got version {spec.get('version')!r}, example_input_shape {shape!r}"
        )
    model = apply_structure(model, spec.get("inner"))
    try:
        prepared = prepare_int8_qat(
            model,
            torch.zeros(1, *shape),
            spec.get("backend"),
            qconfig=spec.get("qconfig"),
            allow_unfolded_bn=spec.get("allow_unfolded_bn", False),
            inplace=True,
        )
    except (ValueError, TypeError) as err:
        raise ZooFormatError(f"int8 structure spec does not fit the architecture: {err}") from err
    return convert_int8(prepared)


# -- MAC counting for quantized layers -----------------------------------------------------------------------


def _register_mac_counters() -> None:
    """Teach :func:`lit_compress.measure.count_macs` the quantized conv / linear layers (same formulas)."""
    import torch.ao.nn.quantized as nnq

    from lit_compress.measure import register_mac_counter

    def nonzero(module: nn.Module) -> tuple[int, int]:
        weight = _weight_bias(module)[0]
        return weight.numel(), int(torch.count_nonzero(weight.dequantize()))

    def conv(module: nn.Module, inputs: tuple, output: Tensor) -> tuple[int, int]:
        positions = output.numel() // module.out_channels
        dense, nnz = nonzero(module)
        return positions * dense, positions * nnz

    def linear(module: nn.Module, inputs: tuple, output: Tensor) -> tuple[int, int]:
        rows = output.numel() // module.out_features
        dense, nnz = nonzero(module)
        return rows * dense, rows * nnz

    for module_type, counter in (
        (nnq.Conv1d, conv),
        (nnq.Conv2d, conv),
        (nnq.Conv3d, conv),
        (nnq.Linear, linear),
    ):
        with contextlib.suppress(ValueError):  # already registered (by the lead, or a re-import)
            register_mac_counter(module_type)(counter)


_register_mac_counters()
