"""When to prune, and to which cumulative sparsity.

A pruning schedule is a frozen dataclass that maps the optimizer step (``trainer.global_step``, never an
epoch) to a *cumulative* sparsity target: ``0.9`` means 90% of the targeted weights are zero, never "90% of
what is left". The layer's final sparsity ``final`` is the callback's business (it may differ per layer), so
every query takes it as an argument::

    schedule = Gradual(start_step=0, end_step=100, frequency=10)
    schedule.prune_steps()                 # [0, 10, 20, ..., 100]: masks are recomputed at these steps
    schedule.target_sparsity(50, final=0.9)  # 0.7875 = 0.9 * (1 - 0.5 ** 3)

"An event at step ``s``" means: once ``s`` optimizer steps have been taken (``trainer.global_step == s``),
before step ``s + 1``. Targets are 0.0 before the first prune step, constant between prune steps and equal
to ``final`` from the last prune step on (except :class:`DenseSparseDense`, whose masks are dropped at
``release_step``, after which the target is 0.0 again).

Three attributes tell the callback about the non-pruning events; they are plain class attributes on the
base class and dataclass fields on the schedules that use them:

- ``release_step``: :class:`DenseSparseDense` drops every mask at this step (dense retraining).
- ``rewind_step``: :class:`LotteryTicket` snapshots the weights at this step (0 = the initialisation) and,
  right after every prune event, resets the surviving weights to that snapshot.
- ``reinit``: with a ``rewind_step``, re-initialise the survivors randomly instead (Liu et al.'s control).

Schedules form an open registry: ``@register_pruning_schedule("name")`` on your own :class:`PruningSchedule`
subclass, ``get_pruning_schedule("name", **kwargs)`` to build one.
"""

from __future__ import annotations

import difflib
import itertools
import math
from abc import ABC, abstractmethod
from bisect import bisect_right
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar

from lit_compress.schedules import (
    _build,
    _check_float,
    _check_fraction,
    _check_int,
    _check_step_arg,
    _registrar,
    _set,
    _unknown_name,
)

__all__ = [
    "DenseSparseDense",
    "Gradual",
    "Iterative",
    "LotteryTicket",
    "OneShot",
    "PruningSchedule",
    "get_pruning_schedule",
    "list_pruning_schedules",
    "register_pruning_schedule",
    "rescaled_dropout",
]

GROWTHS = ("linear", "geometric")


class PruningSchedule(ABC):
    """Base class: prune steps and the cumulative sparsity target in force at each optimizer step.

    Subclasses are frozen dataclasses implementing :meth:`_compute_prune_steps` and, when the target after
    the ``k``-th of ``n`` prune events is not simply ``final``, :meth:`_sparsity_after`.
    """

    name: ClassVar[str] = ""
    # Plain class attributes here; the schedules that use them redeclare them as dataclass fields.
    release_step: int | None = None
    rewind_step: int | None = None
    reinit: bool = False

    # ----------------------------------------------------------------------------------------- to implement
    @abstractmethod
    def _compute_prune_steps(self) -> list[int]:
        """Sorted, distinct optimizer steps at which masks are recomputed (called once, then cached)."""

    def _sparsity_after(self, k: int, n: int, final: float) -> float:
        """Cumulative target after the ``k``-th of ``n`` prune events, ``1 <= k < n`` (``k == n`` gives
        ``final``)."""
        return final

    def _check_final(self, final: float) -> None:
        """Extra checks of ``final`` against the schedule's own arguments (see :class:`Gradual`)."""
        return None

    # ----------------------------------------------------------------------------------------- interface
    @cached_property
    def _prune_steps(self) -> tuple[int, ...]:
        steps = tuple(self._compute_prune_steps())
        valid = all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in steps)
        if not steps or not valid or any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(
                f"{type(self).__name__}._compute_prune_steps() must return a non-empty, strictly increasing "
                f"list of optimizer steps (ints >= 0), got {list(steps)}."
            )
        return steps

    def prune_steps(self) -> list[int]:
        """Sorted optimizer steps at which masks are recomputed."""
        return list(self._prune_steps)

    def is_prune_step(self, step: int) -> bool:
        """Whether masks are recomputed at optimizer step ``step``."""
        step = _check_step_arg(step)
        i = bisect_right(self._prune_steps, step)
        return i > 0 and self._prune_steps[i - 1] == step

    def target_sparsity(self, step: int, final: float) -> float:
        """Cumulative sparsity target in force at optimizer ``step`` for a layer whose final sparsity is
        ``final`` (in ``[0, 1)``): 0.0 before the first prune step, constant between prune steps, ``final``
        from the last prune step on, and 0.0 again from ``release_step`` on when there is one."""
        step = _check_step_arg(step)
        final = _check_fraction(final, "final", type(self).__name__)
        self._check_final(final)
        if self.release_step is not None and step >= self.release_step:
            return 0.0
        steps = self._prune_steps
        k = bisect_right(steps, step)
        if k == 0:
            return 0.0
        if k == len(steps):
            return final
        return self._sparsity_after(k, len(steps), final)

    def last_step(self) -> int:
        """The last optimizer step at which the schedule acts (prune, release or rewind); a run's
        ``max_steps`` must be at least this."""
        events = [*self._prune_steps, self.release_step, self.rewind_step]
        return max(e for e in events if e is not None)

    def suggested_max_steps(self) -> int:
        """The fewest optimizer steps that give the last phase its full training (see each schedule)."""
        return self.last_step()


