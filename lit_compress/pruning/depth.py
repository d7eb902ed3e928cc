"""Residual blocks as removable units: find them, gate their branch (epsilon-ResNet), replace them.

A residual block computes ``act(F(x) + shortcut(x))``. When its residual branch ``F`` is switched off
(``F(x) = 0``) the block computes exactly ``act(shortcut(x))``, so it can be replaced by a
:class:`ResidualShortcut` holding the same shortcut module (same parameter names: the kept weights keep their
state_dict keys) and the same post-addition activation. This works whether the shortcut is the identity, our
CIFAR ResNet's zero-padding shortcut "A" (:class:`PadShortcut`) or a strided 1x1 conv + BN ("B", torchvision's
and timm's ``downsample``): a block whose shortcut changes the shape is replaced by that shortcut, so the
network keeps its shapes. The activation is applied out of place (an in-place ReLU on the block's input would
corrupt the previous layer's saved output during training).

Which modules are residual blocks, where their branch ends and what their shortcut is comes from a small
registry of adapters (:func:`register_residual_block`), keyed by class; lit_compress's CIFAR ``BasicBlock``,
timm's ``BasicBlock`` / ``Bottleneck`` and torchvision's ``BasicBlock`` / ``Bottleneck`` are registered by
name, without importing timm or torchvision.

epsilon-ResNet (Yu, Yu, Ramalingam, Yang, Zhu. "Learning Strict Identity Mappings in Deep Residual Networks",
CVPR 2018) multiplies ``F(x)`` by a sparsity-promoting gate built from four ReLUs that is 0 when every
response ``|F(x)|`` is at most ``epsilon`` and 1 otherwise (:func:`epsilon_gate`); blocks whose gate stays
closed are discarded. :class:`EpsilonGates` applies the gate through forward hooks (the network's modules and
state_dict keys are untouched) and records each block's largest response, which drives the removal.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GATE_SCOPES",
    "BlockAdapter",
    "EpsilonGates",
    "PadShortcut",
    "ResidualShortcut",
    "block_adapter",
    "branch_norm",
    "branch_parameters",
    "drop_from_optimizer",
    "epsilon_gate",
    "register_residual_block",
    "remove_blocks",
    "residual_blocks",
    "select_blocks",
    "shortcut_replacement",
    "stage_of",
]

GATE_SCOPES = ("batch", "sample", "off")


class PadShortcut(nn.Module):
    """The CIFAR ResNet's parameter-free shortcut "A": subsample by ``stride``, zero-pad ``pad`` channels.

    Exactly what :class:`lit_compress.models.resnet_cifar.BasicBlock` computes on its identity path when the
    shape changes (``pad // 2`` zero channels before, the rest after).
    """

    def __init__(self, stride: int, pad: int) -> None:
        super().__init__()
        self.stride, self.pad = int(stride), int(pad)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class ResidualShortcut(nn.Module):
    """A removed residual block: ``activation(shortcut(x))``, what the block computes when ``F(x) = 0``.

    The shortcut module is registered under the block's own attribute name (``shortcut``, ``downsample``), so
    its parameters keep their state_dict keys (``layer2.0.shortcut.0.weight``).
    """

    def __init__(self, shortcut: nn.Module, shortcut_attr: str, activation: nn.Module | None) -> None:
        super().__init__()
        if shortcut_attr in ("activation", "shortcut_attr") or not shortcut_attr.isidentifier():
            raise ValueError(
                f"shortcut_attr must be an identifier other than 'activation', got {shortcut_attr!r}"
            )
        self.shortcut_attr = shortcut_attr
        self.add_module(shortcut_attr, shortcut)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        out = getattr(self, self.shortcut_attr)(x)
        return out if self.activation is None else self.activation(out)


@dataclass(frozen=True)
class BlockAdapter:
    """How to read one residual block class.

    Attributes:
        branch_end: the block's submodule (dotted name) whose output is the residual branch ``F(x)``, or a
            function of the block returning it (timm: ``se`` when the block has one, else ``bn2``).
        shortcut_attr: the block's attribute holding the shortcut module (may be None on the block: identity).
        shortcut: optional function of the block returning the module computing the shortcut (our "A"
            shortcut is not a module on the block); default: ``getattr(block, shortcut_attr)`` or Identity.
        activation: the block's attribute holding the activation applied after the addition (None: none).
    """

    branch_end: str | Callable[[nn.Module], str]
    shortcut_attr: str
    shortcut: Callable[[nn.Module], nn.Module] | None = None
    activation: str | None = None

    def branch_end_name(self, block: nn.Module) -> str:
        return self.branch_end(block) if callable(self.branch_end) else self.branch_end

    def shortcut_module(self, block: nn.Module) -> nn.Module:
        if self.shortcut is not None:
            return self.shortcut(block)
        module = getattr(block, self.shortcut_attr, None)
        return nn.Identity() if module is None else module

    def activation_module(self, block: nn.Module) -> nn.Module | None:
        if self.activation is None:
            return None
        act = getattr(block, self.activation)
        act = copy.deepcopy(act)
        if hasattr(act, "inplace"):
            act.inplace = False  # the block's input may be needed by autograd: never modify it in place
        return act


_ADAPTERS: dict[str, BlockAdapter] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_residual_block(
    cls: type[nn.Module] | str,
    *,
    branch_end: str | Callable[[nn.Module], str],
    shortcut_attr: str,
    shortcut: Callable[[nn.Module], nn.Module] | None = None,
    activation: str | None = None,
) -> BlockAdapter:
    """Declare a residual block class (or its qualified name ``"pkg.module.Class"``) for depth pruning.

    See :class:`BlockAdapter` for the arguments. Subclasses of a registered class are found too.
    """
    name = cls if isinstance(cls, str) else _qualname(cls)
    if not isinstance(name, str) or "." not in name:
        raise TypeError(
            f"register_residual_block needs a module class or its qualified name 'package.module.Class', "
            f"got {cls!r}"
        )
    adapter = BlockAdapter(branch_end, shortcut_attr, shortcut, activation)
    _ADAPTERS[name] = adapter
    return adapter


def block_adapter(module: nn.Module) -> BlockAdapter | None:
    """The adapter of ``module``'s class (or of its nearest registered base class), or None."""
    for cls in type(module).__mro__:
        adapter = _ADAPTERS.get(_qualname(cls))
        if adapter is not None:
            return adapter
    return None


def _cifar_shortcut(block: nn.Module) -> nn.Module:
    return PadShortcut(block.stride, block.pad) if block.pad else block.shortcut


register_residual_block(
    "lit_compress.models.resnet_cifar.BasicBlock",
    branch_end="bn2",
    shortcut_attr="shortcut",
    shortcut=_cifar_shortcut,
    activation="relu",
)
register_residual_block(
    "timm.models.resnet.BasicBlock",
    branch_end=lambda b: "se" if getattr(b, "se", None) is not None else "bn2",
    shortcut_attr="downsample",
    activation="act2",
)
register_residual_block(
    "timm.models.resnet.Bottleneck",
    branch_end=lambda b: "se" if getattr(b, "se", None) is not None else "bn3",
    shortcut_attr="downsample",
    activation="act3",
)
register_residual_block(
    "torchvision.models.resnet.BasicBlock", branch_end="bn2", shortcut_attr="downsample", activation="relu"
)
register_residual_block(
    "torchvision.models.resnet.Bottleneck", branch_end="bn3", shortcut_attr="downsample", activation="relu"
)


def residual_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """FQN -> module of every registered residual block of ``model``, in module order (outermost only)."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(outer + ".") for outer in found):
            continue
        if block_adapter(module) is not None:
            found[name] = module
    return found


def stage_of(block_fqn: str) -> str:
    """The stage a block belongs to: its parent module's FQN (``"layer2"`` for ``"layer2.1"``)."""
    return block_fqn.rpartition(".")[0]


def select_blocks(
    blocks: Sequence[str], include: Sequence[str] = ("*",), exclude: Sequence[str] = (), prefix: str = ""
) -> list[str]:
    """The block FQNs matched by ``include`` minus ``exclude`` (fnmatch globs, with or without ``prefix``).

    A glob that matches no block raises a ValueError listing the blocks.
    """

    def matches(name: str, pattern: str) -> bool:
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(prefix + name, pattern)

    if not blocks:
        raise ValueError(
            "the network has no residual block that depth pruning knows (registered: "
            f"{sorted(_ADAPTERS)}); declare yours with lit_compress.pruning.depth.register_residual_block"
        )
    for kind, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(matches(b, pattern) for b in blocks):
                close = difflib.get_close_matches(pattern.removeprefix(prefix), list(blocks), n=4, cutoff=0.3)
                raise ValueError(
                    f"{kind} pattern {pattern!r} matches no residual block. Close names: {close or 'none'}; "
                    f"the blocks are: {list(blocks)}"
                )
    chosen = [
        b for b in blocks if any(matches(b, p) for p in include) and not any(matches(b, p) for p in exclude)
    ]
    if not chosen:
        raise ValueError(f"include {list(include)} minus exclude {list(exclude)} selects no residual block")
    return chosen


def shortcut_replacement(block: nn.Module) -> ResidualShortcut:
    """The :class:`ResidualShortcut` computing what ``block`` computes with its residual branch at zero.

    It shares the block's shortcut module (its parameters are the same objects: optimizer state carries over).
    """
    adapter = block_adapter(block)
    if adapter is None:
        raise TypeError(
            f"{type(block).__name__} is not a registered residual block; declare it with "
            "lit_compress.pruning.depth.register_residual_block"
        )
    return ResidualShortcut(
        adapter.shortcut_module(block), adapter.shortcut_attr, adapter.activation_module(block)
    )


def remove_blocks(model: nn.Module, fqns: Iterable[str]) -> dict[str, nn.Parameter]:
    """Replace each named residual block of ``model`` by its shortcut, in place.

    Returns the parameters that left the model (the residual branches'), by their former FQN. Raises
    ValueError for a name that is not a registered residual block of ``model`` (nothing is changed then).
    """
    fqns = list(dict.fromkeys(fqns))
    blocks = residual_blocks(model)
    missing = [f for f in fqns if f not in blocks]
    if missing:
        raise ValueError(
            f"cannot remove {missing}: not residual blocks of {type(model).__name__} (blocks: {list(blocks)})"
        )
    before = dict(model.named_parameters())
    for fqn in fqns:
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, shortcut_replacement(blocks[fqn]))
    after = {id(p) for p in model.parameters()}
    return {name: p for name, p in before.items() if id(p) not in after}


