"""Quantizers: small serialisable objects that map a real tensor to its quantized value (with an STE).

A quantizer has a registered ``name``, plain constructor arguments (so YAML and zoo cards can hold it:
:meth:`Quantizer.to_spec` / :func:`get_quantizer` round-trip), and

- ``__call__(x, training) -> Tensor``: the quantized tensor, differentiable through its straight-through
  estimator (:mod:`lit_compress.quantization.ste`). ``training`` only matters for stochastic quantizers,
  which sample while training and binarise deterministically otherwise;
- ``bits``: bits per value of the quantized tensor (32 = not quantized);
- ``clip_latent``: ``(low, high)`` to which the latent real weights are clipped after every optimizer step
  when this quantizer is a layer's weight quantizer, or None (the Quantization callback does the clipping).

=====================  ===========================================================  ========  ===========
name                   forward (gradient)                                            bits      clip_latent
=====================  ===========================================================  ========  ===========
``identity``           ``x`` (identity)                                             32        None
``binary``             BinaryConnect ``sign`` (identity); ``mode="stochastic"``     1         (-1, 1)
                       draws ``+1`` with probability ``hard_sigmoid(x)``
``sign``               BNN ``sign`` (``1{|x| <= 1}``)                               1         (-1, 1)
``xnor_weight``        ``mean|W_c| * sign(W)`` per output channel (paper's rule)    1         None
``xnor_activation``    ``sign`` (``1{|x| <= 1}``), no scaling factor ``K``           1         None
``dorefa_weight``      DoReFa k-bit weights in ``[-1, 1]``; ``bits=1`` is DoReFa's   bits      None
                       binary case ``E|w| * sign(w / E|w|)`` (identity)
``dorefa_activation``  ``quantize_k(clip(x, 0, 1))`` (``1{0 <= x <= 1}``)           bits      None
=====================  ===========================================================  ========  ===========

**Pruned zeros.** ``sign(0) = +1``, so a binary quantizer would turn a pruned (exactly zero) latent weight
into ``+1``. Weight quantizers (``binary``, ``xnor_weight``, ``dorefa_weight`` with ``bits=1``) therefore
take ``keep_zeros=True`` by default: latent weights that are exactly zero stay exactly zero, without any
coupling to the pruning callback (pruning keeps pruned latent weights at exactly zero; a trained float weight
is never exactly zero otherwise). ``sign`` defaults to ``keep_zeros=False`` because it also binarises
activations, where zeros (e.g. after a ReLU) must become ``+1``; the ``bnn`` preset uses ``sign`` with
``keep_zeros=True`` for weights. k-bit DoReFa weights (``bits >= 2``) are not sign-based: a zero latent weight
maps to the grid point nearest 0 (its grid has no zero level), so pruning does not survive k-bit DoReFa.

**XNOR activation scale.** The paper scales binarised activations by ``K`` (the mean ``|input|`` over
channels, box-filtered by the kernel). Like most re-implementations (and the paper's own ablation that
finds ``alpha`` matters far more than ``K``), this library drops ``K``: ``xnor_activation`` is a plain sign.

Register your own with ``@register_quantizer("name")`` on a :class:`Quantizer` subclass, or pass a dotted
``"package.module.Class"`` path to :func:`get_quantizer`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor

from lit_compress.quantization.ste import (
    BinaryConnectDeterministic,
    BinaryConnectStochastic,
    SignSTE,
    XnorWeightSTE,
    dorefa_activation,
    dorefa_weight,
)
from lit_compress.schedules import _registrar

__all__ = [
    "KBIT_RANGE",
    "BinaryQuantizer",
    "DoReFaActivationQuantizer",
    "DoReFaWeightQuantizer",
    "IdentityQuantizer",
    "Quantizer",
    "SignQuantizer",
    "XnorActivationQuantizer",
    "XnorWeightQuantizer",
    "get_quantizer",
    "list_quantizers",
    "register_quantizer",
]

KBIT_RANGE = (2, 8)  # bits accepted by the k-bit (DoReFa) quantizers
BINARY_MODES = ("deterministic", "stochastic")

_QUANTIZERS: dict[str, type[Quantizer]] = {}
_Q = TypeVar("_Q", bound="type[Quantizer]")


@dataclass
class Quantizer:
    """Base class. Subclasses are dataclasses whose fields are their (YAML-writable) constructor arguments.

    Class attributes: ``name`` (set by :func:`register_quantizer`) and ``sign_binary`` (True when the output
    is ``+-1`` times a scale, so all-nonnegative inputs collapse to a constant: the Quantization callback
    warns when such a quantizer binarises post-ReLU activations).
    """

    name: ClassVar[str] = "quantizer"
    sign_binary: ClassVar[bool] = False

    def __call__(self, x: Tensor, training: bool = False) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(x, training)")

    @property
    def bits(self) -> int:
        return 32

    @property
    def clip_latent(self) -> tuple[float, float] | None:
        return None

    def to_spec(self) -> dict[str, Any]:
        """``{"name": ..., "args": {...}}``, plain JSON/YAML data; :func:`get_quantizer` rebuilds it."""
        args = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        name = self.name if _QUANTIZERS.get(self.name) is type(self) else _class_path(type(self))
        return {"name": name, "args": args}

    def describe(self) -> str:
        """Short human-readable form, e.g. ``dorefa_weight(bits=4)``."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.to_spec()["args"].items())
        return f"{self.name}({args})"


