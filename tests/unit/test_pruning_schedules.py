import dataclasses
import itertools
import math
from dataclasses import dataclass

import pytest

from lit_compress.pruning.schedules import (
    DenseSparseDense,
    Gradual,
    Iterative,
    LotteryTicket,
    OneShot,
    PruningSchedule,
    get_pruning_schedule,
    list_pruning_schedules,
    register_pruning_schedule,
    rescaled_dropout,
)


def targets(schedule, final, steps):
    return [schedule.target_sparsity(t, final) for t in steps]


# --------------------------------------------------------------------------------------------- OneShot
def test_one_shot():
    s = OneShot(step=100)
    assert s.prune_steps() == [100] and s.last_step() == 100 == s.suggested_max_steps()
    assert targets(s, 0.9, [0, 99, 100, 101, 10**6]) == [0.0, 0.0, 0.9, 0.9, 0.9]
    assert OneShot().prune_steps() == [0] and OneShot().target_sparsity(0, 0.5) == 0.5
    assert (s.release_step, s.rewind_step, s.reinit) == (None, None, False)


# --------------------------------------------------------------------------------------------- Iterative
def test_iterative_geometric_each_round_removes_same_fraction_of_the_rest():
    s = Iterative(rounds=3, steps_per_round=10, start_step=5)
    assert s.growth == "geometric"
    assert s.prune_steps() == [5, 15, 25]
    assert s.last_step() == 25 and s.suggested_max_steps() == 35
    # final 0.875 = 1 - 0.5**3: every round halves the surviving weights
    assert targets(s, 0.875, [0, 4, 5, 14, 15, 24, 25, 1000]) == pytest.approx(
        [0.0, 0.0, 0.5, 0.5, 0.75, 0.75, 0.875, 0.875]
    )
    # general formula 1 - (1 - final) ** (k / rounds)
    assert s.target_sparsity(15, 0.9) == pytest.approx(1 - 0.1 ** (2 / 3))
    kept = [1 - s.target_sparsity(t, 0.9) for t in (5, 15, 25)]
    assert kept[1] / kept[0] == pytest.approx(kept[2] / kept[1]) == pytest.approx(kept[0])


def test_iterative_linear_growth():
    s = Iterative(rounds=4, steps_per_round=100, growth="linear")
    assert s.prune_steps() == [0, 100, 200, 300]
    assert targets(s, 0.8, [0, 50, 100, 250, 300, 301]) == pytest.approx([0.2, 0.2, 0.4, 0.6, 0.8, 0.8])


def test_iterative_geometric_front_loads_more_than_linear():
    geo, lin = Iterative(5, 10), Iterative(5, 10, growth="linear")
    for t in (0, 10, 20, 30):
        assert geo.target_sparsity(t, 0.95) > lin.target_sparsity(t, 0.95)
    assert geo.target_sparsity(40, 0.95) == lin.target_sparsity(40, 0.95) == 0.95


def test_iterative_single_round_is_one_shot():
    s = Iterative(rounds=1, steps_per_round=7, start_step=3)
    assert s.prune_steps() == [3]
    assert targets(s, 0.6, [2, 3]) == targets(OneShot(3), 0.6, [2, 3]) == [0.0, 0.6]


def test_final_target_is_exact():
    # 1 - (1 - 0.9) ** 1 is not 0.9 in floating point: the last round must give ``final`` exactly
    for final in (0.1, 0.3, 0.7, 0.9, 0.97):
        assert Iterative(3, 10).target_sparsity(20, final) == final
        assert LotteryTicket(3, 10).target_sparsity(30, final) == final
        assert Gradual(0, 30, 10).target_sparsity(30, final) == final


# --------------------------------------------------------------------------------------------- Gradual
def test_gradual_zhu_gupta_hand_values():
    s = Gradual(start_step=0, end_step=100, frequency=10)
    assert s.prune_steps() == list(range(0, 101, 10))
    assert s.last_step() == 100
    assert s.target_sparsity(0, 0.9) == 0.0  # s_i at t0
    assert s.target_sparsity(50, 0.9) == pytest.approx(0.9 * (1 - 0.5**3)) == pytest.approx(0.7875)
    assert s.target_sparsity(10, 0.9) == pytest.approx(0.9 * (1 - 0.9**3))
    assert s.target_sparsity(90, 0.9) == pytest.approx(0.9 * (1 - 0.1**3))
    assert s.target_sparsity(100, 0.9) == 0.9 and s.target_sparsity(5000, 0.9) == 0.9


def test_gradual_constant_between_prune_steps():
    s = Gradual(start_step=0, end_step=100, frequency=10)
    assert targets(s, 0.9, range(50, 60)) == [pytest.approx(0.7875)] * 10
    assert targets(s, 0.9, range(90, 100)) == [s.target_sparsity(90, 0.9)] * 10


