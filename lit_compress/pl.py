"""lit_compress callbacks for the ``pytorch_lightning`` namespace (the ``pytorch-lightning`` distribution).

``pytorch_lightning.Callback`` and ``lightning.pytorch.Callback`` are distinct types, and the
``pytorch_lightning`` LightningCLI (and ``isinstance`` checks) accept only the former. This module
builds, from the very same implementations, one class per lit_compress callback with the
``pytorch_lightning`` base::

    import pytorch_lightning as pl
    from lit_compress.pl import CompressionSummary
    pl.Trainer(callbacks=[CompressionSummary()])

In a LightningCLI YAML run with ``pytorch_lightning``, use ``class_path: lit_compress.pl.<Name>``.
"""

from __future__ import annotations

try:
    import pytorch_lightning as _pl
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lit_compress.pl needs the 'pytorch-lightning' distribution: pip install 'lit-compress[pl]' "
        "(or use the lightning.pytorch flavour: `from lit_compress import ...`)"
    ) from _err

from lit_compress._flavour import make_flavour, registered_implementations

# Importing these modules registers their callback implementations.
from lit_compress.deep_compression import sharing_callback as _sharing_callback  # noqa: F401
from lit_compress.distillation import callback as _distillation_callback  # noqa: F401
from lit_compress.factorization import callback as _factorization_callback  # noqa: F401
from lit_compress.gating import blockdrop_callback as _blockdrop_callback  # noqa: F401
from lit_compress.gating import fbs_callback as _fbs_callback  # noqa: F401
from lit_compress.measure import callback as _measure_callback  # noqa: F401
from lit_compress.pruning import callback as _pruning_callback  # noqa: F401
from lit_compress.pruning import depth_callback as _depth_callback  # noqa: F401
from lit_compress.pruning.structured import callback as _structured_callback  # noqa: F401
from lit_compress.quantization import callback as _quantization_callback  # noqa: F401
from lit_compress.quantization import int8_callback as _int8_callback  # noqa: F401
from lit_compress.zoo import from_lightning as _zoo_callback  # noqa: F401

__all__ = sorted(registered_implementations())

for _name, _impl in registered_implementations().items():
    globals()[_name] = make_flavour(_impl, _pl.Callback, __name__)
