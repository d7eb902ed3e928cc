"""ONNX export of lit_compress models, checked by ``onnx.checker`` and onnxruntime against PyTorch.

:func:`export_onnx` writes a model with a dynamic batch dimension and, before anything reaches the disk,
checks it: ``onnx.checker`` (full check, with shape inference), then onnxruntime on fresh inputs at batch
sizes that differ from the one traced (so a batch size baked into the graph is caught), compared with the
PyTorch model's own output. Only a graph that passes is written, atomically (temp file + ``os.replace``):
a refused or failed export leaves nothing behind.

What exports, and how (see ``docs/onnx.md``):

- **Dense and physically pruned networks** (structured channel pruning, depth pruning, low-rank,
  depthwise): as they are. A structurally pruned zoo entry is already smaller, so is its graph.
- **Unstructured-sparse networks**: dense, zeros stored (ONNX has no sparse conv/GEMM that onnxruntime
  runs faster). :class:`~lit_compress.pruning.sparse_inference.SparseLinear` layers are turned back into
  ``nn.Linear`` first (their CSR kernel does not trace).
- **torch.ao int8 networks** (:class:`~lit_compress.quantization.int8.Int8Network`, the zoo's ``int8-qat``
  entries): as a QDQ graph (``QuantizeLinear`` / ``DequantizeLinear`` around float ``Conv`` / ``Gemm``,
  int8 weights and per-channel scales stored, biases as int32 with scale ``input_scale * weight_scale``),
  which onnxruntime fuses into integer kernels. This is what torch.onnx's TorchScript exporter emits for
  torch.ao's quantized modules; the dynamo exporter cannot trace them at all in this torch
  ("quantized nyi in meta tensors"). A QAT model (fake-quantizers, before ``convert_int8``) is refused:
  convert it first, which is the network that actually runs in int8.
- **STE-quantized networks** (``QuantLinear`` / ``QuantConv2d``: binary, XNOR, DoReFa): their eval forward is
  plain tensor ops (``Sign``, ``Round``, ``Clip``...). The effective (quantized) weights are baked into the
  graph; activation quantizers stay as ONNX ops.
- **FBS-gated networks**: exported with every channel computed and the winner-take-all gate multiplied in
  (the layers' ``skip=False`` form, ``TopK`` + ``ScatterElements`` in ONNX): the same outputs, but none of
  the skipped MACs, since which channels to skip depends on each image.
- **Refused** with a message saying why and what to do instead: BlockDrop networks (which blocks run is
  decided per image by Python branches: a traced graph would hard-code the trace input's decisions), the
  bit-packed binary inference layers of ``to_binary_inference`` (their kernel does not trace: export the
  ``QuantConv2d`` / ``QuantLinear`` model instead), QAT graphs, and any model whose trace raised a
  ``TracerWarning`` (Python control flow on tensor values) unless ``strict_trace=False``.

**Exporter.** The TorchScript-based exporter (``exporter="torchscript"``, the default) is used because it is
the only one that exports torch.ao int8 modules, and because it is fast (well under a second for the zoo's
networks here, against several seconds for the dynamo exporter, which also refuses FBS's data-dependent
shapes). It is deprecated upstream; ``exporter="dynamo"`` runs ``torch.onnx.export(dynamo=True)`` for float
networks and is checked the same way.

**Tolerances** (``max |onnxruntime - PyTorch|`` over all outputs):

- float graphs: ``1e-5 + 1e-4 * max|PyTorch output|``. The two runtimes sum in different orders and use
  different conv algorithms (MLAS vs oneDNN / im2col): that costs a few float32 ulps per accumulation,
  measured at 1e-6 to 5e-6 on the zoo's networks (logits up to ~15). The bound leaves 100x headroom and is
  still far below any real export mistake (a wrong padding, transposed weight or dropped branch moves
  outputs by O(1)).
- int8 (QDQ) graphs, whose output is a ``DequantizeLinear``: ``2`` output quantization steps (plus the float
  bound). fbgemm requantizes each layer with a float multiplier while onnxruntime rounds half to even after
  its own accumulation, so an intermediate code can land one step apart and carry to the output. Over the
  10,000 MNIST test images the zoo's ``lenet5-mnist.int8-qat`` differs by at most 1 step (0.324) on a logit
  (on 20% of the images), and the argmax agrees on 9,999 of them.
- networks with ``sign`` activations (BNNs) amplify a 1-ulp difference right at zero into a flipped bit;
  with random inputs this did not happen on the zoo's BNN, but a check can in principle fail there.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lit_compress._io import atomic_write_bytes

__all__ = [
    "DEFAULT_OPSET",
    "FLOAT_ATOL",
    "FLOAT_RTOL",
    "INT8_STEPS",
    "OnnxCheckError",
    "OnnxExportError",
    "OnnxReport",
    "export_onnx",
    "load_and_check",
    "main",
    "onnx_tolerance",
]

DEFAULT_OPSET = 17
_DYNAMO_MIN_OPSET = 18  # the dynamo exporter's translation library starts at opset 18
FLOAT_RTOL = 1e-4
FLOAT_ATOL = 1e-5
INT8_STEPS = 2
_TRACE_BATCH = 2
_CHECK_BATCHES = (1, 3)  # differ from the traced batch: a batch size baked into the graph fails the check
_SEED = 0
_QUIET = (
    "You are using the legacy TorchScript-based ONNX export",
    "The feature will be removed",
    "Constant folding - Only steps=1",
    "`torch.jit.trace",
    "torch.ao.quantization is deprecated",
)

Exporter = Literal["torchscript", "dynamo"]


class OnnxExportError(ValueError):
    """The model cannot be exported faithfully (refused, or the exporter failed); nothing was written."""


class OnnxCheckError(OnnxExportError):
    """The exported graph failed ``onnx.checker`` or differs from PyTorch beyond the tolerance."""


@dataclass(frozen=True)
class OnnxReport:
    """What :func:`export_onnx` wrote and how well it matched PyTorch."""

    path: str
    form: str  # "float", "int8-qdq", "fbs-dense-gates"
    exporter: str
    opset: int
    input_shape: tuple[int, ...]  # per example; the batch dimension is dynamic ("batch")
    bytes: int
    op_counts: dict[str, int]
    initializer_shapes: dict[str, tuple[int, ...]]  # the stored weights (smaller for pruned networks)
    checked: bool
    batch_sizes: tuple[int, ...]  # batch sizes run through onnxruntime (empty if not checked)
    max_abs_diff: float | None
    tolerance: float | None
    notes: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- preparing the module that is traced ---------------------------------------------------------------------


def _check_input_shape(input_shape: object) -> tuple[int, ...]:
    if isinstance(input_shape, torch.Size):
        input_shape = tuple(input_shape)
    if not (
        isinstance(input_shape, tuple | list)
        and input_shape
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)
    ):
        raise TypeError(
            "input_shape must be a non-empty sequence of positive ints, one example's shape without the "
            f"batch dimension (e.g. (1, 28, 28) for MNIST), got {input_shape!r}"
        )
    return tuple(input_shape)


def _check_opset(opset: object, exporter: str) -> int:
    lowest = _DYNAMO_MIN_OPSET if exporter == "dynamo" else 13
    if not isinstance(opset, int) or isinstance(opset, bool) or not lowest <= opset <= 23:
        raise ValueError(
            f"opset must be an int in [{lowest}, 23] for the {exporter} exporter, got {opset!r}; "
            f"the default {DEFAULT_OPSET if exporter == 'torchscript' else _DYNAMO_MIN_OPSET} works with "
            "onnxruntime >= 1.14"
        )
    return opset


def _named(model: nn.Module, types: tuple[type, ...]) -> list[str]:
    return [name or "<root>" for name, m in model.named_modules() if isinstance(m, types)]


def _refusal(model: nn.Module) -> str | None:
    """Why ``model`` cannot be exported faithfully, or None."""
    from lit_compress.gating.blockdrop import BlockDropNetwork, is_gated
    from lit_compress.quantization.binary_inference import BinaryConv2d
    from lit_compress.quantization.binary_kernel import BinaryLinear

    gated = [name or "<root>" for name, m in model.named_modules() if is_gated(m)]
    if isinstance(model, BlockDropNetwork) or gated:
        return (
            f"{type(model).__name__} is a BlockDrop network (gated blocks {gated}): which residual "
            "blocks run is decided per image by its policy through Python branches (`if keep.all()`, "
            "grouping the batch by decision), so a traced ONNX graph would hard-code the decisions made for "
            "the trace input and silently compute the wrong blocks for other images. Export the backbone "
            "without gates instead (every block runs: lit_compress.gating.blockdrop.ungate_blocks("
            "net.backbone, net.blocks), then export net.backbone), or the static network of an "
            "epsilon-ResNet / depth-pruned entry"
        )
    binary = _named(model, (BinaryLinear, BinaryConv2d))
    if binary:
        return (
            f"layers {binary} are bit-packed binary inference layers (to_binary_inference): their popcount "
            "kernel converts tensors to Python values and does not trace. Export the model before "
            "to_binary_inference: its QuantConv2d / QuantLinear layers export as Sign + Conv / Gemm with the "
            "binary weights stored"
        )
    from lit_compress.quantization.int8 import Int8Network, is_int8_qat

    if is_int8_qat(model) and not isinstance(model, Int8Network):
        return (
            f"{type(model).__name__} is an int8 QAT graph (torch.ao fake-quantizers, before conversion): "
            "torch.onnx's TorchScript exporter fails on torch.ao's QAT graph in this torch version "
            "(unsupported operator 'aten::copy'). Convert it first with "
            "lit_compress.quantization.int8.convert_int8(model) and export the result, the network that "
            "really runs in int8: it exports as a QDQ graph (QuantizeLinear / DequantizeLinear)"
        )
    return None


def _is_int8(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def _exportable(model: nn.Module) -> tuple[nn.Module, str, list[str], tuple[str, ...]]:
    """The module to trace (a rewritten copy where needed), its form, notes on what was rewritten and the
    source files whose TracerWarnings are known to be shape checks (not data-dependent branches)."""
    reason = _refusal(model)
    if reason is not None:
        raise OnnxExportError(f"cannot export to ONNX: {reason}")
    from lit_compress.gating.fbs import fbs_layers
    from lit_compress.pruning.sparse_inference import SparseLinear
    from lit_compress.quantization.modules import bake_quantized_weights, is_quantized

    notes: list[str] = []
    form = "int8-qdq" if _is_int8(model) else "float"
    sparse = _named(model, (SparseLinear,))
    quantized = [name or "<root>" for name, m in model.named_modules() if is_quantized(m)]
    fbs = fbs_layers(model)
    trusted: tuple[str, ...] = ()
    if not (sparse or quantized or fbs):
        return model, form, notes, ()
    model = copy.deepcopy(model)
    for name in sparse:
        dense = model.get_submodule(name if name != "<root>" else "").to_dense()
        model = _replace(model, name, dense)
    if sparse:
        notes.append(f"SparseLinear layers {sparse} exported as dense nn.Linear (zeros stored)")
    if quantized:
        model = bake_quantized_weights(model, keep_input_quantizers=True)
        notes.append(
            f"effective quantized weights of {quantized} baked in; activation quantizers kept as ops"
        )
    if fbs:
        for layer in fbs_layers(model).values():
            layer.skip = False
            layer.fbs_state.record = False
        form = "fbs-dense-gates"
        # The skip=False path branches only on channel counts and k (fixed per layer); the tracer flags
        # those shape checks because it records sizes as tensors.
        trusted = (str(Path(sys.modules[fbs_layers.__module__].__file__).resolve()),)
        notes.append(
            f"FBS layers {sorted(fbs)} exported with every channel computed and the winner-take-all gate "
            "multiplied in (skip=False): same outputs, no skipped MACs in ONNX"
        )
    return model, form, notes, trusted


def _replace(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "<root>":
        return new
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, new)
    return root


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then every module's own training flag back."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextlib.contextmanager
def _determinism_off() -> Iterator[None]:
    """Tracing runs ops that have no deterministic kernel (quantized tensors' resize_ in int8 modules); a run
    trained with ``Trainer(deterministic=True)`` leaves determinism on for the whole process. The trace only
    records the graph, so the flag is lifted for its duration and then restored as it was."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=f".*{message}")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        yield


def _float_output(output: object, what: str) -> Tensor:
    if not isinstance(output, Tensor) or not output.is_floating_point():
        raise OnnxExportError(
            f"{what} must return one floating-point tensor to be exported and checked, got "
            f"{type(output).__name__}; wrap the model in a module whose forward returns the logits tensor"
        )
    return output


# -- exporting -----------------------------------------------------------------------------------------------


def _trace_input(input_shape: tuple[int, ...], batch: int) -> Tensor:
    generator = torch.Generator().manual_seed(_SEED + batch)
    return torch.randn(batch, *input_shape, generator=generator)


def _export_bytes(
    module: nn.Module,
    input_shape: tuple[int, ...],
    opset: int,
    exporter: str,
    strict_trace: bool,
    input_name: str,
    output_name: str,
    trusted: tuple[str, ...] = (),
) -> bytes:
    example = _trace_input(input_shape, _TRACE_BATCH)
    try:
        with torch.no_grad():
            output = module(example)
    except Exception as err:
        raise OnnxExportError(
            f"{type(module).__name__} does not run on a batch of shape {list(example.shape)} "
            f"(input_shape={list(input_shape)} plus the batch dimension): {type(err).__name__}: "
            f"{_first_lines(err)}. input_shape is one example's shape without the batch dimension, e.g. "
            "(1, 28, 28) for MNIST"
        ) from err
    _float_output(output, type(module).__name__)
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught, _quiet(), _determinism_off():
        warnings.simplefilter("always", torch.jit.TracerWarning)
        try:
            if exporter == "dynamo":
                program = torch.onnx.export(
                    module,
                    (example,),
                    dynamo=True,
                    opset_version=opset,
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    verbose=False,
                )
                data = program.model_proto.SerializeToString()
            else:
                torch.onnx.export(
                    module,
                    (example,),
                    buffer,
                    dynamo=False,
                    opset_version=opset,
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                    do_constant_folding=True,
                )
                data = buffer.getvalue()
        except OnnxExportError:
            raise
        except Exception as err:  # the exporters raise many types; all mean "this model does not export"
            raise OnnxExportError(
                f"torch.onnx ({exporter} exporter, opset {opset}) could not export {type(module).__name__}: "
                f"{type(err).__name__}: {_first_lines(err)}. If the message names an operator, that operator "
                "has no ONNX translation at this opset (try a higher opset, or replace the layer); if it "
                "names a shape, check input_shape (one example's shape, without the batch dimension)"
            ) from err
    tracer = sorted(
        {
            f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0]}"
            for w in caught
            if issubclass(w.category, torch.jit.TracerWarning)
            and str(Path(w.filename).resolve()) not in trusted
        }
    )
    for w in caught:  # re-emit what was not ours to judge
        if not issubclass(w.category, torch.jit.TracerWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if tracer and strict_trace:
        raise OnnxExportError(
            f"cannot export {type(module).__name__} faithfully: tracing hit Python control flow on tensor "
            f"values, so the graph would hard-code what the trace input did: {tracer}. Make that code "
            "tensor-only (torch.where instead of if, no .item() / bool()), or pass strict_trace=False to "
            "export anyway (the onnxruntime check still compares outputs on other inputs)"
        )
    return data


def _first_lines(err: BaseException, lines: int = 3, chars: int = 600) -> str:
    text = " ".join(str(err).strip().splitlines()[:lines])
    return text[:chars] + ("..." if len(text) > chars else "")


# -- checking ------------------------------------------------------------------------------------------------


def _session(data: bytes | str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _constant(proto: Any, name: str) -> Any | None:
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def _output_scale(proto: Any) -> float | None:
    """The quantization step of the graph's output if it comes out of a DequantizeLinear, else None."""
    output = proto.graph.output[0].name
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and output in node.output and len(node.input) > 1:
            scale = _constant(proto, node.input[1])
            if scale is not None and scale.size >= 1:
                return float(abs(scale).max())
    return None


def onnx_tolerance(proto: Any, reference: Tensor) -> float:
    """The largest ``|onnxruntime - PyTorch|`` accepted for ``proto``'s output (see the module docstring)."""
    bound = FLOAT_ATOL + FLOAT_RTOL * float(reference.abs().max()) if reference.numel() else FLOAT_ATOL
    scale = _output_scale(proto)
    return bound + INT8_STEPS * scale if scale is not None else bound


def _check_proto(proto: Any) -> None:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as err:
        raise OnnxCheckError(f"onnx.checker rejected the exported graph: {_first_lines(err)}") from err
    for value, what in ((proto.graph.input[0], "input"), (proto.graph.output[0], "output")):
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            raise OnnxCheckError(
                f"the exported graph's {what} {value.name!r} has a fixed batch dimension "
                f"({[d.dim_value or d.dim_param for d in dims]}); expected a symbolic one"
            )


def _run(session: Any, x: Tensor) -> Tensor:
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().cpu().float().numpy()})[0])