_PRUNING_SCHEDULES: dict[str, type[PruningSchedule]] = {}
register_pruning_schedule = _registrar("pruning schedule", _PRUNING_SCHEDULES, PruningSchedule)
register_pruning_schedule.__doc__ = (
    "Decorator registering a :class:`PruningSchedule` subclass under ``name``."
)


def list_pruning_schedules() -> list[str]:
    """Registered pruning schedule names."""
    return sorted(_PRUNING_SCHEDULES)


def get_pruning_schedule(name_or_instance: str | PruningSchedule, **kwargs: Any) -> PruningSchedule:
    """A :class:`PruningSchedule` from a registered name (built with ``kwargs``) or an instance (returned)."""
    if isinstance(name_or_instance, PruningSchedule):
        if kwargs:
            raise ValueError(
                f"get_pruning_schedule got a ready {type(name_or_instance).__name__} and extra keyword "
                f"arguments {sorted(kwargs)}; pass either an instance or a name with its arguments."
            )
        return name_or_instance
    if isinstance(name_or_instance, str):
        if name_or_instance not in _PRUNING_SCHEDULES:
            raise _unknown_name("pruning schedule", name_or_instance, list_pruning_schedules())
        return _build("pruning schedule", name_or_instance, _PRUNING_SCHEDULES[name_or_instance], kwargs)
    raise ValueError(
        f"cannot make a pruning schedule from {name_or_instance!r} (type {type(name_or_instance).__name__}); "
        f"expected a registered name ({', '.join(list_pruning_schedules())}) or a PruningSchedule instance."
    )


def _grow(k: int, rounds: int, final: float, growth: str) -> float:
    """Cumulative target after round ``k`` of ``rounds``: ``final * k / rounds`` (linear) or
    ``1 - (1 - final) ** (k / rounds)`` (geometric: every round removes the same fraction of what is left)."""
    if k >= rounds:
        return final
    if growth == "linear":
        return final * k / rounds
    return 1.0 - (1.0 - final) ** (k / rounds)


def _check_rounds(schedule: PruningSchedule) -> None:
    owner = type(schedule).__name__
    _set(
        schedule,
        rounds=_check_int(schedule.rounds, "rounds", owner, minimum=1, hint="Use at least one round."),
        steps_per_round=_check_int(
            schedule.steps_per_round,
            "steps_per_round",
            owner,
            minimum=1,
            hint="Each round trains for steps_per_round optimizer steps before the next prune.",
        ),
    )


@register_pruning_schedule("one_shot")
@dataclass(frozen=True)
class OneShot(PruningSchedule):
    """Prune once, straight to ``final``, at optimizer ``step`` (then train the sparse net).

    ``step=0`` prunes before the first optimizer step: with a data-driven criterion (SNIP, GraSP) that is
    pruning at initialisation; with magnitudes after training it is Han et al.'s single prune/retrain.
    """

    step: int = 0

    def __post_init__(self) -> None:
        _set(self, step=_check_int(self.step, "step", "OneShot"))

    def _compute_prune_steps(self) -> list[int]:
        return [self.step]


