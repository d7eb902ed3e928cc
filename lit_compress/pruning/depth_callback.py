"""``DepthPruning``: remove whole residual blocks of a ResNet during training (epsilon-ResNet or SSL depth).

Two criteria decide which blocks go:

- ``"epsilon"`` (Yu et al. 2018, epsilon-ResNet): every targeted block's residual branch ``F(x)`` is
  multiplied by the sparsity-promoting gate of :func:`~lit_compress.pruning.depth.epsilon_gate` (0 when all
  responses ``|F(x)|`` are at most ``epsilon``, else 1) through forward hooks, in training and evaluation.
  The callback records each block's largest training response since the last removal event; at an event a
  block whose largest response stayed at or below ``epsilon`` (its gate was closed on every batch, so it
  contributed nothing) is removed. Removal is exact: a closed block computes ``act(shortcut(x))``, which is
  what replaces it.
- ``"ssl"`` (Wen et al. 2016, depth-wise group lasso): the ``group_lasso`` penalty of
  :mod:`lit_compress.pruning.structured.penalties` on each targeted block's whole residual branch
  (``depth_branches``, shortcut excluded) pushes branches to zero; at an event a block whose branch L2 norm is
  at or below ``threshold`` is removed. This is approximate (a small branch is not exactly zero).

**Events** are optimizer steps (``trainer.global_step``): every ``remove_every`` steps, at the listed
``remove_steps``, and (``remove_at_end``) once more when training ends. Removed blocks are replaced in place
by :class:`~lit_compress.pruning.depth.ResidualShortcut` (the shortcut keeps its parameter names), their
branch parameters leave the optimizers (the others keep their momentum / Adam state) and a DDP wrapper is
rebuilt.

**A minimum is kept**: each stage (the parent module of the blocks, e.g. ``layer2``) keeps at least
``min_blocks_per_stage`` residual blocks, and the network always keeps at least one. When the criterion would
remove more, the blocks with the largest statistic are kept, a warning says so, and their gate is disabled
from then on (a block kept with a closed gate would get no gradient and could never recover).

**DDP**: the recorded responses are reduced with ``max`` across ranks before deciding, branch norms come from
the synchronised weights, so every rank removes the same blocks. The gate itself is evaluated on each rank's
own batch, as in single-device training.

**Resume**: ``state_dict`` holds the removed and exempt blocks, the window maxima, the last event step and the
history. As for :class:`~lit_compress.pruning.structured.StructuredPruning`, ``setup`` wraps the
LightningModule's ``on_load_checkpoint`` so that a checkpoint taken after a removal is loaded into a network
from which the same blocks were removed first (``trainer.fit/validate/test(ckpt_path=...)`` on a fresh
module). :meth:`DepthPruning.export` and :meth:`DepthPruning.compression_summary` give ``ZooExport`` the
smaller network and its ``"depth"`` structure spec.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
from torch import nn

from lit_compress._flavour import lightning_callback
from lit_compress._strategy import spawns_workers
from lit_compress.pruning.depth import (
    GATE_SCOPES,
    EpsilonGates,
    ResidualShortcut,
    block_adapter,
    branch_norm,
    drop_from_optimizer,
    remove_blocks,
    residual_blocks,
    select_blocks,
    stage_of,
)
from lit_compress.targets import network_of

__all__ = ["CRITERIA", "DepthPruning"]

CRITERIA = ("epsilon", "ssl")


@lightning_callback
class DepthPruning:
    """Remove residual blocks whose branch is switched off (epsilon-ResNet) or shrunk to zero (SSL depth).

    Args:
        criterion: ``"epsilon"`` (epsilon-ResNet gate and response rule) or ``"ssl"`` (group lasso on whole
            residual branches, branch-norm rule).
        epsilon: ``"epsilon"``: the gate threshold on ``|F(x)|`` (the paper uses 2.0 to 2.5 on CIFAR, for
            BatchNorm'd branch outputs). Must be > 0.
        gate: ``"epsilon"``: ``"batch"`` (the paper: one gate per batch), ``"sample"`` (one gate per sample,
            so an image's output does not depend on its batch mates) or ``"off"`` (no gating: blocks are only
            removed when their largest response stays at or below ``epsilon``; removal is then approximate).
        penalty_weight: ``"ssl"``: the group lasso's ``lambda``.
        threshold: ``"ssl"``: a block whose residual branch L2 norm is at or below this is removed.
        remove_every: removal event every this many optimizer steps (None: none).
        remove_steps: removal events at these optimizer steps.
        remove_at_end: a last removal event when training ends (``on_train_end``).
        min_blocks_per_stage: blocks each stage keeps at least (>= 0); the network always keeps one block.
        include, exclude: FQN globs on the residual blocks (e.g. ``["layer3.*"]``), matched with and without
            the ``model_attr`` prefix; a glob that matches no block is an error listing the blocks.
        model_attr: attribute of the LightningModule holding the network (None: the module itself).
        verbose: print a line per removal event (rank zero).
    """

    def __init__(
        self,
        criterion: str = "epsilon",
        epsilon: float = 2.0,
        gate: str = "batch",
        penalty_weight: float = 1e-4,
        threshold: float = 1e-2,
        remove_every: int | None = None,
        remove_steps: list[int] | None = None,
        remove_at_end: bool = True,
        min_blocks_per_stage: int = 1,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        model_attr: str | None = "net",
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if criterion not in CRITERIA:
            raise ValueError(
                f"criterion must be one of {CRITERIA} ('epsilon': epsilon-ResNet gate; 'ssl': depth-wise "
                f"group lasso), got {criterion!r}"
            )
        _positive_number("epsilon", epsilon)
        _positive_number("threshold", threshold)
        if (
            isinstance(penalty_weight, bool)
            or not isinstance(penalty_weight, (int, float))
            or not (0 <= penalty_weight < math.inf)
        ):
            raise ValueError(f"penalty_weight must be a finite number >= 0, got {penalty_weight!r}")
        if gate not in GATE_SCOPES:
            raise ValueError(f"gate must be one of {GATE_SCOPES}, got {gate!r}")
        if remove_every is not None and (
            isinstance(remove_every, bool) or not isinstance(remove_every, int) or remove_every < 1
        ):
            raise ValueError(
                f"remove_every must be a positive number of optimizer steps or null, got {remove_every!r}"
            )
        if remove_steps is not None and (
            isinstance(remove_steps, (str, bytes))
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in remove_steps)
        ):
            raise ValueError(
                f"remove_steps must be a list of optimizer steps (ints >= 0), got {remove_steps!r}"
            )
        if not isinstance(remove_at_end, bool):
            raise ValueError(f"remove_at_end must be true or false, got {remove_at_end!r}")
        if remove_every is None and not remove_steps and not remove_at_end:
            raise ValueError(
                "no removal event is configured: set remove_every, remove_steps or remove_at_end=true"
            )
        if (
            isinstance(min_blocks_per_stage, bool)
            or not isinstance(min_blocks_per_stage, int)
            or min_blocks_per_stage < 0
        ):
            raise ValueError(f"min_blocks_per_stage must be an int >= 0, got {min_blocks_per_stage!r}")
        for arg, value in (("include", include), ("exclude", exclude)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ValueError(
                    f'{arg} must be a list of glob strings, got {value!r}; e.g. {arg}: ["layer3.*"]'
                )
        if include is not None and not include:
            raise ValueError("include is empty: no block would be targeted; use ['*'] for every block")
        if model_attr is not None and (not isinstance(model_attr, str) or not model_attr):
            raise ValueError(
                f"model_attr must be an attribute name such as 'net', or null; got {model_attr!r}"
            )
        self.criterion = criterion
        self.epsilon = float(epsilon)
        self.gate = gate
        self.penalty_weight = float(penalty_weight)
        self.threshold = float(threshold)
        self.remove_every = remove_every
        self.remove_steps = sorted(set(remove_steps or []))
        self.remove_at_end = remove_at_end
        self.min_blocks_per_stage = min_blocks_per_stage
        self.include = list(include or ["*"])
        self.exclude = list(exclude or [])
        self.model_attr = model_attr
        self.verbose = verbose
        # State (state_dict).
        self.removed: list[str] = []
        self.exempt: list[str] = []
        self.last_event_step = -1
        self.window_batches = 0
        self.history: list[dict[str, Any]] = []
        self._restored_window: dict[str, float] = {}
        # Runtime.
        self._module: nn.Module | None = None
        self._net: nn.Module | None = None
        self._targets: list[str] = []
        self._reference: nn.Module | None = None
        self._gates: EpsilonGates | None = None
        self._penalty: Any = None
        self._patched: tuple[nn.Module, bool, Any] | None = None

    # -- Lightning hooks -------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            criterion=self.criterion, include=self.include, exclude=self.exclude, model_attr=self.model_attr
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer is not None and spawns_workers(trainer):
            raise ValueError(
                "DepthPruning removes residual blocks inside the worker processes, but with a spawning "
                "strategy (ddp_spawn, ddp_fork, ddp_notebook) Lightning copies the final weights back into "
                "the main process's module, which keeps all its blocks. Use strategy='ddp' (one process per "
                "device, launched as scripts or by torchrun)."
            )
        self._module = pl_module
        net = self._network(pl_module)
        if net is not self._net:
            self._detach()
            self._net = net
            if not any(isinstance(m, ResidualShortcut) for m in net.modules()):
                self._reference = copy.deepcopy(net).to("meta")
        blocks = residual_blocks(net)
        names = [*blocks, *(r for r in self.removed if r not in blocks)]
        self._targets = select_blocks(names, self.include, self.exclude, self._prefix)
        self._attach()
        self._patch_on_load_checkpoint(pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._detach()
        if self._patched is not None:
            module, had_own, original = self._patched
            if had_own:
                module.on_load_checkpoint = original
            else:
                del module.on_load_checkpoint
            self._patched = None

    def on_fit_start(self, trainer, pl_module) -> None:
        pending = [b for b in self.removed if b in residual_blocks(self._net)]
        if pending:
            raise RuntimeError(
                f"DepthPruning restored a state in which blocks {pending} were removed, but the network "
                "still has them. Resume through trainer.fit(..., ckpt_path=...) with this callback on the "
                "Trainer, or call lit_compress.pruning.depth.remove_blocks(net, state['removed']) before "
                "loading."
            )
        self._attach()  # the restored state may have changed which blocks are exempt or gone
        if self._gates is not None and self._restored_window:
            device = next(iter(self._net.parameters())).device
            self._gates.window = {
                k: torch.tensor(v, device=device)
                for k, v in self._restored_window.items()
                if k in self._alive()
            }
        self._restored_window = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step <= self.last_event_step:
            return  # already acted at this step (gradient accumulation calls this once per micro-batch)
        if self._is_event(step):
            self._event(trainer, step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.window_batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._penalty is not None:
            self._penalty.add_gradient()

    def on_train_end(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if self.remove_at_end and self.window_batches > 0 and step > self.last_event_step:
            self._event(trainer, step)

    def state_dict(self) -> dict[str, Any]:
        window = self._restored_window
        if self._gates is not None and self._gates.window:
            window = {k: float(v) for k, v in self._gates.window.items()}
        return {
            "removed": list(self.removed),
            "exempt": list(self.exempt),
            "last_event_step": self.last_event_step,
            "window_batches": self.window_batches,
            "window_max": dict(window),
            "history": list(self.history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.removed = [str(r) for r in state_dict["removed"]]
        self.exempt = [str(r) for r in state_dict.get("exempt", [])]
        self.last_event_step = int(state_dict["last_event_step"])
        self.window_batches = int(state_dict.get("window_batches", 0))
        self._restored_window = {str(k): float(v) for k, v in state_dict.get("window_max", {}).items()}
        self.history = list(state_dict.get("history", []))
        if self._gates is not None:
            self._gates.exempt = set(self.exempt)

    # -- export -----------------------------------------------------------------------------------------

    def export(self, pl_module: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        """A plain copy of the network (no gate hooks, eval mode, no gradients) and its ``"depth"`` spec.

        The removed blocks are already gone from the network; the kept ones lose their gate, which for an
        ``"epsilon"`` run changes nothing unless a kept block's responses all stay within ``epsilon``.
        """
        from lit_compress.pruning.depth_spec import depth_spec

        net = self._network(pl_module)
        plain = copy.deepcopy(net).eval()
        if self._gates is not None:
            self._gates.strip_copy(plain)
        for p in plain.parameters():
            p.requires_grad_(False)
        if self._reference is None:
            raise RuntimeError(
                "DepthPruning.export: the reference architecture is unknown (the network already had removed "
                "blocks when this callback first saw it); export from the run that pruned it."
            )
        return plain, depth_spec(plain, self._reference)

    def compression_summary(self) -> dict[str, Any]:
        """What this callback did, for zoo cards: ``methods``, ``description``, ``structure`` (the ``"depth"``
        spec, None when no block was removed) and ``network`` (from :meth:`export`; None before setup)."""
        total = len(self._targets) if self._targets else None
        if self.criterion == "epsilon":
            how = f"epsilon-ResNet depth pruning (epsilon={self.epsilon:g}, gate={self.gate})"
        else:
            how = (
                f"SSL depth-wise group lasso (lambda={self.penalty_weight:g}) with branch-norm threshold "
                f"{self.threshold:g}"
            )
        done = f"; {len(self.removed)}/{total} residual blocks removed" if total else ""
        removed = f" ({', '.join(self.removed)})" if self.removed else ""
        summary: dict[str, Any] = {
            "methods": [f"depth_pruning:{self.criterion}"],
            "description": how + done + removed,
            "structure": None,
            "network": None,
        }
        if self._module is not None:
            network, spec = self.export(self._module)
            summary["network"] = network
            summary["structure"] = spec if spec["removed"] or spec["inner"] else None
        return summary

    # -- mechanics --------------------------------------------------------------------------------------

    def _is_event(self, step: int) -> bool:
        if step in self.remove_steps:
            return True
        return self.remove_every is not None and step > 0 and step % self.remove_every == 0

    def _alive(self) -> list[str]:
        return [b for b in self._targets if b not in self.removed]

    def _statistics(self, trainer) -> dict[str, float | None]:
        """Per alive target block: largest response in the window (epsilon) or branch norm (ssl)."""
        alive = self._alive()
        if self.criterion == "ssl":
            blocks = residual_blocks(self._net)
            return {b: branch_norm(blocks[b]) for b in alive}
        window = self._gates.window if self._gates is not None else {}
        device = next(iter(self._net.parameters())).device
        peaks = (
            torch.stack(
                [
                    window[b].float().reshape(()) if b in window else torch.tensor(-math.inf, device=device)
                    for b in alive
                ]
            )
            if alive
            else torch.zeros(0)
        )
        if trainer is not None and getattr(trainer, "world_size", 1) > 1 and alive:
            peaks = trainer.strategy.reduce(peaks, reduce_op="max")
        values = peaks.detach().cpu().tolist()
        return {b: (None if v == -math.inf else float(v)) for b, v in zip(alive, values)}

    def _limit(self) -> float:
        return self.epsilon if self.criterion == "epsilon" else self.threshold

    def plan(self, stats: dict[str, float | None]) -> tuple[list[str], list[str]]:
        """(blocks to remove, blocks the minimum keeps although the criterion would remove them)."""
        limit = self._limit()
        below = [b for b, v in stats.items() if v is not None and v <= limit]
        blocks = list(residual_blocks(self._net))
        remaining: dict[str, list[str]] = {}
        for b in blocks:
            remaining.setdefault(stage_of(b), []).append(b)
        remove = set(below)
        kept_by_min: list[str] = []
        for members in remaining.values():
            going = [b for b in members if b in remove]
            deficit = self.min_blocks_per_stage - (len(members) - len(going))
            if deficit > 0:
                for b in sorted(going, key=lambda b: (-stats[b], blocks.index(b)))[:deficit]:
                    remove.discard(b)
                    kept_by_min.append(b)
        if blocks and len(remove) == len(blocks):  # min_blocks_per_stage=0 and every block would go
            keep = max(remove, key=lambda b: (stats[b], -blocks.index(b)))
            remove.discard(keep)
            kept_by_min.append(keep)
        return [b for b in blocks if b in remove], kept_by_min

    @torch.no_grad()
    def _event(self, trainer, step: int) -> None:
        stats = self._statistics(trainer)
        remove, kept_by_min = self.plan(stats)
        newly = sorted(set(kept_by_min) - set(self.exempt))
        if kept_by_min:
            self.exempt = sorted(set(self.exempt) | set(kept_by_min))
            if self._gates is not None:
                self._gates.exempt = set(self.exempt)
        if newly and _is_global_zero(trainer):
            warnings.warn(
                f"DepthPruning: the {self.criterion} criterion (limit {self._limit():g}) would remove "
                f"{newly} too, which would leave fewer than min_blocks_per_stage="
                f"{self.min_blocks_per_stage} block(s) in their stage (or no block at all); they are kept "
                "and no longer gated. Lower epsilon / threshold to keep more blocks.",
                stacklevel=2,
            )
        if remove:
            gone = remove_blocks(self._net, remove)
            for optimizer in getattr(trainer, "optimizers", None) or []:
                drop_from_optimizer(optimizer, gone.values())
            self.removed.extend(remove)
            if self._gates is not None:
                self._gates.detach(remove)
            self._prepare_penalty()
            if trainer is not None:
                _rewrap_ddp(trainer)
        if self._gates is not None:
            self._gates.reset()
        self.window_batches = 0
        self.last_event_step = step
        left = len(residual_blocks(self._net))
        self.history.append(
            {
                "step": step,
                "removed": list(remove),
                "kept_by_minimum": sorted(kept_by_min),
                "blocks_left": left,
                "statistics": {b: v for b, v in stats.items() if v is not None},
            }
        )
        if _is_global_zero(trainer):
            for logger in getattr(trainer, "loggers", []):
                logger.log_metrics({"depth_pruning/blocks": float(left)}, step=step)
            if self.verbose:
                what = ", ".join(remove) if remove else "none"
                print(f"[lit_compress] step {step}: residual blocks removed: {what}; {left} blocks left")

    def _attach(self) -> None:
        net = self._net
        if net is None:
            return
        blocks = residual_blocks(net)
        alive = {b: blocks[b] for b in self._alive() if b in blocks}
        if self.criterion == "epsilon":
            if self._gates is None:
                self._gates = EpsilonGates(self.epsilon, self.gate)
            self._gates.exempt = set(self.exempt)
            self._gates.detach([b for b in list(self._gates._handles) if b not in alive])
            self._gates.attach(alive)
        else:
            self._prepare_penalty()

    def _prepare_penalty(self) -> None:
        if self.criterion != "ssl" or self._net is None:
            return
        from lit_compress.pruning.structured.penalties import GroupLassoPenalty

        blocks = residual_blocks(self._net)
        alive = [b for b in self._alive() if b in blocks]
        if not alive:
            self._penalty = None
            return
        excluded = []
        names = {n for n, _ in self._net.named_modules()}
        for b in alive:
            attr = block_adapter(blocks[b]).shortcut_attr
            if f"{b}.{attr}" in names:
                excluded.append(f"{b}.{attr}")
        penalty = GroupLassoPenalty(
            weight=self.penalty_weight, filters=False, depth_branches=alive, depth_exclude=excluded
        )
        penalty.prepare(self._net, [], "")
        self._penalty = penalty

    def _detach(self) -> None:
        if self._gates is not None:
            self._gates.detach()

    @property
    def _prefix(self) -> str:
        return "" if self.model_attr is None else f"{self.model_attr}."

    def _network(self, pl_module: nn.Module) -> nn.Module:
        return network_of(pl_module, self.model_attr, "DepthPruning")

    # -- resume ----------------------------------------------------------------------------------------

    def _patch_on_load_checkpoint(self, pl_module: nn.Module) -> None:
        if self._patched is not None:
            return
        had_own = "on_load_checkpoint" in vars(pl_module)
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> Any:
            state = (checkpoint.get("callbacks") or {}).get(self.state_key)
            if state and state.get("removed"):
                pending = [b for b in state["removed"] if b in residual_blocks(self._net)]
                if pending:
                    remove_blocks(self._net, pending)
                    if self._gates is not None:
                        self._gates.detach(pending)
            return original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint
        self._patched = (pl_module, had_own, original)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_module", "_net", "_reference", "_gates", "_penalty", "_patched"):
            state[key] = None
        state["_targets"] = []
        return state


def _positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _is_global_zero(trainer) -> bool:
    return trainer is None or bool(getattr(trainer, "is_global_zero", True))


def _rewrap_ddp(trainer) -> None:
    from lit_compress.pruning.structured.callback import _rewrap_ddp as rewrap

    rewrap(trainer)
