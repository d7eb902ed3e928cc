"""Pure ``step -> value`` schedules (distillation temperature / alpha, gate density, ...).

Every schedule is a small frozen dataclass, callable as ``schedule(step) -> float`` where ``step`` is the
optimizer step (``trainer.global_step``), never an epoch, so gradient accumulation and resume are exact.
Constructor arguments are validated up front and are plain YAML values, so LightningCLI (jsonargparse) can
build any of them from ``class_path`` + ``init_args``::

    temperature:
      class_path: lit_compress.schedules.Cosine
      init_args: {start_value: 8.0, end_value: 1.0, start_step: 0, end_step: 10000}

Schedules form an open registry: decorate your own :class:`Schedule` subclass with
``@register_schedule("my_name")`` and ask for it with ``get_schedule("my_name", **kwargs)``.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from abc import ABC, abstractmethod
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

__all__ = [
    "Constant",
    "Cosine",
    "Linear",
    "Polynomial",
    "Schedule",
    "Step",
    "get_schedule",
    "list_schedules",
    "register_schedule",
]


# --------------------------------------------------------------------------------------------- validation
# Shared with ``lit_compress.pruning.schedules``; private to the package.


def _where(owner: str, arg: str) -> str:
    return f"{owner}: {arg}" if owner else arg


def _check_int(value: Any, arg: str, owner: str = "", minimum: int | None = 0, hint: str = "") -> int:
    """``value`` as a plain ``int`` (``bool`` and non-integral floats rejected), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(
                f"{_where(owner, arg)} must be an integer (a count of optimizer steps or rounds), "
                f"got {value!r} of type {type(value).__name__}.{' ' + hint if hint else ''}"
            )
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(
            f"{_where(owner, arg)} must be >= {minimum}, got {value}."
            f"{' ' + hint if hint else ' Schedules count optimizer steps (trainer.global_step) from 0.'}"
        )
    return value


def _check_float(value: Any, arg: str, owner: str = "") -> float:
    """``value`` as a finite ``float`` (``bool`` rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{_where(owner, arg)} must be a finite real number, got {value!r}.")
    return float(value)


def _check_fraction(value: Any, arg: str, owner: str = "", *, high_inclusive: bool = False) -> float:
    """``value`` as a float in ``[0, 1)`` (or ``[0, 1]`` with ``high_inclusive``)."""
    value = _check_float(value, arg, owner)
    ok = 0.0 <= value <= 1.0 if high_inclusive else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if high_inclusive else "[0, 1)"
        raise ValueError(
            f"{_where(owner, arg)} must be in {interval}, got {value!r}. "
            "Sparsities are cumulative fractions of the targeted weights (0.9 = 90% of them are zero)."
        )
    return value


def _check_step_arg(step: Any) -> int:
    """The ``step`` passed to a schedule at run time."""
    return _check_int(step, "step", minimum=0)


def _set(obj: Any, **values: Any) -> None:
    """Store normalised values on a frozen dataclass from ``__post_init__``."""
    for key, value in values.items():
        object.__setattr__(obj, key, value)


def _check_range(start: int, end: int, owner: str, other: str) -> None:
    if end <= start:
        raise ValueError(
            f"{owner}: end_step must be > start_step, got start_step={start}, end_step={end}. "
            f"For an instantaneous change use {other}."
        )


C = TypeVar("C", bound=type)


def _unknown_name(kind: str, name: str, names: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ValueError(
        f"unknown {kind} {name!r}.{hint} Registered names: {', '.join(names) or '(none)'}. "
        f"Register your own with @register_{kind.replace(' ', '_')}('name')."
    )


def _build(kind: str, name: str, cls: type, kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)``, turning a wrong keyword into a ValueError that lists the accepted ones."""
    signature = inspect.signature(cls)
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        accepted = ", ".join(
            p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
            for p in signature.parameters.values()
        )
        raise ValueError(
            f"{kind} {name!r} ({cls.__name__}) takes ({accepted}); got keyword arguments {sorted(kwargs)}: "
            f"{err}."
        ) from None
    return cls(**kwargs)


