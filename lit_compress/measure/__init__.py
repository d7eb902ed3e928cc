"""Exact compression measurement: parameters and nonzeros, dense/effective MACs, bytes, latency, reports.

Importing this package does not import Lightning; :class:`CompressionSummary` (the callback) is loaded on
first access.
"""

from __future__ import annotations

from typing import Any

from .latency import LatencyResult, measure_latency
from .macs import (
    LayerMacs,
    MacReport,
    count_macs,
    mac_counter_for,
    register_mac_counter,
    unregister_mac_counter,
)
from .params import LayerParams, ParamCount, count_params, layer_params
from .report import CompressionReport, LayerRow, compression_report
from .size import file_bytes, fp32_bytes, state_dict_bytes

__all__ = [
    "CompressionReport",
    "CompressionSummary",
    "LatencyResult",
    "LayerMacs",
    "LayerParams",
    "LayerRow",
    "MacReport",
    "ParamCount",
    "compression_report",
    "count_macs",
    "count_params",
    "file_bytes",
    "fp32_bytes",
    "layer_params",
    "mac_counter_for",
    "measure_latency",
    "register_mac_counter",
    "state_dict_bytes",
    "unregister_mac_counter",
]


def __getattr__(name: str) -> Any:
    if name == "CompressionSummary":  # lazy: the callback imports Lightning
        from .callback import CompressionSummary

        return CompressionSummary
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
