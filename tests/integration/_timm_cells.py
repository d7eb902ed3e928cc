"""One cell of the timm coverage matrix: a compression method applied to a timm family, end to end.

A cell builds ``ImageClassifier(model="timm:<name>")`` on ``1x28x28`` inputs (the zoo's datasets are
MNIST-shaped), fits it for two optimizer steps on random tensors (batch 2, CPU) with the method's callback
and :class:`~lit_compress.zoo.ZooExport`, then checks

1. output shapes (``[2, 10]``) of the trained and of the reloaded network;
2. that the method took effect, against a hand computation where one is cheap (pruned fraction per layer,
   weights on the DoReFa / BinaryConnect grid, the distillation loss recomputed from the logits, channels
   physically gone, gated layers present);
3. that ``zoo.load`` of the exported entry (sha256-checked, rebuilt from the card) computes what the trained
   network computes in eval mode.

The zoo's evaluation reads the official test split through :func:`lit_compress.data.load_split`; cells
replace it with a few random images (:func:`fake_test_split`) so they need no dataset and stay fast. The
card's accuracy is therefore meaningless; every other number on it is measured as usual.

Shared by ``tests/integration/test_timm_matrix.py`` (the tests) and ``benchmarks/timm_matrix.py`` (the
markdown table). Cells that lit_compress refuses on purpose are listed in :data:`REFUSED` with the error
they must raise; cells that hit a bug are listed in :data:`KNOWN_BUGS` with the failure and a proposed fix.
"""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
BATCH = 2
STEPS = 2
# BatchNorm over 2 images on the 1x1 maps of the last stages is nearly degenerate: the gradient norm of a
# fresh efficientnet_b0 is ~1e6 at batch 2 (~2e4 at batch 4), and two unclipped SGD steps turn its
# running statistics into inf / NaN (without any lit_compress callback). Clipping keeps every cell finite.
GRAD_CLIP = 1.0

# Row label -> (timm model name, create_model kwargs making it run on 1x28x28); random init, timm defaults.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet10t": ("resnet10t", {}),
    "mobilenetv3_small_050": ("mobilenetv3_small_050", {}),
    "efficientnet_b0": ("efficientnet_b0", {}),
    # The 4x4 patch stem and three stride-2 stages shrink 28x28 to nothing (7, 3, 1, then a 2x2 kernel on
    # 1x1); a 1x1 stem (overall stride 8) keeps 28, 14, 7, 3. (output_stride=16 would instead dilate the
    # last stage through timm's Conv2dSame, the layer of the tf_* row below.)
    "convnext_atto": ("convnext_atto", {"patch_size": 1}),
    # 28 / 7 = 4x4 patches (the 16x16 patches of the 224 model do not tile 28x28).
    "vit_tiny_patch16_224": ("vit_tiny_patch16_224", {"img_size": 28, "patch_size": 7}),
    # TensorFlow ports use 'same' padding: timm's Conv2dSame (pads in forward) for its stride-2 convs.
    "tf_mobilenetv3_small_minimal_100": ("tf_mobilenetv3_small_minimal_100", {}),
}
METHODS = ("pruning", "structured", "dorefa", "binaryconnect", "distillation", "fbs")

PRUNE_SPARSITY = 0.5
STRUCTURED_AMOUNT = 0.25
DOREFA_BITS = 4
DOREFA_ACTIVATION_BITS = 4
DISTILL_T, DISTILL_ALPHA = 4.0, 0.7
FBS_DENSITY = 0.5


@dataclass(frozen=True)
class Refusal:
    """A cell lit_compress refuses on purpose: the error type and a regex its message must match."""

    error: type[BaseException]
    match: str
    reason: str  # short, for the table
    detail: str = ""  # why, and what would lift the refusal (for docs/timm_matrix.md)


@dataclass(frozen=True)
class KnownBug:
    """A cell that hits a bug in lit_compress: the exact failure and the fix proposed (xfail meanwhile)."""

    failure: str
    fix: str
    short: str  # for the table


_CONV2D_SAME = Refusal(
    TypeError,
    r"4 selected layer\(s\) subclass Conv2d/Linear with their own forward, which cannot be quantized: "
    r"'net\.blocks\.0\.0\.conv_dw' \(Conv2dSame\), .*; "
    r"exclude them \(exclude: \['net\.blocks\.0\.0\.conv_dw', ",
    "timm Conv2dSame ('same' padding in forward) cannot be quantized",
    "timm's Conv2dSame pads its input in its own forward; QuantConv2d's forward is a plain conv and would "
    "drop that padding, so the callback refuses the layers, all four named in one message with a ready "
    "`exclude:` list; excluding them works (tested). A QuantConv2d that applies `timm.layers.pad_same` "
    "for Conv2dSame sources would lift the refusal.",
)