def _registrar(kind: str, registry: dict[str, type], base: type) -> Callable[[str], Callable[[C], C]]:
    def register(name: str) -> Callable[[C], C]:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {kind} name must be a non-empty string, got {name!r}.")

        def decorator(cls: C) -> C:
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise ValueError(
                    f"@register_{kind.replace(' ', '_')}({name!r}) expects a subclass of "
                    f"{base.__name__}, got {cls!r}."
                )
            if name in registry and registry[name] is not cls:
                raise ValueError(
                    f"{kind} name {name!r} is already registered by {registry[name].__qualname__}; "
                    "choose another name."
                )
            registry[name] = cls
            cls.name = name
            return cls

        return decorator

    return register


# --------------------------------------------------------------------------------------------- schedules


class Schedule(ABC):
    """A pure function of the optimizer step: ``schedule(step) -> float``.

    Subclasses are frozen dataclasses implementing :meth:`at`; register them with :func:`register_schedule`.
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def at(self, step: int) -> float:
        """The value at optimizer step ``step``; ``__call__`` validates ``step`` (an int >= 0) first."""

    def __call__(self, step: int) -> float:
        return self.at(_check_step_arg(step))


_SCHEDULES: dict[str, type[Schedule]] = {}
register_schedule = _registrar("schedule", _SCHEDULES, Schedule)
register_schedule.__doc__ = "Decorator registering a :class:`Schedule` subclass under ``name``."


def list_schedules() -> list[str]:
    """Registered schedule names."""
    return sorted(_SCHEDULES)


def get_schedule(name_or_obj: str | float | Schedule, **kwargs: Any) -> Schedule:
    """Resolve a schedule: a registered name (built with ``kwargs``), a :class:`Schedule` instance (returned
    as is), or a plain number (a :class:`Constant`), so a callback argument typed ``float | Schedule`` accepts
    both ``alpha: 0.5`` and a ``class_path`` block."""
    if isinstance(name_or_obj, Schedule):
        if kwargs:
            raise ValueError(
                f"get_schedule got a ready {type(name_or_obj).__name__} and extra keyword arguments "
                f"{sorted(kwargs)}; pass either an instance or a name with its arguments."
            )
        return name_or_obj
    if isinstance(name_or_obj, str):
        if name_or_obj not in _SCHEDULES:
            raise _unknown_name("schedule", name_or_obj, list_schedules())
        return _build("schedule", name_or_obj, _SCHEDULES[name_or_obj], kwargs)
    if isinstance(name_or_obj, numbers.Real) and not isinstance(name_or_obj, bool) and not kwargs:
        return Constant(float(name_or_obj))
    raise ValueError(
        f"cannot make a schedule from {name_or_obj!r} (type {type(name_or_obj).__name__}); expected a "
        f"registered name ({', '.join(list_schedules())}), a Schedule instance, or a number."
    )


@register_schedule("constant")
@dataclass(frozen=True)
class Constant(Schedule):
    """``v(t) = value`` for every step."""

    value: float

    def __post_init__(self) -> None:
        _set(self, value=_check_float(self.value, "value", "Constant"))

    def at(self, step: int) -> float:
        return self.value


def _progress(step: int, start: int, end: int) -> float:
    """``(t - start) / (end - start)`` clamped to ``[0, 1]``."""
    return min(max((step - start) / (end - start), 0.0), 1.0)


@dataclass(frozen=True)
class _Ramp(Schedule):
    """Shared validation for ``start_value -> end_value`` over ``[start_step, end_step]``."""

    start_value: float
    end_value: float
    start_step: int
    end_step: int

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _set(
            self,
            start_value=_check_float(self.start_value, "start_value", owner),
            end_value=_check_float(self.end_value, "end_value", owner),
            start_step=_check_int(self.start_step, "start_step", owner),
            end_step=_check_int(self.end_step, "end_step", owner),
        )
        _check_range(self.start_step, self.end_step, owner, "Step(values=[a, b], boundaries=[step])")


@register_schedule("linear")
@dataclass(frozen=True)
class Linear(_Ramp):
    """``v(t) = start + (end - start) * p``, ``p = clamp((t - start_step) / (end_step - start_step), 0, 1)``.

    ``start_value`` before ``start_step``, ``end_value`` from ``end_step`` on.
    """

    def at(self, step: int) -> float:
        p = _progress(step, self.start_step, self.end_step)
        return self.end_value if p >= 1.0 else self.start_value + (self.end_value - self.start_value) * p


@register_schedule("polynomial")
@dataclass(frozen=True)
class Polynomial(_Ramp):
    """``v(t) = end + (start - end) * (1 - p) ** power``, ``p`` the clamped progress as in :class:`Linear`.

    With ``power=3`` this is Zhu & Gupta's (2017) cubic: fast change first, slow near the end.
    ``power=1`` equals :class:`Linear`.
    """

    power: float = 3.0

    def __post_init__(self) -> None:
        super().__post_init__()
        power = _check_float(self.power, "power", "Polynomial")
        if power <= 0:
            raise ValueError(f"Polynomial: power must be > 0, got {power}. Zhu & Gupta use 3; 1 is linear.")
        _set(self, power=power)

    def at(self, step: int) -> float:
        p = _progress(step, self.start_step, self.end_step)
        return self.end_value + (self.start_value - self.end_value) * (1.0 - p) ** self.power


@register_schedule("cosine")
@dataclass(frozen=True)
class Cosine(_Ramp):
    """``v(t) = end + (start - end) * (1 + cos(pi * p)) / 2``, ``p`` the clamped progress of :class:`Linear`.

    Half a cosine wave: slow change at both ends, fastest in the middle.
    """

    def at(self, step: int) -> float:
        p = _progress(step, self.start_step, self.end_step)
        if p >= 1.0:
            return self.end_value
        return self.end_value + (self.start_value - self.end_value) * 0.5 * (1.0 + math.cos(math.pi * p))


@register_schedule("step")
@dataclass(frozen=True)
class Step(Schedule):
    """Piecewise constant: ``v(t) = values[i]`` with ``i`` = number of ``boundaries`` that are ``<= t``.

    ``values[0]`` holds before ``boundaries[0]``, ``values[k]`` from ``boundaries[k-1]`` (inclusive) on.
    E.g. ``Step(values=[4.0, 2.0, 1.0], boundaries=[1000, 5000])``.
    """

    values: Sequence[float]
    boundaries: Sequence[int]

    def __post_init__(self) -> None:
        for arg in ("values", "boundaries"):
            seq = getattr(self, arg)
            if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
                raise ValueError(f"Step: {arg} must be a list, got {seq!r}.")
        values = tuple(_check_float(v, f"values[{i}]", "Step") for i, v in enumerate(self.values))
        boundaries = tuple(
            _check_int(
                b,
                f"boundaries[{i}]",
                "Step",
                minimum=1,
                hint="values[0] applies before boundaries[0], so a boundary at 0 leaves it unused.",
            )
            for i, b in enumerate(self.boundaries)
        )
        if len(values) != len(boundaries) + 1:
            raise ValueError(
                f"Step: needs exactly one more value than boundaries, got {len(values)} values and "
                f"{len(boundaries)} boundaries. values[0] holds before boundaries[0], values[-1] after "
                "boundaries[-1]."
            )
        for i in range(1, len(boundaries)):
            if boundaries[i] <= boundaries[i - 1]:
                raise ValueError(
                    f"Step: boundaries must be strictly increasing, got {list(boundaries)} "
                    f"(boundaries[{i}]={boundaries[i]} <= boundaries[{i - 1}]={boundaries[i - 1]})."
                )
        _set(self, values=values, boundaries=boundaries)

    def at(self, step: int) -> float:
        return self.values[bisect_right(self.boundaries, step)]
