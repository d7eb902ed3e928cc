"""lit_compress._resume: compression state that a resume would silently drop is an error or a warning."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lit_compress._resume import check_callback_states
from lit_compress.measure import CompressionSummary
from lit_compress.pruning import Pruning


def _checkpoint(*callbacks) -> dict:
    return {"callbacks": {cb.state_key: {"masks": {}} for cb in callbacks}}


def test_same_callbacks_pass_silently(recwarn):
    pruning = Pruning(sparsity=0.5, verbose=False)
    trainer = SimpleNamespace(callbacks=[pruning])
    check_callback_states(pruning, trainer, _checkpoint(Pruning(sparsity=0.5, verbose=False)))
    assert not [w for w in recwarn if "compression state" in str(w.message)]


def test_changed_arguments_are_refused_naming_both_keys():
    saved = Pruning(sparsity=0.5, verbose=False)
    pruning = Pruning(sparsity=0.9, verbose=False)
    trainer = SimpleNamespace(callbacks=[pruning])
    with pytest.raises(ValueError, match=r"cannot resume Pruning.*'sparsity': 0\.5.*'sparsity': 0\.9"):
        check_callback_states(pruning, trainer, _checkpoint(saved))


def test_a_second_callback_of_a_class_may_join_a_resumed_run():
    first = Pruning(sparsity=0.5, include=["a.*"], verbose=False)
    second = Pruning(sparsity=0.5, include=["b.*"], verbose=False)
    trainer = SimpleNamespace(callbacks=[first, second])
    check_callback_states(second, trainer, _checkpoint(first))  # first's state is claimed: no error


def test_dropped_state_warns_once_per_checkpoint():
    summary = CompressionSummary()
    trainer = SimpleNamespace(callbacks=[summary])
    checkpoint = _checkpoint(Pruning(sparsity=0.5, verbose=False))
    with pytest.warns(UserWarning, match=r"no callback of this run loads, so it is dropped: \[.Pruning\{"):
        check_callback_states(summary, trainer, checkpoint)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_callback_states(summary, trainer, checkpoint)  # the same checkpoint: already reported


def test_foreign_state_is_ignored(recwarn):
    summary = CompressionSummary()
    trainer = SimpleNamespace(callbacks=[summary])
    check_callback_states(summary, trainer, {"callbacks": {"ModelCheckpoint{'monitor': None}": {}}})
    check_callback_states(summary, trainer, {})  # no callbacks section at all
    assert not [w for w in recwarn if "compression state" in str(w.message)]