REFUSED: dict[tuple[str, str], Refusal] = {
    ("tf_mobilenetv3_small_minimal_100", "dorefa"): _CONV2D_SAME,
    ("tf_mobilenetv3_small_minimal_100", "binaryconnect"): _CONV2D_SAME,
    ("tf_mobilenetv3_small_minimal_100", "fbs"): Refusal(
        ValueError,
        r"FBS traces the network \(MobileNetV3\) with torch\.fx .*tracing failed: TraceError: symbolically "
        r"traced variables cannot be used as inputs to control flow",
        "torch.fx cannot trace timm's Conv2dSame (shape-dependent padding)",
        "FBS finds each gated conv's input, BatchNorm and consumers with plain `torch.fx.symbolic_trace`; "
        "timm's Conv2dSame computes its padding from the input size in Python (`timm/layers/padding.py`), "
        "which fx cannot trace. StructuredPruning traces the same network: its tracer "
        "(`lit_compress.pruning.structured.graph._Tracer`) keeps Conv/Linear/BN look-alikes and timm's "
        "no-trace modules as leaves. FBS sharing that tracer should lift the refusal (Conv2dSame layers then "
        "traced as leaves, left ungated if FBS cannot gate them).",
    ),
    ("vit_tiny_patch16_224", "fbs"): Refusal(
        ValueError,
        r"FBS found no conv layer to gate among \['patch_embed\.proj'\]",
        "FBS gates convs; a ViT has only its patch embedding",
        "FBS gates the output channels of Conv2d layers fed by another layer; the only conv of a ViT reads "
        "the image. Gating tokens or MLP neurons would be a different method.",
    ),
}
KNOWN_BUGS: dict[tuple[str, str], KnownBug] = {}

# Observations about the setup, not lit_compress defects (written to docs/timm_matrix.md).
SETUP_NOTES = (
    "Inputs are 1x28x28 because zoo entries are measured on MNIST-shaped data (the card's MACs use the "
    "dataset's image shape): `in_chans=1` everywhere, `img_size=28, patch_size=7` for the ViT (4x4 patches) "
    "and `patch_size=1` for ConvNeXt (its 4x4 patch stem plus three stride-2 stages would shrink 28x28 below "
    "the last downsampling kernel; `output_stride=16` instead dilates the last stage through timm's "
    "Conv2dSame, which the `tf_` row covers).",
    "Training uses `gradient_clip_val=1.0`: BatchNorm over 2 images on the 1x1 maps of the last stages is "
    "nearly degenerate, a fresh efficientnet_b0 has a gradient norm of ~1e6 at batch 2, and two unclipped "
    "SGD steps turn its BatchNorm running statistics into inf / NaN without any lit_compress callback.",
    "The zoo's evaluation reads `lit_compress.data.load_split`, replaced in the cells by 8 random images, so "
    "the cards' accuracies are meaningless; parameters, MACs, bytes, per-image gating statistics and the "
    "sha256-checked reload are real.",
)


class CellCheckError(AssertionError):
    """A cell ran but one of its checks failed (the method did not take effect, outputs differ...)."""


def check(condition: bool, message: str) -> None:
    # Not `assert`: the benchmark script must check too, also under `python -O`.
    if not condition:
        raise CellCheckError(message)


@dataclass
class CellResult:
    family: str
    method: str
    card: Any
    notes: list[str] = field(default_factory=list)


