"""Latency on zoo cards: the shipped model beside its uncompressed reference, measured side by side.

The reference is the card's architecture built fresh (dense, unpruned, no structure spec), so the ratio
says what the compression bought on this CPU. Both models are timed in alternating rounds in the same
process (load on a shared machine hits both alike) and the median over rounds is kept.

Memory layout: a conv net is timed in both layouts, NCHW (as loaded) and channels-last (parameters and
input converted: ``model.to(memory_format=torch.channels_last)``), in the same alternating rounds, and each
model keeps its faster median. A speed-up claimed against a reference that was not offered the layout that
makes it faster would flatter the compressed model (channels-last alone makes a dense CifarNet about 10%
faster at batch 1). The card's ``reference`` names the layout the reference was timed in, e.g.
``"dense cifarnet (channels_last)"``. A model whose layers cannot run channels-last (custom kernels that
assume contiguous NCHW tensors: binary xnor kernels, grouped or sparse execution) stays in NCHW: the
channels-last copy is dropped when it raises or when its outputs differ from the NCHW ones by more than
:data:`LAYOUT_TOLERANCE`. Models without 4-D parameters or image inputs are timed as loaded only.

The shipped model is timed in its inference form: layers that binarise their inputs and weights (BNN,
XNOR-Net) run on the xnor + popcount kernel (:func:`~lit_compress.quantization.to_binary_inference`, exact
up to float summation order), since that is how such a model is deployed; everything else as loaded.
"""

from __future__ import annotations

import copy
import platform
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lit_compress.zoo.card import Latency

NCHW = "NCHW"
CHANNELS_LAST = "channels_last"
LAYOUTS = (NCHW, CHANNELS_LAST)
#: Largest difference between a model's channels-last and NCHW outputs, relative to the output scale
#: (at least 1), for the channels-last copy to count as the same model. Float summation order differs
#: between the layouts by ~1e-6; a layer that misreads channels-last strides differs by far more.
LAYOUT_TOLERANCE = 1e-4
_CHECK_IMAGES = 8  # images per batch size on which the layouts' outputs are compared


def reference_model(architecture: str, kwargs: dict[str, Any]) -> nn.Module:
    from lit_compress.models import create_model

    return create_model(architecture, **kwargs).eval()


def inference_form(model: nn.Module) -> nn.Module:
    """``model`` with its binary layers on the xnor + popcount kernel (a copy; ``model`` when none)."""
    from lit_compress.quantization.binary_inference import binary_inference_plan, to_binary_inference

    if "binary" not in binary_inference_plan(model).values():
        return model
    return to_binary_inference(copy.deepcopy(model))


@dataclass(frozen=True)
class LayoutTimes:
    """Median milliseconds of one model at one batch size, per memory layout it was timed in."""

    ms: dict[str, float]

    @property
    def layout(self) -> str:
        """The faster layout."""
        return min(self.ms, key=self.ms.__getitem__)

    @property
    def best_ms(self) -> float:
        return self.ms[self.layout]


class ChannelsLast(nn.Module):
    """``model`` fed channels-last input (a 4-D input is converted first, and the conversion is timed: data
    arriving in NCHW pays it in deployment too; it is free for one-channel images)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> Any:
        if isinstance(x, Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)


def layout_variants(
    model: nn.Module,
    input_shape: Sequence[int],
    samples: Sequence[Tensor],
    layouts: Sequence[str] = LAYOUTS,
) -> dict[str, nn.Module]:
    """``{layout: module to time}``: ``model`` in NCHW, and (when ``layouts`` has it) a channels-last copy
    when ``model`` has 4-D parameters, takes ``[C, H, W]`` images and computes the same outputs on
    ``samples`` in it."""
    variants: dict[str, nn.Module] = {NCHW: model}
    has_4d = any(t.dim() == 4 for t in [*model.parameters(), *model.buffers()])
    if CHANNELS_LAST not in layouts or not has_4d or len(input_shape) != 3:
        return variants
    try:  # any failure means the model's layers do not support the layout: it stays in NCHW
        converted = ChannelsLast(copy.deepcopy(model).to(memory_format=torch.channels_last))
        if samples and all(_same_outputs(model, converted, x) for x in samples):
            variants[CHANNELS_LAST] = converted
    except Exception:  # custom kernels raise all kinds of errors on unexpected strides
        pass
    return variants


def _same_outputs(model: nn.Module, other: nn.Module, x: Tensor) -> bool:
    """Whether ``other`` computes ``model``'s outputs on ``x`` within :data:`LAYOUT_TOLERANCE`."""
    from torch.utils._pytree import tree_leaves

    from lit_compress.measure._util import eval_mode

    with eval_mode(model), eval_mode(other), torch.inference_mode():
        expected, got = tree_leaves(model(x)), tree_leaves(other(x))
    if len(expected) != len(got):
        return False
    for a, b in zip(expected, got):
        if not isinstance(a, Tensor):
            continue
        if not isinstance(b, Tensor) or a.shape != b.shape:
            return False
        scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
        if a.numel() and float((a.float() - b.float()).abs().max()) > LAYOUT_TOLERANCE * scale:
            return False
    return True


