"""Wall-clock inference latency at fixed batch sizes and a fixed thread count.

A fixed ``torch`` intra-op thread count (1 by default) makes numbers comparable from run to run and machine
load to machine load; the median is the headline figure, the minimum the best case.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._util import check_input_shape, eval_mode, model_device_dtype, random_batch


@dataclass(frozen=True)
class LatencyResult:
    """Milliseconds per forward pass of one batch."""

    batch_size: int
    median_ms: float
    min_ms: float
    repeats: int
    threads: int

    @property
    def per_example_ms(self) -> float:
        return self.median_ms / self.batch_size


def _positive_int(value: object, name: str, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return value


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 256),
    repeats: int = 20,
    warmup: int = 3,
    threads: int = 1,
    inputs: torch.Tensor | None = None,
) -> dict[int, LatencyResult]:
    """Time ``model`` on seeded random batches of each size; return ``{batch_size: LatencyResult}``.

    ``inputs`` (``[N, *input_shape]``, e.g. real test images): time on those instead, a different window of
    ``batch_size`` images for each call (cycling). Needed for input-dependent (gated) networks, whose work
    on random noise says nothing about their work on real data.

    Runs under ``torch.inference_mode()`` in eval mode with ``torch.set_num_threads(threads)``; the
    modules' modes and the previous thread count are restored afterwards, even on error. CUDA models are
    synchronised around each timed call.
    """
    shape = check_input_shape(input_shape)
    if isinstance(batch_sizes, int) or not isinstance(batch_sizes, Sequence) or not batch_sizes:
        raise ValueError(
            f"batch_sizes must be a non-empty sequence of ints, e.g. (1, 256); got {batch_sizes}"
        )
    sizes = [_positive_int(b, "each batch size") for b in batch_sizes]
    _positive_int(repeats, "repeats")
    _positive_int(warmup, "warmup", minimum=0)
    _positive_int(threads, "threads")

    device, _ = model_device_dtype(model)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    previous_threads = torch.get_num_threads()
    results: dict[int, LatencyResult] = {}
    try:
        torch.set_num_threads(threads)
        with eval_mode(model), torch.inference_mode():
            for batch_size in sizes:
                batches = _batches(model, shape, batch_size, inputs)
                for _ in range(warmup):
                    model(next(batches))
                times = []
                for _ in range(repeats):
                    x = next(batches)
                    sync()
                    start = time.perf_counter()
                    model(x)
                    sync()
                    times.append((time.perf_counter() - start) * 1e3)
                results[batch_size] = LatencyResult(
                    batch_size, statistics.median(times), min(times), repeats, threads
                )
    finally:
        torch.set_num_threads(previous_threads)
    return results


def _batches(model: nn.Module, shape: tuple[int, ...], batch_size: int, inputs: torch.Tensor | None):
    """Endless batches: one seeded random batch, or consecutive windows of ``inputs`` (wrapping around)."""
    if inputs is None:
        x = random_batch(model, shape, batch_size)
        while True:
            yield x
    if tuple(inputs.shape[1:]) != tuple(shape) or inputs.shape[0] < 1:
        expected = ", ".join(map(str, shape))
        raise ValueError(f"inputs must have shape [N, {expected}], got {list(inputs.shape)}")
    device, dtype = model_device_dtype(model)
    pool = inputs.to(device=device, dtype=dtype)
    if pool.shape[0] < batch_size:
        pool = pool.repeat((batch_size + pool.shape[0] - 1) // pool.shape[0], *([1] * len(shape)))
    start = 0
    while True:
        if start + batch_size > pool.shape[0]:
            start = 0
        yield pool[start : start + batch_size]
        start += batch_size