register_quantizer: Callable[[str], Callable[[_Q], _Q]] = _registrar("quantizer", _QUANTIZERS, Quantizer)
register_quantizer.__doc__ = (
    "Class decorator registering a Quantizer subclass under a name (sets ``cls.name``)."
)


def list_quantizers() -> list[str]:
    """Registered quantizer names, sorted."""
    return sorted(_QUANTIZERS)


def get_quantizer(
    spec: str | Mapping[str, Any] | Quantizer | type[Quantizer] | None, **kwargs: Any
) -> Quantizer:
    """Build a quantizer from a registered name, a dotted class path, a Quantizer subclass, an instance
    (returned as is; ``kwargs`` must be empty), a spec dict ``{"name" | "class_path": ..., "args" |
    "init_args": {...}}`` (what :meth:`Quantizer.to_spec` writes), or None (``identity``)."""
    if spec is None:
        spec = "identity"
    if isinstance(spec, Quantizer):
        if kwargs:
            raise ValueError(
                f"got a ready quantizer instance {spec!r} and also keyword arguments {sorted(kwargs)}; "
                "pass either the instance or a name/class with its arguments."
            )
        return spec
    if isinstance(spec, Mapping):
        name = spec.get("name", spec.get("class_path"))
        args = dict(spec.get("args", spec.get("init_args")) or {})
        unknown = set(spec) - {"name", "class_path", "args", "init_args"}
        if name is None or unknown:
            raise ValueError(
                f"a quantizer spec dict needs 'name' (or 'class_path') and optional 'args' (or 'init_args'), "
                f"got keys {sorted(spec)}; e.g. {{'name': 'dorefa_weight', 'args': {{'bits': 4}}}}"
            )
        return get_quantizer(name, **args, **kwargs)
    if isinstance(spec, type):
        if not issubclass(spec, Quantizer):
            raise TypeError(f"{spec.__qualname__} is not a lit_compress Quantizer subclass")
        try:
            return spec(**kwargs)
        except TypeError as err:
            fields = [f.name for f in dataclasses.fields(spec) if f.init]
            raise TypeError(f"quantizer {spec.name!r}: {err}; its arguments are {fields}") from err
    if not isinstance(spec, str):
        raise TypeError(
            f"quantizer must be a name, a dotted class path, a spec dict, a Quantizer subclass or instance; "
            f"got {spec!r}"
        )
    if spec in _QUANTIZERS:
        return get_quantizer(_QUANTIZERS[spec], **kwargs)
    if "." in spec:
        return get_quantizer(_import_class(spec), **kwargs)
    close = difflib.get_close_matches(spec, list_quantizers(), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"unknown quantizer {spec!r}.{hint} Registered quantizers: {', '.join(list_quantizers())}; "
        "or pass a dotted class path such as 'my_package.my_module.MyQuantizer'."
    )