def _samples(
    model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int], inputs: Tensor | None
) -> list[Tensor]:
    """The batches (at most :data:`_CHECK_IMAGES` images) on which the layouts' outputs are compared: at
    batch 1 and at the largest batch size (gated networks take different paths at batch 1)."""
    from lit_compress.measure._util import model_device_dtype, random_batch

    if isinstance(batch_sizes, int) or not batch_sizes:
        return []  # measure_latency says what is wrong with them
    sizes = sorted({min(b, _CHECK_IMAGES) for b in (min(batch_sizes), max(batch_sizes))})
    if inputs is None:
        return [random_batch(model, input_shape, b) for b in sizes]
    device, dtype = model_device_dtype(model)
    return [inputs[: min(b, inputs.shape[0])].to(device=device, dtype=dtype) for b in sizes]


def time_side_by_side(
    models: dict[str, nn.Module],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 256),
    threads: int = 1,
    rounds: int = 5,
    repeats: int = 20,
    inputs: Tensor | None = None,
    layouts: Sequence[str] = LAYOUTS,
) -> dict[str, dict[int, LayoutTimes]]:
    """``{name: {batch size: LayoutTimes}}`` for each of ``models``, each timed in every layout of
    ``layouts`` that :func:`layout_variants` allows, all in the same alternating rounds (``repeats`` calls
    each, median over rounds). A channels-last copy that fails while being timed is dropped (its NCHW
    times are kept)."""
    variants = {
        name: layout_variants(model, input_shape, _samples(model, input_shape, batch_sizes, inputs), layouts)
        for name, model in models.items()
    }
    times: dict[tuple[str, str], dict[int, list[float]]] = {
        (name, layout): {b: [] for b in batch_sizes} for name, nets in variants.items() for layout in nets
    }
    for _ in range(rounds):
        for name, nets in variants.items():
            for layout in list(nets):
                measured = _time_one(nets[layout], layout, input_shape, batch_sizes, threads, repeats, inputs)
                if measured is None:
                    del nets[layout], times[(name, layout)]
                    continue
                for b, ms in measured.items():
                    times[(name, layout)][b].append(ms)
    return {
        name: {
            b: LayoutTimes({layout: statistics.median(times[(name, layout)][b]) for layout in nets})
            for b in batch_sizes
        }
        for name, nets in variants.items()
    }


def _time_one(
    net: nn.Module,
    layout: str,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int],
    threads: int,
    repeats: int,
    inputs: Tensor | None,
) -> dict[int, float] | None:
    """Median ms per batch size of one timing round; None when a channels-last copy fails (NCHW raises)."""
    from lit_compress.measure import measure_latency

    try:
        results = measure_latency(
            net, input_shape, batch_sizes, repeats=repeats, threads=threads, inputs=inputs
        )
    except Exception:  # see layout_variants
        if layout == NCHW:
            raise
        return None
    return {b: r.median_ms for b, r in results.items()}


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
    layouts: Sequence[str] = LAYOUTS,
) -> list[Latency]:
    """One :class:`Latency` per batch size: median ms of ``model`` and of the dense reference, each in its
    faster memory layout (see the module docstring).

    ``inputs``: real images to time on (both models), for gated networks whose work depends on the input.
    ``layouts``: the layouts offered; ``(NCHW,)`` is the protocol of cards written before both were tried
    (see :func:`card_layouts`).
    """
    timed = time_side_by_side(
        {"model": inference_form(model), "reference": reference_model(architecture, architecture_kwargs)},
        input_shape,
        batch_sizes,
        threads=threads,
        rounds=rounds,
        repeats=repeats,
        inputs=inputs,
        layouts=layouts,
    )
    device = f"cpu ({platform.processor() or platform.machine()})"
    out = []
    for b in batch_sizes:
        ours, ref = timed["model"][b], timed["reference"][b]
        out.append(
            Latency(
                batch_size=b,
                threads=threads,
                ms=round(ours.best_ms, 4),
                reference_ms=round(ref.best_ms, 4),
                reference=reference_label(architecture, ref),
                speedup=round(ref.best_ms / ours.best_ms, 3),
                device=device,
            )
        )
    return out


def reference_label(architecture: str, times: LayoutTimes) -> str:
    """``"dense <architecture>"``, with the layout it was timed in when more than one was tried (the card
    schema has no field for it; older cards simply lack the suffix)."""
    label = f"dense {architecture}"
    return f"{label} ({times.layout})" if len(times.ms) > 1 else label


def card_layouts(reference: str) -> tuple[str, ...]:
    """The layouts a card's latency was measured with, read from its ``reference`` label: cards written
    before channels-last was offered name no layout, and were timed as loaded (NCHW) only. Re-timing a
    claim under the protocol it was made with keeps ``zoo verify --latency`` comparing like with like."""
    return LAYOUTS if reference.endswith((f"({NCHW})", f"({CHANNELS_LAST})")) else (NCHW,)