def timm_name(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; the matrix covers {sorted(FAMILIES)}")
    return "timm:" + FAMILIES[family][0]


def model_kwargs(family: str) -> dict[str, Any]:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; the matrix covers {sorted(FAMILIES)}")
    return {"in_chans": INPUT_SHAPE[0], **copy.deepcopy(FAMILIES[family][1])}


def entry_name(family: str, method: str) -> str:
    return f"{family}-mnist.{method}"


@contextmanager
def fake_test_split(count: int = 8, seed: int = 0) -> Iterator[None]:
    """``lit_compress.data.load_split`` returns ``count`` random uint8 images (and labels) while active, so
    the zoo's evaluation and per-image statistics run their real code without a dataset."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, *INPUT_SHAPE[1:]), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (count,), generator=gen)
    with mock.patch("lit_compress.data.load_split", lambda *a, **k: (images, labels)):
        yield


def _callback(method: str, family: str, overrides: dict[str, Any] | None = None):
    """The method's callback as a matrix cell configures it; ``overrides`` replace constructor arguments."""
    kwargs = _callback_kwargs(method, family)
    kwargs.update(overrides or {})
    return _CALLBACKS[method](**kwargs)


def _callback_kwargs(method: str, family: str) -> dict[str, Any]:
    if method == "pruning":
        return {"sparsity": PRUNE_SPARSITY, "schedule": "one_shot", "verbose": False}
    if method == "structured":
        return {"amount": STRUCTURED_AMOUNT, "example_input_shape": [1, *INPUT_SHAPE], "verbose": False}
    if method == "dorefa":
        return {
            "method": "dorefa",
            "bits": DOREFA_BITS,
            "activation_bits": DOREFA_ACTIVATION_BITS,
            "verbose": False,
        }
    if method == "binaryconnect":
        return {"method": "binaryconnect", "verbose": False}
    if method == "distillation":
        from lit_compress.models import create_model

        torch.manual_seed(1)  # a teacher of the same family, initialised differently from the student
        teacher = create_model(timm_name(family), num_classes=NUM_CLASSES, **model_kwargs(family))
        return {"teacher": teacher, "temperature": DISTILL_T, "alpha": DISTILL_ALPHA, "verbose": False}
    if method == "fbs":
        return {"density": FBS_DENSITY, "verbose": False}
    raise ValueError(f"unknown method {method!r}; the matrix covers {list(METHODS)}")


def _pruning(**kwargs):
    from lit_compress.pruning import Pruning

    return Pruning(**kwargs)


def _structured(**kwargs):
    from lit_compress.pruning.structured import StructuredPruning

    return StructuredPruning(**kwargs)


def _quantization(**kwargs):
    from lit_compress.quantization.callback import Quantization

    return Quantization(**kwargs)


def _distillation(**kwargs):
    from lit_compress.distillation import Distillation

    return Distillation(**kwargs)


def _fbs(**kwargs):
    from lit_compress.gating.fbs_callback import FBS

    return FBS(**kwargs)


_CALLBACKS = {
    "pruning": _pruning,
    "structured": _structured,
    "dorefa": _quantization,
    "binaryconnect": _quantization,
    "distillation": _distillation,
    "fbs": _fbs,
}


def run_cell(
    family: str,
    method: str,
    workdir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> CellResult:
    """Fit, check, export, reload, compare; raises on any failure (CellCheckError for a failed check).

    ``workdir`` holds the temporary zoo (a fresh temporary folder when None); ``overrides`` replace
    arguments of the method's callback (e.g. ``{"exclude": [...]}``).
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="timm-cell-") as tmp:
            return run_cell(family, method, tmp, overrides)
    import lightning.pytorch as L

    from lit_compress import zoo
    from lit_compress.data import SyntheticDataModule
    from lit_compress.models import ImageClassifier
    from lit_compress.zoo.from_lightning import ZooExport

    root = Path(workdir) / "zoo"
    name = entry_name(family, method)
    kwargs = model_kwargs(family)
    torch.manual_seed(0)
    module = ImageClassifier(
        model=timm_name(family),
        model_kwargs=kwargs,
        num_classes=NUM_CLASSES,
        optimizer=lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
    )
    dense_params = sum(p.numel() for p in module.net.parameters())
    callback = _callback(method, family, overrides)
    probe = _DistillationProbe(callback) if method == "distillation" else None
    export = ZooExport(name=name, dataset="mnist", zoo=str(root), overwrite=True)
    data = SyntheticDataModule(
        num_train=BATCH * STEPS,
        num_val=0,
        num_test=0,
        input_shape=INPUT_SHAPE,
        num_classes=NUM_CLASSES,
        batch_size=BATCH,
        shuffle=False,
    )
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        callbacks=[c for c in (callback, probe, export) if c is not None],
        logger=False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=GRAD_CLIP,
        default_root_dir=str(workdir),
    )
    with fake_test_split():
        trainer.fit(module, data)
    check(trainer.global_step == STEPS, f"expected {STEPS} optimizer steps, ran {trainer.global_step}")
    card = export.card
    check(card is not None, "ZooExport wrote no card")

    net = module.net.eval()
    x = torch.randn(BATCH, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = net(x)
    check(tuple(out.shape) == (BATCH, NUM_CLASSES), f"output shape {tuple(out.shape)}")

    loaded = zoo.load(name, zoo=root)
    with torch.no_grad():
        reloaded = loaded(x)
    check(tuple(reloaded.shape) == (BATCH, NUM_CLASSES), f"reloaded output shape {tuple(reloaded.shape)}")
    result = CellResult(family, method, card)
    EFFECT_CHECKS[method](callback, module, loaded, card, dense_params, probe, result)
    # Same architecture: bit-exact. Physically removed channels change the summation order: tolerance.
    atol, rtol = (1e-4, 1e-4) if method == "structured" else (0.0, 0.0)
    try:
        torch.testing.assert_close(reloaded, out, atol=atol, rtol=rtol)
    except AssertionError as err:
        raise CellCheckError(f"zoo.load output differs from the trained network: {err}") from None
    return result


# -- per-method checks: did the method take effect? ----------------------------------------------------


def _check_pruning(cb, module, loaded, card, dense_params, probe, result) -> None:
    check(bool(cb.masks), "Pruning selected no weights")
    state = loaded.state_dict()
    for fqn, mask in cb.masks.items():
        pruned = int((~mask).sum())
        expected = round(PRUNE_SPARSITY * mask.numel())
        # One-shot layerwise magnitude at step 0: exactly round(s * n) weights per layer.
        check(pruned == expected, f"{fqn}: {pruned} pruned, expected {expected} of {mask.numel()}")
        weight = state[fqn[len("net.") :]]
        check(bool(torch.all(weight[~mask] == 0)), f"{fqn}: a pruned weight is non-zero after reload")
    nonzero = sum(int(p.count_nonzero()) for p in loaded.parameters())
    check(card.params.nonzero == nonzero, f"card nonzero {card.params.nonzero} != reloaded {nonzero}")
    result.notes.append(f"{len(cb.masks)} layers at {PRUNE_SPARSITY:.0%}")


def _check_structured(cb, module, loaded, card, dense_params, probe, result) -> None:
    removed = {g: cb.sizes[g] - len(k) for g, k in cb.kept.items() if len(k) < cb.sizes[g]}
    check(bool(removed), "StructuredPruning removed no channel")
    check(card.structure is not None, "the card has no structure spec for the smaller network")
    loaded_params = sum(p.numel() for p in loaded.parameters())
    check(loaded_params < dense_params, f"reloaded net has {loaded_params} params, dense {dense_params}")
    check(card.params.dense == loaded_params, f"card params {card.params.dense} != {loaded_params}")
    result.notes.append(
        f"{sum(removed.values())} channels removed in {len(removed)} groups, "
        f"params {dense_params:,} -> {loaded_params:,}"
    )


def _quantized_layers(cb, module) -> dict[str, nn.Module]:
    from lit_compress.quantization.modules import is_quantized

    check(bool(cb.layers), "Quantization quantized no layer")
    layers = {n: module.get_submodule(n) for n in cb.layers}
    check(all(is_quantized(m) for m in layers.values()), "a selected layer was not swapped")
    return layers


def _check_dorefa(cb, module, loaded, card, dense_params, probe, result) -> None:
    layers = _quantized_layers(cb, module)
    levels = 2**DOREFA_BITS - 1
    for fqn in layers:
        w = loaded.get_submodule(fqn[len("net.") :]).weight.detach()
        k = (w + 1) * levels / 2  # DoReFa grid {2i / (2^k - 1) - 1}: k must be an integer in [0, 2^k - 1]
        on_grid = torch.allclose(k, k.round(), atol=1e-4) and float(k.min()) > -1e-4
        check(on_grid and float(k.max()) < levels + 1e-4, f"{fqn}: weights off the {DOREFA_BITS}-bit grid")
    check(card.compression.bits == DOREFA_BITS, f"card bits {card.compression.bits}")
    check(
        card.structure is not None and card.structure.get("kind") == "quantized",
        "input quantizers are not on the card",
    )
    result.notes.append(
        f"{len(layers)} layers, {DOREFA_BITS}-bit weights / {DOREFA_ACTIVATION_BITS}-bit inputs"
    )


def _check_binaryconnect(cb, module, loaded, card, dense_params, probe, result) -> None:
    layers = _quantized_layers(cb, module)
    for fqn in layers:
        w = loaded.get_submodule(fqn[len("net.") :]).weight.detach()
        check(bool(torch.all((w.abs() == 1) | (w == 0))), f"{fqn}: reloaded weights are not +-1")
    check(card.compression.bits == 1, f"card bits {card.compression.bits}")
    result.notes.append(f"{len(layers)} layers binary")


def _check_distillation(cb, module, loaded, card, dense_params, probe, result) -> None:
    check(len(probe.pairs) == STEPS, f"the probe saw {len(probe.pairs)} steps")
    for step, (returned, expected) in enumerate(probe.pairs):
        check(
            math.isclose(returned, expected, rel_tol=1e-4, abs_tol=1e-6),
            f"step {step}: training loss {returned} != hand-computed distillation loss {expected}",
        )
    check(any(m.startswith("distillation") for m in card.compression.methods), "not on the card")
    result.notes.append("loss = (1-a) CE + a T^2 KL checked by hand")


def _check_fbs(cb, module, loaded, card, dense_params, probe, result) -> None:
    from lit_compress.gating.fbs import fbs_layers

    gated = fbs_layers(module.net)
    check(bool(gated), "FBS gated no layer")
    check(list(fbs_layers(loaded)) == list(gated), "the reloaded net lost its gated layers")
    gating = card.compression.gating or {}
    check(gating.get("method") == "fbs", f"no FBS gating on the card: {gating}")
    check("statistics" in gating, "the card lacks the per-image MAC statistics of the gated net")
    # Not checked: effective < dense. On 28x28 inputs the SE convs and the head run on 1x1 maps, where a
    # gate's predictor costs as much as the conv it gates; see docs/timm_matrix.md.
    result.notes.append(
        f"{len(gated)} gated convs at d={FBS_DENSITY}, "
        f"MACs/image {card.macs.dense:,} -> {card.macs.effective:,}"
    )


EFFECT_CHECKS = {
    "pruning": _check_pruning,
    "structured": _check_structured,
    "dorefa": _check_dorefa,
    "binaryconnect": _check_binaryconnect,
    "distillation": _check_distillation,
    "fbs": _check_fbs,
}


def _distillation_probe_base():
    import lightning.pytorch as L

    return L.Callback


class _DistillationProbe(_distillation_probe_base()):
    """Recomputes each step's distillation loss by hand before the step and records what training returned.

    Expected: ``(1 - alpha) * CE(s, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))`` with the
    student's logits ``s`` in train mode and the frozen teacher's ``t`` in eval mode.
    """

    def __init__(self, distillation) -> None:
        self.distillation = distillation
        self.expected: float | None = None
        self.pairs: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x, y = batch
        net = pl_module.net
        buffers = copy.deepcopy(dict(net.named_buffers()))  # BatchNorm statistics: leave them untouched
        with torch.no_grad():  # no grad: the distillation hook ignores this forward
            s = net(x).double()
            t = self.distillation.teacher(x).double()
        for name, value in buffers.items():
            net.get_buffer(name).copy_(value)
        T, a = DISTILL_T, DISTILL_ALPHA
        p = F.softmax(t / T, dim=1)
        kl = (p * (F.log_softmax(t / T, dim=1) - F.log_softmax(s / T, dim=1))).sum(dim=1).mean()
        self.expected = float((1 - a) * F.cross_entropy(s, y) + a * T * T * kl)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.pairs.append((float(loss), float(self.expected)))


@dataclass
class Outcome:
    """A cell's line in the matrix: ``works`` / ``refused`` / ``fails``, a short detail, the run's result."""

    status: str
    detail: str
    result: CellResult | None = None
    seconds: float = 0.0


def classify(family: str, method: str, workdir: str | Path | None = None) -> Outcome:
    """Run one cell and say how it went, never raising: the matrix reports every outcome."""
    import re
    import time

    start = time.perf_counter()
    try:
        result = run_cell(family, method, workdir)
    except Exception as err:  # the table reports every failure
        seconds = time.perf_counter() - start
        refusal = REFUSED.get((family, method))
        if refusal is not None and isinstance(err, refusal.error) and re.search(refusal.match, str(err)):
            return Outcome("refused", refusal.reason, seconds=seconds)
        bug = KNOWN_BUGS.get((family, method))
        if bug is not None:
            return Outcome("fails", f"{bug.short} (known bug)", seconds=seconds)
        text = " ".join(str(err).split())
        return Outcome("fails", f"{type(err).__name__}: {text[:160]}", seconds=seconds)
    seconds = time.perf_counter() - start
    notes = "; ".join(result.notes)
    if (family, method) in REFUSED or (family, method) in KNOWN_BUGS:
        notes += " (listed as refused / known bug: update the lists in tests/integration/_timm_cells.py)"
    return Outcome("works", notes, result, seconds)
