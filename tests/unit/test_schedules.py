import dataclasses
import itertools
import math
from dataclasses import dataclass

import pytest

from lit_compress.schedules import (
    Constant,
    Cosine,
    Linear,
    Polynomial,
    Schedule,
    Step,
    get_schedule,
    list_schedules,
    register_schedule,
)


def test_constant():
    s = Constant(2.5)
    assert [s(t) for t in (0, 1, 10**9)] == [2.5, 2.5, 2.5]
    assert Constant(value=3).value == 3.0 and isinstance(Constant(3).value, float)


def test_linear_formula_and_clamping():
    s = Linear(start_value=1.0, end_value=0.0, start_step=10, end_step=20)
    assert s(0) == 1.0 and s(10) == 1.0
    assert s(15) == pytest.approx(0.5)
    assert s(12) == pytest.approx(0.8)
    assert s(20) == 0.0 and s(1000) == 0.0
    up = Linear(2.0, 4.0, 0, 4)
    assert [up(t) for t in range(6)] == pytest.approx([2.0, 2.5, 3.0, 3.5, 4.0, 4.0])


def test_polynomial_is_zhu_gupta_cubic():
    s = Polynomial(start_value=0.0, end_value=0.9, start_step=0, end_step=100)
    assert s.power == 3.0
    assert s(0) == 0.0
    assert s(50) == pytest.approx(0.9 * (1 - 0.5**3)) == pytest.approx(0.7875)
    assert s(10) == pytest.approx(0.9 + (0.0 - 0.9) * 0.9**3)
    assert s(100) == pytest.approx(0.9) and s(500) == pytest.approx(0.9)
    # with an offset start and a different power
    q = Polynomial(4.0, 1.0, 100, 200, power=2.0)
    assert q(50) == 4.0
    assert q(150) == pytest.approx(1.0 + 3.0 * 0.25)


def test_polynomial_power_one_equals_linear():
    p, lin = Polynomial(3.0, -1.0, 5, 25, power=1.0), Linear(3.0, -1.0, 5, 25)
    for t in range(0, 40, 3):
        assert p(t) == pytest.approx(lin(t))


def test_cosine_formula():
    s = Cosine(start_value=8.0, end_value=1.0, start_step=0, end_step=100)
    assert s(0) == 8.0
    assert s(50) == pytest.approx(4.5)
    assert s(25) == pytest.approx(1.0 + 7.0 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s(100) == 1.0 and s(10**6) == 1.0


def test_step_piecewise_constant_boundary_inclusive():
    s = Step(values=[4.0, 2.0, 1.0], boundaries=[1000, 5000])
    assert [s(t) for t in (0, 999, 1000, 4999, 5000, 10**7)] == [4.0, 4.0, 2.0, 2.0, 1.0, 1.0]
    assert Step([7.0], [])(123) == 7.0
    assert s.values == (4.0, 2.0, 1.0) and s.boundaries == (1000, 5000)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Linear(0.0, 1.0, 0, 10),
        lambda: Linear(1.0, 0.0, 5, 8),
        lambda: Polynomial(0.0, 0.9, 3, 40),
        lambda: Polynomial(2.0, 0.5, 0, 7, power=0.5),
        lambda: Cosine(0.0, 1.0, 0, 9),
        lambda: Cosine(5.0, -5.0, 2, 30),
        lambda: Step([0.0, 1.0, 3.0], [4, 9]),
    ],
)
def test_ramps_are_monotone_between_their_end_values(make):
    s = make()
    values = [s(t) for t in range(50)]
    increasing = values[-1] >= values[0]
    pairs = itertools.pairwise(values)
    assert all(b >= a - 1e-12 if increasing else b <= a + 1e-12 for a, b in pairs)


