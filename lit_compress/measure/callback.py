"""``CompressionSummary``: measure the trained model at the end of fit and test, print, log and save JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from .._flavour import lightning_callback
from .._io import atomic_write_text
from ._util import check_input_shape
from .report import CompressionReport, compression_report

_BATCH_KEYS = ("image", "input", "x")


def _batch_input(batch: Any) -> Tensor | None:
    """The input tensor of a batch: ``x`` of ``(x, y)``/``[x, y]``, a dict's image/input/x, or a tensor."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in _BATCH_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    return None


@lightning_callback
class CompressionSummary:
    """Measure parameters, nonzeros, MACs and bytes of the model at the end of ``fit`` and ``test``.

    On global rank zero the report is printed as a table, its totals are logged to every logger under
    ``compression/*`` and it is written as JSON (atomically) to ``report_name`` in the checkpoint directory,
    else the logger's log dir, else ``default_root_dir``. ``last_report`` and ``last_report_path`` hold the
    latest results.

    Args:
        input_shape: per-example input shape, e.g. ``[1, 28, 28]``. If ``None``, the datamodule's
            ``input_shape`` attribute is used, else the shape of the first batch seen (``x`` of ``(x, y)``,
            or a dict's ``"image"``/``"input"``/``"x"``).
        latency: also time inference at batch sizes 1 and 256 with one thread (slow for large nets).
        report_name: file name of the JSON report.
        model_attr: measure ``pl_module.<model_attr>`` instead of the LightningModule. If ``None``,
            a ``net`` attribute that is an ``nn.Module`` is measured when present (the network without
            losses and metrics, whose ``forward`` takes the input tensor), else the whole module.
        verbose: print the table.
    """

    def __init__(
        self,
        input_shape: list[int] | None = None,
        latency: bool = False,
        report_name: str = "compression_report.json",
        model_attr: str | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.input_shape = None if input_shape is None else list(check_input_shape(input_shape))
        for name, value in (("latency", latency), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise ValueError(f"CompressionSummary({name}=...) must be True or False, got {value!r}.")
        plain = isinstance(report_name, str) and report_name.strip() and Path(report_name).name == report_name
        if not plain:
            raise ValueError(
                f"CompressionSummary(report_name=...) must be a plain file name, got {report_name!r}. "
                "Hint: e.g. 'compression_report.json'; the directory is the checkpoint/log directory."
            )
        if model_attr is not None and (not isinstance(model_attr, str) or not model_attr.isidentifier()):
            raise ValueError(
                f"CompressionSummary(model_attr=...) must be an attribute name such as 'net' or None, "
                f"got {model_attr!r}."
            )
        self.latency = latency
        self.report_name = report_name
        self.model_attr = model_attr
        self.verbose = verbose
        self.last_report: CompressionReport | None = None
        self.last_report_path: Path | None = None
        self._batch_shape: list[int] | None = None
        self._out_dir: str | None = None
        self.start_report: CompressionReport | None = None  # the model as fit found it

    # -- which model, which input ---------------------------------------------------------------------------

    def _target(self, pl_module: nn.Module) -> nn.Module:
        if self.model_attr is None:
            net = getattr(pl_module, "net", None)
            return net if isinstance(net, nn.Module) else pl_module
        target = getattr(pl_module, self.model_attr, None)
        if not isinstance(target, nn.Module):
            modules = sorted(name for name, _ in pl_module.named_children())
            raise ValueError(
                f"CompressionSummary(model_attr={self.model_attr!r}): {type(pl_module).__name__} has no "
                f"nn.Module attribute {self.model_attr!r} (got {type(target).__name__}). "
                f"Its child modules are {modules}; pass one of them or model_attr=None."
            )
        return target

    def _resolve_input_shape(self, trainer: Any) -> list[int] | None:
        if self.input_shape is not None:
            return self.input_shape
        shape = getattr(getattr(trainer, "datamodule", None), "input_shape", None)
        if shape is not None:
            return list(check_input_shape(shape, "datamodule.input_shape"))
        return self._batch_shape

    def _remember_batch(self, batch: Any) -> None:
        if self._batch_shape is None:
            x = _batch_input(batch)
            if x is not None and x.dim() > 1:
                self._batch_shape = list(x.shape[1:])

    # -- Lightning hooks ------------------------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        self._target(pl_module)  # fail now on a bad model_attr, not after training

    def on_train_batch_start(self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int) -> None:
        self._remember_batch(batch)

    def on_test_batch_start(
        self, trainer: Any, pl_module: nn.Module, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._remember_batch(batch)  # for trainer.test() without a preceding fit

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._out_dir = self._output_dir(trainer)
        shape = self._resolve_input_shape(trainer)
        if trainer.is_global_zero and shape is not None:
            # Before any compression callback acts: the "before" of the before/after line.
            self.start_report = compression_report(self._target(pl_module), input_shape=shape)

    def on_test_start(self, trainer: Any, pl_module: nn.Module) -> None:
        self._out_dir = self._output_dir(trainer)

    def on_fit_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._summarise(trainer, pl_module)

    def on_test_end(self, trainer: Any, pl_module: nn.Module) -> None:
        self._summarise(trainer, pl_module)

    # -- work -----------------------------------------------------------------------------------------------

    @staticmethod
    def _output_dir(trainer: Any) -> str:
        """Resolved on every rank at the start of a stage: ``trainer.log_dir`` is a collective call."""
        ckpt = getattr(trainer, "checkpoint_callback", None)
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return str(ckpt.dirpath)
        return str(trainer.log_dir or trainer.default_root_dir)

    def _summarise(self, trainer: Any, pl_module: nn.Module) -> None:
        if not trainer.is_global_zero:
            return
        shape = self._resolve_input_shape(trainer)
        if shape is None:
            rank_zero_warn(
                "CompressionSummary: no input shape known (none given, no datamodule.input_shape, no batch "
                "seen), so no report was made. Hint: pass CompressionSummary(input_shape=[C, H, W])."
            )
            return
        report = compression_report(self._target(pl_module), input_shape=shape, latency=self.latency)
        unchanged = self.last_report is not None and _same_model(self.last_report, report)
        self.last_report = report
        if self.verbose and unchanged:  # e.g. test right after fit: no need to print the same table twice
            rank_zero_info(f"Compression summary ({report.model}): unchanged since the last report")
        elif self.verbose:
            rank_zero_info(f"Compression summary ({report.model}, input {shape}):\n{report.format_table()}")
            if self.start_report is not None:
                rank_zero_info(before_after(self.start_report, report))
        metrics = {
            "compression/params_total": float(report.params_total),
            "compression/params_nonzero": float(report.params_nonzero),
            "compression/macs_dense": float(report.macs_dense),
            "compression/macs_effective": float(report.macs_effective),
            "compression/ratio": report.compression_ratio,
            "compression/mac_reduction": report.mac_reduction,
            "compression/fp32_bytes": float(report.fp32_bytes),
            "compression/state_dict_bytes": float(report.state_dict_bytes),
        }
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}  # an all-zero model has ratio inf
        for logger in getattr(trainer, "loggers", []):
            logger.log_metrics(metrics, step=trainer.global_step)
        out_dir = self._out_dir or str(trainer.default_root_dir)
        path = Path(out_dir) / self.report_name
        atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
        self.last_report_path = path


def before_after(before: CompressionReport, after: CompressionReport) -> str:
    """One line comparing the model at fit start with the model now."""

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "inf"

    return (
        f"before fit -> now: nonzero params {before.params_nonzero:,} -> {after.params_nonzero:,} "
        f"({ratio(before.params_nonzero, after.params_nonzero)} fewer), effective MACs "
        f"{before.macs_effective:,} -> {after.macs_effective:,} "
        f"({ratio(before.macs_effective, after.macs_effective)} fewer)"
    )


def _same_model(a: CompressionReport, b: CompressionReport) -> bool:
    """Same per-layer counts and totals (latency, being a timing, is ignored)."""
    strip = {"latency"}
    return {k: v for k, v in a.to_dict().items() if k not in strip} == {
        k: v for k, v in b.to_dict().items() if k not in strip
    }
