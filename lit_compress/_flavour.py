"""One callback implementation, two Lightning namespaces.

Lightning ships the same classes twice: ``lightning.pytorch`` and the older ``pytorch_lightning``
distribution. Their ``Callback`` classes are distinct types: each namespace's ``LightningCLI``
(jsonargparse) validates ``trainer.callbacks`` against its own ``Callback``, as do ``isinstance``
checks in Lightning and in user code, so a callback must subclass the base of the namespace it is
used with. Callbacks in lit_compress are therefore written as plain classes (no Lightning base)
and decorated with :func:`lightning_callback`, which returns the ``lightning.pytorch`` flavour.
``lit_compress.pl`` builds the ``pytorch_lightning`` flavour of every registered implementation
from the same code.
"""

from __future__ import annotations

_IMPLEMENTATIONS: dict[str, type] = {}


def make_flavour(impl: type, base: type, module: str) -> type:
    """Return ``impl`` combined with a namespace's ``Callback`` ``base``, named as ``module.<impl name>``.

    The class name and module are set so that pickling (``ddp_spawn``) and jsonargparse
    ``class_path`` resolution find the combined class, not the bare implementation.
    """
    return type(
        impl.__name__,
        (impl, base),
        {"__module__": module, "__qualname__": impl.__name__, "__doc__": impl.__doc__},
    )


def lightning_callback(impl: type) -> type:
    """Class decorator: register ``impl`` and return its ``lightning.pytorch.Callback`` flavour."""
    from lightning.pytorch import Callback

    if impl.__name__ in _IMPLEMENTATIONS and _IMPLEMENTATIONS[impl.__name__] is not impl:
        raise RuntimeError(f"two lit_compress callbacks are both named {impl.__name__!r}")
    _IMPLEMENTATIONS[impl.__name__] = impl
    return make_flavour(impl, Callback, impl.__module__)


def registered_implementations() -> dict[str, type]:
    """Name -> bare implementation of every callback decorated so far."""
    return dict(_IMPLEMENTATIONS)
