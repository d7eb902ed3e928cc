"""One compression report: per-layer parameters and MACs, totals, bytes, latency; JSON and a text table."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor, nn

from ._util import Number
from .latency import LatencyResult, measure_latency
from .macs import count_macs
from .params import count_params, layer_params
from .size import file_bytes, state_dict_bytes

REPORT_FORMAT = "lit_compress.compression_report"
REPORT_VERSION = 1


@dataclass(frozen=True)
class LayerRow:
    """One module: the parameters it owns directly and its MACs per example.

    ``macs_dense``/``macs_effective`` are ``None`` for modules whose work is not counted (batch norm, ...);
    ``params`` is 0 for a counted module whose parameters live in its children (a gated block).
    """

    name: str
    type: str
    params: int
    nonzero: int
    sparsity: float
    macs_dense: Number | None
    macs_effective: Number | None


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("inf")


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass
class CompressionReport:
    """Measured size and cost of a model; MACs are mean per example (see :mod:`lit_compress.measure.macs`)."""

    model: str
    input_shape: list[int] | None
    layers: list[LayerRow]
    params_total: int
    params_nonzero: int
    params_trainable: int
    macs_dense: Number
    macs_effective: Number
    fp32_bytes: int
    state_dict_bytes: int
    file_bytes: int | None = None
    latency: dict[int, LatencyResult] | None = field(default=None)

    @property
    def compression_ratio(self) -> float:
        """``params_total / params_nonzero``."""
        return _ratio(self.params_total, self.params_nonzero)

    @property
    def mac_reduction(self) -> float:
        """``macs_dense / macs_effective``."""
        return _ratio(self.macs_dense, self.macs_effective)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.params_nonzero / self.params_total if self.params_total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready primitives; derived ratios are included for readers and ignored by :meth:`from_dict`."""
        d = asdict(self)
        d["latency"] = None if self.latency is None else {str(b): asdict(r) for b, r in self.latency.items()}
        derived = {
            "compression_ratio": _finite_or_none(self.compression_ratio),
            "mac_reduction": _finite_or_none(self.mac_reduction),
            "sparsity": self.sparsity,
        }
        return {"format": REPORT_FORMAT, "version": REPORT_VERSION, **d, "derived": derived}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionReport:
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != REPORT_FORMAT or data.get("version") != REPORT_VERSION:
            raise ValueError(
                f"not a {REPORT_FORMAT} v{REPORT_VERSION} dict: got format={data.get('format')!r}, "
                f"version={data.get('version')!r}."
            )
        names = [f for f in cls.__dataclass_fields__ if f not in ("file_bytes", "latency")]
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"compression report dict is missing keys {missing}.")
        kwargs = {n: data[n] for n in names}
        kwargs["layers"] = [LayerRow(**row) for row in data["layers"]]
        kwargs["input_shape"] = None if data["input_shape"] is None else list(data["input_shape"])
        latency = data.get("latency")
        if latency is not None:
            latency = {int(b): LatencyResult(**r) for b, r in latency.items()}
        return cls(**kwargs, file_bytes=data.get("file_bytes"), latency=latency)

    def format_table(self) -> str:
        """A fixed-width text table: one row per layer, a TOTAL row, then ratio, byte and latency lines."""
        header = ("Layer", "Type", "Params", "Nonzero", "Sparsity", "Dense MACs", "Eff. MACs")
        rows = [
            (
                r.name or "<root>",
                r.type,
                _n(r.params),
                _n(r.nonzero),
                _pct(r.sparsity),
                _n(r.macs_dense),
                _n(r.macs_effective),
            )
            for r in self.layers
        ]
        total = (
            "TOTAL",
            "",
            _n(self.params_total),
            _n(self.params_nonzero),
            _pct(self.sparsity),
            _n(self.macs_dense),
            _n(self.macs_effective),
        )
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, total)]
        left = 2  # the name and type columns are left-aligned, numbers right-aligned

        def line(cells: Sequence[str]) -> str:
            cols = enumerate(zip(cells, widths))
            return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in cols)

        rule = "  ".join("-" * w for w in widths)
        out = [line(header), rule, *(line(r) for r in rows), rule, line(total), ""]
        out.append(
            f"compression ratio {_x(self.compression_ratio)} (params total / nonzero), "
            f"MAC reduction {_x(self.mac_reduction)} (dense / effective, per example)"
        )
        sizes = f"fp32 bytes {_n(self.fp32_bytes)}, state_dict bytes {_n(self.state_dict_bytes)}"
        if self.file_bytes is not None:
            sizes += f", file bytes {_n(self.file_bytes)}"
        out.append(sizes)
        for r in (self.latency or {}).values():
            out.append(
                f"latency batch {r.batch_size}: median {r.median_ms:.3f} ms, min {r.min_ms:.3f} ms "
                f"({r.repeats} runs, {r.threads} thread{'s' if r.threads != 1 else ''})"
            )
        return "\n".join(out)


def _n(x: Number | None) -> str:
    if x is None:
        return "-"
    return f"{x:,}" if isinstance(x, int) else f"{x:,.1f}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _x(x: float) -> str:
    return f"{x:.2f}x" if math.isfinite(x) else "inf"


def compression_report(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...] | Sequence[int] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    latency: bool = False,
    latency_options: Mapping[str, Any] | None = None,
    file_path: str | os.PathLike | None = None,
) -> CompressionReport:
    """Measure ``model`` into a :class:`CompressionReport`.

    The input is given as for :func:`~lit_compress.measure.macs.count_macs` (a batched example tensor, or a
    per-example shape). ``latency=True`` adds :func:`~lit_compress.measure.latency.measure_latency` timings
    (``latency_options`` are passed to it, e.g. ``{"batch_sizes": (1, 64), "repeats": 10}``); ``file_path``
    adds the size of a saved file. Per-layer rows merge the parameter and MAC views by module name.
    """
    macs = count_macs(model, example_input, input_shape=input_shape)
    if input_shape is None and isinstance(example_input, Tensor):
        shape: list[int] | None = list(example_input.shape[1:])
    elif (
        input_shape is None
        and isinstance(example_input, Sequence)
        and all(isinstance(d, int) for d in example_input)
    ):
        shape = list(example_input)
    else:
        shape = None if input_shape is None else list(input_shape)
    if latency and shape is None:
        raise ValueError("latency=True needs a single-tensor input; pass input_shape or an example tensor.")

    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    params = {row.name: row for row in layer_params(model)}
    mac_rows = macs.by_name()
    names = sorted(params.keys() | mac_rows.keys(), key=lambda n: (order.get(n, len(order)), n))
    layers = []
    for name in names:
        p, m = params.get(name), mac_rows.get(name)
        layers.append(
            LayerRow(
                name=name,
                type=(p or m).type,
                params=p.params if p else 0,
                nonzero=p.nonzero if p else 0,
                sparsity=p.sparsity if p else 0.0,
                macs_dense=m.dense if m else None,
                macs_effective=m.effective if m else None,
            )
        )
    counts = count_params(model)
    return CompressionReport(
        model=type(model).__name__,
        input_shape=shape,
        layers=layers,
        params_total=counts.total,
        params_nonzero=counts.nonzero,
        params_trainable=counts.trainable,
        macs_dense=macs.dense,
        macs_effective=macs.effective,
        fp32_bytes=4 * counts.total,  # == fp32_bytes(model), without counting again
        state_dict_bytes=state_dict_bytes(model),
        file_bytes=None if file_path is None else file_bytes(file_path),
        latency=measure_latency(model, shape, **(latency_options or {})) if latency else None,
    )