@register_pruning_schedule("iterative")
@dataclass(frozen=True)
class Iterative(PruningSchedule):
    """Han et al. (2015): ``rounds`` of prune then retrain for ``steps_per_round`` optimizer steps.

    Prunes at ``start_step + i * steps_per_round`` for ``i = 0 .. rounds - 1``. After round ``k``
    (``k = 1 .. rounds``) the cumulative target is

    - ``growth="linear"``:    ``final * k / rounds``
    - ``growth="geometric"``: ``1 - (1 - final) ** (k / rounds)`` -- each round removes the same fraction
      ``1 - (1 - final) ** (1 / rounds)`` of the weights still alive (Frankle & Carbin's p% per round).

    ``last_step() = start_step + (rounds - 1) * steps_per_round``; the last round's retraining needs
    ``suggested_max_steps() = last_step() + steps_per_round``.
    """

    rounds: int
    steps_per_round: int
    start_step: int = 0
    growth: str = "geometric"

    def __post_init__(self) -> None:
        _check_rounds(self)
        _set(self, start_step=_check_int(self.start_step, "start_step", "Iterative"))
        if self.growth not in GROWTHS:
            close = difflib.get_close_matches(str(self.growth), GROWTHS, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"Iterative: growth must be one of {', '.join(map(repr, GROWTHS))}, "
                f"got {self.growth!r}.{hint} "
                "'geometric' removes the same fraction of the remaining weights each round; 'linear' removes "
                "final / rounds of all weights each round."
            )

    def _compute_prune_steps(self) -> list[int]:
        return [self.start_step + i * self.steps_per_round for i in range(self.rounds)]

    def _sparsity_after(self, k: int, n: int, final: float) -> float:
        return _grow(k, self.rounds, final, self.growth)

    def suggested_max_steps(self) -> int:
        return self.last_step() + self.steps_per_round


