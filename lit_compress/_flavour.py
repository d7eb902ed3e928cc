"""One callback implementation, two Lightning namespaces.

Lightning ships the same classes twice: ``lightning.pytorch`` and the older ``pytorch_lightning``
distribution. Their ``Callback`` classes are distinct types: each namespace's ``LightningCLI``
(jsonargparse) validates ``trainer.callbacks`` against its own ``Callback``, as do ``isinstance``
checks in Lightning and in user code, so a callback must subclass the base of the namespace it is
used with. Callbacks in lit_compress are therefore written as plain classes (no Lightning base)
and decorated with :func:`lightning_callback`, which returns the ``lightning.pytorch`` flavour.
``lit_compress.pl`` builds the ``pytorch_lightning`` flavour of every registered implementation
from the same code.

Both flavours run :func:`lit_compress._strategy.check_strategy` before the implementation's ``setup``, so
every callback refuses strategies it cannot work under (FSDP, DeepSpeed, ...) with one message, without any
callback having to remember to call it; set up and tear down in phase order (:mod:`lit_compress._ordering`);
and check on resume that no compression state is silently dropped (:mod:`lit_compress._resume`).
"""

from __future__ import annotations

from lit_compress._ordering import run_in_order
from lit_compress._resume import check_callback_states
from lit_compress._strategy import check_strategy

_IMPLEMENTATIONS: dict[str, type] = {}


def make_flavour(impl: type, base: type, module: str) -> type:
    """Return ``impl`` combined with a namespace's ``Callback`` ``base``, named as ``module.<impl name>``.

    The class name and module are set so that pickling (``ddp_spawn``) and jsonargparse
    ``class_path`` resolution find the combined class, not the bare implementation. Three hooks are wrapped,
    identically in both namespaces:

    * ``setup``: the strategy check (:func:`lit_compress._strategy.check_strategy`), then the implementation's
      ``setup`` (or the base's no-op); run for every lit_compress callback of the trainer in phase order
      (:mod:`lit_compress._ordering`), whatever order they are listed in;
    * ``teardown``: the implementation's, in the reverse phase order;
    * ``on_load_checkpoint``: first :func:`lit_compress._resume.check_callback_states` (compression state that
      would be silently dropped on resume), then the implementation's.
    """
    flavour = type(
        impl.__name__,
        (impl, base),
        {"__module__": module, "__qualname__": impl.__name__, "__doc__": impl.__doc__},
    )

    def own_setup(self, trainer, pl_module, stage: str) -> None:
        check_strategy(trainer, self)
        super(flavour, self).setup(trainer, pl_module, stage)

    def own_teardown(self, trainer, pl_module, stage: str) -> None:
        super(flavour, self).teardown(trainer, pl_module, stage)

    def setup(self, trainer, pl_module, stage: str) -> None:
        run_in_order("setup", self, trainer, pl_module, stage)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        run_in_order("teardown", self, trainer, pl_module, stage)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        check_callback_states(self, trainer, checkpoint)
        super(flavour, self).on_load_checkpoint(trainer, pl_module, checkpoint)

    for hook, function in (
        ("_lit_compress_setup", own_setup),
        ("_lit_compress_teardown", own_teardown),
        ("setup", setup),
        ("teardown", teardown),
        ("on_load_checkpoint", on_load_checkpoint),
    ):
        function.__name__ = hook
        function.__qualname__ = f"{impl.__name__}.{hook}"
        function.__doc__ = getattr(getattr(impl, hook.removeprefix("_lit_compress_"), None), "__doc__", None)
        setattr(flavour, hook, function)
    return flavour


def implementation_of(callback: object) -> str | None:
    """The name of the lit_compress implementation ``callback`` is built from (either namespace, user
    subclasses included), or None for callbacks that are not lit_compress's."""
    for cls in type(callback).__mro__:
        if _IMPLEMENTATIONS.get(cls.__name__) is cls:
            return cls.__name__
    return None


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
