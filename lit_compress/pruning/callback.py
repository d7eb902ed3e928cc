"""``Pruning``: unstructured weight pruning injected into any LightningModule.

The callback only wires a criterion (which weights matter), a schedule (when and how far to prune) and
the mask mechanism to Lightning's hooks:

- ``setup``: select targets by FQN globs and layer types, validate every option.
- ``on_train_start``: check the schedule fits in the run (``trainer.estimated_stepping_batches``),
  re-apply masks restored from a checkpoint, take the lottery-ticket snapshot at step 0.
- ``on_train_batch_start``: at a scheduled optimizer step, score, choose masks, zero weights and their
  optimizer state (momentum, Adam moments); rewind (lottery ticket) or release masks (DSD).
- ``on_before_optimizer_step``: zero gradients of pruned weights; ``on_train_batch_end``: re-zero the
  weights after the step, so no optimizer can revive a pruned weight.
- ``state_dict`` / ``load_state_dict``: masks (bool, keyed by FQN), the last step acted on and the rewind
  snapshot, so a resumed run continues exactly the same schedule. The module's own state_dict keys never
  change: pruned weights are simply exactly zero in it.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lit_compress._flavour import lightning_callback
from lit_compress.pruning.criteria import Criterion, ScoringContext, get_criterion
from lit_compress.pruning.masks import (
    PreparedMasks,
    apply_masks,
    global_masks,
    layerwise_masks,
    mask_optimizer_state,
    sparsity_stats,
)
from lit_compress.pruning.schedules import PruningSchedule, get_pruning_schedule, rescaled_dropout
from lit_compress.targets import DEFAULT_TYPES, TargetSpec, select_parameters

SCOPES = ("layerwise", "global")


def _loss_from_output(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"]
    raise TypeError(
        f"training_step returned {type(output).__name__}; data-dependent pruning criteria need it to return "
        "the loss tensor (or a dict with a 'loss' tensor)"
    )


@lightning_callback
class Pruning:
    """Prune weights of any LightningModule to a cumulative sparsity on a schedule.

    Args:
        sparsity: final sparsity, the fraction of targeted weights that are zero at the end (0.9 = 90%):
            per target when ``scope="layerwise"``, over all targets together when ``scope="global"``.
        criterion: registered name (``magnitude``, ``random``, ``snip``, ``taylor``, ``obd``, ``grasp``,
            ``woodfisher``) or a :class:`~lit_compress.pruning.criteria.Criterion` instance.
        criterion_args: constructor arguments when ``criterion`` is a name.
        schedule: registered name (``one_shot``, ``iterative``, ``gradual``, ``lottery_ticket``,
            ``dense_sparse_dense``) or a :class:`~lit_compress.pruning.schedules.PruningSchedule`
            (YAML: class_path / init_args).
        schedule_args: constructor arguments when ``schedule`` is a name.
        scope: ``layerwise`` (each target reaches its sparsity) or ``global`` (one ranking over targets).
        include, exclude, types, parameter: which parameters are pruned (FQN globs of modules, class names,
            ``weight`` or ``bias``); see :class:`lit_compress.targets.TargetSpec`.
        layer_sparsity: final sparsity overrides, module FQN glob -> sparsity (e.g. ``{"net.conv1": 0.34}``,
            Han et al. keep the first conv denser); overridden layers are pruned layerwise in either scope.
        data_batches: how many training batches data-dependent criteria may use at each pruning event.
        rescale_dropout: Han et al.'s retraining rule: after each pruning event every ``nn.Dropout`` rate
            becomes ``p0 * sqrt(kept fraction)`` (the paper applies it per layer; this uses the kept fraction
            of all targets, a documented simplification).
        seed: seeds the random criterion and lottery-ticket re-initialisation, identical on every rank.
        verbose: print a line per pruning event (rank zero).
    """

    def __init__(
        self,
        sparsity: float,
        criterion: str | Criterion = "magnitude",
        criterion_args: dict[str, Any] | None = None,
        schedule: str | PruningSchedule = "one_shot",
        schedule_args: dict[str, Any] | None = None,
        scope: str = "layerwise",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        types: list[str] | None = None,
        parameter: str = "weight",
        layer_sparsity: dict[str, float] | None = None,
        data_batches: int = 8,
        rescale_dropout: bool = False,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        _check_sparsity("sparsity", sparsity)
        for pattern, value in (layer_sparsity or {}).items():
            _check_sparsity(f"layer_sparsity[{pattern!r}]", value)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if not isinstance(data_batches, int) or data_batches < 1:
            raise ValueError(f"data_batches must be a positive int, got {data_batches!r}")
        self.sparsity = float(sparsity)
        self.criterion = get_criterion(criterion, **(criterion_args or {}))
        self.schedule = get_pruning_schedule(schedule, **(schedule_args or {}))
        self.scope = scope
        self.targets = TargetSpec(
            include=tuple(include or ("*",)),
            exclude=tuple(exclude or ()),
            types=tuple(types or DEFAULT_TYPES),
            parameter=parameter,
        )
        self.layer_sparsity = {str(k): float(v) for k, v in (layer_sparsity or {}).items()}
        self.data_batches = data_batches
        self.rescale_dropout = rescale_dropout
        self.seed = seed
        self.verbose = verbose
        # State (in state_dict): masks keyed by parameter FQN, last step acted on, rewind snapshot.
        self.masks: dict[str, torch.Tensor] = {}
        self.last_event_step = -1
        self.released = False
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, float]] = []
        self._params: dict[str, nn.Parameter] = {}
        self._dropout_p0: dict[str, float] = {}
        self._prepared: PreparedMasks | None = None  # masks ready for the per-step hooks

    # -- Lightning hooks -------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            sparsity=self.sparsity,
            scope=self.scope,
            include=list(self.targets.include),
            exclude=list(self.targets.exclude),
            parameter=self.targets.parameter,
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._params = select_parameters(pl_module, self.targets)
        for pattern in self.layer_sparsity:
            if not any(_module_matches(name, pattern) for name in self._params):
                raise ValueError(
                    f"layer_sparsity pattern {pattern!r} matches no targeted layer; targeted: "
                    f"{[_module_name(n) for n in self._params]}"
                )
        self._dropout_p0 = {n: m.p for n, m in pl_module.named_modules() if isinstance(m, nn.Dropout)}

    def on_train_start(self, trainer, pl_module) -> None:
        # Runs before the first optimizer step: every remaining configuration error surfaces here.
        if self.criterion.needs_data and not pl_module.automatic_optimization:
            raise ValueError(
                f"criterion {self.criterion.name!r} needs the loss of training_step, but this module uses "
                "manual optimization (training_step returns no loss); use 'magnitude' or 'random'"
            )
        total = trainer.estimated_stepping_batches
        last = self.schedule.last_step()
        if math.isfinite(total) and last >= total:
            raise ValueError(
                f"the pruning schedule acts until optimizer step {last}, but the run has only {int(total)} "
                f"steps (max_steps / max_epochs); shorten the schedule or train longer"
            )
        if self.masks:  # restored from a checkpoint: re-impose them (weights are already zero)
            self._masks_changed()
        if self.schedule.rewind_step == 0 and self.snapshot is None:
            self.snapshot = self._take_snapshot()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step <= self.last_event_step:
            return  # already acted at this step (gradient accumulation calls this once per micro-batch)
        rewind = self.schedule.rewind_step
        if rewind is not None and rewind > 0 and step == rewind and self.snapshot is None:
            self.snapshot = self._take_snapshot()
        if self.schedule.release_step is not None and step == self.schedule.release_step:
            self._release(trainer)
            self.last_event_step = step
        elif self.schedule.is_prune_step(step):
            self._prune(trainer, pl_module, step)
            self.last_event_step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._prepared is not None:
            self._prepared.zero_gradients()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._prepared is not None:
            self._prepared.zero_weights()

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {k: v.detach().cpu() for k, v in self.masks.items()},
            "last_event_step": self.last_event_step,
            "released": self.released,
            "snapshot": None if self.snapshot is None else {k: v.cpu() for k, v in self.snapshot.items()},
            "history": list(self.history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = {k: v.bool() for k, v in state_dict["masks"].items()}
        self.last_event_step = int(state_dict["last_event_step"])
        self.released = bool(state_dict["released"])
        self.snapshot = state_dict.get("snapshot")
        self.history = list(state_dict.get("history", []))

    def export(self, pl_module: nn.Module, attr: str | None = "net") -> nn.Module:
        """A plain copy of the pruned network (``pl_module.<attr>``, or the module itself for ``None``).

        Pruned weights are exactly zero in it; no masks, hooks or extra parameters are attached, so it saves,
        loads and exports like the original architecture (use the zoo's ``sparse-safetensors`` codec to store
        it compactly).
        """
        net = pl_module if attr is None else getattr(pl_module, attr)
        prefix = "" if attr is None else f"{attr}."
        plain = copy.deepcopy(net).eval()
        params = dict(plain.named_parameters())
        inside = {n: m for n, m in self.masks.items() if n.startswith(prefix)}
        apply_masks({n: params[n[len(prefix) :]] for n in inside}, inside)
        return plain

    def compression_summary(self) -> dict[str, Any]:
        """What this callback did, for zoo cards (:class:`~lit_compress.zoo.ZooExport` collects it)."""
        overrides = f", overrides {self.layer_sparsity}" if self.layer_sparsity else ""
        return {
            "methods": [f"pruning:{self.criterion.name}"],
            "description": f"{self.scope} {self.criterion.name} pruning to {self.sparsity:.1%} with the "
            f"{self.schedule.name} schedule{overrides}",
        }

    # -- mechanics --------------------------------------------------------------------------------------

    def final_sparsity(self, param_name: str) -> float:
        """Final sparsity of one target: its first matching ``layer_sparsity`` override, else ``sparsity``."""
        for pattern, value in self.layer_sparsity.items():
            if _module_matches(param_name, pattern):
                return value
        return self.sparsity

    @torch.no_grad()
    def _prune(self, trainer, pl_module, step: int) -> None:
        self._sync_mask_devices()
        context = ScoringContext(
            model=pl_module,
            params=self._params,
            masks=dict(self.masks),
            loss_fn=self._loss_fn(pl_module) if self.criterion.needs_data else None,
            batches=self._batches(trainer) if self.criterion.needs_data else None,
            all_reduce_mean=_all_reduce_mean(trainer),
            generator_seed=self.seed + step,
            step=step,
        )
        with torch.enable_grad():
            scores = self.criterion.scores(context)
        targets = {name: self.schedule.target_sparsity(step, self.final_sparsity(name)) for name in scores}
        current = self.masks or None
        overridden = {n for n in scores if any(_module_matches(n, p) for p in self.layer_sparsity)}
        if self.scope == "global":
            rest = {n: s for n, s in scores.items() if n not in overridden}
            global_target = self.schedule.target_sparsity(step, self.sparsity)
            masks = global_masks(rest, global_target, current) if rest else {}
            masks.update(layerwise_masks({n: scores[n] for n in overridden}, targets, current))
        else:
            masks = layerwise_masks(scores, targets, current)
        with torch.enable_grad():
            updated = self.criterion.update_weights(context, masks)
        if updated:
            for name, value in updated.items():
                self._params[name].copy_(value)
        self.masks = masks
        self._masks_changed()
        mask_optimizer_state(trainer.optimizers, self._params, self.masks)
        if self.schedule.rewind_step is not None:
            self._rewind(trainer, pl_module)
        stats = sparsity_stats(self.masks)
        if self.rescale_dropout:
            self._rescale_dropout(pl_module, kept=1.0 - stats["global"])
        self._report(trainer, step, stats)

    def _rewind(self, trainer, pl_module) -> None:
        """Lottery ticket: reset surviving weights to the snapshot (or re-initialise them: the control)."""
        if self.schedule.reinit:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(self.seed + 7919 * (len(self.history) + 1))
            fresh = {}
            for name in self._params:
                module = pl_module.get_submodule(_module_name(name))
                clone = copy.deepcopy(module)
                clone.reset_parameters()
                fresh[name] = getattr(clone, self.targets.parameter).detach()
            torch.random.set_rng_state(generator_state)
        else:
            if self.snapshot is None:
                raise RuntimeError(
                    f"lottery-ticket rewind requested but no snapshot was taken at step "
                    f"{self.schedule.rewind_step}; the run resumed from a checkpoint older than the snapshot"
                )
            fresh = self.snapshot
        for name, param in self._params.items():
            param.copy_(fresh[name].to(param.device, param.dtype))
        self._prepared.zero_weights()
        for optimizer in trainer.optimizers:  # a rewound ticket restarts training: drop optimizer memory
            for param in self._params.values():
                optimizer.state.pop(param, None)

    def _release(self, trainer) -> None:
        """Dense-Sparse-Dense: drop every mask; pruned weights restart from zero and train again."""
        self.masks = {}
        self._prepared = None
        self.released = True
        self._report(trainer, trainer.global_step, {"global": 0.0}, event="release")

    def _rescale_dropout(self, pl_module, kept: float) -> None:
        for name, module in pl_module.named_modules():
            if isinstance(module, nn.Dropout) and name in self._dropout_p0:
                module.p = rescaled_dropout(self._dropout_p0[name], 1.0, kept)

    def _take_snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self._params.items()}

    def _sync_mask_devices(self) -> None:
        self.masks = {n: m.to(self._params[n].device) for n, m in self.masks.items()}

    def _masks_changed(self) -> None:
        """Move masks to their parameters' devices, prepare the hot-path form, zero the pruned weights."""
        self._sync_mask_devices()
        self._prepared = PreparedMasks(self._params, self.masks) if self.masks else None
        if self._prepared is not None:
            self._prepared.zero_weights()

    def _report(self, trainer, step: int, stats: dict[str, float], event: str = "prune") -> None:
        record = {"step": step, **{f"sparsity/{k}": v for k, v in stats.items()}}
        self.history.append(record)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"pruning/{k}": v for k, v in stats.items()}, step=step)
            if self.verbose:
                layers = ", ".join(f"{_module_name(k)} {v:.1%}" for k, v in stats.items() if k != "global")
                print(
                    f"[lit_compress] step {step}: {event} -> global sparsity {stats['global']:.2%} ({layers})"
                )

    # -- data for data-dependent criteria --------------------------------------------------------------

    def _loss_fn(self, pl_module) -> Callable[[Any], torch.Tensor]:
        return scoring_loss_fn(pl_module)

    def _batches(self, trainer) -> Callable[[], Iterator[Any]]:
        return scoring_batches(trainer, self.data_batches, "data-dependent pruning criterion")