def _reference(model: nn.Module, x: Tensor) -> Tensor:
    with _eval_mode(model), torch.no_grad():
        return _float_output(model(x), type(model).__name__).detach().float().cpu()


def load_and_check(path: str | Path, model: nn.Module, sample: Tensor) -> float:
    """``max |onnxruntime(path)(sample) - model(sample)|`` after ``onnx.checker`` accepts the file.

    ``model`` is the PyTorch model the file was exported from (run in eval mode, without gradients; its
    training flags are restored), ``sample`` a batch of inputs. Raises :class:`OnnxCheckError` if the checker
    rejects the file or the output shapes differ; the difference itself is returned, not judged (compare
    it with :func:`onnx_tolerance`).
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {str(path)!r}")
    if not isinstance(sample, Tensor) or sample.dim() < 1:
        raise TypeError(f"sample must be a batched tensor, got {type(sample).__name__}")
    proto = onnx.load(str(path))
    _check_proto(proto)
    got = _run(_session(str(path)), sample)
    want = _reference(model, sample)
    if got.shape != want.shape:
        raise OnnxCheckError(
            f"onnxruntime returned shape {list(got.shape)}, PyTorch {list(want.shape)} for input "
            f"{list(sample.shape)}"
        )
    return float((got - want).abs().max()) if want.numel() else 0.0


def _check_numerics(
    data: bytes, proto: Any, model: nn.Module, inputs: Sequence[Tensor], atol: float | None
) -> tuple[float, float]:
    session = _session(data)
    worst, tolerance = 0.0, float("inf")
    for x in inputs:
        got = _run(session, x)
        want = _reference(model, x)
        if got.shape != want.shape:
            raise OnnxCheckError(
                f"onnxruntime returned shape {list(got.shape)}, PyTorch {list(want.shape)} for input "
                f"{list(x.shape)}: the graph does not follow the batch size"
            )
        diff = float((got - want).abs().max()) if want.numel() else 0.0
        bound = atol if atol is not None else onnx_tolerance(proto, want)
        if diff > bound:
            raise OnnxCheckError(
                f"onnxruntime's output differs from PyTorch's by {diff:.3g} (tolerance {bound:.3g}) on a "
                f"batch of {x.shape[0]}; nothing was written. The graph does not compute what the model does "
                "(an untraceable branch, an op translated differently), or the tolerance is too tight for "
                "this network: pass atol=... to accept a larger difference knowingly"
            )
        worst, tolerance = max(worst, diff), min(tolerance, bound)
    return worst, tolerance


# -- the public entry point ----------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_shape: Sequence[int],
    opset: int | None = None,
    check: bool = True,
    sample: Tensor | None = None,
    atol: float | None = None,
    exporter: Exporter = "torchscript",
    strict_trace: bool = True,
    input_name: str = "input",
    output_name: str = "logits",
) -> OnnxReport:
    """Export ``model`` to ONNX at ``path`` with a dynamic batch dimension, checked before it is written.

    ``input_shape`` is one example's shape without the batch dimension (``(1, 28, 28)`` for MNIST);
    the graph's input is ``[batch, *input_shape]`` float32. ``opset`` defaults to 17 (18 for the dynamo
    exporter). With ``check`` (default) the graph must pass ``onnx.checker`` (full check) and onnxruntime's
    output must match the model's on random inputs of batch 1 and 3 (and on ``sample``, a batch of real
    inputs, when given) within :func:`onnx_tolerance` (or ``atol``). ``model`` is traced in eval mode and left
    unchanged (rewrites, e.g. for FBS or SparseLinear layers, happen on a copy).

    Raises :class:`OnnxExportError` (a ``ValueError``) for a model that cannot be exported faithfully (see
    the module docstring) and :class:`OnnxCheckError` for a graph that fails its check; either way nothing
    is written. Returns an :class:`OnnxReport`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects an nn.Module, got {type(model).__name__}")
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', got {exporter!r}")
    shape = _check_input_shape(input_shape)
    if opset is None:
        opset = DEFAULT_OPSET if exporter == "torchscript" else _DYNAMO_MIN_OPSET
    opset = _check_opset(opset, exporter)
    if not isinstance(check, bool) or not isinstance(strict_trace, bool):
        raise TypeError(f"check and strict_trace must be True or False, got {check!r}, {strict_trace!r}")
    if atol is not None and (not isinstance(atol, int | float) or isinstance(atol, bool) or atol < 0):
        raise ValueError(f"atol must be a number >= 0 or None (automatic tolerance), got {atol!r}")
    if sample is not None and (not isinstance(sample, Tensor) or tuple(sample.shape[1:]) != shape):
        got = list(sample.shape) if isinstance(sample, Tensor) else type(sample).__name__
        raise ValueError(f"sample must be a tensor of shape [batch, *{list(shape)}], got {got}")
    if any(p.device.type != "cpu" for p in model.parameters()) or any(
        b.device.type != "cpu" for b in model.buffers()
    ):
        raise ValueError("export_onnx exports from the CPU; call model.cpu() first (or export a CPU copy)")

    module, form, notes, trusted = _exportable(model)
    if exporter == "dynamo" and form == "int8-qdq":
        raise OnnxExportError(
            "the dynamo exporter cannot export torch.ao quantized modules (torch.export has no meta kernels "
            "for quantized tensors: 'quantized nyi in meta tensors'); use exporter='torchscript', which "
            "writes a QDQ graph"
        )
    with _eval_mode(module):
        data = _export_bytes(module, shape, opset, exporter, strict_trace, input_name, output_name, trusted)

    import onnx

    proto = onnx.load_from_string(data)
    worst: float | None = None
    tolerance: float | None = None
    batches: tuple[int, ...] = ()
    if check:
        _check_proto(proto)
        inputs = [_trace_input(shape, b) for b in _CHECK_BATCHES]
        if sample is not None:
            inputs.append(sample.detach().cpu().float())
        worst, tolerance = _check_numerics(data, proto, model, inputs, atol)
        batches = tuple(int(x.shape[0]) for x in inputs)
    atomic_write_bytes(path, data)
    from onnx import numpy_helper

    return OnnxReport(
        path=str(path),
        form=form,
        exporter=exporter,
        opset=opset,
        input_shape=shape,
        bytes=len(data),
        op_counts=dict(sorted(Counter(n.op_type for n in proto.graph.node).items())),
        initializer_shapes={i.name: tuple(numpy_helper.to_array(i).shape) for i in proto.graph.initializer},
        checked=check,
        batch_sizes=batches,
        max_abs_diff=worst,
        tolerance=tolerance,
        notes=tuple(notes),
    )