def test_gradual_with_offset_and_initial_sparsity():
    s = Gradual(start_step=1000, end_step=3000, frequency=500, initial_sparsity=0.1)
    assert s.prune_steps() == [1000, 1500, 2000, 2500, 3000]
    assert s.target_sparsity(999, 0.9) == 0.0
    assert s.target_sparsity(1000, 0.9) == pytest.approx(0.1)
    assert s.target_sparsity(2000, 0.9) == pytest.approx(0.9 + (0.1 - 0.9) * 0.5**3) == pytest.approx(0.8)
    assert s.target_sparsity(2700, 0.9) == pytest.approx(0.9 - 0.8 * 0.25**3)
    assert s.target_sparsity(3000, 0.9) == 0.9
    assert s.target_sparsity(1200, 0.1) == pytest.approx(0.1)  # initial == final is allowed


# --------------------------------------------------------------------------------------------- Lottery
def test_lottery_ticket_prune_and_rewind_steps():
    s = LotteryTicket(rounds=3, steps_per_round=100)
    assert s.rewind_step == 0 and s.reinit is False and s.release_step is None
    assert s.prune_steps() == [100, 200, 300]  # first prune after one round of training
    assert s.last_step() == 300 and s.suggested_max_steps() == 400
    assert targets(s, 0.875, [0, 99, 100, 199, 200, 300, 400]) == pytest.approx(
        [0.0, 0.0, 0.5, 0.5, 0.75, 0.875, 0.875]
    )
    late = LotteryTicket(rounds=2, steps_per_round=50, rewind_step=20, reinit=True)
    assert late.prune_steps() == [70, 120] and late.rewind_step == 20 and late.reinit is True
    assert late.last_step() == 120 and late.suggested_max_steps() == 170
    assert late.target_sparsity(70, 0.99) == pytest.approx(0.9)


# --------------------------------------------------------------------------------------------- DSD
def test_dense_sparse_dense_release():
    s = DenseSparseDense(sparse_step=1000, release_step=2000)
    assert s.prune_steps() == [1000] and s.release_step == 2000 and s.rewind_step is None
    assert s.last_step() == 2000
    assert targets(s, 0.5, [0, 999, 1000, 1999, 2000, 10**6]) == [0.0, 0.0, 0.5, 0.5, 0.0, 0.0]
    assert DenseSparseDense(0, 1).target_sparsity(0, 0.3) == 0.3


def test_base_class_event_attributes_stay_defaults():
    assert (PruningSchedule.release_step, PruningSchedule.rewind_step, PruningSchedule.reinit) == (
        None,
        None,
        False,
    )
    with pytest.raises(TypeError):
        DenseSparseDense(sparse_step=10)  # release_step is required, not inherited as None


# --------------------------------------------------------------------------------------------- properties
SCHEDULES = [
    OneShot(7),
    Iterative(4, 9, start_step=2),
    Iterative(3, 5, growth="linear"),
    Gradual(3, 43, 5),
    Gradual(0, 40, 4, initial_sparsity=0.05),
    LotteryTicket(3, 10, rewind_step=4),
    DenseSparseDense(5, 30),
]


GRID = [
    pytest.param(s, f, id=f"{s!r}-{f}")
    for s in SCHEDULES
    for f in (0.0, 0.05, 0.5, 0.9, 0.999)
    if getattr(s, "initial_sparsity", 0.0) <= f  # initial > final is an error, tested below
]


@pytest.mark.parametrize(("schedule", "final"), GRID)
def test_targets_cumulative_monotone_and_piecewise_constant(schedule, final):
    steps = schedule.prune_steps()
    assert steps == sorted(set(steps)) and all(isinstance(t, int) for t in steps)
    horizon = schedule.last_step() + 20
    values = targets(schedule, final, range(horizon))
    assert all(0.0 <= v <= final for v in values)
    assert values[: steps[0]] == [0.0] * steps[0]
    for t in range(1, horizon):
        if t not in steps and t != schedule.release_step:
            assert values[t] == values[t - 1], f"target changed at {t}, not a prune step"
        assert schedule.is_prune_step(t) == (t in steps)
    released = schedule.release_step
    dense_until = released if released is not None else horizon
    assert all(b >= a for a, b in itertools.pairwise(values[:dense_until]))
    assert values[steps[-1]] == final
    if released is not None:
        assert values[released:] == [0.0] * (horizon - released)
    else:
        assert values[steps[-1] :] == [final] * (horizon - steps[-1])


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: repr(s))
def test_schedules_are_frozen_and_hashable(schedule):
    field = dataclasses.fields(schedule)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(schedule, field, 1)
    assert hash(schedule) == hash(dataclasses.replace(schedule))
    assert schedule == dataclasses.replace(schedule)


