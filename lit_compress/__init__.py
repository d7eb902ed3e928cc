"""lit_compress: neural-network compression for PyTorch Lightning.

Importing the package stays cheap: subpackages (``models``, ``data``, ``measure``, ``zoo``) load on use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = {
    "models",
    "data",
    "measure",
    "zoo",
    "cli",
    "pruning",
    "distillation",
    "quantization",
    "deep_compression",
    "factorization",
    "gating",
}


def __getattr__(name: str):
    if name == "compression_loss":
        from lit_compress._loss_terms import compression_loss

        return compression_loss
    if name in _SUBMODULES:
        return importlib.import_module(f"lit_compress.{name}")
    raise AttributeError(f"module 'lit_compress' has no attribute {name!r}")