def test_schedules_are_frozen_hashable_and_comparable():
    s = Polynomial(0.0, 1.0, 0, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.power = 2.0
    assert s == Polynomial(0, 1, 0, 10) and hash(s) == hash(Polynomial(0, 1, 0, 10))
    assert hash(Step([1.0, 2.0], [3]))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Constant(float("nan")), r"Constant: value must be a finite real number, got nan"),
        (lambda: Constant(True), r"finite real number, got True"),
        (lambda: Constant("1.0"), r"finite real number"),
        (lambda: Linear(0.0, 1.0, -1, 10), r"Linear: start_step must be >= 0, got -1.*optimizer steps"),
        (lambda: Linear(0.0, 1.0, 0, -5), r"end_step must be >= 0"),
        (
            lambda: Linear(0.0, 1.0, 10, 10),
            r"end_step must be > start_step.*start_step=10, end_step=10.*Step",
        ),
        (lambda: Cosine(0.0, 1.0, 20, 10), r"Cosine: end_step must be > start_step"),
        (lambda: Linear(0.0, 1.0, 0.5, 10), r"start_step must be an integer.*got 0.5 of type float"),
        (lambda: Linear(0.0, 1.0, True, 10), r"start_step must be an integer"),
        (lambda: Linear(0.0, float("inf"), 0, 10), r"end_value must be a finite real number"),
        (lambda: Polynomial(0.0, 1.0, 0, 10, power=0.0), r"power must be > 0, got 0.0.*Zhu & Gupta use 3"),
        (lambda: Polynomial(0.0, 1.0, 0, 10, power=-2), r"power must be > 0"),
        (lambda: Step([1.0, 2.0], [5, 9]), r"one more value than boundaries, got 2 values and 2 boundaries"),
        (lambda: Step([], []), r"one more value than boundaries, got 0 values"),
        (lambda: Step([1.0, 2.0, 3.0], [5, 5]), r"strictly increasing, got \[5, 5\]"),
        (lambda: Step([1.0, 2.0, 3.0], [9, 5]), r"strictly increasing"),
        (lambda: Step([1.0, 2.0], [0]), r"boundaries\[0\] must be >= 1, got 0.*values\[0\] applies before"),
        (lambda: Step([1.0, 2.0], [-3]), r"boundaries\[0\] must be >= 1"),
        (lambda: Step("12", [1]), r"values must be a list"),
        (lambda: Step([1.0, "x"], [1]), r"values\[1\] must be a finite real number"),
    ],
)
def test_constructor_validation(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_integral_floats_are_accepted_as_steps():
    assert Linear(0.0, 1.0, 0.0, 10.0).end_step == 10 and isinstance(Linear(0, 1, 0, 10.0).end_step, int)


@pytest.mark.parametrize("step", [-1, 1.5, "3", None])
def test_call_rejects_bad_steps(step):
    with pytest.raises(ValueError, match=r"step must be"):
        Constant(1.0)(step)


def test_registry_names_and_lookup():
    assert {"constant", "linear", "polynomial", "cosine", "step"} <= set(list_schedules())
    assert Linear.name == "linear" and Polynomial.name == "polynomial"
    s = get_schedule("polynomial", start_value=0.0, end_value=0.9, start_step=0, end_step=100)
    assert s == Polynomial(0.0, 0.9, 0, 100)
    assert get_schedule(s) is s
    assert get_schedule(0.5) == Constant(0.5)
    assert get_schedule(2) == Constant(2.0)


def test_registry_errors():
    with pytest.raises(
        ValueError, match=r"unknown schedule 'cosin'. Did you mean 'cosine'\?.*constant, cosine"
    ):
        get_schedule("cosin")
    with pytest.raises(ValueError, match=r"unknown schedule 'zzz'\. Registered names: .*linear"):
        get_schedule("zzz")
    with pytest.raises(
        ValueError, match=r"'linear' \(Linear\) takes \(start_value, end_value, start_step, end"
    ):
        get_schedule("linear", start=0.0)
    with pytest.raises(ValueError, match=r"ready Constant and extra keyword arguments \['x'\]"):
        get_schedule(Constant(1.0), x=1)
    with pytest.raises(ValueError, match=r"cannot make a schedule from \[1\].*a registered name"):
        get_schedule([1])
    with pytest.raises(ValueError, match=r"cannot make a schedule from True"):
        get_schedule(True)


@pytest.fixture
def scratch_schedule_registry():
    """Undo test registrations, so the test can run twice in one process."""
    import lit_compress.schedules as mod

    before = dict(mod._SCHEDULES)
    yield
    mod._SCHEDULES.clear()
    mod._SCHEDULES.update(before)


def test_register_custom_schedule(scratch_schedule_registry):
    @register_schedule("test_square_root")
    @dataclass(frozen=True)
    class SquareRoot(Schedule):
        scale: float = 1.0

        def at(self, step: int) -> float:
            return self.scale * math.sqrt(step)

    assert SquareRoot.name == "test_square_root" and "test_square_root" in list_schedules()
    assert get_schedule("test_square_root", scale=2.0)(16) == 8.0
    register_schedule("test_square_root")(SquareRoot)  # re-registering the same class is fine
    with pytest.raises(ValueError, match=r"'linear' is already registered by Linear; choose another name"):
        register_schedule("linear")(SquareRoot)
    with pytest.raises(ValueError, match=r"expects a subclass of Schedule"):
        register_schedule("test_not_a_schedule")(dict)
    with pytest.raises(ValueError, match=r"non-empty string"):
        register_schedule("")


def test_yaml_class_path_instantiation():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--temperature", type=Schedule)
    parser.add_argument("--alpha", type=Schedule)
    cfg = parser.parse_object(
        {
            "temperature": {
                "class_path": "lit_compress.schedules.Cosine",
                "init_args": {"start_value": 8.0, "end_value": 1.0, "start_step": 0, "end_step": 100},
            },
            "alpha": {
                "class_path": "lit_compress.schedules.Step",
                "init_args": {"values": [0.9, 0.5], "boundaries": [10]},
            },
        }
    )
    built = parser.instantiate(cfg)
    assert built.temperature == Cosine(8.0, 1.0, 0, 100)
    assert built.alpha(9) == 0.9 and built.alpha(10) == 0.5
