"""BlockDrop mechanism (Wu et al., "BlockDrop: Dynamic Inference Paths in Residual Networks", CVPR 2018).

A small policy network looks at the input and emits one keep/drop decision per residual block; a dropped
block is replaced by its shortcut path, so easy images run through fewer blocks. This module holds the
mechanism only (no Lightning):

- **Block discovery and shortcuts.** :func:`find_blocks` selects residual blocks by FQN glob and/or class name
  (default: every ``BasicBlock`` / ``Bottleneck`` with a known shortcut: lit_compress's CIFAR ResNets,
  torchvision and timm ResNets). :func:`block_shortcut` is what a dropped block computes: the identity, the
  zero-padding shortcut "A" or the 1x1-conv ``downsample`` / shortcut "B" where shapes change, without the
  block's final ReLU (as the official code does). Other block families plug in with
  :func:`register_shortcut`.
- **Gating.** :func:`gate_blocks` swaps each block's class for a subclass (``GatedBasicBlock`` ...) that reads
  its decision column from a shared :class:`GateState`; parameters, buffers and state_dict keys are untouched,
  ``isinstance`` checks still hold, and :func:`ungate_blocks` restores the original class. With no decisions
  set a gated block is the original block.
- **Two execution modes.** *Skip* (eval mode and autograd off, i.e. inference): the samples of a batch are
  grouped by their decision, the block runs on the kept subset only and the results are scattered back, so
  a dropped block's convolutions are never computed (batch 1: either the block or its shortcut runs).
  *Soft* (training, or whenever autograd is on): the block runs on the whole batch and
  ``torch.where(decision, block(x), shortcut(x))`` selects per sample. Every parameter takes part in the
  graph, which keeps DDP without ``find_unused_parameters`` working, and batch-norm statistics are those of
  the full batch, as in the official implementation's masked forward. ``GateState.train_skip`` forces skip
  mode in training too (faster; then DDP needs ``find_unused_parameters=True``).
- **Policy, reward and REINFORCE.** :class:`PolicyNet` (the paper's ResNet-8 "Policy32", or a cheaper 2-conv
  CNN), :func:`bound_probs` (the official code's exploration bound ``alpha``), :func:`blockdrop_reward`
  (``1 - (used / K)^2`` when correct, ``-gamma`` otherwise), :func:`reinforce_loss` (policy gradient with a
  given advantage, curriculum mask and entropy bonus) and :func:`learned_blocks` (the curriculum).
- **Inference and measurement.** :class:`BlockDropNetwork` is the exportable gated backbone + policy in one
  module (thresholded decisions); :func:`block_costs` gives the static MACs of every block and of its
  shortcut, from which :func:`gating_statistics` reports per-image MACs (mean +- std), the number of distinct
  policies, block usage and the histogram of blocks used. Gated blocks define ``compression_macs`` so that
  :func:`lit_compress.measure.count_macs` counts the decisions actually taken.

Deviations from the paper are listed where they occur (entropy bonus, curriculum mask on the entropy, loss
normalisation); the callback (:mod:`lit_compress.gating.blockdrop_callback`) documents the training side.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_BLOCK_TYPES: tuple[str, ...] = ("BasicBlock", "Bottleneck")
POLICY_ARCHS: tuple[str, ...] = ("resnet8", "cnn")

ShortcutFn = Callable[[nn.Module, Tensor], Tensor]
_SHORTCUTS: dict[type, ShortcutFn] = {}
_GATED_CLASSES: dict[type, type] = {}
_STATE_ATTR = "_blockdrop_state"
_INDEX_ATTR = "_blockdrop_index"
_BASE_ATTR = "_blockdrop_base"


# -- shortcuts -----------------------------------------------------------------------------------------


def register_shortcut(block_type: type, *, override: bool = False) -> Callable[[ShortcutFn], ShortcutFn]:
    """Decorator registering ``fn(block, x) -> shortcut output`` for a residual block class (and subclasses).

    The function must return what the block adds its residual branch to (the identity, or the projection
    where shapes change), with the block's output shape.
    """
    if not (isinstance(block_type, type) and issubclass(block_type, nn.Module)):
        raise TypeError(f"register_shortcut expects an nn.Module subclass, got {block_type!r}")

    def decorator(fn: ShortcutFn) -> ShortcutFn:
        if block_type in _SHORTCUTS and not override:
            raise ValueError(
                f"a shortcut is already registered for {block_type.__qualname__}; pass override=True to "
                "replace it"
            )
        _SHORTCUTS[block_type] = fn
        return fn

    return decorator


def _register_builtin_shortcuts() -> None:
    from lit_compress.models.resnet_cifar import BasicBlock

    if BasicBlock not in _SHORTCUTS:
        _SHORTCUTS[BasicBlock] = _cifar_shortcut


def _register_library_shortcuts(module_name: str) -> None:
    """torchvision / timm ResNet blocks: ``downsample(x)`` or ``x`` (imported only if such a block exists)."""
    import importlib

    for root, path in (("torchvision", "torchvision.models.resnet"), ("timm", "timm.models.resnet")):
        if not module_name.startswith(root):
            continue
        try:
            lib = importlib.import_module(path)
        except ImportError:  # pragma: no cover - the block came from there, so it imports
            continue
        for name in DEFAULT_BLOCK_TYPES:
            cls = getattr(lib, name, None)
            if isinstance(cls, type) and cls not in _SHORTCUTS:
                _SHORTCUTS[cls] = _downsample_shortcut


def _cifar_shortcut(block: nn.Module, x: Tensor) -> Tensor:
    if getattr(block, "pad", 0):  # option "A": subsample, zero-pad the new channels on both sides
        identity = x[:, :, :: block.stride, :: block.stride]
        return F.pad(identity, (0, 0, 0, 0, block.pad // 2, block.pad - block.pad // 2))
    return block.shortcut(x)


def _downsample_shortcut(block: nn.Module, x: Tensor) -> Tensor:
    downsample = getattr(block, "downsample", None)
    return x if downsample is None else downsample(x)


def shortcut_fn(block: nn.Module) -> ShortcutFn | None:
    """The shortcut function that applies to ``block`` (most specific registered class first), or None."""
    _register_builtin_shortcuts()
    base = block.__dict__.get(_BASE_ATTR, type(block))
    for klass in base.__mro__:
        if klass in _SHORTCUTS:
            return _SHORTCUTS[klass]
    _register_library_shortcuts(base.__module__)
    for klass in base.__mro__:
        if klass in _SHORTCUTS:
            return _SHORTCUTS[klass]
    return None


def block_shortcut(block: nn.Module, x: Tensor) -> Tensor:
    """What a dropped ``block`` computes for ``x``: its shortcut (identity / zero-pad / projection)."""
    fn = shortcut_fn(block)
    if fn is None:
        raise TypeError(
            f"no BlockDrop shortcut is known for {type(block).__qualname__}; register one with "
            "lit_compress.gating.register_shortcut(<block class>)"
        )
    return fn(block, x)


# -- discovery -----------------------------------------------------------------------------------------


def _class_names(module: nn.Module) -> set[str]:
    base = module.__dict__.get(_BASE_ATTR, type(module))
    return {klass.__name__ for klass in base.__mro__}


def find_blocks(
    net: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    types: Sequence[str] | None = None,
) -> list[str]:
    """FQNs (relative to ``net``) of the residual blocks to gate, in module registration order.

    A module is selected when its class (or a base class) is named in ``types`` (default ``BasicBlock`` and
    ``Bottleneck``), its FQN matches one of the ``include`` globs (default: any) and none of ``exclude``.
    Decisions are indexed in this order, which is the forward order of standard ResNets; the curriculum's
    "last blocks" are the last ones in it.

    Raises ValueError when nothing is selected (listing the types and globs it looked for and the model's
    module types), when an include/exclude glob matches no candidate block, when a selected block has no
    known shortcut, or when a selected block contains another one.
    """
    for name, value in (("include", include), ("exclude", exclude), ("types", types)):
        if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
            raise ValueError(f'{name} must be a list of strings, got {value!r}; e.g. {name}: ["layer3.*"]')
    wanted_types = tuple(types) if types is not None else DEFAULT_BLOCK_TYPES
    if not wanted_types:
        raise ValueError("types is empty; leave it unset for the default ('BasicBlock', 'Bottleneck')")
    candidates = {
        name: module
        for name, module in net.named_modules()
        if name and _class_names(module) & set(wanted_types)
    }
    if types is None:  # auto-discovery: only blocks whose shortcut we know
        candidates = {n: m for n, m in candidates.items() if shortcut_fn(m) is not None}
    if not candidates:
        found = sorted({type(m).__name__ for m in net.modules()})
        raise ValueError(
            f"BlockDrop found no residual block to gate: looked for modules of types {list(wanted_types)}"
            f"{' with a known shortcut' if types is None else ''} (include {list(include or ['*'])}); "
            f"the network's module types are {found}. BlockDrop needs a residual network; for your own block "
            "class pass types: [<ClassName>] and register its shortcut with "
            "lit_compress.gating.register_shortcut"
        )
    for kind, patterns in (("include", include or ()), ("exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in candidates):
                close = difflib.get_close_matches(pattern, list(candidates), n=4, cutoff=0.3)
                raise ValueError(
                    f"{kind} pattern {pattern!r} matches no residual block of types {list(wanted_types)}. "
                    f"Close names: {close or 'none'}; all candidates: {list(candidates)}"
                )
    selected = [
        n
        for n in candidates
        if (include is None or any(fnmatch.fnmatchcase(n, p) for p in include))
        and not any(fnmatch.fnmatchcase(n, p) for p in exclude)
    ]
    if not selected:
        raise ValueError(
            f"include {list(include or ['*'])} minus exclude {list(exclude)} selects no residual block; "
            f"candidates: {list(candidates)}"
        )
    for name in selected:
        module = net.get_submodule(name)
        if shortcut_fn(module) is None:
            raise ValueError(
                f"block {name!r} ({type(module).__qualname__}) has no known shortcut, so BlockDrop cannot "
                "drop it; register one with lit_compress.gating.register_shortcut(<block class>)"
            )
        inner = [o for o in selected if o != name and o.startswith(name + ".")]
        if inner:
            raise ValueError(
                f"selected blocks are nested: {inner} lie inside {name!r}; narrow include/types so that "
                "only the residual blocks themselves are selected"
            )
    return selected


# -- gating ---------------------------------------------------------------------------------------------


class GateState:
    """Decisions shared by the gated blocks of one network during one forward.

    ``decisions`` is a ``[B, K]`` bool tensor set for the duration of a forward (by the callback's hook or by
    :class:`BlockDropNetwork`), ``forced`` overrides it (used for the greedy baseline, the curriculum's
    forced blocks and MAC measurement), ``train_skip`` makes training forwards skip work too.
    """

    def __init__(self, num_blocks: int, train_skip: bool = False) -> None:
        self.num_blocks = num_blocks
        self.decisions: Tensor | None = None
        self.forced: Tensor | None = None
        self._row: list[bool] = []
        self._row_source: Tensor | None = None
        self.train_skip = train_skip

    def current(self) -> Tensor | None:
        return self.forced if self.forced is not None else self.decisions

    def single_row(self, decisions: Tensor) -> list[bool]:
        """``decisions[0]`` as Python bools, converted once per decisions tensor: at batch 1 every gated
        block reads its bit from this list instead of running tensor ops (index, cast, sum) of its own
        (8% of a ResNet-32's batch-1 latency). Decisions are new tensors per forward; one changed in place
        between forwards would not be seen, so assign a new tensor instead."""
        if self._row_source is not decisions:
            self._row, self._row_source = decisions[0].tolist(), decisions
        return self._row

    def __deepcopy__(self, memo: dict) -> GateState:  # a copied network gets a fresh, empty state
        return GateState(self.num_blocks, self.train_skip)


class GatedBlockMixin:
    """Forward of a gated residual block: the original block, its shortcut, or a per-sample mix of both."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        state: GateState | None = self.__dict__.get(_STATE_ATTR)
        decisions = state.current() if state is not None else None
        base = self.__dict__[_BASE_ATTR]
        if decisions is None:
            return base.forward(self, x)
        if decisions.dim() != 2 or decisions.shape[0] != x.shape[0]:
            raise RuntimeError(
                f"BlockDrop: decisions of shape {tuple(decisions.shape)} do not fit a batch of {x.shape[0]} "
                f"at block {self.__dict__[_INDEX_ATTR]}; the gated network must receive the whole batch the "
                "policy saw"
            )
        skip = (not self.training and not torch.is_grad_enabled()) or state.train_skip
        if skip and x.shape[0] == 1:
            if state.single_row(decisions)[self.__dict__[_INDEX_ATTR]]:
                return base.forward(self, x)
            return block_shortcut(self, x)
        keep = decisions[:, self.__dict__[_INDEX_ATTR]].bool()
        if skip:
            return _grouped_forward(self, base, x, keep)
        full = base.forward(self, x)  # always: every parameter takes part in the graph (DDP)
        if bool(keep.all()):
            return full
        short = block_shortcut(self, x)
        return torch.where(keep.view(-1, *([1] * (full.dim() - 1))), full, short)

    def compression_macs(self, inputs: tuple, output: Any) -> tuple[float, float]:
        """Batch (dense, effective) totals from this forward's decisions; drops cost the shortcut."""
        x = inputs[0]
        full_dense, full_eff, _, short_eff = static_block_macs(self, x[:1])
        state: GateState | None = self.__dict__.get(_STATE_ATTR)
        decisions = state.current() if state is not None else None
        batch = x.shape[0]
        if decisions is None:
            return batch * full_dense, batch * full_eff
        kept = int(decisions[:, self.__dict__[_INDEX_ATTR]].bool().sum())
        return batch * full_dense, kept * full_eff + (batch - kept) * short_eff


def _grouped_forward(block: nn.Module, base: type, x: Tensor, keep: Tensor) -> Tensor:
    kept = int(keep.sum())
    if kept == x.shape[0]:
        return base.forward(block, x)
    if kept == 0:
        return block_shortcut(block, x)
    idx_keep = keep.nonzero().squeeze(1)
    idx_drop = (~keep).nonzero().squeeze(1)
    outs = torch.cat(
        [base.forward(block, x.index_select(0, idx_keep)), block_shortcut(block, x.index_select(0, idx_drop))]
    )
    order = torch.argsort(torch.cat([idx_keep, idx_drop]))  # position of each original sample in `outs`
    return outs.index_select(0, order)


def gated_class(cls: type) -> type:
    """The gated subclass of ``cls`` (created once per class)."""
    if cls not in _GATED_CLASSES:
        _GATED_CLASSES[cls] = type(
            f"Gated{cls.__name__}",
            (GatedBlockMixin, cls),
            {"__module__": __name__, "__doc__": f"{cls.__name__} gated by BlockDrop (see GatedBlockMixin)."},
        )
    return _GATED_CLASSES[cls]


def is_gated(module: nn.Module) -> bool:
    return _BASE_ATTR in module.__dict__


def gate_blocks(net: nn.Module, fqns: Sequence[str], state: GateState) -> None:
    """Gate the blocks ``fqns`` of ``net`` (decision column ``i`` for ``fqns[i]``) with ``state``.

    Re-gating an already gated block re-points it to ``state``; the module objects, parameters and state_dict
    keys stay the same.
    """
    if len(fqns) != state.num_blocks:
        raise ValueError(f"{len(fqns)} blocks but a GateState for {state.num_blocks}")
    for index, name in enumerate(fqns):
        block = net.get_submodule(name)
        if shortcut_fn(block) is None:
            raise ValueError(f"block {name!r} ({type(block).__qualname__}) has no registered shortcut")
        base = block.__dict__.get(_BASE_ATTR, type(block))
        block.__dict__[_BASE_ATTR] = base
        block.__dict__[_INDEX_ATTR] = index
        block.__dict__[_STATE_ATTR] = state
        block.__class__ = gated_class(base)


def ungate_blocks(net: nn.Module, fqns: Iterable[str]) -> None:
    """Undo :func:`gate_blocks`: the blocks get their original class back (missing names are ignored)."""
    modules = dict(net.named_modules())
    for name in fqns:
        block = modules.get(name)
        if block is None or not is_gated(block):
            continue
        block.__class__ = block.__dict__.pop(_BASE_ATTR)
        block.__dict__.pop(_INDEX_ATTR, None)
        block.__dict__.pop(_STATE_ATTR, None)


# -- MAC costs -----------------------------------------------------------------------------------------


class _Subtree(nn.Module):
    """A block's children under a root whose forward is ``fn``: lets count_macs look inside a gated block."""

    def __init__(self, block: nn.Module, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self._fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self._fn(x)


def static_block_macs(block: nn.Module, example: Tensor) -> tuple[float, float, float, float]:
    """Per-example (full dense, full effective, shortcut dense, shortcut effective) MACs of ``block``."""
    from lit_compress.measure.macs import count_macs

    base = block.__dict__.get(_BASE_ATTR, type(block))
    full = count_macs(_Subtree(block, lambda t: base.forward(block, t)), example)
    short = count_macs(_Subtree(block, lambda t: block_shortcut(block, t)), example)
    return full.dense, full.effective, short.dense, short.effective


@dataclass(frozen=True)
class BlockCosts:
    """Static per-image MACs: outside the gated blocks (``base``), each block kept / dropped, the policy.

    Effective MACs count only nonzero weights (:mod:`lit_compress.measure.macs`); ``per_image`` uses them.
    """

    base_dense: float
    base_effective: float
    full_dense: tuple[float, ...]
    full_effective: tuple[float, ...]
    shortcut_dense: tuple[float, ...]
    shortcut_effective: tuple[float, ...]
    policy: float = 0.0

    @property
    def backbone_dense(self) -> float:
        """MACs of the static backbone (every block kept, no policy)."""
        return self.base_dense + sum(self.full_dense)

    def per_image(self, decisions: Tensor) -> Tensor:
        """Effective MACs of each image (``[N, K]`` decisions -> ``[N]`` float64), policy included."""
        d = decisions.bool().cpu()
        full = torch.tensor(self.full_effective, dtype=torch.float64)
        short = torch.tensor(self.shortcut_effective, dtype=torch.float64)
        return self.base_effective + self.policy + torch.where(d, full, short).sum(dim=1)


@torch.no_grad()
def block_costs(
    backbone: nn.Module, fqns: Sequence[str], example: Tensor, policy: nn.Module | None = None
) -> BlockCosts:
    """Measure :class:`BlockCosts` of a gated ``backbone`` on one example (``example[:1]`` is used).

    Runs :func:`~lit_compress.measure.count_macs` once with every block forced on, capturing each block's
    input, and measures every block kept and dropped on its own input; the policy network's MACs (when given)
    are measured on the same example.
    """
    from lit_compress.measure.macs import count_macs

    blocks = [backbone.get_submodule(n) for n in fqns]
    state: GateState | None = blocks[0].__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError(f"block {fqns[0]!r} is not gated; call gate_blocks first")
    x = example[:1]
    inputs: dict[int, Tensor] = {}

    def keep_input(index: int, module: nn.Module, args: tuple) -> None:
        inputs.setdefault(index, args[0])

    handles = [b.register_forward_pre_hook(functools.partial(keep_input, i)) for i, b in enumerate(blocks)]
    saved = state.forced
    try:
        state.forced = torch.ones((1, len(fqns)), dtype=torch.bool, device=x.device)
        total = count_macs(backbone, x)
    finally:
        state.forced = saved
        for handle in handles:
            handle.remove()
    missing = [fqns[i] for i in range(len(fqns)) if i not in inputs]
    if missing:
        raise RuntimeError(f"gated blocks {missing} did not run in the backbone's forward")
    statics = [static_block_macs(b, inputs[i]) for i, b in enumerate(blocks)]
    full_d, full_e, short_d, short_e = (tuple(float(s[k]) for s in statics) for k in range(4))
    policy_macs = float(count_macs(policy, x).effective) if policy is not None else 0.0
    return BlockCosts(
        base_dense=float(total.dense) - sum(full_d),
        base_effective=float(total.effective) - sum(full_e),
        full_dense=full_d,
        full_effective=full_e,
        shortcut_dense=short_d,
        shortcut_effective=short_e,
        policy=policy_macs,
    )


# -- policy network ------------------------------------------------------------------------------------


class PolicyNet(nn.Module):
    """Input image -> one logit per gated block (keep probability = sigmoid).

    ``arch="resnet8"`` is the paper's CIFAR policy (ResNet-8 features + a linear layer, the official
    ``Policy32``); ``arch="cnn"`` is two strided 3x3 conv-BN-ReLU layers, global average pooling and a linear
    layer, for backbones so small that a ResNet-8 would cost a large share of their MACs. ``downsample > 1``
    average-pools the input first (the paper's ImageNet policy sees a 2x downsampled image).
    The configuration is plain data (:meth:`config`) so the zoo can rebuild the policy.
    """

    def __init__(
        self, num_blocks: int, in_chans: int = 3, arch: str = "resnet8", width: int = 16, downsample: int = 1
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("num_blocks", num_blocks, 1),
            ("in_chans", in_chans, 1),
            ("width", width, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"policy {name} must be an int >= {low}, got {value!r}")
        if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
            raise ValueError(
                f"policy downsample must be an int >= 1 (1 = full resolution), got {downsample!r}"
            )
        if arch not in POLICY_ARCHS:
            raise ValueError(f"policy arch must be one of {POLICY_ARCHS}, got {arch!r}")
        self.num_blocks, self.in_chans, self.arch = num_blocks, in_chans, arch
        self.width, self.downsample = width, downsample
        if arch == "resnet8":
            from lit_compress.models.resnet_cifar import CifarResNet

            self.body: nn.Module = CifarResNet(
                depth=8, num_classes=num_blocks, in_chans=in_chans, width=width
            )
        else:
            self.body = nn.Sequential(
                nn.Conv2d(in_chans, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(2 * width),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(2 * width, num_blocks),
            )

    def forward(self, x: Tensor) -> Tensor:
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample)
        return self.body(x)

    @torch.no_grad()
    def shift_logits(self, delta: float) -> None:
        """Add ``delta`` to every output logit (through the last Linear's bias): a new keep threshold
        ``t`` is ``delta = -logit(t)``, with no change to the architecture or the state_dict's keys."""
        last = [m for m in self.modules() if isinstance(m, nn.Linear)][-1]
        if last.bias is None:
            raise ValueError("PolicyNet.shift_logits: the policy's last Linear has no bias to shift")
        last.bias.add_(delta)

    def config(self) -> dict[str, Any]:
        return {
            "num_blocks": self.num_blocks,
            "in_chans": self.in_chans,
            "arch": self.arch,
            "width": self.width,
            "downsample": self.downsample,
        }


# -- reward, policy gradient, curriculum --------------------------------------------------------------


def bound_probs(probs: Tensor, alpha: float) -> Tensor:
    """``alpha * p + (1 - alpha) * (1 - p)``: keeps sampling probabilities in ``[1 - alpha, alpha]``.

    The official BlockDrop code samples from these bounded probabilities (alpha = 0.8) so that exploration
    never stops; decisions at inference threshold the unbounded ``p`` at 0.5, which is the same test.
    """
    return probs * alpha + (1.0 - probs) * (1.0 - alpha)


def blockdrop_reward(logits: Tensor, targets: Tensor, policy: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Per-sample reward ``1 - (blocks used / K)^2`` when the prediction is right, ``-gamma`` when wrong.

    ``policy`` is the ``[B, K]`` 0/1 decision matrix actually executed (forced blocks included, as in the
    official code). Returns ``(reward [B] float32, correct [B] bool)``; no gradient flows through either.
    """
    with torch.no_grad():
        used = policy.float().sum(dim=1) / policy.shape[1]
        correct = logits.argmax(dim=1) == targets
        reward = torch.where(correct, 1.0 - used**2, torch.full_like(used, -float(gamma)))
    return reward, correct


def reinforce_loss(
    probs: Tensor,
    actions: Tensor,
    advantage: Tensor,
    mask: Tensor | None = None,
    entropy_weight: float = 0.0,
) -> Tensor:
    """Policy-gradient loss for independent Bernoulli decisions, averaged over the batch.

    ``loss = -1/B * sum_b sum_k m_k * (A_b * log pi(a_bk) + entropy_weight * H(p_bk))`` with
    ``log pi(a) = a log p + (1 - a) log(1 - p)`` and ``H`` the Bernoulli entropy. ``probs`` are the sampling
    probabilities (after :func:`bound_probs`), ``actions`` the sampled 0/1 decisions, ``advantage`` the
    per-sample ``reward(sample) - reward(greedy)`` (self-critical baseline), ``mask`` ``[K]`` or ``[B, K]``
    selects the blocks being learned (curriculum). A positive advantage makes gradient descent raise the
    probability of the action taken.

    Deviations from the official code: the entropy is the full Bernoulli entropy (not ``-p log p``) and is
    masked like the policy term; the fine-tuning stage is averaged over the batch too (the official
    ``finetune.py`` sums).
    """
    p = probs.float().clamp(1e-6, 1.0 - 1e-6)
    a = actions.float()
    log_pi = a * torch.log(p) + (1.0 - a) * torch.log1p(-p)
    terms = -log_pi * advantage.float().detach().view(-1, 1)
    if entropy_weight:
        entropy = -(p * torch.log(p) + (1.0 - p) * torch.log1p(-p))
        terms = terms - entropy_weight * entropy
    if mask is not None:
        terms = terms * mask.to(terms.dtype)
    return terms.sum() / probs.shape[0]


def learned_blocks(epoch: int, num_blocks: int, curriculum_epochs: int) -> int:
    """How many of the last blocks the policy decides in ``epoch`` (the rest are kept on).

    The official code learns one more block each epoch (``c = epoch + 1``); here the growth is spread over
    ``curriculum_epochs`` so that the last curriculum epoch learns all ``K`` blocks:
    ``c(e) = ceil((e + 1) * K / curriculum_epochs)`` (``= e + 1`` when ``curriculum_epochs = K``).
    """
    if curriculum_epochs <= 0 or epoch >= curriculum_epochs:
        return num_blocks
    return max(1, min(num_blocks, math.ceil((epoch + 1) * num_blocks / curriculum_epochs)))


def always_on_mask(num_blocks: int, learned: int, device: torch.device | None = None) -> Tensor:
    """``[K]`` bool: True for the first ``K - learned`` blocks, kept on while the curriculum runs."""
    mask = torch.zeros(num_blocks, dtype=torch.bool, device=device)
    mask[: num_blocks - learned] = True
    return mask


def greedy_decisions(probs: Tensor, always_on: Tensor | None = None) -> Tensor:
    """Deterministic decisions: keep a block when its probability is at least 0.5 (plus forced blocks)."""
    decisions = probs >= 0.5
    if always_on is not None:
        decisions = decisions | always_on.to(decisions.device)
    return decisions


# -- the exportable gated network ----------------------------------------------------------------------


class BlockDropNetwork(nn.Module):
    """A gated backbone and its policy in one module: ``forward(x)`` decides, then runs the chosen blocks.

    Decisions are always deterministic (probability >= 0.5, plus the ``always_on`` blocks of an unfinished
    curriculum); in eval mode without autograd the dropped blocks are skipped (grouped per block for
    batches), otherwise every block runs and the shortcut is selected per sample. ``last_decisions`` keeps the
    ``[B, K]`` decisions of the latest forward for statistics. Its state_dict holds ``backbone.*`` (the
    original network's keys) and ``policy.*``; :func:`lit_compress.gating.structure.blockdrop_structure`
    records what the zoo needs to rebuild it.
    """

    def __init__(
        self,
        backbone: nn.Module,
        policy: PolicyNet,
        blocks: Sequence[str],
        always_on: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if policy.num_blocks != len(blocks):
            raise ValueError(f"the policy decides {policy.num_blocks} blocks but {len(blocks)} are gated")
        bad = [i for i in always_on if not (isinstance(i, int) and 0 <= i < len(blocks))]
        if bad:
            raise ValueError(
                f"always_on must hold block indices in [0, {len(blocks)}), got {list(always_on)}"
            )
        self.backbone = backbone
        self.policy = policy
        self.blocks = list(blocks)
        self.always_on = sorted(set(always_on))
        self.state = GateState(len(blocks))
        gate_blocks(backbone, self.blocks, self.state)
        self.last_decisions: Tensor | None = None

    def _always_on(self, device: torch.device) -> Tensor:
        mask = torch.zeros(len(self.blocks), dtype=torch.bool, device=device)
        mask[self.always_on] = True
        return mask

    def decide(self, x: Tensor) -> Tensor:
        """``[B, K]`` bool decisions for input ``x``."""
        return greedy_decisions(torch.sigmoid(self.policy(x)), self._always_on(x.device))

    def forward(self, x: Tensor) -> Tensor:
        decisions = self.state.forced if self.state.forced is not None else self.decide(x)
        self.last_decisions = decisions.detach()
        self.state.decisions = decisions
        try:
            return self.backbone(x)
        finally:
            self.state.decisions = None

    def costs(self, example: Tensor) -> BlockCosts:
        """Static MACs of every block kept / dropped and of the policy, measured on ``example[:1]``."""
        return block_costs(self.backbone, self.blocks, example, self.policy)


def _as_input(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(f"expected batches of tensors or (input, target) tuples, got {type(batch).__name__}")


def summarize_decisions(
    decisions: Tensor, costs: BlockCosts | None = None, blocks: Sequence[str] | None = None
) -> dict[str, Any]:
    """Plain statistics of ``[N, K]`` decisions: blocks used (mean, std), per-block usage, histogram of the
    number of blocks used, number of distinct policies, and with ``costs`` the per-image MACs (mean, std,
    min, max) beside the static backbone's."""
    d = decisions.bool().cpu()
    n, k = d.shape
    if n == 0:
        raise ValueError("no decisions to summarize (an empty evaluation set?)")
    used = d.sum(dim=1).double()
    names = list(blocks) if blocks is not None else [str(i) for i in range(k)]
    stats: dict[str, Any] = {
        "images": n,
        "blocks": k,
        "blocks_mean": round(float(used.mean()), 6),
        "blocks_std": round(float(used.std(unbiased=False)), 6),
        "block_usage": {name: round(float(u), 6) for name, u in zip(names, d.double().mean(dim=0))},
        "blocks_histogram": torch.bincount(d.sum(dim=1), minlength=k + 1).tolist(),
        "distinct_policies": int(torch.unique(d, dim=0).shape[0]),
    }
    if costs is not None:
        macs = costs.per_image(d)
        stats.update(
            {
                "macs_mean": round(float(macs.mean()), 1),
                "macs_std": round(float(macs.std(unbiased=False)), 1),
                "macs_min": round(float(macs.min()), 1),
                "macs_max": round(float(macs.max()), 1),
                "macs_backbone": round(costs.backbone_dense, 1),
                "macs_policy": round(costs.policy, 1),
                "mac_reduction": round(costs.backbone_dense / float(macs.mean()), 4),
            }
        )
    return stats


@torch.no_grad()
def gating_statistics(
    model: BlockDropNetwork, batches: Iterable[Any], max_batches: int | None = None
) -> dict:
    """Run ``model`` (eval mode) over ``batches`` and summarize its decisions, per-image MACs included.

    ``batches`` yields input tensors or ``(input, target, ...)`` tuples (a DataLoader). The result is plain
    data, ready for a zoo card's ``compression.gating`` field.
    """
    if not isinstance(model, BlockDropNetwork):
        raise TypeError(f"gating_statistics needs a BlockDropNetwork, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    collected: list[Tensor] = []
    example: Tensor | None = None
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            x = _as_input(batch).to(device)
            example = x[:1] if example is None else example
            model(x)
            collected.append(model.last_decisions.cpu())
        if example is None:
            raise ValueError("gating_statistics got no batches")
        costs = model.costs(example)
    finally:
        model.train(was_training)
    return summarize_decisions(torch.cat(collected), costs, model.blocks)
