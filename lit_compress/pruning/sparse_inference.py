"""Faster inference for unstructured-pruned ``nn.Linear`` layers: CSR weights, used only where they pay.

Unstructured pruning zeroes weights but a dense kernel still multiplies by every zero, so a 95%-sparse
layer is no faster than a dense one. :class:`SparseLinear` stores the weight in compressed sparse row
(CSR) form and runs torch's CSR kernels (MKL sparse BLAS on CPU). Whether that beats the dense kernel
depends on the layer's shape, the batch size, the thread count and the machine, so
:func:`to_sparse_inference` times both at each layer's shape and batch size and swaps a layer only where
CSR is faster; :func:`crossover` finds the sparsity from which CSR wins for one shape.

Kernel choice (torch 2.14, CPU, float32, one thread, LeNet-300-100 shapes; all variants were measured):
- one input row: ``torch.addmv(bias, W_csr, x)`` -- 1.5-2.5x faster than ``addmm`` / ``mm`` with one
  column, whose per-call cost is higher;
- more rows: ``torch.addmm(bias[:, None], W_csr, x.T).T`` then ``.contiguous()``. ``F.linear(x, W_csr)``
  and dense @ CSR(W^T) run 2.5-7x slower at batch 256 (no MKL path); writing into a transposed ``out=``
  is 3-5x slower; ``torch.sparse.addmm`` is the same kernel. The final copy (10-15% of the CSR time) keeps
  the output's strides those of ``nn.Linear``, so user code calling ``.view`` on it keeps working;
- int32 indices: torch hands int64 CSR indices to MKL through a conversion on every call, which costs
  15-60% at batch 1.
Half and bfloat16 have no CPU CSR kernel, so only float32 and float64 layers are converted.

The sparse module is an inference artefact built from a trained dense model. Its ``state_dict`` still
holds the dense ``weight`` (materialised on save) and loading a dense ``weight`` re-sparsifies it, so the
user's checkpoint keys never change, a plain ``nn.Linear`` / the original model loads a sparse model's
state_dict and vice versa. The CSR arrays are non-persistent buffers: ``.to()``, ``deepcopy`` and
pickling work, while the weight is not a trainable parameter.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SparseLinear", "crossover", "interleaved_latency_us", "to_sparse_inference"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)
_CSR_BUFFERS = frozenset({"weight_crow_indices", "weight_col_indices", "weight_values"})
_INT32_MAX = 2**31 - 1


def _csr_arrays(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(crow_indices, col_indices, values) of a dense 2-D weight; int32 indices when they fit."""
    csr = weight.detach().to_sparse_csr()
    crow, col, values = csr.crow_indices(), csr.col_indices(), csr.values()
    if values.numel() <= _INT32_MAX:
        crow, col = crow.to(torch.int32), col.to(torch.int32)
    return crow.contiguous(), col.contiguous(), values.contiguous()


def _check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what} has dtype {dtype}, but torch's CSR kernels support only float32 and float64 here. "
            "Hint: convert the model with .float() before building the sparse version."
        )