# --------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: OneShot(-1), r"OneShot: step must be >= 0, got -1"),
        (lambda: OneShot(1.5), r"OneShot: step must be an integer.*got 1.5"),
        (lambda: Iterative(0, 10), r"Iterative: rounds must be >= 1, got 0"),
        (lambda: Iterative(2, 0), r"Iterative: steps_per_round must be >= 1, got 0.*trains for "
         r"steps_per_round"),
        (lambda: Iterative(2, 10, start_step=-5), r"Iterative: start_step must be >= 0, got -5"),
        (lambda: Iterative(2, 10, growth="geometrc"), r"growth must be one of 'linear', 'geometric', got "
         r"'geometrc'\. Did you mean 'geometric'\?"),
        (lambda: Iterative(True, 10), r"rounds must be an integer"),
        (lambda: Gradual(-1, 10, 1), r"Gradual: start_step must be >= 0, got -1"),
        (lambda: Gradual(0, 10, 0), r"Gradual: frequency must be >= 1, got 0"),
        (lambda: Gradual(10, 10, 1), r"end_step must be > start_step.*OneShot\(step=10\)"),
        (lambda: Gradual(20, 10, 1), r"end_step must be > start_step, got start_step=20, end_step=10"),
        (lambda: Gradual(0, 95, 10), r"\(95 - 0 = 95\) must be a multiple of frequency \(10\).*end_step: 90 "
         r"\(or 100\)"),
        (lambda: Gradual(0, 98, 10), r"Nearest valid end_step: 100 \(or 90\)"),
        (lambda: Gradual(3, 8, 10), r"Nearest valid end_step: 13\."),
        (lambda: Gradual(0, 10, 1, initial_sparsity=1.0), r"initial_sparsity must be in \[0, 1\), got 1.0"),
        (lambda: Gradual(0, 10, 1, initial_sparsity=-0.1), r"initial_sparsity must be in \[0, 1\)"),
        (lambda: LotteryTicket(0, 10), r"LotteryTicket: rounds must be >= 1"),
        (lambda: LotteryTicket(2, -3), r"LotteryTicket: steps_per_round must be >= 1, got -3"),
        (lambda: LotteryTicket(2, 10, rewind_step=-1), r"LotteryTicket: rewind_step must be >= 0"),
        (lambda: LotteryTicket(2, 10, reinit="yes"), r"reinit must be true or false, got 'yes'"),
        (lambda: DenseSparseDense(-1, 10), r"DenseSparseDense: sparse_step must be >= 0"),
        (lambda: DenseSparseDense(10, 10), r"release_step must be > sparse_step, got sparse_step=10, "
         r"release_step=10"),
    ],
)  # fmt: skip
def test_constructor_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("final", [1.0, -0.1, 1.5, float("nan"), "0.9", None])
def test_target_rejects_final_out_of_range(final):
    with pytest.raises(ValueError, match=r"OneShot: final must be|final must be a finite real number"):
        OneShot(0).target_sparsity(5, final)


def test_target_rejects_bad_steps():
    with pytest.raises(ValueError, match=r"step must be >= 0, got -1"):
        OneShot(0).target_sparsity(-1, 0.5)
    with pytest.raises(ValueError, match=r"step must be an integer"):
        OneShot(0).target_sparsity(2.5, 0.5)
    with pytest.raises(ValueError, match=r"step must be >= 0"):
        OneShot(0).is_prune_step(-3)


def test_gradual_initial_above_final_fails_at_target_time():
    s = Gradual(0, 10, 1, initial_sparsity=0.5)  # final is unknown until the callback asks
    with pytest.raises(ValueError, match=r"initial_sparsity \(0.5\) must be <= the final sparsity \(0.4\)"):
        s.target_sparsity(0, 0.4)
    with pytest.raises(ValueError, match=r"initial_sparsity"):
        s.target_sparsity(100, 0.4)  # checked at every step, not only inside the ramp


# --------------------------------------------------------------------------------------------- registry
def test_registry_names_and_lookup():
    assert list_pruning_schedules() == sorted(list_pruning_schedules())
    assert {"one_shot", "iterative", "gradual", "lottery_ticket", "dense_sparse_dense"} <= set(
        list_pruning_schedules()
    )
    assert (OneShot.name, Iterative.name, Gradual.name) == ("one_shot", "iterative", "gradual")
    assert (LotteryTicket.name, DenseSparseDense.name) == ("lottery_ticket", "dense_sparse_dense")
    s = get_pruning_schedule("iterative", rounds=3, steps_per_round=2000)
    assert s == Iterative(3, 2000)
    assert get_pruning_schedule(s) is s
    assert get_pruning_schedule("one_shot") == OneShot(0)


