"""Feature Boosting and Suppression (Gao et al., "Dynamic Channel Pruning: Feature Boosting and Suppression",
ICLR 2019): the mechanism. The Lightning wiring is :mod:`lit_compress.gating.fbs_callback`.

For a gated convolution ``l`` with input ``x`` (the previous layer's output, ``[B, C_in, H, W]``):

* saliencies ``g(x) = relu(W_p ss(x) + b_p)``, ``ss(x)`` the per-channel mean of ``|x|`` over the spatial
  positions (the paper's L1 subsampling; for post-ReLU features it *is* global average pooling), giving one
  saliency per output channel from a small linear ``predictor`` (``C_in -> C_out``);
* winner-take-all: the ``k = ceil(d * C_out)`` largest saliencies of each image are kept, the rest zeroed
  (:func:`winner_take_all`); the gate is the kept saliencies (boosting) or 1 (``boost=False``, ablation);
* the gate multiplies the layer's output channels **after its BatchNorm** (before the ReLU): the paper's
  ``relu(pi(x) * bn(conv(x)))``. The gate is ``>= 0``, so for a ReLU it is the same as gating after the
  ReLU. Suppressed channels are exactly zero; without a BatchNorm right after the conv the gate multiplies
  the conv output. The BatchNorm keeps its affine ``gamma`` (the paper folds it into ``pi``): keeping it
  leaves a dense checkpoint's function intact at ``d = 1`` with the gate at 1.

Layers (:func:`apply_fbs` swaps them in place, the swapped modules subclass what they replace and keep the
same Parameter and buffer objects, so existing state_dict keys do not change):

* :class:`FBSConv2d` (an ``nn.Conv2d``) computes the saliencies and the gate; it owns the predictor, whose
  parameters add the keys ``<conv>.predictor.weight`` / ``<conv>.predictor.bias`` to the state_dict;
* :class:`FBSBatchNorm2d` (an ``nn.BatchNorm2d``) applies the gate after normalising;
* :class:`FBSLinear` (an ``nn.Linear``) reads a gated conv's flattened compact output (see below).

Inference that really skips work (``skip=True``, eval mode): only the output channels kept by some image of
the batch are computed (weight rows, bias and BatchNorm entries sliced), so at batch 1 exactly the kept
channels run. When a gated conv's (gated) output reaches the next gated conv only through zero-preserving
per-channel ops (ReLU, max/avg pooling, dropout, identity), the tensor stays *compact* (only the computed
channels) and the next conv reads only the matching input channels of its weight and of its predictor: the
paper's input-side saving, so the work of a layer scales with ``d_in * d_out``. Otherwise the compact
tensor still passes through the zero-preserving modules that follow (e.g. ReLU and max-pool: they run on the
computed channels only) and then either ends in ``flatten(1)`` and an ``nn.Linear``, which becomes an
:class:`FBSLinear` reading only the weight columns of the computed channels (at batch 1 a memory-bound
layer, so this saves time in proportion), or is scattered back to full width with zeros (no
multiply-accumulates) after the last such module (a forward hook), or at the gate point when none follows
(a residual add, the network output). At batch 1 the conv also folds its BatchNorm (running statistics)
into the sliced weight and bias and multiplies its small output by the gate, so a gated layer is one small
conv plus the predictor; it computes in channels-last memory format (same values, faster small convs and
max-pools; ``FBSConv2d.channels_last_one``). Batches larger than 1 compute the **union** of the channels
kept by their images (exact: a channel not kept by an image is multiplied by its zero gate), so a batch
saves only what none of its images keeps; loop over images for the full per-image saving. Channels whose
kept saliency is exactly 0 (ReLU) are skipped too: their gate is 0, so the output is the same.

Wall-clock caveat: each gated layer adds about ten small tensor ops (pooling, predictor, top-k, slicing);
on a CPU at batch 1 they cost several microseconds each, which small convs (tens of channels at 14x14) do
not amortise, so the latency gain of a small network is well below its MAC reduction. Kept channel counts
that are multiples of 8 also run markedly faster in oneDNN than others (26 vs 32 channels).

The analysis that finds each conv's BatchNorm, the compact chains and where each compact output ends traces
the network with ``torch.fx`` (:func:`plan_fbs`); the resulting plan is plain data (:class:`LayerPlan`),
stored on zoo cards, so loading a zoo entry does not trace (except for cards older than the
``expand_after`` / ``linear`` fields: :func:`plan_tails`). MACs: :meth:`FBSConv2d.compression_macs`
reports, for ``count_macs``, the work actually done by the call (sliced conv plus predictor, weight sizes not
nonzeros) against the full layer; :func:`macs_per_image` / :func:`mac_statistics` give per-image MACs from
the decisions taken (what batch-1 execution computes for each image). An :class:`FBSLinear` counts as the
full Linear (its skipped columns are not subtracted: card MAC counts stay as they were).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FBSBatchNorm2d",
    "FBSConv2d",
    "FBSLinear",
    "GateState",
    "LayerPlan",
    "MacStatistics",
    "apply_fbs",
    "check_density",
    "costly_gates",
    "fbs_layers",
    "kept_channels",
    "layer_plans",
    "mac_statistics",
    "macs_per_image",
    "plan_fbs",
    "plan_tails",
    "saliency_l1",
    "set_density",
    "winner_take_all",
]


# ------------------------------------------------------------------------------------------- pure functions


def check_density(value: Any, what: str = "density") -> float:
    """``value`` as a float in ``(0, 1]``, else ValueError saying what was received."""
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(float(value))
        and 0.0 < float(value) <= 1.0
    )
    if not ok:
        raise ValueError(
            f"{what} must be a number in (0, 1], the fraction of each gated conv's output channels computed "
            f"per image (e.g. 0.5 keeps the top half), got {value!r}"
        )
    return float(value)


def kept_channels(density: float, channels: int) -> int:
    """``ceil(density * channels)`` (at least 1), robust to float error: ``ceil(0.3 * 10)`` is 3, not 4."""
    density = check_density(density)
    return min(channels, max(1, math.ceil(round(density * channels, 6))))


def winner_take_all(saliency: Tensor, k: int) -> Tensor:
    """A 0/1 mask (dtype of ``saliency``) of the ``k`` largest saliencies in each row of ``[B, C]``.

    Ties are broken by ``torch.topk``. The mask is a constant for autograd: gradients reach the kept
    saliencies through ``saliency * mask``.
    """
    if saliency.dim() != 2:
        raise ValueError(f"winner_take_all expects saliencies of shape [B, C], got {tuple(saliency.shape)}")
    channels = saliency.shape[1]
    if not 1 <= k <= channels:
        raise ValueError(f"k must be in [1, {channels}] for {channels} channels, got {k}")
    if k == channels:
        return torch.ones_like(saliency)
    indices = saliency.detach().topk(k, dim=1, sorted=False).indices
    return torch.zeros_like(saliency).scatter_(1, indices, 1.0)


# -------------------------------------------------------------------------------------------------- layers


class GateState:
    """Run-time state shared by an :class:`FBSConv2d`, its :class:`FBSBatchNorm2d` (``norm``) and the gated
    convs that read its compact output. Transient tensors are dropped by ``copy.deepcopy`` and pickling (a
    copied network starts clean); the copy stays shared between the copied modules."""

    def __init__(self, channels: int, expand: bool = True) -> None:
        self.channels = int(channels)
        self.expand = bool(expand)  # scatter computed channels back to full width at the gate point
        self.record = False  # keep per-image decision counts (MAC statistics)
        self.norm: FBSBatchNorm2d | None = None
        self.reset()

    def reset(self) -> None:
        self.gate: Tensor | None = None  # [B, n] gate of the computed channels, consumed at the gate point
        self.folded = False  # the conv already applied BatchNorm and gate (batch-1 eval fast path)
        self.out_idx: Tensor | None = None  # computed output channels (compact eval), None when full width
        self.saliency: Tensor | None = None  # [B, C] saliencies of the last training forward (L1 term)
        self.sample_kept: Tensor | None = None  # [B] channels batch-1 execution computes for each image
        self.sample_macs: Tensor | None = None  # [B] MACs batch-1 execution spends in this layer
        self.fold_cache: tuple[tuple, Any] | None = None  # the conv's batch-1 tensors (BatchNorm folded in)
        self.linear_cache: tuple[tuple, Any] | None = None  # the reading FBSLinear's weight, transposed, ...
        self.positions: int | None = None  # output positions (H_out * W_out) seen by the last forward

    def __deepcopy__(self, memo: dict) -> GateState:
        new = GateState(self.channels, self.expand)
        new.record = self.record
        memo[id(self)] = new  # before copying the BatchNorm, which refers back to this state
        new.norm = copy.deepcopy(self.norm, memo)  # the copied network's BatchNorm (memo keeps it shared)
        return new

    def __getstate__(self) -> dict[str, Any]:
        return {"channels": self.channels, "expand": self.expand, "record": self.record, "norm": self.norm}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["channels"], state["expand"])  # type: ignore[misc]
        self.record = bool(state.get("record", False))
        self.norm = state.get("norm")


def _scatter(y: Tensor, state: GateState) -> Tensor:
    """The computed channels of ``y`` scattered back to full width with zeros (``y`` when it is full width).

    ``out_idx`` may be a permutation even when it holds every channel (batch 1 keeps the top-k order), so
    the scatter is never skipped on the count alone."""
    idx = state.out_idx
    if idx is None:
        return y
    if y.shape[1] != idx.numel():
        raise RuntimeError(
            f"FBS: a compact tensor of {y.shape[1]} channels reached the point where {idx.numel()} computed "
            "channels are scattered back to full width; was a module between them changed?"
        )
    return y.new_zeros(y.shape[0], state.channels, *y.shape[2:]).index_copy_(1, idx, y)


def _finish(y: Tensor, state: GateState) -> Tensor:
    """Scatter the computed channels of ``y`` back to full width when the layer expands at its gate point
    (otherwise a compact consumer, a :class:`_ScatterAfter` hook or an :class:`FBSLinear` reads them)."""
    return _scatter(y, state) if state.expand else y


class _ScatterAfter:
    """Forward hook on the last zero-preserving module (ReLU, pooling, ...) that a gated conv's compact
    output passes through: the output is scattered back to full width there, so those modules run on the
    computed channels only. A no-op when the conv computed full width (training, ``skip=False``).

    A plain object holding the state, not a closure: ``copy.deepcopy`` of the network then points the
    copied hook at the copied state."""

    def __init__(self, state: GateState) -> None:
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return _scatter(output, self.state)


def apply_gate(y: Tensor, state: GateState) -> Tensor:
    """Multiply the computed channels of ``y`` by the gate (unless the conv folded it in already), then
    scatter them back to full width when the layer expands."""
    if state.folded:
        state.folded = False
        return _finish(y, state)
    gate = state.gate
    if gate is None:
        raise RuntimeError(
            "an FBS gate point ran without its gated convolution running first in this forward; the FBS "
            "BatchNorm must directly follow its conv"
        )
    state.gate = None  # consumed: no graph kept alive between forwards
    return _finish(y * gate[:, :, None, None].to(y.dtype), state)


def _version_key(tensors: Sequence[Tensor | None], *extra: Any) -> tuple | None:
    """Identity and version counter of each tensor, then ``extra`` (None for inference tensors, which have
    no version)."""
    try:
        return (*[(id(t), t._version) for t in tensors if t is not None], *extra)
    except RuntimeError:
        return None


def _cached(state: GateState, attr: str, tensors: Sequence[Tensor | None], build: Any, *extra: Any) -> Any:
    """``build()``, kept in ``state.<attr>`` while ``tensors`` (identity and version) and ``extra`` are
    unchanged; rebuilt every call while a gradient is recorded (the result must stay in the graph)."""
    key = None if torch.is_grad_enabled() else _version_key(tensors, *extra)
    cached = getattr(state, attr)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    value = build()
    if key is not None:
        setattr(state, attr, (key, value))
    return value


def _fold(
    weight: Tensor,
    bias: Tensor | None,
    mean: Tensor | None = None,
    var: Tensor | None = None,
    gamma: Tensor | None = None,
    beta: Tensor | None = None,
    eps: float = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """A conv's ``(weight, bias)`` with the eval BatchNorm (``mean``, ``var``, ``gamma``, ``beta``) after it
    folded in: ``scale * conv(x) + shift``; unchanged without a BatchNorm (``var`` None)."""
    if var is None:
        return weight, bias
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale
    if beta is not None:
        shift = shift + beta
    bias = shift if bias is None else torch.addcmul(shift, bias, scale)
    return weight * scale.view(-1, 1, 1, 1), bias


def _move_state(src: nn.Module, dst: nn.Module) -> None:
    """Give ``dst`` the same Parameter / buffer / child objects and hooks as ``src`` (own containers)."""
    dst.__dict__.update(src.__dict__)
    for attr in ("_parameters", "_buffers", "_modules"):
        dst.__dict__[attr] = type(src.__dict__[attr])(src.__dict__[attr])
    dst.__dict__["_non_persistent_buffers_set"] = set(src.__dict__.get("_non_persistent_buffers_set", ()))


def _tensors(module: nn.Module, *names: str) -> list[Tensor | None]:
    """``module.<name>`` for each parameter or buffer name, read from the module's dicts:
    ``nn.Module.__getattr__`` costs about a microsecond per access, which adds up on the batch-1 path.
    Anything else (a parametrization, a property) falls back to ``getattr``."""
    params, buffers = module._parameters, module._buffers
    return [
        params[n] if n in params else buffers[n] if n in buffers else getattr(module, n, None) for n in names
    ]


class _BatchOne(NamedTuple):
    """What the batch-1 eval path of an :class:`FBSConv2d` needs, prepared once (see ``_batch_one``)."""

    rows: Tensor  # the conv weight with the eval BatchNorm folded in, one row per output channel
    shape: torch.Size  # the conv weight's
    channels_last: bool  # the order of a row: (kh, kw, C_in) if True, else (C_in, kh, kw)
    bias: Tensor | None  # the folded bias
    predictor: Tensor  # the predictor weight [C_out, C_in], transposed [C_in, C_out] for a compact input
    predictor_bias: Tensor
    offsets: Tensor  # [0]: one bag for embedding_bag


def _weight_rows(weight: Tensor, channels_last: bool) -> Tensor:
    """``weight`` ``[O, C, kh, kw]`` as contiguous rows ``[O, C * kh * kw]`` in the order :func:`_kept_weight`
    slices into the fastest conv weight: ``(kh, kw, C)`` for a conv computing in channels-last that reads
    all its input channels (its kept rows are then a channels-last weight, which the conv takes without
    converting it); ``(C, kh, kw)`` otherwise (a compact input's channels are sliced too: a copy of
    ``kh * kw`` runs in that order, several times slower in the other)."""
    if channels_last:
        weight = weight.permute(0, 2, 3, 1)
    return weight.reshape(weight.shape[0], -1)


def _kept_weight(
    rows: Tensor, shape: torch.Size, channels_last: bool, idx: Tensor, in_idx: Tensor | None
) -> Tensor:
    """The conv weight ``weight[idx][:, in_idx]`` (every input channel when ``in_idx`` is None) from the
    rows of :func:`_weight_rows` (``shape``: the full weight's), channels-last when the rows are. Whole
    rows are contiguous copies: much faster than ``index_select`` on dim 0 of the 4-D weight."""
    _, in_c, kh, kw = shape
    kept = rows.index_select(0, idx)
    kept = kept.view(-1, kh, kw, in_c).permute(0, 3, 1, 2) if channels_last else kept.view(-1, in_c, kh, kw)
    return kept if in_idx is None else kept.index_select(1, in_idx)


class FBSConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` with an FBS saliency predictor and winner-take-all gate (see the module docstring).

    Attributes set by :func:`apply_fbs` (plain data, see :class:`LayerPlan`): ``density`` (in ``(0, 1]``),
    ``boost``, ``skip`` (compute only kept channels in eval mode), ``fbs_name`` (FQN in the network, for
    messages), ``fbs_norm`` (FQN of the gating BatchNorm or None), ``fbs_source_name`` (FQN of the gated conv
    whose compact output this conv reads, or None), ``fbs_expand_after`` / ``fbs_linear`` (where its compact
    output is scattered back to full width, or the Linear reading it; see :class:`LayerPlan`).

    At batch 1 in eval the conv also folds its BatchNorm (running statistics) into the sliced weight and bias
    and multiplies its output by the gate, so the gated layer costs one small conv: the BatchNorm module then
    only passes through.
    """

    predictor: nn.Linear
    #: Batch-1 eval computes in channels-last memory format (same values): the small sliced convs run
    #: faster in it and so do the max-pools that the compact tensors pass through on their way to the next
    #: gated conv. Tensors are scattered back to full width in the default (contiguous) format.
    channels_last_one: bool = True

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        *,
        name: str,
        density: float = 1.0,
        boost: bool = True,
        generator: torch.Generator | None = None,
    ) -> FBSConv2d:
        """The FBS version of ``conv``, sharing its Parameter objects; a new predictor (weights ~ N(0, 0.01),
        bias 1: every saliency starts near 1, so at ``d = 1`` the network starts as the dense one)."""
        if type(conv) is not nn.Conv2d:
            raise TypeError(
                f"FBS layer {name!r}: expected exactly nn.Conv2d, got {type(conv).__name__}; exclude it"
            )
        if conv.groups != 1:
            raise ValueError(
                f"FBS layer {name!r} is a grouped conv (groups={conv.groups}); FBS slices whole input "
                "channels, which only works for groups=1. Exclude it (exclude: ['<its name>'])."
            )
        new = cls.__new__(cls)
        _move_state(conv, new)
        weight = conv.weight
        predictor = nn.Linear(conv.in_channels, conv.out_channels, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            noise = torch.randn(predictor.weight.shape, generator=generator, dtype=torch.float32)
            predictor.weight.copy_(0.01 * noise)
            predictor.bias.fill_(1.0)
        new.predictor = predictor
        new.fbs_name = name
        new.density = density
        new.boost = bool(boost)
        new.skip = True
        new.fbs_norm = None
        new.fbs_source_name = None
        new.fbs_expand_after = None
        new.fbs_linear = None
        new.fbs_state = GateState(conv.out_channels)
        new.fbs_source = None
        return new

    @property
    def density(self) -> float:
        return self._density

    @density.setter
    def density(self, value: float) -> None:
        self._density = check_density(value, f"FBS layer {getattr(self, 'fbs_name', '?')!r}: density")
        self._kept = kept_channels(self._density, self.out_channels)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, density={self.density:g}, boost={self.boost}, skip={self.skip}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"FBS layer {self.fbs_name!r} received an input of shape {tuple(x.shape)}; its saliency "
                "predictor pools a [B, C, H, W] feature map into one value per channel. Exclude this conv "
                "(exclude: ['<its name>'])."
            )
        source = self.fbs_source
        in_idx = source.out_idx if source is not None else None
        if in_idx is not None and x.shape[1] != in_idx.numel():
            raise RuntimeError(
                f"FBS layer {self.fbs_name!r}: its input has {x.shape[1]} channels but its source "
                f"{self.fbs_source_name!r} computed {in_idx.numel()}; was the source skipped?"
            )
        if self.skip and not self.training:
            if x.shape[0] == 1:
                return self._forward_one(x, in_idx)
            return self._forward_union(x, self._saliency(x, in_idx), in_idx)
        return self._forward_full(x, self._saliency(x, in_idx), in_idx)

    def _saliency(self, x: Tensor, in_idx: Tensor | None) -> Tensor:
        """``relu(W_p mean|x| + b_p)``, ``[B, C_out]`` (the predictor reads only the channels computed)."""
        pred_weight = self.predictor.weight
        if in_idx is not None:
            pred_weight = pred_weight.index_select(1, in_idx)
        return F.relu(F.linear(x.abs().mean(dim=(2, 3)), pred_weight, self.predictor.bias))

    def _forward_full(self, x: Tensor, saliency: Tensor, in_idx: Tensor | None) -> Tensor:
        """Every channel computed, the gate multiplies (training, or eval with ``skip=False``)."""
        state = self.fbs_state
        mask = winner_take_all(saliency, self._kept)
        gate = saliency * mask if self.boost else mask
        weight = self.weight if in_idx is None else self.weight.index_select(1, in_idx)
        out = self._conv_forward(x, weight, self.bias)
        state.positions = out.shape[2] * out.shape[3]
        if self.training and torch.is_grad_enabled():
            state.saliency = saliency
        state.gate, state.out_idx, state.folded = gate, None, False
        if state.record:
            self._record((gate != 0).sum(dim=1).clamp(min=1), out)
        return apply_gate(out, state) if self.fbs_norm is None else out

    def _forward_union(self, x: Tensor, saliency: Tensor, in_idx: Tensor | None) -> Tensor:
        """Eval, batch > 1: the union of the channels the images keep; each image's gate zeroes the rest."""
        state = self.fbs_state
        mask = winner_take_all(saliency, self._kept)
        full_gate = saliency * mask if self.boost else mask
        active = full_gate != 0
        out_idx: Tensor | None = active.any(dim=0).nonzero().flatten()
        if out_idx.numel() == 0:
            out_idx = mask[0].nonzero().flatten()[:1]  # nothing to compute; one zero-gated channel
        elif out_idx.numel() == self.out_channels:
            out_idx = None  # every channel: full width, nothing to slice or scatter
        weight = self.weight if out_idx is None else self.weight.index_select(0, out_idx)
        if in_idx is not None:
            weight = weight.index_select(1, in_idx)
        bias = self.bias if self.bias is None or out_idx is None else self.bias.index_select(0, out_idx)
        out = self._conv_forward(x, weight, bias)
        gate = full_gate if out_idx is None else full_gate.index_select(1, out_idx)
        state.gate, state.out_idx, state.folded = gate, out_idx, False
        if state.record:
            self._record(active.sum(dim=1).clamp(min=1), out)
        return apply_gate(out, state) if self.fbs_norm is None else out

    def _forward_one(self, x: Tensor, in_idx: Tensor | None) -> Tensor:
        """Eval, batch 1: only the kept channels, with the BatchNorm folded into the sliced weight and bias
        and the gate applied to the (small) output in place: one small conv plus the predictor. Every op
        counts at batch 1 (each costs microseconds), so this path is kept short."""
        state = self.fbs_state
        prepared = self._batch_one()
        if prepared is None:  # BatchNorm on batch statistics: the unfolded compact path
            return self._forward_union(x, self._saliency(x, in_idx), in_idx)
        if self.channels_last_one:
            x = x.contiguous(memory_format=torch.channels_last)  # no copy when the source computed it so
        values, idx = self._keep_one(x, in_idx, prepared)
        weight = _kept_weight(prepared.rows, prepared.shape, prepared.channels_last, idx, in_idx)
        bias = None if prepared.bias is None else prepared.bias.index_select(0, idx)
        out = self._conv_forward(x, weight, bias)
        if self.boost:
            out.mul_(values.view(-1, 1, 1))  # gate * (scale * conv + shift): fewer elements than the weight
        state.gate, state.out_idx, state.folded = None, idx, True
        if state.record:
            self._record(torch.full((1,), idx.numel(), device=x.device), out)
        return apply_gate(out, state) if state.norm is None else out

    def _keep_one(self, x: Tensor, in_idx: Tensor | None, prepared: _BatchOne) -> tuple[Tensor, Tensor]:
        """Saliencies and indices of the channels one image keeps, largest first; with boost, kept channels
        whose saliency is 0 are dropped (their gate is 0: no work, same output), keeping at least one. A
        compact input's predictor reads only the weights of the computed input channels."""
        # W_p mean|x| + b_p, 1-D (the relu follows); abs().sum is several times faster than vector_norm(x, 1).
        pooled = x.abs().sum(dim=(0, 2, 3))
        alpha = 1.0 / (x.shape[2] * x.shape[3])
        if in_idx is None:
            saliency = torch.addmv(prepared.predictor_bias, prepared.predictor, pooled, alpha=alpha)
        else:  # a compact input: the predictor's rows (transposed) of the computed channels, read in place
            rows = torch.embedding_bag(prepared.predictor, in_idx, prepared.offsets, False, 0, False, pooled)
            saliency = torch.add(prepared.predictor_bias, rows[0][0], alpha=alpha)
        if not self.boost:  # the mask keeps the top k of relu(saliency), ties at 0 included
            return saliency.relu_().topk(self._kept)
        # With boost a kept channel's gate is its saliency, and channels whose saliency is <= 0 (0 after
        # the ReLU) are dropped, so the relu is needed only when the k-th largest saliency is not > 0.
        values, idx = saliency.topk(self._kept)  # sorted: such channels come last
        if values[-1].item() <= 0.0:
            n = max(int((values > 0).sum()), 1)  # keep one channel (gate 0) when none is positive
            values, idx = values[:n].relu_(), idx[:n]
        return values, idx

    def _batch_one(self) -> _BatchOne | None:
        """The tensors of the batch-1 path (:class:`_BatchOne`), or None when the BatchNorm normalises with
        batch statistics. Cached while the parameters and statistics are unchanged, when no gradient is
        recorded."""
        state = self.fbs_state
        norm = state.norm
        predictor = self._modules["predictor"]  # not nn.Module.__getattr__, see _tensors
        tensors = _tensors(predictor, "weight", "bias") + _tensors(self, "weight", "bias")
        if norm is not None:
            tensors += _tensors(norm, "running_mean", "running_var", "weight", "bias")
            if norm.training or tensors[4] is None or tensors[5] is None:
                return None
        return _cached(
            state, "fold_cache", tensors, lambda: self._prepare_batch_one(tensors), self.channels_last_one
        )

    def _prepare_batch_one(self, tensors: list[Tensor | None]) -> _BatchOne:
        """:class:`_BatchOne` from ``tensors`` (predictor weight and bias, conv weight and bias, then the
        BatchNorm's running mean, running variance, weight and bias when there is one)."""
        norm = self.fbs_state.norm
        weight, bias = _fold(*tensors[2:], eps=norm.eps if norm is not None else 0.0)
        compact = self.fbs_source is not None
        pred_weight, pred_bias = tensors[:2]
        channels_last = self.channels_last_one and not compact
        return _BatchOne(
            rows=_weight_rows(weight, channels_last),
            shape=weight.shape,
            channels_last=channels_last,
            bias=bias,
            # a compact input reads rows of the transposed weight (embedding_bag), a full one multiplies
            predictor=pred_weight.t().contiguous() if compact else pred_weight,
            predictor_bias=pred_bias,
            offsets=torch.zeros(1, dtype=torch.long, device=pred_weight.device),
        )

    def _record(self, kept: Tensor, out: Tensor) -> None:
        """Per-image MACs of batch-1 execution: kept outputs x (source's kept or all) inputs + predictor."""
        state, source = self.fbs_state, self.fbs_source
        kept = kept.detach().to(torch.float64)
        inputs = (
            source.sample_kept
            if source is not None and source.sample_kept is not None
            else torch.full_like(kept, float(self.in_channels))
        )
        per_channel = out.shape[2] * out.shape[3] * self.kernel_size[0] * self.kernel_size[1]
        state.sample_kept = kept
        state.sample_macs = per_channel * kept * inputs + inputs * self.out_channels

    def compression_macs(self, inputs: tuple, output: Tensor) -> tuple[int, int]:
        """``(dense, effective)`` batch totals for ``count_macs``: the full layer vs the work of this call
        (the computed output channels x the input channels it read, plus the predictor)."""
        x = inputs[0]
        batch, n_in = x.shape[0], x.shape[1]
        out_idx = self.fbs_state.out_idx
        n_out = out_idx.numel() if out_idx is not None else self.out_channels
        positions = output.shape[2] * output.shape[3]
        kernel = self.kernel_size[0] * self.kernel_size[1]
        dense = batch * positions * self.weight.numel()
        effective = batch * (positions * n_out * n_in * kernel + n_in * self.out_channels)
        return dense, effective