class SparseLinear(nn.Linear):
    """``nn.Linear`` whose weight is held in CSR form: ``y = x W^T + b`` through a sparse kernel.

    Build it with :meth:`from_dense` (or :func:`to_sparse_inference` for a whole model). The constructor
    mirrors ``nn.Linear``'s and makes an all-zero weight, to be filled by ``load_state_dict`` with a
    dense checkpoint. ``weight`` is a read-only dense copy (materialised on each access, for tools that
    inspect it); the layer is for inference: its weight is a buffer, not a parameter, and gets no gradient.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate and initialise a dense weight
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        _check_dtype(dtype, "SparseLinear")
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.register_buffer(
            "weight_crow_indices", torch.zeros(out_features + 1, dtype=torch.int32, device=device), False
        )
        self.register_buffer("weight_col_indices", torch.zeros(0, dtype=torch.int32, device=device), False)
        self.register_buffer("weight_values", torch.zeros(0, dtype=dtype, device=device), False)
        self._csr_cache: Tensor | None = None

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> SparseLinear:
        """A SparseLinear computing the same function as ``linear`` (its exact zeros are not stored)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"SparseLinear.from_dense expects an nn.Linear, got {type(linear).__name__}. "
                "Hint: only fully connected layers have a CSR implementation here."
            )
        weight = linear.weight
        _check_dtype(weight.dtype, f"the weight of {type(linear).__name__}")
        out = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        out.set_weight(weight)
        if linear.bias is not None:
            with torch.no_grad():
                out.bias.copy_(linear.bias)
            out.bias.requires_grad_(linear.bias.requires_grad)
        out.train(linear.training)
        return out

    # -- weight access -----------------------------------------------------------------------------------
    @torch.no_grad()
    def set_weight(self, weight: Tensor) -> None:
        """Replace the weight by the dense ``[out_features, in_features]`` tensor ``weight``."""
        if not isinstance(weight, Tensor) or weight.layout != torch.strided:
            raise TypeError(f"weight must be a dense torch.Tensor, got {type(weight).__name__}")
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"weight has shape {tuple(weight.shape)}, expected {expected} ([out_features, in_features])"
            )
        _check_dtype(weight.dtype, "weight")
        crow, col, values = _csr_arrays(weight)
        device = self.weight_values.device
        self.weight_crow_indices = crow.to(device)
        self.weight_col_indices = col.to(device)
        self.weight_values = values.to(device)
        self._csr_cache = None

    def weight_csr(self) -> Tensor:
        """The weight as a ``torch.sparse_csr`` tensor sharing this module's buffers (cached).

        The cache is dropped whenever the buffers are replaced (``set_weight``, ``load_state_dict``,
        ``.to()`` and other conversions, assignment); in-place edits of the buffers reach it through the
        shared storage. Building it costs microseconds, as much as a batch-1 product on a small layer.
        """
        csr = self._csr_cache
        if csr is None:
            # Built outside inference mode even when first needed inside it (e.g. while timing), so the
            # cached tensor stays usable in ordinary and autograd-recording forward passes later.
            with torch.inference_mode(False):
                csr = torch.sparse_csr_tensor(
                    self.weight_crow_indices,
                    self.weight_col_indices,
                    self.weight_values,
                    (self.out_features, self.in_features),
                    check_invariants=False,
                )
            self._csr_cache = csr
        return csr

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _CSR_BUFFERS:
            self.__dict__["_csr_cache"] = None
        super().__setattr__(name, value)

    def _apply(self, fn, recurse: bool = True):
        self.__dict__["_csr_cache"] = None
        out = super()._apply(fn, recurse)
        self.__dict__["_csr_cache"] = None
        return out

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """A dense copy of the weight (not a parameter: writing to it does not change the layer)."""
        return self.weight_csr().to_dense()

    @weight.setter
    def weight(self, value: Tensor) -> None:
        raise AttributeError(
            "SparseLinear.weight is read-only (a dense copy of the CSR weight); "
            "use set_weight(dense_tensor) or load_state_dict to change it"
        )

    @property
    def nnz(self) -> int:
        """Number of stored (nonzero) weights."""
        return self.weight_values.numel()

    @property
    def sparsity(self) -> float:
        """Fraction of the ``out_features x in_features`` weights that are zero."""
        total = self.out_features * self.in_features
        return 1.0 - self.nnz / total if total else 0.0

    def reset_parameters(self) -> None:
        raise TypeError(
            "SparseLinear is an inference-only layer built from trained weights and cannot be "
            "re-initialised; initialise a dense nn.Linear and convert it with SparseLinear.from_dense"
        )

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with the same weights (e.g. to fine-tune again)."""
        values = self.weight_values
        dense = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=values.device,
            dtype=values.dtype,
        )
        dense.load_state_dict(self.state_dict())
        return dense.train(self.training)

    # -- forward -----------------------------------------------------------------------------------------
    def forward(self, input: Tensor) -> Tensor:
        # Kept lean: at batch 1 a few microseconds of Python are a large share of the layer's time.
        if input.shape[-1] != self.in_features:
            raise ValueError(
                f"SparseLinear expects inputs of shape [..., {self.in_features}], got {tuple(input.shape)}"
            )
        weight = self._csr_cache
        if weight is None:
            weight = self.weight_csr()
        bias = self.bias
        rows = input if input.dim() == 2 else input.reshape(-1, self.in_features)
        if rows.shape[0] == 1:
            out = torch.mv(weight, rows[0]) if bias is None else torch.addmv(bias, weight, rows[0])
            out = out.unsqueeze(0)
        else:
            # MKL computes W @ X^T; transposing the [out, N] result back is a view, made contiguous so the
            # output has nn.Linear's layout.
            out_t = (
                torch.mm(weight, rows.T) if bias is None else torch.addmm(bias.unsqueeze(1), weight, rows.T)
            )
            out = out_t.T.contiguous()
        return out if input.dim() == 2 else out.reshape(*input.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nnz={self.nnz}, sparsity={self.sparsity:.3f}"

    # -- state_dict: the dense weight, as in nn.Linear ----------------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if key in state_dict:
            # load_state_dict hands its own copy of the user's dict down the module tree, so popping is safe
            # and keeps "weight" from being reported as unexpected (it is not a parameter here).
            weight = state_dict.pop(key)
            expected = (self.out_features, self.in_features)
            if not isinstance(weight, Tensor) or tuple(weight.shape) != expected:
                shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
                error_msgs.append(
                    f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                    f"the shape in current model is {expected}."
                )
            else:
                if weight.layout != torch.strided:
                    weight = weight.to_dense()
                self.set_weight(weight.to(self.weight_values.dtype))
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # -- copying: a torch CSR tensor can be neither deep-copied nor pickled, so the cache is dropped ------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_csr_cache"] = None
        return state


# ---------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------
def _positive_int(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_threads(threads: object) -> int | None:
    if threads is None:
        return None
    return _positive_int(threads, "threads (or None for torch's current setting)")


@contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(previous)


def _block_seconds(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def interleaved_latency_us(
    candidates: Sequence[Callable[[Tensor], Any]],
    example: Tensor,
    repeats: int = 7,
    threads: int | None = None,
    min_block_s: float = 2e-4,
) -> list[float]:
    """Median microseconds per call of each ``candidate(example)``, timed in alternation.

    Each of ``repeats`` rounds times one block of calls per candidate, starting with a different candidate
    each round, under ``torch.inference_mode`` with ``threads`` intra-op threads (restored afterwards).
    Blocks hold enough calls to last ``min_block_s``, so microsecond calls are not lost in timer resolution.
    Interleaving makes every candidate see the same background load, which matters on shared machines.
    (The median of the rounds decided more steadily than their minimum in repeated conversions of pruned
    LeNet-300-100 on a loaded machine.) CPU only: nothing is synchronised.
    """
    _positive_int(repeats, "repeats")
    if not candidates:
        raise ValueError("candidates is empty: pass the callables to time, e.g. [dense_layer, sparse_layer]")
    fns = [(lambda fn=fn: fn(example)) for fn in candidates]
    times: list[list[float]] = [[] for _ in fns]
    with _num_threads(_check_threads(threads)), torch.inference_mode():
        numbers = []
        for fn in fns:
            fn()  # warm-up: allocator, MKL handles, caches
            once = _block_seconds(fn, 3)
            numbers.append(max(1, min(10_000, math.ceil(min_block_s / max(once, 1e-9)))))
        for round_ in range(repeats):
            for k in range(len(fns)):
                i = (round_ + k) % len(fns)
                times[i].append(_block_seconds(fns[i], numbers[i]))
    return [statistics.median(t) * 1e6 for t in times]


def _check_sparsity(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1] (fraction of zero weights), got {value!r}")
    return float(value)


def _random_sparse_linear(
    in_features: int, out_features: int, sparsity: float, generator: torch.Generator
) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    numel = in_features * out_features
    with torch.no_grad():
        layer.weight.copy_(
            torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)
        )
        layer.bias.copy_(torch.randn(out_features, generator=generator))
        zero = torch.randperm(numel, generator=generator)[: round(sparsity * numel)]
        layer.weight.view(-1)[zero] = 0.0
    return layer.eval()


def crossover(
    in_features: int,
    out_features: int,
    batch_size: int = 1,
    sparsities: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99),
    threads: int | None = 1,
    repeats: int = 7,
    seed: int = 0,
) -> float | None:
    """The lowest of ``sparsities`` from which CSR beats dense for a ``Linear(in, out)`` at ``batch_size``.

    Each sparsity gets a seeded random weight with exactly that fraction of zeros (uniformly placed, as
    unstructured pruning leaves them) and is timed with :func:`interleaved_latency_us`. The answer is the
    lowest sparsity at which CSR is faster there *and at every higher sparsity tried*, so one noisy win
    below the real crossover does not count. ``None`` when CSR is not faster at the highest sparsity tried.
    """
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        _positive_int(value, name)
    _positive_int(batch_size, "batch_size")
    if isinstance(sparsities, (str, float, int)) or not sparsities:
        raise ValueError(f"sparsities must be a non-empty sequence of numbers in [0, 1], got {sparsities!r}")
    grid = sorted({_check_sparsity(s, "each sparsity") for s in sparsities})
    threads = _check_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(batch_size, in_features, generator=generator)
    faster = []
    for sparsity in grid:
        dense = _random_sparse_linear(in_features, out_features, sparsity, generator)
        sparse = SparseLinear.from_dense(dense)
        dense_us, sparse_us = interleaved_latency_us(
            [dense, sparse], example, repeats=repeats, threads=threads
        )
        faster.append(sparse_us < dense_us)
    answer = None
    for sparsity, wins in zip(reversed(grid), reversed(faster)):
        if not wins:
            break
        answer = sparsity
    return answer


# ---------------------------------------------------------------------------------------------------------
# model conversion
# ---------------------------------------------------------------------------------------------------------
def _weight_sparsity(weight: Tensor) -> float:
    numel = weight.numel()
    return 1.0 - int(torch.count_nonzero(weight.detach())) / numel if numel else 0.0


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def to_sparse_inference(
    model: nn.Module,
    min_sparsity: float | None = None,
    batch_size: int = 1,
    threads: int | None = None,
    measure: bool = True,
    repeats: int = 5,
) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """A copy of ``model`` whose ``nn.Linear`` layers are :class:`SparseLinear` where that is faster.

    With ``measure=True`` (default) every ``nn.Linear`` whose weight sparsity is at least ``min_sparsity``
    (every one when ``None``) is timed dense and CSR on the spot, at its own shape, with a random input of
    ``batch_size`` rows and ``threads`` threads (torch's current count when ``None``), and replaced only if
    CSR is faster. With ``measure=False`` the rule is deterministic: replaced iff its sparsity is
    ``>= min_sparsity`` (required then). Only exact ``nn.Linear`` instances are candidates: subclasses
    (quantized, gated, attention projections whose weight is read directly) keep their own forward.

    Returns ``(copy, report)``; ``report[fqn]`` has ``sparsity``, ``dense_us`` and ``sparse_us``
    (``None`` when not timed), ``chosen`` (``"csr"`` or ``"dense"``) and ``reason``. ``model`` itself is not
    modified. Timing is CPU-only.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(measure, bool):
        raise TypeError(f"measure must be True or False, got {measure!r}")
    if min_sparsity is not None:
        min_sparsity = _check_sparsity(min_sparsity, "min_sparsity")
    elif not measure:
        raise ValueError(
            "min_sparsity is required when measure=False (it is then the only decision rule); "
            "pass e.g. min_sparsity=0.9, or measure=True to decide by timing"
        )
    _positive_int(batch_size, "batch_size")
    threads = _check_threads(threads)
    _positive_int(repeats, "repeats")

    converted = copy.deepcopy(model)
    report: dict[str, dict[str, Any]] = {}
    replacements: dict[int, nn.Module] = {}
    for name, module in converted.named_modules():
        if type(module) is not nn.Linear:
            continue
        sparsity = _weight_sparsity(module.weight)
        entry: dict[str, Any] = {"sparsity": sparsity, "dense_us": None, "sparse_us": None}
        report[name] = entry
        if module.weight.dtype not in SUPPORTED_DTYPES:
            entry.update(chosen="dense", reason=f"dtype {module.weight.dtype} has no CSR kernel")
            continue
        if min_sparsity is not None and sparsity < min_sparsity:
            entry.update(chosen="dense", reason=f"sparsity below min_sparsity={min_sparsity}")
            continue
        sparse = SparseLinear.from_dense(module)
        if not measure:
            entry.update(chosen="csr", reason=f"sparsity >= min_sparsity={min_sparsity}")
        else:
            if module.weight.device.type != "cpu":
                raise ValueError(
                    f"timing layers is implemented on CPU only, but {name!r} is on {module.weight.device}. "
                    "Hint: pass measure=False with min_sparsity, or move the model to CPU first."
                )
            example = torch.randn(batch_size, module.in_features, dtype=module.weight.dtype)
            was_training = module.training
            dense_us, sparse_us = interleaved_latency_us(
                [module.eval(), sparse.eval()], example, repeats=repeats, threads=threads
            )
            module.train(was_training)
            sparse.train(was_training)
            faster = sparse_us < dense_us
            entry.update(
                dense_us=dense_us,
                sparse_us=sparse_us,
                chosen="csr" if faster else "dense",
                reason="CSR faster" if faster else "CSR not faster",
            )
        if entry["chosen"] == "csr":
            replacements[id(module)] = sparse
    # A Linear shared by several parents is replaced everywhere by the same SparseLinear.
    for name, module in list(converted.named_modules(remove_duplicate=False)):
        if id(module) in replacements and name:
            _set_submodule(converted, name, replacements[id(module)])
    if id(converted) in replacements:  # the model itself is one Linear
        converted = replacements[id(converted)]
    return converted, report