def drop_from_optimizer(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> int:
    """Remove ``params`` (and their state) from ``optimizer``'s param groups; returns how many were dropped.

    The other parameters are the same objects as before, so their momentum / Adam moments carry over, and an
    LR scheduler bound to ``optimizer`` keeps working.
    """
    inner = getattr(optimizer, "optimizer", None)  # LightningOptimizer wraps the torch optimizer
    if not isinstance(optimizer, torch.optim.Optimizer) and isinstance(inner, torch.optim.Optimizer):
        optimizer = inner
    gone = {id(p) for p in params}
    dropped = 0
    for group in optimizer.param_groups:
        kept = [p for p in group["params"] if id(p) not in gone]
        dropped += len(group["params"]) - len(kept)
        group["params"] = kept
    for p in [p for p in optimizer.state if id(p) in gone]:
        del optimizer.state[p]
    return dropped


def branch_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``block``'s residual branch (every parameter not under its shortcut attribute)."""
    adapter = block_adapter(block)
    if adapter is None:
        raise TypeError(f"{type(block).__name__} is not a registered residual block")
    shortcut = getattr(block, adapter.shortcut_attr, None)
    skip = {id(p) for p in shortcut.parameters()} if isinstance(shortcut, nn.Module) else set()
    return [p for p in block.parameters() if id(p) not in skip]


@torch.no_grad()
def branch_norm(block: nn.Module) -> float:
    """``||theta_b||_2`` over the residual branch's parameters (SSL's depth-wise group norm)."""
    params = branch_parameters(block)
    return float(torch.sqrt(sum(p.detach().float().square().sum() for p in params))) if params else 0.0


def epsilon_gate(
    response: Tensor, epsilon: float, per_sample: bool = False, big: float = 1e6
) -> tuple[Tensor, Tensor]:
    """epsilon-ResNet's sparsity-promoting gate ``S`` on a residual branch output ``F(x)``.

    With ``m = max |F(x)|`` (over the whole batch, or per sample when ``per_sample``) and
    ``s = ReLU(m - eps)`` (equal to the paper's ``max(ReLU(F - eps) + ReLU(-F - eps))``), the gate is
    ``w = ReLU(1 - big * ReLU(1 - big * s))``: exactly 0 when every response is at most ``epsilon``, exactly 1
    when one exceeds it by at least ``1 / big``. The block then adds ``w * F(x)``. Returns ``(w, m)`` with the
    batch dimension kept for ``per_sample`` (shape ``[N, 1, ...]``), scalars otherwise, both without autograd
    history: the gate's derivative is 0 almost everywhere, so ``F`` receives the gradient ``w * dL/dout``.
    """
    r = response.detach()
    if per_sample and r.ndim >= 2:
        m = r.abs().amax(dim=tuple(range(1, r.ndim)), keepdim=True)
    else:
        m = r.abs().amax()
    s = torch.relu(m - epsilon)
    return torch.relu(1.0 - big * torch.relu(1.0 - big * s)), m


class EpsilonGates:
    """Forward hooks that gate residual branches and record their largest response.

    ``scope``: ``"batch"`` (the paper: one gate per batch, so a branch passes for every sample or none),
    ``"sample"`` (one gate per sample: an image's output does not depend on its batch mates), or ``"off"``
    (record only; removal then acts on the recorded maximum alone). Blocks in ``exempt`` are recorded but not
    gated. ``window[fqn]`` is the largest ``|F(x)|`` over the *training-mode* forward passes since
    :meth:`reset` (a 0-dim tensor on the network's device, no host sync per step).
    """

    def __init__(self, epsilon: float, scope: str = "batch") -> None:
        if scope not in GATE_SCOPES:
            raise ValueError(f"gate must be one of {GATE_SCOPES}, got {scope!r}")
        self.epsilon = float(epsilon)
        self.scope = scope
        self.window: dict[str, Tensor] = {}
        self.exempt: set[str] = set()
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}

    @property
    def hook_ids(self) -> set[int]:
        return {h.id for h in self._handles.values()}

    def attach(self, blocks: Mapping[str, nn.Module]) -> None:
        """Hook the branch end of every block of ``blocks`` (FQN -> block) not hooked yet."""
        for fqn, block in blocks.items():
            if fqn in self._handles:
                continue
            adapter = block_adapter(block)
            if adapter is None:
                raise TypeError(f"{fqn!r} ({type(block).__name__}) is not a registered residual block")
            end = block.get_submodule(adapter.branch_end_name(block))
            self._handles[fqn] = end.register_forward_hook(self._hook(fqn))

    def detach(self, fqns: Iterable[str] | None = None) -> None:
        """Remove the hooks of ``fqns`` (all when None)."""
        for fqn in list(self._handles) if fqns is None else list(fqns):
            handle = self._handles.pop(fqn, None)
            if handle is not None:
                handle.remove()
            self.window.pop(fqn, None)

    def reset(self) -> None:
        self.window = {}

    def _hook(self, fqn: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            if not isinstance(output, Tensor):
                return None
            gate, m = epsilon_gate(output, self.epsilon, per_sample=self.scope == "sample")
            if module.training:
                peak = m.max()
                old = self.window.get(fqn)
                self.window[fqn] = peak if old is None else torch.maximum(old, peak)
            if self.scope == "off" or fqn in self.exempt:
                return None
            return output * gate.to(output.dtype)

        return hook

    def strip_copy(self, model: nn.Module) -> None:
        """Remove this object's hooks from a deep copy of the hooked network (copies keep the hook dicts)."""
        ids = self.hook_ids
        for module in model.modules():
            for hid in ids:
                module._forward_hooks.pop(hid, None)