class FBSBatchNorm2d(nn.BatchNorm2d):
    """An ``nn.BatchNorm2d`` that applies its gated conv's FBS gate after normalising (same parameters and
    buffers as the BatchNorm it replaces). In compact eval it normalises only the computed channels; when
    the conv folded it in (batch 1) it only passes the result on."""

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, state: GateState, name: str) -> FBSBatchNorm2d:
        if type(bn) is not nn.BatchNorm2d:
            raise TypeError(
                f"FBS gate point {name!r}: expected exactly nn.BatchNorm2d, got {type(bn).__name__}"
            )
        new = cls.__new__(cls)
        _move_state(bn, new)
        new.fbs_state = state
        new.fbs_name = name
        state.norm = new
        return new

    def forward(self, x: Tensor) -> Tensor:
        state = self.fbs_state
        idx = state.out_idx
        if state.folded or idx is None:
            return apply_gate(x if state.folded else super().forward(x), state)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, idx)

        y = F.batch_norm(
            x,
            pick(self.running_mean),
            pick(self.running_var),
            pick(self.weight),
            pick(self.bias),
            use_batch_stats,
            0.0,
            self.eps,
        )
        return apply_gate(y, state)


class FBSLinear(nn.Linear):
    """An ``nn.Linear`` (same parameters) reading a gated conv's flattened compact output: only the weight
    columns of the computed channels are used, so the (memory-bound at batch 1) layer reads ``d`` of its
    weight. With full-width input (training, ``skip=False``) it is the plain Linear.

    The columns of channel ``c`` are ``c * P ... c * P + P - 1`` (``P = in_features / channels`` positions,
    ``flatten(1)`` order). Batch 1 sums the rows of the transposed weight for the computed channels'
    inputs, weighted by them (``embedding_bag``, the rows read in place, no copy); inputs that are exactly
    0 are summed like the others, as the dense Linear does. Larger batches copy the kept channels' rows
    once and multiply. The transposed weight is cached while the weight is unchanged, when no gradient is
    recorded (as the conv's ``fold_cache``)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, state: GateState, name: str, source: str) -> FBSLinear:
        if type(linear) is not nn.Linear:
            raise TypeError(
                f"FBS compact reader {name!r}: expected exactly nn.Linear, got {type(linear).__name__}"
            )
        if linear.in_features % state.channels:
            raise ValueError(
                f"FBS compact reader {name!r}: {linear.in_features} input features are not a whole number of "
                f"positions per channel of {source!r} ({state.channels} channels)"
            )
        new = cls.__new__(cls)
        _move_state(linear, new)
        new.fbs_source = state
        new.fbs_name = name
        new.fbs_source_name = source
        return new

    def forward(self, x: Tensor) -> Tensor:
        state = self.fbs_source
        idx = state.out_idx
        if idx is None:
            return super().forward(x)
        positions = self.in_features // state.channels
        if x.dim() != 2 or x.shape[1] != idx.numel() * positions:
            raise RuntimeError(
                f"FBS layer {self.fbs_name!r} expected the flattened compact output of "
                f"{self.fbs_source_name!r} ({idx.numel()} channels x {positions} positions), got "
                f"{tuple(x.shape)}"
            )
        weight_t, columns, offsets = self._weight_t()
        cols = columns.index_select(0, idx).view(-1)  # the input features of the computed channels
        (bias,) = _tensors(self, "bias")
        if x.shape[0] == 1:
            # One weighted sum of the kept channels' rows, read in place (no copy of the weight). Inputs
            # that are 0 (ReLU) are not skipped: a dense Linear does not skip them either.
            out = torch.embedding_bag(weight_t, cols, offsets, False, 0, False, x[0])[0]
            return out if bias is None else out + bias
        weight_t = weight_t.index_select(0, cols)
        return x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)

    def _weight_t(self) -> tuple[Tensor, Tensor, Tensor]:
        """``weight.t()``, contiguous (one row per input feature), the ``[channels, positions]`` table of the
        input features of each channel and ``[0]`` (the offsets of one bag); cached, see the class
        docstring."""
        state, (weight,) = self.fbs_source, _tensors(self, "weight")

        def build() -> tuple[Tensor, Tensor, Tensor]:
            columns = torch.arange(self.in_features, device=weight.device).view(state.channels, -1)
            return weight.t().contiguous(), columns, columns.new_zeros(1)

        return _cached(state, "linear_cache", [weight], build)


# ------------------------------------------------------------------------------------------ graph analysis


@dataclass(frozen=True)
class LayerPlan:
    """How one conv is gated: plain data, stored on zoo cards (structure kind ``fbs``).

    ``norm``: FQN (in the network) of the BatchNorm2d the gate follows, None to gate the conv output.
    ``source``: FQN of the gated conv whose compact output is this conv's only input at eval, or None.
    For a conv whose output no gated conv reads, where the compact output (eval, skipping) goes:
    ``expand_after``: FQN of the last zero-preserving module (ReLU, pooling, ...) it passes through, whose
    output is scattered back to full width (None: at the gate point); ``linear``: FQN of the ``nn.Linear``
    that reads it flattened (only the columns of the computed channels; it is never scattered back).
    Plans stored before these two fields existed lack them: they default to None (scatter at the gate
    point), and loading a zoo entry finds them again (:func:`plan_tails`).
    """

    density: float = 1.0
    boost: bool = True
    norm: str | None = None
    source: str | None = None
    expand_after: str | None = None
    linear: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "?") -> LayerPlan:
        keys = [f.name for f in fields(cls)]
        if not isinstance(data, Mapping) or set(data) - set(keys):
            raise ValueError(
                f"FBS layer plan for {name!r} must be a mapping with keys {', '.join(keys)}; got {data!r}"
            )
        for key in ("norm", "source", "expand_after", "linear"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"FBS layer plan for {name!r}: {key} must be a module name or null")
        if not isinstance(data.get("boost", True), bool):
            raise ValueError(
                f"FBS layer plan for {name!r}: boost must be true or false, got {data['boost']!r}"
            )
        return cls(
            density=check_density(data.get("density", 1.0), f"FBS layer {name!r}: density"),
            boost=data.get("boost", True),
            norm=data.get("norm"),
            source=data.get("source"),
            expand_after=data.get("expand_after"),
            linear=data.get("linear"),
        )


# Per-channel ops that map a zero channel to a zero channel: a compact tensor may pass through them.
_ZERO_PRESERVING_MODULES: tuple[type, ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_ZERO_PRESERVING_FUNCTIONS: set[Any] = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardtanh,
    torch.tanh,
    F.dropout,
    F.dropout2d,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}
_ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone"}
_NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


def _single_tensor_arg(node: fx.Node) -> bool:
    """The node's first argument is a node and no other argument is one."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    others: list[fx.Node] = []
    fx.node.map_arg((tuple(node.args[1:]), dict(node.kwargs)), lambda n: others.append(n) or n)
    return not others