@register_pruning_schedule("gradual")
@dataclass(frozen=True)
class Gradual(PruningSchedule):
    """Zhu & Gupta (2017) gradual pruning: prune every ``frequency`` optimizer steps from ``start_step`` to
    ``end_step`` inclusive, to

        ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3``

    with ``t0 = start_step``, ``dt = frequency``, ``n * dt = end_step - start_step``, ``s_i =
    initial_sparsity`` (the target at the first prune step) and ``s_f = final``. Fast pruning first, slower
    as fewer weights remain. ``end_step - start_step`` must be a multiple of ``frequency``.
    """

    start_step: int
    end_step: int
    frequency: int
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        start = _check_int(self.start_step, "start_step", "Gradual")
        end = _check_int(self.end_step, "end_step", "Gradual")
        frequency = _check_int(
            self.frequency, "frequency", "Gradual", minimum=1, hint="Prune at least every step (frequency=1)."
        )
        if end <= start:
            raise ValueError(
                f"Gradual: end_step must be > start_step, got start_step={start}, end_step={end}. "
                f"To prune once use OneShot(step={start})."
            )
        span = end - start
        if span % frequency:
            below = start + (span // frequency) * frequency
            above = below + frequency
            options = sorted((e for e in (below, above) if e > start), key=lambda e: (abs(e - end), e))
            suggestion = f"{options[0]}" + (f" (or {options[1]})" if len(options) > 1 else "")
            raise ValueError(
                f"Gradual: end_step - start_step ({end} - {start} = {span}) must be a multiple of frequency "
                f"({frequency}) so that end_step is a prune step. Nearest valid end_step: {suggestion}."
            )
        _set(
            self,
            start_step=start,
            end_step=end,
            frequency=frequency,
            initial_sparsity=_check_fraction(self.initial_sparsity, "initial_sparsity", "Gradual"),
        )

    def _check_final(self, final: float) -> None:
        if self.initial_sparsity > final:
            raise ValueError(
                f"Gradual: initial_sparsity ({self.initial_sparsity}) must be <= the final sparsity "
                f"({final}), "
                "otherwise the cubic would un-prune weights. Lower initial_sparsity or raise the target."
            )

    def _compute_prune_steps(self) -> list[int]:
        return list(range(self.start_step, self.end_step + 1, self.frequency))

    def _sparsity_after(self, k: int, n: int, final: float) -> float:
        t = self.start_step + (k - 1) * self.frequency
        progress = (t - self.start_step) / (self.end_step - self.start_step)
        return final + (self.initial_sparsity - final) * (1.0 - progress) ** 3


@register_pruning_schedule("lottery_ticket")
@dataclass(frozen=True)
class LotteryTicket(PruningSchedule):
    """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; rewinding to step ``k``: Frankle
    et al. 2020, "Stabilizing the lottery ticket hypothesis").

    The weights are snapshotted at ``rewind_step`` (0 = the initialisation). Then, for ``k = 1 .. rounds``:
    train ``steps_per_round`` steps, prune at step ``rewind_step + k * steps_per_round`` to the geometric
    target ``1 - (1 - final) ** (k / rounds)`` (every round removes the same fraction of the weights still
    alive), and right after that prune reset the surviving weights to the snapshot. Each round thus
    retrains from the rewound weights for the same ``steps_per_round`` steps as the dense run trained from
    ``rewind_step``.

    The last prune is also followed by a rewind: the final ("winning ticket") sparse net is then trained
    from the rewound state, so a run needs ``max_steps >= suggested_max_steps() = rewind_step +
    (rounds + 1) * steps_per_round``; ``last_step()`` is the last prune/rewind step.

    ``reinit=True`` is the random re-initialisation control (Frankle & Carbin; Liu et al. 2019,
    "Rethinking the value of network pruning"): survivors are re-initialised randomly instead of rewound.
    """

    rounds: int
    steps_per_round: int
    rewind_step: int = 0
    reinit: bool = False

    def __post_init__(self) -> None:
        _check_rounds(self)
        _set(self, rewind_step=_check_int(self.rewind_step, "rewind_step", "LotteryTicket"))
        if not isinstance(self.reinit, bool):
            raise ValueError(f"LotteryTicket: reinit must be true or false, got {self.reinit!r}.")

    def _compute_prune_steps(self) -> list[int]:
        return [self.rewind_step + k * self.steps_per_round for k in range(1, self.rounds + 1)]

    def _sparsity_after(self, k: int, n: int, final: float) -> float:
        return _grow(k, self.rounds, final, "geometric")

    def suggested_max_steps(self) -> int:
        return self.last_step() + self.steps_per_round


@register_pruning_schedule("dense_sparse_dense")
@dataclass(frozen=True)
class DenseSparseDense(PruningSchedule):
    """Han et al. (2017) DSD: dense training until ``sparse_step``, one-shot prune to ``final`` there, sparse
    training, then at ``release_step`` every mask is dropped and training continues dense (the pruned
    weights restart from zero). The target is ``final`` on ``[sparse_step, release_step)`` and 0.0 from
    ``release_step`` on.

    DSD retrains the re-dense phase at a lower learning rate (1/10 in the paper); that is the LR
    scheduler's business, e.g. stepped at ``release_step``::

        trainer:
          max_steps: 30000
          callbacks:
            - class_path: lit_compress.pruning.Pruning
              init_args:
                sparsity: 0.5
                schedule:
                  class_path: lit_compress.pruning.schedules.DenseSparseDense
                  init_args: {sparse_step: 10000, release_step: 20000}
        model:
          class_path: lit_compress.models.ImageClassifier
          init_args:
            optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.01, momentum: 0.9}}
            lr_scheduler:
              class_path: torch.optim.lr_scheduler.MultiStepLR
              init_args: {milestones: [20000], gamma: 0.1}
            lr_scheduler_interval: step
    """

    sparse_step: int
    release_step: int = field()  # no default: not the base class's None

    def __post_init__(self) -> None:
        sparse = _check_int(self.sparse_step, "sparse_step", "DenseSparseDense")
        release = _check_int(self.release_step, "release_step", "DenseSparseDense")
        if release <= sparse:
            raise ValueError(
                f"DenseSparseDense: release_step must be > sparse_step, got sparse_step={sparse}, "
                f"release_step={release}. The sparse phase runs from sparse_step to release_step."
            )
        _set(self, sparse_step=sparse, release_step=release)

    def _compute_prune_steps(self) -> list[int]:
        return [self.sparse_step]


def rescaled_dropout(original_p: float, kept_fraction_before: float, kept_fraction_now: float) -> float:
    """Han et al. (2015)'s dropout rate for retraining a pruned layer: ``D_r = D_o * sqrt(C_r / C_o)``.

    ``C_o`` and ``C_r`` are the numbers of connections kept when the rate was ``original_p`` and now, given
    here as kept fractions (``1 - sparsity``). The square root is because dropout acts on neurons, whose
    count scales like the square root of the connections. E.g. ``rescaled_dropout(0.5, 1.0, 0.25) == 0.25``.
    """
    p = _check_float(original_p, "original_p", "rescaled_dropout")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"rescaled_dropout: original_p must be a dropout probability in [0, 1), got {p}.")
    fractions = {}
    for arg, value in (
        ("kept_fraction_before", kept_fraction_before),
        ("kept_fraction_now", kept_fraction_now),
    ):
        value = _check_float(value, arg, "rescaled_dropout")
        if not 0.0 < value <= 1.0:
            raise ValueError(
                f"rescaled_dropout: {arg} must be in (0, 1], got {value}. It is the fraction of connections "
                "kept (1 - sparsity); a layer with nothing kept has no dropout to rescale."
            )
        fractions[arg] = value
    rate = p * math.sqrt(fractions["kept_fraction_now"] / fractions["kept_fraction_before"])
    if rate >= 1.0:
        raise ValueError(
            f"rescaled_dropout: {p} * sqrt({kept_fraction_now} / {kept_fraction_before}) = {rate:.4g} is not "
            "a dropout probability (>= 1). Pass the dense rate with kept_fraction_before=1.0 instead."
        )
    return rate