def test_registry_errors():
    with pytest.raises(
        ValueError, match=r"unknown pruning schedule 'lotery'\. Did you mean 'lottery_ticket'\?"
    ):
        get_pruning_schedule("lotery")
    with pytest.raises(ValueError, match=r"Registered names: dense_sparse_dense, gradual, iterative"):
        get_pruning_schedule("magnitude")
    with pytest.raises(ValueError, match=r"'iterative' \(Iterative\) takes \(rounds, steps_per_round, "):
        get_pruning_schedule("iterative", rounds=3)
    with pytest.raises(ValueError, match=r"ready OneShot and extra keyword arguments \['step'\]"):
        get_pruning_schedule(OneShot(0), step=3)
    with pytest.raises(ValueError, match=r"cannot make a pruning schedule from 3"):
        get_pruning_schedule(3)


@pytest.fixture
def scratch_pruning_registry():
    import lit_compress.pruning.schedules as mod

    before = dict(mod._PRUNING_SCHEDULES)
    yield
    mod._PRUNING_SCHEDULES.clear()
    mod._PRUNING_SCHEDULES.update(before)


def test_register_custom_pruning_schedule(scratch_pruning_registry):
    @register_pruning_schedule("test_every")
    @dataclass(frozen=True)
    class Every(PruningSchedule):
        """Two events: half of ``final`` at ``step``, all of it at ``2 * step``."""

        step: int = 10

        def _compute_prune_steps(self) -> list[int]:
            return [self.step, 2 * self.step]

        def _sparsity_after(self, k: int, n: int, final: float) -> float:
            return final / 2

    s = get_pruning_schedule("test_every", step=5)
    assert Every.name == "test_every"
    assert targets(s, 0.8, [4, 5, 9, 10]) == [0.0, 0.4, 0.4, 0.8]
    with pytest.raises(ValueError, match=r"'gradual' is already registered by Gradual"):
        register_pruning_schedule("gradual")(Every)
    with pytest.raises(ValueError, match=r"expects a subclass of PruningSchedule"):
        register_pruning_schedule("test_bad")(OneShot.__mro__[-1])


def test_custom_schedule_with_bad_prune_steps_is_reported():
    @dataclass(frozen=True)
    class Broken(PruningSchedule):
        steps: tuple = (5, 3)

        def _compute_prune_steps(self) -> list[int]:
            return list(self.steps)

    with pytest.raises(
        ValueError, match=r"Broken._compute_prune_steps\(\) must return a non-empty, strictly"
    ):
        Broken().prune_steps()
    with pytest.raises(ValueError, match=r"got \[\]"):
        Broken(steps=()).last_step()


def test_yaml_class_path_instantiation():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--schedule", type=PruningSchedule)
    for class_name, init_args, expected in [
        ("DenseSparseDense", {"sparse_step": 10, "release_step": 20}, DenseSparseDense(10, 20)),
        ("LotteryTicket", {"rounds": 2, "steps_per_round": 5, "rewind_step": 1}, LotteryTicket(2, 5, 1)),
        ("Gradual", {"start_step": 0, "end_step": 100, "frequency": 10}, Gradual(0, 100, 10)),
    ]:
        cfg = parser.parse_object(
            {
                "schedule": {
                    "class_path": f"lit_compress.pruning.schedules.{class_name}",
                    "init_args": init_args,
                }
            }
        )
        assert parser.instantiate(cfg).schedule == expected


# --------------------------------------------------------------------------------------------- dropout
def test_rescaled_dropout_han_formula():
    assert rescaled_dropout(0.5, 1.0, 0.25) == pytest.approx(0.25)
    assert rescaled_dropout(0.5, 1.0, 0.09) == pytest.approx(0.15)
    assert rescaled_dropout(0.5, 0.5, 0.5) == pytest.approx(0.5)
    assert rescaled_dropout(0.4, 0.5, 0.125) == pytest.approx(0.2)
    assert rescaled_dropout(0.0, 1.0, 0.1) == 0.0
    assert rescaled_dropout(0.3, 0.1, 0.4) == pytest.approx(0.3 * math.sqrt(4))  # re-densifying


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1.0, 1.0, 0.5), r"original_p must be a dropout probability in \[0, 1\), got 1.0"),
        ((-0.1, 1.0, 0.5), r"original_p must be a dropout probability"),
        ((0.5, 0.0, 0.5), r"kept_fraction_before must be in \(0, 1\], got 0.0.*1 - sparsity"),
        ((0.5, 1.0, 0.0), r"kept_fraction_now must be in \(0, 1\]"),
        ((0.5, 1.0, 1.2), r"kept_fraction_now must be in \(0, 1\], got 1.2"),
        ((0.5, 0.1, 1.0), r"= 1.581 is not a dropout probability.*kept_fraction_before=1.0"),
        (("0.5", 1.0, 1.0), r"original_p must be a finite real number"),
    ],
)
def test_rescaled_dropout_validation(args, match):
    with pytest.raises(ValueError, match=match):
        rescaled_dropout(*args)