def _is_zero_preserving(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    if not _single_tensor_arg(node):
        return False
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)) and module.return_indices:
            return False
        return type(module) in _ZERO_PRESERVING_MODULES
    if node.op == "call_function":
        return node.target in _ZERO_PRESERVING_FUNCTIONS and not node.kwargs.get("return_indices", False)
    if node.op == "call_method":
        return node.target in _ZERO_PRESERVING_METHODS
    return False


def _has_predecessor(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node`` (a conv's input) was computed by a layer, not (only normalised) network input."""
    while True:
        if node.op in ("placeholder", "get_attr"):
            return False
        walk = _is_zero_preserving(node, modules) or (
            node.op == "call_module" and isinstance(modules[node.target], _NORMS) and _single_tensor_arg(node)
        )
        if not walk:
            return True
        node = node.args[0]


def _trace(network: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(network)
    except Exception as err:  # torch.fx raises many types
        raise ValueError(
            f"FBS traces the network ({type(network).__name__}) with torch.fx to find each gated conv's "
            f"input, BatchNorm and consumers, and tracing failed: {type(err).__name__}: {err}. Make the "
            "network's forward traceable (no data-dependent Python control flow) to gate it."
        ) from err


def plan_fbs(
    network: nn.Module,
    targets: Sequence[str] | None = None,
    *,
    density: float = 1.0,
    boost: bool = True,
    strict: bool | None = None,
) -> dict[str, LayerPlan]:
    """Trace ``network`` and return the plan of every gated conv, in graph order.

    ``targets``: conv FQNs inside ``network``; None means every ``Conv2d`` (``groups == 1``) whose input
    comes from a previous layer (so the first conv, which reads the image, is left out). With
    ``strict=True`` (the default for explicit ``targets``) a target that cannot be gated is a ValueError
    naming it; with ``strict=False`` (the default for ``targets=None``) it is left out. Raises ValueError
    when nothing can be gated.
    """
    density = check_density(density)
    strict = targets is not None if strict is None else strict
    gm = _trace(network)
    modules = dict(gm.named_modules())
    calls = _module_calls(gm)
    convs = [n for n, m in network.named_modules() if type(m) is nn.Conv2d]
    wanted = list(convs if targets is None else targets)

    def refuse(name: str, why: str) -> None:
        if strict:
            raise ValueError(f"FBS cannot gate {name!r}: {why}")

    chosen: dict[str, fx.Node] = {}
    for name in wanted:
        module = modules.get(name)
        if module is None or not isinstance(module, nn.Conv2d):
            found = "no such module" if module is None else f"it is a {type(module).__name__}"
            refuse(name, f"{found}; FBS gates nn.Conv2d layers (candidates: {convs})")
            continue
        if type(module) is not nn.Conv2d:
            refuse(name, f"it is a {type(module).__name__}, not exactly nn.Conv2d (already gated?)")
            continue
        if module.groups != 1:
            refuse(name, f"it is a grouped conv (groups={module.groups}); FBS slices whole input channels")
            continue
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            refuse(name, f"it is called {len(nodes)} times in forward (FBS needs exactly one call)")
            continue
        node = nodes[0]
        if not _single_tensor_arg(node) or not _has_predecessor(node.args[0], modules):
            refuse(
                name,
                "it has no predecessor features: its input is the network input (or that input only "
                "normalised/pooled), so there is no previous layer's output to predict saliencies from. "
                "Exclude it; by default FBS leaves out the convs that read the image.",
            )
            continue
        chosen[name] = node
    if not chosen:
        raise ValueError(
            f"FBS found no conv layer to gate among {wanted or convs}: it needs nn.Conv2d layers with "
            "groups=1 whose input is a previous layer's output"
        )

    plans: dict[str, dict[str, Any]] = {}
    gate_nodes: dict[str, fx.Node] = {}
    for name, node in chosen.items():
        conv = modules[name]
        users = list(node.users)
        norm = None
        gate_nodes[name] = node
        if len(users) == 1 and users[0].op == "call_module":
            user = users[0]
            bn = modules[user.target]
            if (
                type(bn) is nn.BatchNorm2d
                and bn.num_features == conv.out_channels
                and len(calls.get(user.target, [])) == 1
                and _single_tensor_arg(user)
                and user.args[0] is node
            ):
                norm, gate_nodes[name] = user.target, user
        plans[name] = {"density": density, "boost": boost, "norm": norm, "source": None}
    for name, gate_node in gate_nodes.items():
        consumers = _compact_consumers(gate_node, set(chosen), modules)
        for consumer in consumers or ():
            plans[consumer]["source"] = name
    return _with_tails({name: LayerPlan(**plan) for name, plan in plans.items()}, modules, calls)


def plan_tails(network: nn.Module, plans: Mapping[str, LayerPlan]) -> dict[str, LayerPlan]:
    """``plans`` with ``expand_after`` / ``linear`` found by tracing ``network`` (not gated yet): for plans
    stored before those fields existed. Raises ValueError when the network cannot be traced."""
    gm = _trace(network)
    return _with_tails(plans, dict(gm.named_modules()), _module_calls(gm))


def _module_calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Module FQN -> the graph nodes calling it."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def _with_tails(
    plans: Mapping[str, LayerPlan], modules: Mapping[str, nn.Module], calls: Mapping[str, list[fx.Node]]
) -> dict[str, LayerPlan]:
    """``plans`` where each conv read by no gated conv gets its :func:`_tail` (the others are unchanged)."""
    sources = {plan.source for plan in plans.values()}
    out = dict(plans)
    for name, plan in plans.items():
        gate = calls.get(plan.norm or name, [])
        if name in sources or len(gate) != 1 or name not in modules:
            continue
        expand_after, linear = _tail(gate[0], modules, calls, modules[name].out_channels)
        out[name] = replace(plan, expand_after=expand_after, linear=linear)
    return out


def _tail(
    start: fx.Node, modules: Mapping[str, nn.Module], calls: Mapping[str, list[fx.Node]], channels: int
) -> tuple[str | None, str | None]:
    """Where a gate point's compact output can go before it must be full width: ``(expand_after, None)``
    with the last module called once on the chain of single-use zero-preserving ops after ``start`` (None
    when there is none), or ``(None, linear)`` when the chain ends in ``flatten(1)`` and an ``nn.Linear``."""
    node, last = start, None
    while len(node.users) == 1:
        (user,) = node.users
        if not _is_zero_preserving(user, modules):
            linear = _flatten_linear(user, modules, calls, channels)
            return (None, linear) if linear is not None else (last, None)
        if user.op == "call_module" and len(calls.get(user.target, [])) == 1:
            last = user.target  # a hook on a module called more than once would fire at its other calls
        node = user
    return last, None


def _flatten_linear(
    node: fx.Node, modules: Mapping[str, nn.Module], calls: Mapping[str, list[fx.Node]], channels: int
) -> str | None:
    """The ``nn.Linear`` (called once) that is the only user of ``node`` when ``node`` is ``flatten(x, 1)``
    (function, method or ``nn.Flatten``) and the Linear's inputs are whole channels; else None."""
    if not (_single_tensor_arg(node) and _is_flatten_1(node, modules) and len(node.users) == 1):
        return None
    (user,) = node.users
    if user.op != "call_module" or len(calls.get(user.target, [])) != 1 or not _single_tensor_arg(user):
        return None
    linear = modules[user.target]
    if type(linear) is not nn.Linear or linear.in_features % channels:
        return None
    return user.target


def _is_flatten_1(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """``flatten(x, 1)`` / ``x.flatten(1)`` / ``nn.Flatten()``: [B, C, H, W] -> [B, C * H * W]."""
    if node.op == "call_module":
        module = modules[node.target]
        return type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1)
    is_flatten = (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    )
    if not is_flatten:
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return (start, end) == (1, -1)


def _compact_consumers(
    start: fx.Node, targets: set[str], modules: Mapping[str, nn.Module]
) -> list[str] | None:
    """Gated convs reached from ``start`` only through zero-preserving per-channel ops, or None when any
    other use of the tensor exists (it must then be expanded to full width)."""
    consumers: list[str] = []
    stack = [start]
    while stack:
        node = stack.pop()
        for user in node.users:
            if user.op == "call_module" and user.target in targets and _single_tensor_arg(user):
                if user.args[0] is not node:
                    return None
                consumers.append(user.target)
            elif _is_zero_preserving(user, modules) and user.args[0] is node:
                stack.append(user)
            else:
                return None
    return consumers or None


# ------------------------------------------------------------------------------------ swapping and access


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def apply_fbs(
    network: nn.Module,
    plans: Mapping[str, LayerPlan | Mapping[str, Any]],
    *,
    generator: torch.Generator | None = None,
) -> dict[str, FBSConv2d]:
    """Swap the planned convs (and their BatchNorms) for FBS layers in place; returns name -> layer.

    ``plans`` maps conv FQNs to :class:`LayerPlan` (or its dict form, as on zoo cards). Predictors are
    created on the conv's device, initialised from ``generator`` (seed it for identical runs). A plan's
    ``linear`` is swapped for an :class:`FBSLinear` (same parameters); its ``expand_after`` module gets a
    forward hook that scatters the compact output back to full width.
    """
    plans = {n: p if isinstance(p, LayerPlan) else LayerPlan.from_dict(p, n) for n, p in plans.items()}
    if not plans:
        raise ValueError("FBS plan is empty: nothing to gate")
    modules = dict(network.named_modules())
    sources = {p.source for p in plans.values() if p.source is not None}
    _check_plans(plans, modules, sources)
    layers: dict[str, FBSConv2d] = {}
    for name, plan in plans.items():
        layer = FBSConv2d.from_conv(
            modules[name], name=name, density=plan.density, boost=plan.boost, generator=generator
        )
        layer.fbs_state.expand = name not in sources and plan.expand_after is None and plan.linear is None
        layer.fbs_norm = plan.norm
        _replace(network, name, layer)
        layers[name] = layer
        if plan.norm is not None:
            bn = modules[plan.norm]
            if getattr(bn, "num_features", None) != layer.out_channels:
                raise ValueError(
                    f"FBS plan: norm {plan.norm!r} of {name!r} has {getattr(bn, 'num_features', '?')} "
                    f"features, the conv {layer.out_channels} output channels"
                )
            _replace(network, plan.norm, FBSBatchNorm2d.from_bn(bn, layer.fbs_state, plan.norm))
    for name, plan in plans.items():
        layer = layers[name]
        if plan.source is not None:
            source = layers[plan.source]
            if source.out_channels != layer.in_channels:
                raise ValueError(
                    f"FBS plan: {name!r} ({layer.in_channels} input channels) cannot read the compact "
                    f"output of {plan.source!r} ({source.out_channels} channels)"
                )
            layer.fbs_source_name = plan.source
            layer.fbs_source = source.fbs_state
        _apply_tail(network, modules, name, layer, plan)
    return layers


def _check_plans(plans: Mapping[str, LayerPlan], modules: Mapping[str, nn.Module], sources: set[str]) -> None:
    """ValueError for a plan naming a module the network lacks or an impossible combination."""
    for name, plan in plans.items():
        refs = (
            ("conv", name),
            ("norm", plan.norm),
            ("source", plan.source),
            ("expand_after", plan.expand_after),
            ("linear", plan.linear),
        )
        for what, ref in refs:
            if ref is not None and ref not in modules:
                raise ValueError(f"FBS plan names {what} {ref!r}, which the network does not have")
        if plan.source is not None and plan.source not in plans:
            raise ValueError(f"FBS plan: {name!r} reads the compact output of {plan.source!r}, not gated")
        _check_end(name, plan, plans, modules, sources)


def _check_end(
    name: str,
    plan: LayerPlan,
    plans: Mapping[str, LayerPlan],
    modules: Mapping[str, nn.Module],
    sources: set[str],
) -> None:
    """ValueError unless ``plan``'s compact output has at most one end, which no other plan uses."""
    ends = {ref for ref in (plan.expand_after, plan.linear) if ref is not None}
    if ends and (name in sources or len(ends) > 1):
        read = "is read by a gated conv" if name in sources else "is read by no gated conv"
        raise ValueError(
            f"FBS plan: {name!r} has expand_after {plan.expand_after!r}, linear {plan.linear!r} and "
            f"{read}; its compact output can go to only one of them"
        )
    for other, other_plan in plans.items():
        if other != name and ends & {other_plan.expand_after, other_plan.linear}:
            raise ValueError(f"FBS plan: {name!r} and {other!r} end their compact outputs at the same module")
    after = modules[plan.expand_after] if plan.expand_after is not None else None
    if after is not None and type(after) not in _ZERO_PRESERVING_MODULES:
        raise ValueError(
            f"FBS plan: {name!r} expands after {plan.expand_after!r}, a {type(after).__name__}, which is "
            "not a zero-preserving per-channel module"
        )


def _apply_tail(
    network: nn.Module, modules: Mapping[str, nn.Module], name: str, layer: FBSConv2d, plan: LayerPlan
) -> None:
    """Install where ``layer``'s compact output ends: the scatter hook, or the :class:`FBSLinear`."""
    layer.fbs_expand_after, layer.fbs_linear = plan.expand_after, plan.linear
    if plan.expand_after is not None:
        modules[plan.expand_after].register_forward_hook(_ScatterAfter(layer.fbs_state))
    if plan.linear is not None:
        try:
            reader = FBSLinear.from_linear(modules[plan.linear], layer.fbs_state, plan.linear, name)
        except TypeError as err:
            raise ValueError(f"FBS plan: {err}") from err
        _replace(network, plan.linear, reader)


def fbs_layers(network: nn.Module) -> dict[str, FBSConv2d]:
    """FQN -> every :class:`FBSConv2d` in ``network``, in module order."""
    return {n: m for n, m in network.named_modules() if isinstance(m, FBSConv2d)}


def layer_plans(network: nn.Module) -> dict[str, LayerPlan]:
    """The plan of every FBS layer of ``network`` as it is now (density included), for zoo cards."""
    return {
        n: LayerPlan(
            density=m.density,
            boost=m.boost,
            norm=m.fbs_norm,
            source=m.fbs_source_name,
            expand_after=m.fbs_expand_after,
            linear=m.fbs_linear,
        )
        for n, m in fbs_layers(network).items()
    }


def set_density(layers: Iterable[FBSConv2d] | nn.Module, density: float) -> None:
    """Set the density of every FBS layer (of a network, or an iterable of layers)."""
    density = check_density(density)
    for layer in fbs_layers(layers).values() if isinstance(layers, nn.Module) else layers:
        layer.density = density


def costly_gates(layers: Mapping[str, FBSConv2d], density: float) -> dict[str, tuple[int, int]]:
    """Gated convs whose saliency predictor costs at least what gating saves at ``density``:
    ``{name: (predictor MACs, MACs saved per image)}``. A conv on a 1x1 map (squeeze-excitation convs, heads
    of small inputs) does ``C_in * C_out * k^2`` MACs; its predictor does ``C_in * C_out`` whatever the map,
    so gating it adds work. Needs a forward first (the output size is recorded then)."""
    costly = {}
    for name, layer in layers.items():
        positions = layer.fbs_state.positions
        if positions is None:
            continue
        kernel = layer.kernel_size[0] * layer.kernel_size[1]
        dense = positions * kernel * layer.in_channels * layer.out_channels
        saved = dense - positions * kernel * layer.in_channels * kept_channels(density, layer.out_channels)
        predictor = layer.in_channels * layer.out_channels
        if predictor >= saved:
            costly[name] = (predictor, saved)
    return costly


def saliency_l1(layers: Iterable[FBSConv2d]) -> Tensor | None:
    """``sum_l mean_b sum_c g_l(x)[b, c]`` over the saliencies of the last training forward (the paper's
    L1 term before its lambda; the per-image sums are averaged over the batch like the task loss). The
    stored saliencies are cleared. None when no layer ran a training forward since the last call."""
    total: Tensor | None = None
    for layer in layers:
        saliency = layer.fbs_state.saliency
        layer.fbs_state.saliency = None
        if saliency is not None:
            term = saliency.sum(dim=1).mean()
            total = term if total is None else total + term
    return total


# ------------------------------------------------------------------------------------------ MAC statistics


@contextmanager
def recording(layers: Iterable[FBSConv2d]) -> Iterator[None]:
    """Within the block, FBS layers keep their per-image decision counts (``GateState.sample_macs``)."""
    layers = list(layers)
    previous = [layer.fbs_state.record for layer in layers]
    for layer in layers:
        layer.fbs_state.record = True
        layer.fbs_state.sample_macs = None
    try:
        yield
    finally:
        for layer, was in zip(layers, previous):
            layer.fbs_state.record = was


@dataclass(frozen=True)
class MacStatistics:
    """Per-image MACs over ``images`` images: mean, (population) std, min, max; ``dense`` is the network
    without gating (per image, FBS predictors excluded)."""

    mean: float
    std: float
    min: float
    max: float
    images: int
    dense: int

    @property
    def reduction(self) -> float:
        return self.dense / self.mean if self.mean else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "reduction": round(self.reduction, 4)}

    @classmethod
    def from_samples(cls, samples: Tensor, dense: int) -> MacStatistics:
        samples = samples.detach().to(torch.float64).flatten()
        if samples.numel() == 0:
            raise ValueError("MAC statistics need at least one image")
        return cls(
            mean=float(samples.mean()),
            std=float(samples.std(correction=0)),
            min=float(samples.min()),
            max=float(samples.max()),
            images=int(samples.numel()),
            dense=int(dense),
        )


def macs_per_image(network: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """Per-image MACs (``[B]`` float64) that batch-1 execution spends on each image of ``x``, from the
    decisions the FBS layers take, and the dense MACs per image of the ungated network.

    Non-FBS layers count as ``count_macs`` counts them (effective: nonzero weights); FBS layers count their
    computed output channels x the input channels they read (all, or their source's kept channels) x
    kernel x output positions, plus the predictor (input channels read x output channels).
    """
    from lit_compress.measure import count_macs

    layers = fbs_layers(network)
    if not layers:
        raise ValueError(
            f"{type(network).__name__} has no FBS layers; apply FBS first (apply_fbs / FBS callback)"
        )
    with recording(layers.values()):
        report = count_macs(network, x)
        per_layer = [layer.fbs_state.sample_macs for layer in layers.values()]
    if any(v is None for v in per_layer):
        raise RuntimeError("some FBS layers did not run in the forward pass; cannot count their MACs")
    static = sum(layer.effective for layer in report.layers if layer.name not in layers)
    # FBS layers report the full conv (no predictor) as their dense count.
    return torch.stack(per_layer).sum(dim=0) + float(static), round(report.dense)


def mac_statistics(
    network: nn.Module, batches: Iterable[Any], max_images: int | None = None
) -> MacStatistics:
    """:class:`MacStatistics` of :func:`macs_per_image` over ``batches`` (tensors, or ``(x, y)`` pairs,
    e.g. a DataLoader), at most ``max_images`` images."""
    samples: list[Tensor] = []
    dense = 0
    seen = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, Tensor):
            raise TypeError(f"batches must yield tensors or (x, y) pairs, got {type(batch).__name__}")
        if max_images is not None:
            x = x[: max_images - seen]
        if x.shape[0] == 0:
            break
        device = next((p.device for p in network.parameters()), torch.device("cpu"))
        values, dense = macs_per_image(network, x.to(device))
        samples.append(values.cpu())
        seen += x.shape[0]
        if max_images is not None and seen >= max_images:
            break
    if not samples:
        raise ValueError("mac_statistics got no images")
    return MacStatistics.from_samples(torch.cat(samples), dense)