# -- the built-in quantizers ------------------------------------------------------------------------


@register_quantizer("identity")
@dataclass
class IdentityQuantizer(Quantizer):
    """No quantization: ``x`` unchanged (a real layer input or weight)."""

    def __call__(self, x: Tensor, training: bool = False) -> Tensor:
        return x


@register_quantizer("binary")
@dataclass
class BinaryQuantizer(Quantizer):
    """BinaryConnect weights: ``sign`` (``mode="deterministic"``) or a ``hard_sigmoid`` draw (``stochastic``).

    The gradient goes to the latent weight unchanged; latent weights are clipped to ``[-1, 1]``. A stochastic
    quantizer samples only while training; in eval it binarises deterministically (the paper's first
    test-time option, the one that gives a truly binary network). Its random draws come from
    ``self.generator``: the Quantization callback sets a callback-owned generator (stored in checkpoints);
    standalone, a CPU generator seeded with ``seed`` is created on first use.
    """

    sign_binary: ClassVar[bool] = True
    mode: str = "deterministic"
    seed: int = 0
    keep_zeros: bool = True
    generator: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in BINARY_MODES:
            raise ValueError(f"binary quantizer mode must be one of {BINARY_MODES}, got {self.mode!r}")
        _check_int("binary", "seed", self.seed)
        _check_bool("binary", "keep_zeros", self.keep_zeros)

    @property
    def bits(self) -> int:
        return 1

    @property
    def clip_latent(self) -> tuple[float, float]:
        return (-1.0, 1.0)

    def __getstate__(self) -> dict[str, Any]:
        # torch.Generator does not survive torch.multiprocessing (ddp_spawn): pickle its state as bytes.
        state = dict(self.__dict__)
        state["generator"] = None if self.generator is None else generator_to_bytes(self.generator)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        saved = state.pop("generator", None)
        self.__dict__.update(state)
        self.generator = None if saved is None else generator_from_bytes(saved)

    def __call__(self, x: Tensor, training: bool = False) -> Tensor:
        if self.mode == "stochastic" and training:
            if self.generator is None:
                self.generator = torch.Generator().manual_seed(self.seed)
            out = BinaryConnectStochastic.apply(x, self.generator)
        else:
            out = BinaryConnectDeterministic.apply(x)
        return _keep_zeros(x, out) if self.keep_zeros else out


@register_quantizer("sign")
@dataclass
class SignQuantizer(Quantizer):
    """BNN binarisation (weights or activations): ``sign`` with the hard-tanh STE ``1{|x| <= 1}``."""

    sign_binary: ClassVar[bool] = True
    keep_zeros: bool = False

    def __post_init__(self) -> None:
        _check_bool("sign", "keep_zeros", self.keep_zeros)

    @property
    def bits(self) -> int:
        return 1

    @property
    def clip_latent(self) -> tuple[float, float]:
        return (-1.0, 1.0)

    def __call__(self, x: Tensor, training: bool = False) -> Tensor:
        out = SignSTE.apply(x)
        return _keep_zeros(x, out) if self.keep_zeros else out


@register_quantizer("xnor_weight")
@dataclass
class XnorWeightQuantizer(Quantizer):
    """XNOR-Net weights ``alpha_c * sign(W)``, ``alpha_c = mean |W|`` per output channel (XnorWeightSTE)."""

    sign_binary: ClassVar[bool] = True
    keep_zeros: bool = True

    def __post_init__(self) -> None:
        _check_bool("xnor_weight", "keep_zeros", self.keep_zeros)

    @property
    def bits(self) -> int:
        return 1

    def __call__(self, x: Tensor, training: bool = False) -> Tensor:
        return XnorWeightSTE.apply(x, self.keep_zeros)


@register_quantizer("xnor_activation")
@dataclass
class XnorActivationQuantizer(Quantizer):
    """XNOR-Net input binarisation: ``sign`` with the ``1{|x| <= 1}`` STE, without the paper's scale ``K``."""

    sign_binary: ClassVar[bool] = True

    @property
    def bits(self) -> int:
        return 1

    def __call__(self, x: Tensor, training: bool = False) -> Tensor:
        return SignSTE.apply(x)


