"""``StructuredPruning``: remove whole channels of any LightningModule's network on a schedule.

The callback wires a channel criterion (which channels matter), a pruning schedule (when, how far), an
optional sparsity penalty and the channel mechanics of :mod:`lit_compress.pruning.structured` to
Lightning's hooks:

- ``setup``: find the network (``model_attr``); trace its channel groups when ``example_input_shape`` is
  given; arrange for a resumed checkpoint of a physically pruned network to load (see *Resume*).
- ``on_train_start``: trace the channel groups (the example shape is taken from the first training batch
  when not given), select the targeted groups, check the schedule fits in the run, re-impose restored masks.
- ``on_train_batch_start``: at a scheduled optimizer step (``trainer.global_step``), score the channels of
  every targeted group that must shrink, keep the best ones, then mask them (``remove="at_end"``) or remove
  them physically and rebuild the optimizer (``remove="immediately"``).
- ``on_before_optimizer_step``: add the penalty's gradient; zero the gradients of masked channels.
  ``on_train_batch_end``: re-zero masked weights after the step, so no optimizer can revive them.
- ``state_dict`` / ``load_state_dict``: kept channel indices per group (original numbering), original group
  sizes, the example shape, whether the weights are physically reduced, the last event step and history.

**Masking** (``remove="at_end"``) zeroes, for each removed channel, the producers' output rows and bias
entries, the BatchNorm weight and bias entries (the normalised output is then exactly 0), depthwise filters
on the way, and the consumers' input columns. The network keeps its shapes during training (and its
state_dict keys); :meth:`StructuredPruning.export` removes the channels physically, with the same outputs.

**Resume** after physical removal: Lightning restores the module's ``state_dict`` *before* the callback
state, and ``trainer.ckpt_path`` is only set after ``setup`` (Lightning 2.x ``_run``: ``setup`` ->
``_restore_modules_and_callbacks`` -> ``resume_start``), so ``setup`` cannot read the checkpoint. Instead
``setup`` wraps the LightningModule's ``on_load_checkpoint`` (called with the loaded checkpoint right
before the weights are loaded, undone in ``teardown``): it reads this callback's saved state from
``checkpoint["callbacks"][state_key]`` and re-applies the removal to the freshly built network, so the
shapes match. This also makes ``trainer.validate/test(ckpt_path=...)`` work on a fresh module.
:func:`restore_structure` does the same for a checkpoint loaded by hand.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_compress._flavour import lightning_callback
from lit_compress._strategy import spawns_workers
from lit_compress.pruning.callback import _all_reduce_mean, scoring_batches, scoring_loss_fn
from lit_compress.pruning.masks import PreparedMasks, mask_optimizer_state
from lit_compress.pruning.schedules import PruningSchedule, get_pruning_schedule
from lit_compress.pruning.structured.criteria import (
    ChannelCriterion,
    ChannelScoringContext,
    get_channel_criterion,
)
from lit_compress.pruning.structured.graph import ChannelGroup, ChannelRef, channel_groups
from lit_compress.pruning.structured.penalties import Penalty, get_penalty
from lit_compress.pruning.structured.removal import rebuild_optimizer, remove_channels
from lit_compress.targets import network_of

__all__ = ["REMOVE_MODES", "StructuredPruning", "restore_structure"]

REMOVE_MODES = ("at_end", "immediately")


@lightning_callback
class StructuredPruning:
    """Prune whole channels (filters, neurons) of a network to a cumulative fraction on a schedule.

    Args:
        amount: final fraction of the channels removed from each prunable targeted group, cumulative
            (0.5 = half of the original channels are gone at the end), in ``[0, 1)``. Groups keep at least
            ``min_channels``.
        criterion: channel criterion name (``l1``, ``l2``, ``apoz``, ``mean_activation``,
            ``taylor_activation``, ``bn_scale``, ``group_lasso``, ``thinet``), a dotted class path or a
            :class:`~lit_compress.pruning.structured.criteria.ChannelCriterion` instance.
        criterion_args: constructor arguments when ``criterion`` is a name.
        schedule: pruning schedule name (``one_shot``, ``iterative``, ``gradual``) or a
            :class:`~lit_compress.pruning.schedules.PruningSchedule`; it maps the optimizer step to the
            fraction removed so far. Rewinding and release schedules are not supported.
        schedule_args: constructor arguments when ``schedule`` is a name.
        include, exclude: FQN globs on channel-group names (a group is named after its first producer, e.g.
            ``"conv1"`` or ``"layer1.0.conv1"``); each glob is matched against the name inside the network
            and against it prefixed with ``model_attr`` (``"net.conv1"``). A glob that matches no group is an
            error listing the groups. Groups that cannot be pruned (e.g. the one feeding the output) are
            skipped.
        group_amount: per-group final fraction overrides, glob -> amount (first match wins).
        min_channels: keep a minimum: never fewer than this many channels in a group (>= 1: a group is never
            emptied).
        round_to: kept channel counts are rounded to a multiple of this (1: exact). CPU convolutions
            (oneDNN) run markedly slower on odd channel counts (12 channels measured slower than 16), so 8
            turns a MAC cut into a real speed-up; the group's full size is always a valid count.
        penalty: ``None``, ``"bn_l1"`` (network slimming) or ``"group_lasso"`` (SSL), added as a gradient term
            at every optimizer step (see :mod:`lit_compress.pruning.structured.penalties`), on the targeted
            groups.
        penalty_weight: the penalty's ``lambda``.
        penalty_args: extra penalty arguments (``group_lasso``: ``filters``, ``depth_branches``,
            ``depth_exclude``).
        remove: ``"at_end"``: mask channels during training, remove them physically in :meth:`export`;
            ``"immediately"``: remove them physically at each pruning event (the optimizer is rebuilt in
            place: momentum / Adam moments of the kept channels carry over, LR schedulers keep working).
        data_batches: how many training batches data-dependent criteria use at each event.
        example_input_shape: input shape used to trace the network (with the batch dimension, e.g.
            ``[1, 1, 28, 28]``); default: the first training batch's input with batch size 1.
        model_attr: attribute of the LightningModule holding the network to prune (``"net"``); None prunes
            the LightningModule itself.
        seed: seeds randomised criteria (ThiNet's sampling), identical on every rank.
        verbose: print a line per pruning event (rank zero).
    """

    def __init__(
        self,
        amount: float,
        criterion: str | ChannelCriterion = "l1",
        criterion_args: dict[str, Any] | None = None,
        schedule: str | PruningSchedule = "one_shot",
        schedule_args: dict[str, Any] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        group_amount: dict[str, float] | None = None,
        min_channels: int = 1,
        round_to: int = 1,
        penalty: str | None = None,
        penalty_weight: float = 1e-4,
        penalty_args: dict[str, Any] | None = None,
        remove: str = "at_end",
        data_batches: int = 8,
        example_input_shape: list[int] | None = None,
        model_attr: str | None = "net",
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        _check_amount("amount", amount)
        for pattern, value in (group_amount or {}).items():
            _check_amount(f"group_amount[{pattern!r}]", value)
        if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
            raise ValueError(
                "min_channels must be an int >= 1 (a group always keeps a minimum of channels; 0 would "
                f"allow emptying a layer, which disconnects the network), got {min_channels!r}"
            )
        if remove not in REMOVE_MODES:
            close = difflib.get_close_matches(str(remove), REMOVE_MODES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"remove must be one of {REMOVE_MODES}, got {remove!r}.{hint}")
        if isinstance(data_batches, bool) or not isinstance(data_batches, int) or data_batches < 1:
            raise ValueError(f"data_batches must be a positive int, got {data_batches!r}")
        if example_input_shape is not None and (
            isinstance(example_input_shape, (str, bytes))
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in example_input_shape)
            or len(example_input_shape) < 1
        ):
            raise ValueError(
                "example_input_shape must be a list of positive ints including the batch dimension, e.g. "
                f"[1, 1, 28, 28]; got {example_input_shape!r}"
            )
        if model_attr is not None and (not isinstance(model_attr, str) or not model_attr):
            raise ValueError(
                f"model_attr must be an attribute name such as 'net', or null; got {model_attr!r}"
            )
        for arg, value in (("include", include), ("exclude", exclude)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ValueError(
                    f'{arg} must be a list of glob strings, got {value!r}; e.g. {arg}: ["conv*"]'
                )
        if include is not None and not include:
            raise ValueError("include is empty: nothing would be pruned; use ['*'] for every group")
        self.amount = float(amount)
        self.criterion = get_channel_criterion(criterion, **(criterion_args or {}))
        self.schedule = get_pruning_schedule(schedule, **(schedule_args or {}))
        if self.schedule.release_step is not None or self.schedule.rewind_step is not None:
            raise ValueError(
                f"schedule {self.schedule.name!r} rewinds or releases pruned weights, which structured "
                "pruning does not support (removed channels are gone); use one_shot, iterative or gradual."
            )
        self.schedule.target_sparsity(0, self.amount)  # schedule-specific checks of the final amount now
        self.include = list(include or ["*"])
        self.exclude = list(exclude or [])
        self.group_amount = {str(k): float(v) for k, v in (group_amount or {}).items()}
        self.min_channels = min_channels
        if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
            raise ValueError(
                f"round_to must be an int >= 1 (1 = no rounding, 8 = multiples of 8), got {round_to!r}"
            )
        self.round_to = round_to
        self.penalty: Penalty | None = (
            None if penalty is None else get_penalty(penalty, weight=penalty_weight, **(penalty_args or {}))
        )
        self.remove = remove
        self.data_batches = data_batches
        self.example_input_shape = None if example_input_shape is None else list(example_input_shape)
        self.model_attr = model_attr
        self.seed = seed
        self.verbose = verbose
        # State (state_dict): kept channel indices per group in the ORIGINAL numbering, original sizes.
        self.kept: dict[str, Tensor] = {}
        self.sizes: dict[str, int] = {}
        self.physical = False  # the network's weights are physically reduced (remove="immediately")
        self.example_shape: list[int] | None = self.example_input_shape
        self.last_event_step = -1
        self.history: list[dict[str, Any]] = []
        # Runtime.
        self._module: nn.Module | None = None
        self._net: nn.Module | None = None
        self._groups: dict[str, ChannelGroup] = {}
        self._targets: list[str] = []
        self._reference: nn.Module | None = None
        self._reduced: weakref.ref[nn.Module] | None = None  # the network object that is physically reduced
        self._prepared: PreparedMasks | None = None
        self._patched: tuple[nn.Module, bool, Any] | None = None

    # -- Lightning hooks -------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            amount=self.amount,
            criterion=self.criterion.name,
            include=self.include,
            exclude=self.exclude,
            remove=self.remove,
            model_attr=self.model_attr,
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.remove == "immediately" and spawns_workers(trainer):
            raise ValueError(
                "StructuredPruning(remove='immediately') changes the network's shapes inside the worker "
                "processes, but with a spawning strategy (ddp_spawn, ddp_fork, ddp_notebook) Lightning "
                "copies the final weights back into the main process's module, which keeps its dense "
                "shapes. Use remove='at_end' (channels masked during training, removed by export()), or "
                "strategy='ddp' (one process per device, launched as scripts or by torchrun)."
            )
        self._module = pl_module
        net = self._network(pl_module)
        if net is not self._net:  # a new network object: forget everything traced on the previous one
            self._net, self._groups, self._targets, self._prepared = net, {}, [], None
            if not self._is_reduced(net):
                self._reference = _meta_copy(net)
        self._patch_on_load_checkpoint(pl_module)
        if self.example_input_shape is not None and stage == "fit":
            self._trace()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._patched is not None:
            module, had_own, original = self._patched
            if had_own:
                module.on_load_checkpoint = original
            else:
                del module.on_load_checkpoint
            self._patched = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.criterion.needs_data and not pl_module.automatic_optimization:
            raise ValueError(
                f"channel criterion {self.criterion.name!r} needs the loss of training_step, but this module "
                "uses manual optimization (training_step returns no loss); use 'l1', 'l2' or 'bn_scale'"
            )
        total = trainer.estimated_stepping_batches
        last = self.schedule.last_step()
        if math.isfinite(total) and last >= total:
            raise ValueError(
                f"the pruning schedule acts until optimizer step {last}, but the run has only {int(total)} "
                "steps (max_steps / max_epochs); shorten the schedule or train longer"
            )
        if self.physical and not self._is_reduced(self._net):
            raise RuntimeError(
                "StructuredPruning restored a physically pruned state, but the network was not reduced when "
                "the checkpoint was loaded. Hint: resume through trainer.fit(..., ckpt_path=...) with this "
                "callback on the Trainer, or call "
                "lit_compress.pruning.structured.callback.restore_structure first."
            )
        if self.example_shape is None:
            self.example_shape = _shape_from_loader(trainer)
        if not self._groups:
            self._trace()
        if self.remove == "at_end" and self.kept:  # resumed: re-impose the masks (weights are already zero)
            self._masks_changed(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step <= self.last_event_step:
            return  # already acted at this step (gradient accumulation calls this once per micro-batch)
        if self.schedule.is_prune_step(step):
            self._prune(trainer, pl_module, step)
            self.last_event_step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.penalty is not None:
            self.penalty.add_gradient()
        if self._prepared is not None:
            self._prepared.zero_gradients()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._prepared is not None:
            self._prepared.zero_weights()

    def state_dict(self) -> dict[str, Any]:
        return {
            "kept": {k: v.detach().cpu().long() for k, v in self.kept.items()},
            "sizes": dict(self.sizes),
            "physical": self.physical,
            "example_shape": None if self.example_shape is None else list(self.example_shape),
            "last_event_step": self.last_event_step,
            "history": list(self.history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.kept = {k: torch.as_tensor(v).long() for k, v in state_dict["kept"].items()}
        self.sizes = {k: int(v) for k, v in state_dict["sizes"].items()}
        self.physical = bool(state_dict["physical"])
        shape = state_dict.get("example_shape")
        self.example_shape = self.example_input_shape or (None if shape is None else [int(d) for d in shape])
        self.last_event_step = int(state_dict["last_event_step"])
        self.history = list(state_dict.get("history", []))
        self._prepared = None

    # -- export -------------------------------------------------------------------------------------------

    def export(self, pl_module: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
        """A plain, physically smaller copy of the network (``pl_module.<model_attr>``) and its spec.

        Masked channels (``remove="at_end"``) are removed from the copy, which computes the same outputs as
        the masked network; with ``remove="immediately"`` the network already is smaller. The spec (plain
        JSON, see :func:`lit_compress.pruning.structured.spec.structure_spec`) rebuilds the smaller modules
        from a freshly built architecture before its weights are loaded.
        """
        from lit_compress.pruning.structured.spec import structure_spec

        net = self._network(pl_module)
        plain = copy.deepcopy(net).eval()
        pending = {n: k for n, k in self.kept.items() if len(k) < self.sizes[n]}
        if self.physical and self._reference is None:
            raise RuntimeError(
                "StructuredPruning.export: the dense reference architecture is unknown (the network was "
                "already reduced when this callback first saw it); export from the run that pruned it."
            )
        if self.remove == "at_end" and pending:
            groups = channel_groups(plain, self._example_input(plain))
            remove_channels(plain, groups, pending)
        reference = self._reference if self._reference is not None else _meta_copy(net)
        for p in plain.parameters():
            p.requires_grad_(False)
        return plain, structure_spec(plain, reference)

    def compression_summary(self) -> dict[str, Any]:
        """What this callback did, for zoo cards (:class:`~lit_compress.zoo.ZooExport` collects it).

        Keys: ``methods`` (list of str), ``description`` (str), ``structure`` (the structure spec dict, or
        None when no channel was removed), ``network`` (the plain, physically smaller ``nn.Module`` from
        :meth:`export`, or None before the callback has seen a module).
        """
        methods = [f"structured_pruning:{self.criterion.name}"]
        if self.penalty is not None:
            methods.append(f"penalty:{self.penalty.name}")
        overrides = f", overrides {self.group_amount}" if self.group_amount else ""
        total = sum(self.sizes.values())
        kept = sum(len(self.kept.get(n, range(s))) for n, s in self.sizes.items())
        done = f"; {kept}/{total} channels kept in {len(self.sizes)} groups" if total else ""
        summary: dict[str, Any] = {
            "methods": methods,
            "description": f"structured {self.criterion.name} channel pruning of {self.amount:.1%} per group "
            f"with the {self.schedule.name} schedule{overrides}"
            + (f", {self.penalty.name} penalty {self.penalty.weight:g}" if self.penalty is not None else "")
            + f", channels removed {'during training' if self.remove == 'immediately' else 'at export'}"
            + done,
            "structure": None,
            "network": None,
        }
        if self._module is not None:
            network, spec = self.export(self._module)
            summary["network"] = network
            summary["structure"] = spec if total and kept < total else None
        return summary

    # -- mechanics --------------------------------------------------------------------------------------

    def final_amount(self, group: str) -> float:
        """Final fraction removed from ``group``: its first matching ``group_amount``, else ``amount``."""
        for pattern, value in self.group_amount.items():
            if self._matches(group, pattern):
                return value
        return self.amount

    def _network(self, pl_module: nn.Module) -> nn.Module:
        return network_of(pl_module, self.model_attr, "StructuredPruning")

    def _is_reduced(self, net: nn.Module | None) -> bool:
        return net is not None and self._reduced is not None and self._reduced() is net

    def __getstate__(self) -> dict[str, Any]:
        # Runtime fields belong to one process and one module (ddp_spawn pickles callbacks before setup).
        runtime = (
            "_module",
            "_net",
            "_groups",
            "_targets",
            "_reference",
            "_reduced",
            "_prepared",
            "_patched",
        )
        state = dict(self.__dict__)
        state.update({k: None for k in runtime})
        state["_groups"], state["_targets"] = {}, []
        return state

    @property
    def _prefix(self) -> str:
        return "" if self.model_attr is None else f"{self.model_attr}."

    def _matches(self, name: str, pattern: str) -> bool:
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(self._prefix + name, pattern)

    def _example_input(self, net: nn.Module) -> Tensor:
        if self.example_shape is None:
            raise RuntimeError(
                "StructuredPruning: no example input shape known yet (set example_input_shape)"
            )
        ref = next(iter(net.parameters()), None)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        device = ref.device if ref is not None else torch.device("cpu")
        return torch.zeros(self.example_shape, dtype=dtype, device=device)

    def _trace(self) -> None:
        """(Re)trace the channel groups of the current network and (re)select the targeted ones."""
        net = self._net
        assert net is not None
        groups = channel_groups(net, self._example_input(net))
        self._groups = {g.name: g for g in groups}
        self._targets = self._select(groups)
        for name in self._targets:
            if name not in self.sizes:
                self.sizes[name] = self._groups[name].size
        if self.penalty is not None:
            self.penalty.prepare(net, [self._groups[n] for n in self._targets], self._prefix)

    def _select(self, groups: Sequence[ChannelGroup]) -> list[str]:
        names = [g.name for g in groups]
        prunable = {g.name for g in groups if g.prunable}
        for kind, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(self._matches(n, pattern) for n in names):
                    close = difflib.get_close_matches(
                        pattern.removeprefix(self._prefix), names, n=4, cutoff=0.3
                    )
                    raise ValueError(
                        f"{kind} pattern {pattern!r} matches no channel group. Close names: "
                        f"{close or 'none'}; the groups (named after their first producer) are: {names}"
                    )
                if kind == "include" and not any(self._matches(n, pattern) for n in prunable):
                    reasons = "; ".join(
                        f"{g.name}: {g.reason}" for g in groups if self._matches(g.name, pattern)
                    )
                    raise ValueError(
                        f"include pattern {pattern!r} matches only groups that cannot be pruned ({reasons}). "
                        f"Prunable groups: {sorted(prunable)}"
                    )
        targets = [
            n
            for n in names
            if n in prunable
            and any(self._matches(n, p) for p in self.include)
            and not any(self._matches(n, p) for p in self.exclude)
        ]
        if not targets:
            raise ValueError(f"include {self.include} minus exclude {self.exclude} selects no prunable group")
        for pattern in self.group_amount:
            if not any(self._matches(n, pattern) for n in targets):
                raise ValueError(
                    f"group_amount pattern {pattern!r} matches no targeted channel group; targeted: {targets}"
                )
        return targets

    def _alive(self, name: str) -> Tensor:
        """Bool mask over the group's CURRENT channels, False for masked ones (all True once removed)."""
        group = self._groups[name]
        kept = self.kept.get(name)
        if kept is None or self.remove == "immediately":
            return torch.ones(group.size, dtype=torch.bool)
        alive = torch.zeros(group.size, dtype=torch.bool)
        alive[kept] = True
        return alive

    @torch.no_grad()
    def _prune(self, trainer, pl_module, step: int) -> None:
        plan: dict[str, int] = {}
        for name in self._targets:
            size = self.sizes[name]
            target = self.schedule.target_sparsity(step, self.final_amount(name))
            keep = max(min(self.min_channels, size), size - round(target * size))
            if self.round_to > 1 and keep < size:
                keep = min(size, max(self.round_to, self.round_to * round(keep / self.round_to)))
            alive = len(self.kept[name]) if name in self.kept else size
            if keep < alive:
                plan[name] = keep
        if plan:
            groups = [self._groups[n] for n in plan]
            context = ChannelScoringContext(
                model=self._net,
                groups=groups,
                alive={n: self._alive(n) for n in plan},
                loss_fn=self._loss_fn(pl_module) if self.criterion.needs_data else None,
                batches=self._batches(trainer) if self.criterion.needs_data else None,
                all_reduce_mean=_all_reduce_mean(trainer),
                generator_seed=self.seed + step,
                step=step,
                owner=pl_module,
            )
            with torch.enable_grad():
                scores = self.criterion.scores(context)
            keep_now = {n: _top(scores[n], self._alive(n), count) for n, count in plan.items()}
            with torch.enable_grad():
                updates = self.criterion.update_weights(context, keep_now)
            if updates:
                params = dict(self._net.named_parameters())
                for fqn, value in updates.items():
                    params[fqn].copy_(value)
            if self.remove == "immediately":
                self._remove_now(trainer, keep_now)
            else:
                self.kept.update(keep_now)
                self._masks_changed(trainer)
        self._report(trainer, step)

    def _remove_now(self, trainer, keep_now: Mapping[str, Tensor]) -> None:
        net = self._net
        old = dict(net.named_parameters())
        sliced = remove_channels(net, list(self._groups.values()), keep_now)
        for optimizer in trainer.optimizers:
            rebuild_optimizer(optimizer, old, net, sliced)
        for name, local in keep_now.items():
            original = self.kept.get(name, torch.arange(self.sizes[name]))
            self.kept[name] = original[local]
        self.physical = True
        self._reduced = weakref.ref(net)
        self._trace()
        _rewrap_ddp(trainer)

    def _masks_changed(self, trainer) -> None:
        """Bool masks of every parameter touched by a masked channel; zero weights and optimizer state."""
        params = dict(self._net.named_parameters())
        masks: dict[str, Tensor] = {}
        for name in self.kept:
            group = self._groups[name]
            gone = ~self._alive(name)
            if not gone.any():
                continue
            channels = gone.nonzero().flatten()
            refs = [*group.producers, *group.norms, *getattr(group, "passthrough", ()), *group.consumers]
            for ref in refs:
                module = self._net.get_submodule(ref.module)
                for pname in ("weight", "bias"):
                    p = getattr(module, pname, None)
                    if not isinstance(p, nn.Parameter) or (pname == "bias" and ref.dim != 0):
                        continue
                    fqn = f"{ref.module}.{pname}" if ref.module else pname
                    mask = masks.setdefault(fqn, torch.ones_like(p, dtype=torch.bool))
                    _channel_view(mask, ref, group.size)[channels.to(mask.device)] = False
        self._prepared = PreparedMasks(params, masks) if masks else None
        if self._prepared is not None:
            self._prepared.zero_weights()
            mask_optimizer_state(trainer.optimizers, params, masks)

    def _report(self, trainer, step: int) -> None:
        counts = {n: len(self.kept[n]) if n in self.kept else self.sizes[n] for n in self._targets}
        total = sum(self.sizes[n] for n in self._targets)
        fraction = sum(counts.values()) / total if total else 1.0
        self.history.append(
            {"step": step, "kept_fraction": fraction, **{f"channels/{n}": c for n, c in counts.items()}}
        )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({"structured_pruning/kept_fraction": fraction}, step=step)
            if self.verbose:
                layers = ", ".join(f"{n} {c}/{self.sizes[n]}" for n, c in counts.items())
                mode = "removed" if self.remove == "immediately" else "masked"
                print(f"[lit_compress] step {step}: channels {mode} -> {fraction:.1%} kept ({layers})")

    # -- resume --------------------------------------------------------------------------------------------

    def _patch_on_load_checkpoint(self, pl_module: nn.Module) -> None:
        if self._patched is not None:
            return
        had_own = "on_load_checkpoint" in vars(pl_module)
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> Any:
            state = (checkpoint.get("callbacks") or {}).get(self.state_key)
            if state and state.get("physical"):
                self._restore_from(checkpoint, state)
            return original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint
        self._patched = (pl_module, had_own, original)

    def _restore_from(self, checkpoint: Mapping[str, Any], state: Mapping[str, Any]) -> None:
        net = self._net
        assert net is not None
        saved = checkpoint.get("state_dict") or {}
        prefix = self._prefix
        current = {f"{prefix}{k}": v.shape for k, v in net.state_dict().items()}
        if all(k not in saved or saved[k].shape == s for k, s in current.items()):
            self._reduced = weakref.ref(net)  # already has the saved shapes
            return
        if self._reference is None:
            self._reference = _meta_copy(net)
        restore_structure(net, state)
        self._reduced = weakref.ref(net)
        self._groups, self._targets = {}, []

    # -- data for data-dependent criteria --------------------------------------------------------------

    def _loss_fn(self, pl_module) -> Callable[[Any], Tensor]:
        return scoring_loss_fn(pl_module)

    def _batches(self, trainer) -> Callable[[], Iterator[Any]]:
        return scoring_batches(trainer, self.data_batches, "data-dependent channel criterion")


def restore_structure(net: nn.Module, state: Mapping[str, Any]) -> None:
    """Re-apply a :class:`StructuredPruning` state's physical channel removal to a freshly built ``net``.

    ``state`` is the callback's ``state_dict()`` (e.g. ``checkpoint["callbacks"][callback.state_key]``);
    afterwards ``net`` has the pruned shapes, so the checkpoint's weights load into it.
    """
    shape = state.get("example_shape")
    if shape is None:
        raise ValueError("the StructuredPruning state has no example_shape to trace the network with")
    ref = next(iter(net.parameters()), None)
    example = torch.zeros(
        [int(d) for d in shape],
        dtype=ref.dtype if ref is not None and ref.is_floating_point() else torch.float32,
        device=ref.device if ref is not None else "cpu",
    )
    groups = channel_groups(net, example)
    by_name = {g.name: g for g in groups}
    keep = {}
    for name, kept in state["kept"].items():
        if name not in by_name:
            raise ValueError(
                f"the StructuredPruning state names channel group {name!r}, which this network does not have "
                f"(groups: {sorted(by_name)}); build the same architecture the checkpoint was trained with"
            )
        kept = torch.as_tensor(kept).long()
        if len(kept) < by_name[name].size:
            keep[name] = kept
    if keep:
        remove_channels(net, groups, keep)


def _top(scores: Tensor, alive: Tensor, count: int) -> Tensor:
    """Sorted indices of the ``count`` best alive channels (NaN = lowest; ties: lower index first)."""
    s = scores.detach().float().cpu().clone()
    s[torch.isnan(s)] = -torch.inf
    candidates = alive.nonzero().flatten()
    order = torch.sort(s[candidates], descending=True, stable=True).indices
    return candidates[order[:count]].sort().values


def _channel_view(t: Tensor, ref: ChannelRef, size: int) -> Tensor:
    """A view of ``t`` with channel ``c`` of ``ref`` at index ``c`` of dim 0 (writes go through)."""
    part = t.narrow(ref.dim, ref.offset, size * ref.repeat).movedim(ref.dim, 0)
    return part.unflatten(0, (size, ref.repeat))


def _meta_copy(net: nn.Module) -> nn.Module:
    """A weightless copy of ``net`` (meta tensors): the dense reference architecture for the spec."""
    return copy.deepcopy(net).to("meta")


def _shape_from_loader(trainer) -> list[int]:
    """The first training batch's input shape with batch size 1 (the data order and RNG are untouched)."""
    loader = trainer.train_dataloader
    if loader is None:
        raise ValueError(
            "StructuredPruning: no training dataloader to take the input shape from; set example_input_shape"
        )
    with torch.random.fork_rng(devices=[]):
        batch = next(iter(loader))
    x = _first_tensor(batch)
    if x is None or x.ndim < 1:
        raise ValueError(
            "StructuredPruning: cannot find the input tensor in a training batch of type "
            f"{type(batch).__name__}; set example_input_shape, e.g. [1, 3, 32, 32]"
        )
    return [1, *x.shape[1:]]


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch:
        return _first_tensor(batch[0])
    return None


def _rewrap_ddp(trainer) -> None:
    """DDP's reducer holds the old parameters: wrap the (changed) LightningModule again after a removal."""
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if isinstance(getattr(strategy, "model", None), DistributedDataParallel) and hasattr(
        strategy, "configure_ddp"
    ):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()


def _check_amount(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"{name} must be a number in [0, 1) (0.5 = half of each group's channels removed), got {value!r}"
        )
