"""Latency on zoo cards: the shipped model beside its uncompressed reference, measured side by side.

The reference is the card's architecture built fresh (dense, unpruned, no structure spec), so the ratio
says what the compression bought on this CPU. Both models are timed in alternating rounds in the same
process (load on a shared machine hits both alike) and the median over rounds is kept.

The shipped model is timed in its inference form: layers that binarise their inputs and weights (BNN,
XNOR-Net) run on the xnor + popcount kernel (:func:`~lit_compress.quantization.to_binary_inference`, exact
up to float summation order), since that is how such a model is deployed; everything else as loaded.
"""

from __future__ import annotations

import copy
import platform
import statistics
from collections.abc import Sequence
from typing import Any

from torch import nn

from lit_compress.zoo.card import Latency


def reference_model(architecture: str, kwargs: dict[str, Any]) -> nn.Module:
    from lit_compress.models import create_model

    return create_model(architecture, **kwargs).eval()


def inference_form(model: nn.Module) -> nn.Module:
    """``model`` with its binary layers on the xnor + popcount kernel (a copy; ``model`` when none)."""
    from lit_compress.quantization.binary_inference import binary_inference_plan, to_binary_inference

    if "binary" not in binary_inference_plan(model).values():
        return model
    return to_binary_inference(copy.deepcopy(model))


def measure_card_latency(
    model: nn.Module,
    architecture: str,
    architecture_kwargs: dict[str, Any],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 256),
    threads: int = 1,
    rounds: int = 5,
    repeats: int = 20,
    inputs: Any = None,
) -> list[Latency]:
    """One :class:`Latency` per batch size: median ms of ``model`` and of the dense reference.

    ``inputs``: real images to time on (both models), for gated networks whose work depends on the input.
    """
    from lit_compress.measure import measure_latency

    reference = reference_model(architecture, architecture_kwargs)
    model = inference_form(model)
    ours: dict[int, list[float]] = {b: [] for b in batch_sizes}
    theirs: dict[int, list[float]] = {b: [] for b in batch_sizes}
    for _ in range(rounds):
        for results, net in ((ours, model), (theirs, reference)):
            for b, r in measure_latency(
                net, input_shape, batch_sizes, repeats=repeats, threads=threads, inputs=inputs
            ).items():
                results[b].append(r.median_ms)
    device = f"cpu ({platform.processor() or platform.machine()})"
    out = []
    for b in batch_sizes:
        ms, ref = statistics.median(ours[b]), statistics.median(theirs[b])
        out.append(
            Latency(
                batch_size=b,
                threads=threads,
                ms=round(ms, 4),
                reference_ms=round(ref, 4),
                reference=f"dense {architecture}",
                speedup=round(ref / ms, 3),
                device=device,
            )
        )
    return out