@register_quantizer("dorefa_weight")
@dataclass
class DoReFaWeightQuantizer(Quantizer):
    """DoReFa k-bit weights on the grid ``{2i / (2^k - 1) - 1}`` (``bits`` in 2..8).

    ``bits=1`` is DoReFa's binary case, not the k-bit formula (whose 1-bit grid ``{-1, +1}`` would discard
    the scale): ``w_q = E * sign(w / E)`` with ``E = mean|w|`` over the whole tensor, held constant in the
    backward pass, and an identity STE for sign, so ``dL/dw = dL/dw_q`` as in the reference code.
    """

    bits: int = 2  # type: ignore[assignment]
    keep_zeros: bool = True

    def __post_init__(self) -> None:
        if self.bits != 1:
            _check_bits("dorefa_weight", self.bits, extra=" (or 1 for DoReFa's binary weights)")
        _check_bool("dorefa_weight", "keep_zeros", self.keep_zeros)

    @property
    def sign_binary(self) -> bool:  # type: ignore[override]
        return self.bits == 1

    def __call__(self, x: Tensor, training: bool = False) -> Tensor:
        if self.bits == 1:
            scale = x.detach().abs().mean().clamp_min(torch.finfo(x.dtype).tiny)
            out = BinaryConnectDeterministic.apply(x / scale) * scale
            return _keep_zeros(x, out) if self.keep_zeros else out
        return dorefa_weight(x, self.bits)


@register_quantizer("dorefa_activation")
@dataclass
class DoReFaActivationQuantizer(Quantizer):
    """DoReFa k-bit activations ``quantize_k(clip(x, 0, 1))``, ``bits`` in 2..8 (for post-ReLU inputs)."""

    bits: int = 2  # type: ignore[assignment]

    def __post_init__(self) -> None:
        _check_bits("dorefa_activation", self.bits)

    def __call__(self, x: Tensor, training: bool = False) -> Tensor:
        return dorefa_activation(x, self.bits)


# -- helpers ----------------------------------------------------------------------------------------


def generator_to_bytes(generator: torch.Generator) -> tuple[str, bytes]:
    """``(device, state bytes)`` of a generator: picklable everywhere (a ``torch.Generator`` is not, under
    ``torch.multiprocessing``)."""
    return str(generator.device), bytes(generator.get_state().numpy().tobytes())


def generator_from_bytes(saved: tuple[str, bytes]) -> torch.Generator:
    """Inverse of :func:`generator_to_bytes`."""
    device, state = saved
    generator = torch.Generator(device=device)
    generator.set_state(torch.frombuffer(bytearray(state), dtype=torch.uint8))
    return generator


def _keep_zeros(x: Tensor, out: Tensor) -> Tensor:
    """``out`` with exact zeros wherever ``x`` is exactly zero (pruned weights stay pruned)."""
    # |sign(x)| is the 0/1 nonzero mask from float kernels (faster than a bool mask); NaN counts as nonzero.
    return out * torch.nan_to_num(x, nan=1.0).sign_().abs_().to(out.dtype)


def _check_bits(owner: str, bits: Any, extra: str = "") -> None:
    low, high = KBIT_RANGE
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ValueError(f"{owner}: bits must be an int in {low}..{high}{extra}, got {bits!r}")


def _check_bool(owner: str, arg: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {arg} must be true or false, got {value!r}")


def _check_int(owner: str, arg: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}: {arg} must be an int, got {value!r}")


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_class(path: str) -> type[Quantizer]:
    module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"cannot import module {module_name!r} for quantizer {path!r}: {err}. "
            f"Hint: registered names are {', '.join(list_quantizers())}."
        ) from err
    obj = getattr(module, attr, None)
    if not (isinstance(obj, type) and issubclass(obj, Quantizer)):
        raise ValueError(
            f"{path!r} does not name a Quantizer subclass (found {type(obj).__name__ if obj else 'nothing'})."
        )
    return obj
