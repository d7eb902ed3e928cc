"""The phase rule of :mod:`lit_compress._ordering`: lit_compress callbacks set up in phase order and tear down
in the reverse order, whatever order the user lists them in, in both Lightning namespaces."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import lit_compress.pl as lpl
from lit_compress import _ordering
from lit_compress._flavour import registered_implementations
from lit_compress.distillation import Distillation
from lit_compress.gating.fbs_callback import FBS
from lit_compress.measure import CompressionSummary
from lit_compress.pruning import Pruning
from lit_compress.pruning.structured import StructuredPruning
from lit_compress.quantization import Quantization


def test_every_registered_callback_has_a_phase():
    assert set(registered_implementations()) == set(_ordering.PHASES)


@pytest.fixture()
def calls(monkeypatch):
    """Record every implementation hook call: (hook, callback class name)."""
    seen: list[tuple[str, str]] = []
    for flavour in {type(cb) for cb in _instances("lightning") + _instances("pl")}:
        for hook in _ordering.ORDERED_HOOKS:

            def record(self, trainer, pl_module, stage, _hook=hook):
                seen.append((_hook, type(self).__name__))

            monkeypatch.setattr(flavour, f"_lit_compress_{hook}", record)
    return seen


def _instances(namespace: str) -> list:
    if namespace == "pl":
        return [
            lpl.Distillation(teacher={"model": "lenet_300_100"}),
            lpl.Pruning(sparsity=0.5),
            lpl.CompressionSummary(),
            lpl.Quantization(method="binaryconnect"),
            lpl.FBS(density=0.5),
            lpl.StructuredPruning(amount=0.5),
        ]
    return [
        Distillation(teacher={"model": "lenet_300_100"}),
        Pruning(sparsity=0.5),
        CompressionSummary(),
        Quantization(method="binaryconnect"),
        FBS(density=0.5),
        StructuredPruning(amount=0.5),
    ]


def _lightning_calls(trainer, hook: str) -> None:
    """What Lightning does: call ``hook`` on every callback, in list order."""
    for cb in trainer.callbacks:
        getattr(cb, hook)(trainer=trainer, pl_module=trainer.module, stage="fit")


@pytest.mark.parametrize("namespace", ["lightning", "pl"])
@pytest.mark.parametrize("reverse", [False, True])
def test_setup_runs_in_phase_order_and_teardown_in_reverse(calls, namespace, reverse):
    callbacks = _instances(namespace)
    other = SimpleNamespace(
        setup=lambda **kw: calls.append(("setup", "user")),
        teardown=lambda **kw: calls.append(("teardown", "user")),
    )
    listed = [other, *(callbacks[::-1] if reverse else callbacks)]
    trainer = SimpleNamespace(callbacks=listed, module=object())
    _lightning_calls(trainer, "setup")
    expected = ["StructuredPruning", "FBS", "Quantization", "Pruning", "Distillation", "CompressionSummary"]
    assert calls == [("setup", "user")] + [("setup", n) for n in expected]
    calls.clear()
    _lightning_calls(trainer, "teardown")
    assert calls == [("teardown", "user")] + [("teardown", n) for n in expected[::-1]]
    calls.clear()
    _lightning_calls(trainer, "setup")  # a second round (trainer.test after fit) runs everything again
    assert [n for _, n in calls][1:] == expected


def _by_name(callbacks, name):
    return next(cb for cb in callbacks if type(cb).__name__ == name)


def test_a_failing_setup_leaves_no_marks(calls, monkeypatch):
    callbacks = _instances("lightning")
    trainer = SimpleNamespace(callbacks=callbacks, module=object())

    def boom(self, trainer, pl_module, stage):
        raise ValueError("bad configuration")

    monkeypatch.setattr(type(_by_name(callbacks, "Quantization")), "_lit_compress_setup", boom)
    with pytest.raises(ValueError, match="bad configuration"):
        _lightning_calls(trainer, "setup")
    assert calls == [("setup", "StructuredPruning"), ("setup", "FBS")]  # phases before quantization ran
    assert not any(hasattr(cb, "_lit_compress_ran_in_order") for cb in callbacks)


def test_a_hook_called_by_hand_runs_only_that_callback(calls):
    pruning = Pruning(sparsity=0.5)
    trainer = SimpleNamespace(callbacks=[Distillation(teacher={"model": "lenet_300_100"})], module=object())
    pruning.setup(trainer, trainer.module, "fit")
    assert calls == [("setup", "Pruning")]