def scoring_loss_fn(pl_module) -> Callable[[Any], torch.Tensor]:
    """``batch -> loss`` through the module's own ``training_step``, for data-dependent criteria.

    Scoring batches are not training steps: logging is suppressed and torchmetrics states updated inside
    ``training_step`` are restored, so train metrics only see real steps.
    """

    def loss(batch: Any) -> torch.Tensor:
        log, log_dict = pl_module.log, pl_module.log_dict
        pl_module.log = lambda *a, **k: None
        pl_module.log_dict = lambda *a, **k: None
        try:
            with _metric_states_preserved(pl_module):
                return _loss_from_output(pl_module.training_step(batch, 0))
        finally:
            pl_module.log, pl_module.log_dict = log, log_dict

    return loss


def scoring_batches(trainer, count: int, what: str) -> Callable[[], Iterator[Any]]:
    """A factory of iterators over the first ``count`` training batches, moved to the strategy's device."""

    def batches() -> Iterator[Any]:
        loader = trainer.train_dataloader
        if loader is None:
            raise ValueError(f"no training dataloader available for a {what}")
        for i, batch in enumerate(loader):
            if i >= count:
                return
            yield trainer.strategy.batch_to_device(batch)

    return batches


@contextmanager
def _metric_states_preserved(module: nn.Module) -> Iterator[None]:
    """Restore every torchmetrics ``Metric`` of ``module`` to its state on entry."""
    try:
        from torchmetrics import Metric
    except ImportError:  # pragma: no cover - torchmetrics is a dependency
        yield
        return
    saved = [
        (m, {k: copy.deepcopy(getattr(m, k)) for k in m._defaults}, m._update_count, m._computed)
        for m in module.modules()
        if isinstance(m, Metric)
    ]
    try:
        yield
    finally:
        for metric, states, count, computed in saved:
            for key, value in states.items():
                setattr(metric, key, value)
            metric._update_count, metric._computed = count, computed


def _all_reduce_mean(trainer) -> Callable[[torch.Tensor], torch.Tensor]:
    if trainer.world_size <= 1:
        return lambda t: t
    return lambda t: trainer.strategy.reduce(t, reduce_op="mean")


def _check_sparsity(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"{name} must be a number in [0, 1) (0.9 = 90% of the weights pruned), got {value!r}"
        )


def _module_name(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


def _module_matches(param_name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(_module_name(param_name), pattern)
