"""Parameter counts: total, nonzero and trainable, overall and per layer.

Only parameters are counted (buffers such as batch-norm running statistics or pruning masks are not), and
a parameter shared by several modules (tied weights) is counted once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parameter import is_lazy


@dataclass(frozen=True)
class ParamCount:
    """Whole-model parameter counts."""

    total: int
    nonzero: int
    trainable: int

    @property
    def sparsity(self) -> float:
        """Fraction of parameters that are exactly zero."""
        return 1.0 - self.nonzero / self.total if self.total else 0.0

    @property
    def compression_ratio(self) -> float:
        """``total / nonzero`` (Han et al.'s "compression rate" for pruning); ``inf`` if all are zero."""
        return self.total / self.nonzero if self.nonzero else float("inf")


@dataclass(frozen=True)
class LayerParams:
    """Parameters owned directly (not through children) by one module."""

    name: str
    type: str
    params: int
    nonzero: int
    sparsity: float


def _check_materialised(name: str, p: nn.Parameter) -> None:
    if is_lazy(p):
        raise ValueError(
            f"parameter {name!r} is an uninitialised lazy parameter, so it has no size yet. "
            "Hint: run one forward pass (or count_macs) before counting parameters."
        )


def _nonzero(p: torch.Tensor) -> int:
    return int(torch.count_nonzero(p.detach()))


def count_params(model: nn.Module) -> ParamCount:
    """Count ``model``'s parameters (shared ones once): total, exactly-nonzero and ``requires_grad``."""
    total = nonzero = trainable = 0
    for name, p in model.named_parameters():  # deduplicates shared parameters
        _check_materialised(name, p)
        total += p.numel()
        nonzero += _nonzero(p)
        if p.requires_grad:
            trainable += p.numel()
    for module in model.modules():  # inference-only sparse layers keep their weight as a CSR buffer
        csr = getattr(module, "weight_csr", None)
        if callable(csr) and hasattr(module, "nnz"):
            total += module.in_features * module.out_features
            nonzero += int(module.nnz)
    return ParamCount(total=total, nonzero=nonzero, trainable=trainable)


def layer_params(model: nn.Module) -> list[LayerParams]:
    """One row per module that directly owns parameters, in module order.

    A shared parameter is attributed to the first module that owns it, so the rows sum to
    :func:`count_params` ``total``; a module whose parameters were all counted earlier gets no row.
    """
    seen: set[int] = set()
    rows: list[LayerParams] = []
    for mod_name, module in model.named_modules():
        params = nonzero = 0
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            _check_materialised(f"{mod_name}.{p_name}" if mod_name else p_name, p)
            params += p.numel()
            nonzero += _nonzero(p)
        if params:
            rows.append(LayerParams(mod_name, type(module).__name__, params, nonzero, 1.0 - nonzero / params))
    return rows