# -- CLI -----------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lit-compress onnx",
        description="Export a zoo entry or a Lightning checkpoint of an ImageClassifier to ONNX (dynamic "
        "batch), checked with onnx.checker and onnxruntime against PyTorch before it is written.",
    )
    p.add_argument("target", help="a zoo entry name (e.g. lenet5-mnist.dense) or a .ckpt file")
    p.add_argument("--out", required=True, help="the .onnx file to write (written atomically)")
    p.add_argument("--zoo", default=None, help="zoo folder (default: $LIT_COMPRESS_ZOO, the shipped zoo)")
    p.add_argument(
        "--input-shape",
        default=None,
        help="one example's shape without the batch dimension, e.g. 1,28,28 (default for zoo entries: the "
        "card's; required for checkpoints)",
    )
    p.add_argument("--opset", type=int, default=None, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    p.add_argument("--atol", type=float, default=None, help="accepted max |onnxruntime - PyTorch|")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker and the onnxruntime comparison")
    p.add_argument(
        "--allow-tracer-warnings",
        action="store_true",
        help="export even if tracing met Python control flow on tensor values (still checked numerically)",
    )
    return p


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(
            f"--input-shape must look like 1,28,28 (positive ints, no batch dimension), got {text!r}"
        )
    return shape


def _checkpoint_network(path: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The ``net.*`` weights and hyper-parameters of an ImageClassifier checkpoint, read with
    ``weights_only=True`` (no pickled objects; Lightning is not imported)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(
            f"cannot read checkpoint {path!r} safely (weights_only=True): {_first_lines(err)}"
        ) from err
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} is not a Lightning checkpoint (no 'state_dict' entry)")
    net = {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}
    hparams = dict(ckpt.get("hyper_parameters") or {})
    if not net or not isinstance(hparams.get("model"), str):
        raise ValueError(
            f"{path!r}: expected an ImageClassifier checkpoint (weights under 'net.', hyper-parameter "
            f"'model'), found keys like {sorted(state)[:3]} and hyper-parameters {sorted(hparams)}; export "
            "other networks from Python with lit_compress.onnx_export.export_onnx"
        )
    return net, hparams


def _load_target(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, ...]]:
    target = str(args.target)
    if target.endswith(".ckpt") or Path(target).is_file():
        if args.input_shape is None:
            raise ValueError(
                f"{target!r} is a checkpoint, which does not record its input shape; pass --input-shape, "
                "e.g. --input-shape 1,28,28"
            )
        shape = _parse_shape(args.input_shape)
        state, hparams = _checkpoint_network(target)
        from lit_compress.models import create_model

        arch = hparams["model"]
        model = create_model(arch, **dict(hparams.get("model_kwargs") or {}))
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"{target!r}: its weights do not fit a freshly built {arch!r} (a physically pruned or "
                f"swapped network?): {_first_lines(err, 2)}. Export it to the zoo first (lit-compress zoo "
                "export), whose card records the structure, then export the zoo entry"
            ) from err
        return model.eval(), shape
    from lit_compress import zoo

    model, card = zoo.load(target, args.zoo, return_card=True)
    shape = _parse_shape(args.input_shape) if args.input_shape else tuple(card.dataset.input_shape)
    return model, shape


def main(argv: Sequence[str] | None = None) -> int:
    """``lit-compress onnx <zoo-name-or-ckpt> --out x.onnx``: 0 written, 1 check failed, 2 refused.

    Prints the :class:`OnnxReport` as JSON on success and ``error: ...`` on stderr otherwise.
    """
    from lit_compress.zoo.errors import ZooError

    args = _parser().parse_args(argv)
    try:
        model, shape = _load_target(args)
        report = export_onnx(
            model,
            args.out,
            input_shape=shape,
            opset=args.opset,
            check=not args.no_check,
            atol=args.atol,
            exporter=args.exporter,
            strict_trace=not args.allow_tracer_warnings,
        )
    except OnnxCheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ZooError, OSError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = report.to_dict()
    summary.pop("initializer_shapes")
    print(json.dumps(summary, indent=2))
    return 0
