"""``Int8QAT``: int8 quantization-aware training with BatchNorm folding, for PyTorch's int8 CPU backend.

Trainer(callbacks=[Int8QAT(freeze_bn_step=3000, freeze_observer_step=4000)])

The callback wires :mod:`~lit_compress.quantization.int8` to Lightning's hooks:

- ``setup`` (before ``configure_optimizers``, the checkpoint restore and the DDP wrap):
  ``pl_module.<model_attr>`` is replaced by its QAT version
  (:func:`~lit_compress.quantization.int8.prepare_int8_qat`): Conv+BN(+ReLU) fused with the BN folded into
  the fake-quantized weight, Linear(+ReLU) fused, fake-quantizers on weights and activations. Its
  parameters are new objects, which is why this happens in ``setup``: the optimizer is built on them, and a
  checkpoint of the run (whose state_dict has the QAT keys: fused layers, BN statistics, observer ranges)
  loads into them on resume. Tracing needs an example input shape: ``example_input_shape``, else the
  module's ``example_input_array``, else the first batch of the datamodule's loader for the stage (drawn
  with the global RNG state saved and restored: neither it nor the preparation changes the run's random
  numbers).
- ``on_train_batch_start``: from optimizer step ``freeze_bn_step`` on, the folded BNs use (and stop
  updating) their running statistics; from ``freeze_observer_step`` on, activation ranges and weight scales
  are frozen (the torch.ao QAT recipe). Both are decided by ``trainer.global_step``, so a resumed run freezes
  at the same step as an uninterrupted one.
- Validation, test and predict loops run with the observers paused (restored afterwards): torch.ao's
  observers otherwise keep moving in eval mode, and the exported ranges would depend on the validation data
  and frequency.
- ``teardown`` leaves the QAT model in place (``trainer.test`` after ``fit`` sees the trained fake-quantized
  net); :meth:`Int8QAT.export` returns the real int8 network
  (:class:`~lit_compress.quantization.int8.Int8Network`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lit_compress._flavour import lightning_callback
from lit_compress.quantization.int8 import (
    QCONFIGS,
    Int8Network,
    convert_int8,
    describe_qconfig,
    int8_backends,
    int8_config,
    int8_structure,
    is_int8_qat,
    prepare_int8_qat,
)

_LOADERS = {
    "fit": "train_dataloader",
    "validate": "val_dataloader",
    "test": "test_dataloader",
    "predict": "predict_dataloader",
}


def _optional_step(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Int8QAT: {name} must be an optimizer step (int >= 0) or null, got {value!r}")
    return value


@lightning_callback
class Int8QAT:
    """int8 quantization-aware training of ``pl_module.<model_attr>``, exported to PyTorch's int8 CPU backend.

    Args:
        backend: quantized engine the int8 network targets: ``x86`` (default; x86 CPUs), ``fbgemm``,
            ``onednn`` or ``qnnpack`` (ARM). It picks torch.ao's default QAT qconfig for that backend.
        model_attr: attribute (dotted path allowed) of the LightningModule holding the network.
        example_input_shape: per-example input shape without the batch dimension, e.g. ``[1, 28, 28]``;
            default: from the module's ``example_input_array`` or the datamodule's first batch.
        freeze_bn_step: optimizer step from which the folded BatchNorms' running statistics are frozen
            (None: never).
        freeze_observer_step: optimizer step from which activation ranges and weight scales are frozen
            (None: never).
        qconfig: ``default`` (torch.ao's default QAT qconfig mapping for ``backend``).
        allow_unfolded_bn: keep BatchNorms that cannot be folded into a preceding Conv / Linear as separate
            quantized BatchNorms instead of failing in ``setup`` (the error names them and why).
        verbose: print what was fused and fake-quantized once (rank zero).
    """

    def __init__(
        self,
        backend: str = "x86",
        model_attr: str = "net",
        example_input_shape: list[int] | None = None,
        freeze_bn_step: int | None = None,
        freeze_observer_step: int | None = None,
        qconfig: str = "default",
        allow_unfolded_bn: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if backend not in int8_backends():
            raise ValueError(
                f"Int8QAT: backend must be one of {list(int8_backends())} (this torch build's quantized "
                f"engines), got {backend!r}; use 'x86' on x86 CPUs, 'qnnpack' on ARM"
            )
        if qconfig not in QCONFIGS:
            raise ValueError(f"Int8QAT: qconfig must be one of {list(QCONFIGS)}, got {qconfig!r}")
        if not isinstance(model_attr, str) or not model_attr:
            raise ValueError(
                f"Int8QAT: model_attr must be an attribute name such as 'net', got {model_attr!r}"
            )
        if example_input_shape is not None:
            shape = example_input_shape
            if (
                isinstance(shape, str | bytes)
                or not isinstance(shape, list | tuple)
                or not shape
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)
            ):
                raise ValueError(
                    "Int8QAT: example_input_shape must be the per-example input shape without the batch "
                    f"dimension, a list of positive ints such as [1, 28, 28], got {example_input_shape!r}"
                )
            example_input_shape = [int(d) for d in shape]
        for arg, value in (("allow_unfolded_bn", allow_unfolded_bn), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise ValueError(f"Int8QAT: {arg} must be true or false, got {value!r}")
        self.backend = backend
        self.model_attr = model_attr
        self.example_input_shape = example_input_shape
        self.freeze_bn_step = _optional_step("freeze_bn_step", freeze_bn_step)
        self.freeze_observer_step = _optional_step("freeze_observer_step", freeze_observer_step)
        self.qconfig = qconfig
        self.allow_unfolded_bn = allow_unfolded_bn
        self.verbose = verbose
        # State: whether the freezes have happened (re-derived from global_step on resume), the folded BNs.
        self.bn_frozen = False
        self.observers_frozen = False
        self.folded: list[str] = []
        self._module: nn.Module | None = None
        self._paused: list[tuple[nn.Module, Tensor]] = []

    # -- Lightning hooks ---------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(backend=self.backend, model_attr=self.model_attr)

    def setup(self, trainer, pl_module, stage: str) -> None:
        net = self._network(pl_module)
        if is_int8_qat(net):  # prepared already: trainer.test after fit, or a second fit
            try:
                backend = int8_config(net)["backend"]
            except TypeError:
                raise ValueError(
                    f"Int8QAT: {self.model_attr!r} already has torch.ao fake-quantizers that Int8QAT did not "
                    "add; give Int8QAT the float network"
                ) from None
            if backend != self.backend:
                raise ValueError(
                    f"Int8QAT: {self.model_attr!r} is already prepared for int8 QAT with backend "
                    f"{backend!r}, this callback uses {self.backend!r}; use one Int8QAT callback per network"
                )
        else:
            shape = self._example_shape(trainer, pl_module, stage)
            prepared = prepare_int8_qat(
                net,
                torch.zeros(1, *shape),
                self.backend,
                qconfig=self.qconfig,
                allow_unfolded_bn=self.allow_unfolded_bn,
            )
            self._set_network(pl_module, prepared)
            self.example_input_shape = list(shape)
            net = prepared
        self._module = pl_module
        self.folded = [name for name, m in net.named_modules() if hasattr(m, "freeze_bn_stats")]
        if self.verbose and stage == "fit" and trainer.is_global_zero:
            layers = [n for n, m in net.named_modules() if hasattr(m, "weight_fake_quant")]
            print(
                f"[lit_compress] Int8QAT: {self.model_attr} prepared for int8 ({self.backend}): "
                f"{len(layers)} layers fake-quantized, {len(self.folded)} BatchNorms folded"
                + (f" ({', '.join(self.folded)})" if self.folded else "")
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        net = self._network(pl_module)
        if self.freeze_bn_step is not None and step >= self.freeze_bn_step and not self.bn_frozen:
            for module in net.modules():
                if hasattr(module, "freeze_bn_stats"):
                    module.freeze_bn_stats()
            self.bn_frozen = True
        freeze_observers = self.freeze_observer_step is not None and step >= self.freeze_observer_step
        if freeze_observers and not self.observers_frozen:
            from torch.ao.quantization import disable_observer

            net.apply(disable_observer)
            self.observers_frozen = True

    def on_validation_start(self, trainer, pl_module) -> None:
        self._pause_observers(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._resume_observers()

    def on_test_start(self, trainer, pl_module) -> None:
        self._pause_observers(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._resume_observers()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._pause_observers(pl_module)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._resume_observers()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._resume_observers()  # a loop that raised never reached its *_end hook

    def state_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "example_input_shape": self.example_input_shape,
            "bn_frozen": self.bn_frozen,
            "observers_frozen": self.observers_frozen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("backend", self.backend) != self.backend:
            raise ValueError(
                f"Int8QAT: the checkpoint was trained for backend {state_dict['backend']!r}, this run uses "
                f"{self.backend!r}; resume with the same backend"
            )
        # The freezes are re-applied from trainer.global_step at the next batch: the BN freeze is a module
        # attribute that the model's state_dict does not carry.
        self.bn_frozen = False
        self.observers_frozen = False

    # -- export ------------------------------------------------------------------------------------------

    def export(self, pl_module: nn.Module) -> Int8Network:
        """The real int8 network of ``pl_module.<model_attr>`` (left unchanged), in eval mode.

        BatchNorms are folded into the int8 conv weights and float biases; it takes and returns float
        tensors. Its ``state_dict()`` is plain tensors (int8 weights), loadable into the template that
        :meth:`compression_summary`'s ``structure`` spec builds.
        """
        net = self._network(pl_module)
        if not is_int8_qat(net):
            raise ValueError(
                f"Int8QAT.export: {self.model_attr!r} has not been prepared for int8 QAT; call it after "
                "trainer.fit (or trainer.test / validate) with this callback"
            )
        return convert_int8(net)

    def compression_summary(self) -> dict[str, Any]:
        """What this callback did, for zoo cards (:class:`~lit_compress.zoo.ZooExport` collects it).

        ``network`` is :meth:`export`'s int8 network and ``structure`` the ``int8`` structure spec that
        rebuilds its template from the float architecture (both None before ``setup``).
        """
        folded = f", {len(self.folded)} BatchNorms folded" if self.folded else ""
        summary: dict[str, Any] = {
            "methods": ["int8_qat"],
            "description": "int8 quantization-aware training with BatchNorm folding: "
            f"{describe_qconfig(self.backend, self.qconfig)}{folded}",
            "bits": 8,
            "activation_bits": 8,
            "network": None,
            "structure": None,
        }
        if self._module is not None and is_int8_qat(self._network(self._module)):
            network = self.export(self._module)
            summary["network"] = network
            summary["structure"] = int8_structure(network)
        return summary

    # -- mechanics ---------------------------------------------------------------------------------------

    def _network(self, pl_module: nn.Module) -> nn.Module:
        try:
            net = pl_module.get_submodule(self.model_attr)
        except AttributeError:
            net = None
        if not isinstance(net, nn.Module) or net is pl_module:
            raise ValueError(
                f"Int8QAT: the LightningModule {type(pl_module).__name__} has no submodule "
                f"{self.model_attr!r}; set model_attr to the attribute that holds the network"
            )
        return net

    def _set_network(self, pl_module: nn.Module, net: nn.Module) -> None:
        parent_name, _, attr = self.model_attr.rpartition(".")
        parent = pl_module.get_submodule(parent_name) if parent_name else pl_module
        setattr(parent, attr, net)

    def _example_shape(self, trainer, pl_module, stage: str) -> list[int]:
        if self.example_input_shape is not None:
            return list(self.example_input_shape)
        example = getattr(pl_module, "example_input_array", None)
        if isinstance(example, tuple | list) and example:
            example = example[0]
        if isinstance(example, Tensor) and example.dim() >= 1:
            return list(example.shape[1:])
        batch, problem = self._first_batch(trainer, stage)
        if isinstance(batch, tuple | list) and batch:
            batch = batch[0]
        if isinstance(batch, Tensor) and batch.dim() >= 1:
            return list(batch.shape[1:])
        raise ValueError(
            "Int8QAT: cannot tell the network's input shape (needed to trace it in setup, before training): "
            "pass example_input_shape (per example, e.g. [1, 28, 28]), set the module's example_input_array, "
            "or use a datamodule whose batches are tensors or (inputs, targets) pairs"
            + (f" ({problem})" if problem else "")
        )

    @staticmethod
    def _first_batch(trainer, stage: str) -> tuple[Any, str]:
        """The first batch of the datamodule's loader for ``stage``, or None and why not."""
        datamodule = getattr(trainer, "datamodule", None)
        name = _LOADERS.get(stage, "train_dataloader")
        make = getattr(datamodule, name, None)
        if not callable(make):
            return None, "" if datamodule is None else f"the datamodule has no {name}"
        # Iterating a shuffled loader draws from the global RNG: keep training randomness untouched.
        with torch.random.fork_rng(devices=[]):
            try:
                loader = make()
                return (next(iter(loader), None) if loader is not None else None), ""
            except Exception as err:  # reported in the error above; the run itself would hit it later
                return None, f"the datamodule's {name}() raised {type(err).__name__}: {err}"

    def _pause_observers(self, pl_module: nn.Module) -> None:
        from torch.ao.quantization.fake_quantize import FakeQuantizeBase

        self._resume_observers()
        net = self._network(pl_module)
        for module in net.modules():
            # A fake-quantizer that has never observed data has no ranges yet (per-channel ones cannot even
            # run): it keeps observing, e.g. in the sanity-check validation before the first training step.
            if isinstance(module, FakeQuantizeBase) and _has_observed(module):
                self._paused.append((module, module.observer_enabled.clone()))
                module.disable_observer()

    def _resume_observers(self) -> None:
        for module, enabled in self._paused:
            module.observer_enabled.copy_(enabled)
        self._paused.clear()


def _has_observed(fake_quant: nn.Module) -> bool:
    observer = getattr(fake_quant, "activation_post_process", None)
    low = getattr(observer, "min_val", None)
    return isinstance(low, torch.Tensor) and low.numel() > 0 and bool(torch.isfinite(low).all())
