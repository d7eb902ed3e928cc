"""The order lit_compress callbacks set up and tear down in: fixed by what they do, never by the order the
user listed them in ``Trainer(callbacks=[...])``.

Most per-step hooks of the callbacks commute (masking gradients and weights, clipping latent weights,
averaging shared-weight gradients, adding loss terms), but ``setup`` does module surgery and reads the network
other callbacks change, and ``teardown`` undoes it. So lit_compress fixes their order by phase:

====  ==============  ========================================================================================
 0    architecture    ``StructuredPruning``, ``DepthPruning``, ``LowRank``, ``DepthwiseSeparable``: replace or
                      remove layers, so every later phase sees the final modules and parameter objects
 1    gating          ``BlockDrop``, ``FBS``: swap blocks or convs for gated subclasses, add predictors
 2    quantization    ``Quantization``, ``Int8QAT``: swap layers for quantized subclasses (same parameters)
 3    weights         ``Pruning``, ``WeightSharing``: select the parameter objects of the network as it is now
 4    loss            ``Distillation``: wraps ``training_step`` around whatever the earlier phases installed
 5    measurement     ``CompressionSummary``, ``ZooExport``: read the finished network
====  ==============  ========================================================================================

``setup`` runs phase 0 first, ``teardown`` runs in the reverse order (the last wrapper installed is the first
removed). Callbacks of the same phase keep the order they were listed in. Callbacks that are not lit_compress
callbacks are untouched: Lightning calls them in its own order.

Mechanism: when Lightning calls the ``setup`` (or ``teardown``) of the first lit_compress callback in its
list, that call runs the hook of *every* lit_compress callback of the trainer in phase order, and marks the
others so that their own call, which Lightning makes next, returns at once.
"""

from __future__ import annotations

from typing import Any

ARCHITECTURE, GATING, QUANTIZATION, WEIGHTS, LOSS, MEASUREMENT = range(6)
PHASE_NAMES = ("architecture", "gating", "quantization", "weights", "loss", "measurement")

PHASES: dict[str, int] = {
    "StructuredPruning": ARCHITECTURE,
    "DepthPruning": ARCHITECTURE,
    "LowRank": ARCHITECTURE,
    "DepthwiseSeparable": ARCHITECTURE,
    "BlockDrop": GATING,
    "FBS": GATING,
    "Quantization": QUANTIZATION,
    "Int8QAT": QUANTIZATION,
    "Pruning": WEIGHTS,
    "WeightSharing": WEIGHTS,
    "Distillation": LOSS,
    "CompressionSummary": MEASUREMENT,
    "ZooExport": MEASUREMENT,
}
ORDERED_HOOKS = ("setup", "teardown")
_MARK = "_lit_compress_ran_in_order"


def phase_of(callback: Any) -> int:
    """The phase of a lit_compress callback (:data:`PHASES`); callbacks registered later default to
    ``measurement``, the phase that changes nothing."""
    from lit_compress._flavour import implementation_of

    return PHASES.get(implementation_of(callback) or "", MEASUREMENT)


def ordered_callbacks(callbacks: list[Any], hook: str) -> list[Any]:
    """The lit_compress callbacks among ``callbacks`` that implement ``hook``, in the order it runs them
    (stable within a phase)."""
    ours = [cb for cb in callbacks if hasattr(type(cb), f"_lit_compress_{hook}")]
    ordered = sorted(ours, key=phase_of)  # sorted() is stable: listing order within a phase
    return ordered[::-1] if hook == "teardown" else ordered


def run_in_order(hook: str, callback: Any, trainer: Any, pl_module: Any, stage: str) -> None:
    """Lightning called ``callback.<hook>(trainer, pl_module, stage)``: the first time in a round, run the
    hook (``_lit_compress_<hook>``) of every lit_compress callback of ``trainer`` in phase order; return at
    once for those already run."""
    key = (hook, id(trainer), id(pl_module), stage)
    if getattr(callback, _MARK, None) == key:
        delattr(callback, _MARK)  # run already, in order, by the first lit_compress callback of the round
        return
    callbacks = list(getattr(trainer, "callbacks", None) or [])
    if not any(cb is callback for cb in callbacks):  # called by hand, outside a Trainer's callback list
        getattr(type(callback), f"_lit_compress_{hook}")(callback, trainer, pl_module, stage)
        return
    order = ordered_callbacks(callbacks, hook)
    for other in order:
        if other is not callback:
            object.__setattr__(other, _MARK, key)
    try:
        for other in order:
            getattr(type(other), f"_lit_compress_{hook}")(other, trainer, pl_module, stage)
    except BaseException:
        for other in order:  # a failed round leaves no stale marks behind
            if getattr(other, _MARK, None) == key:
                delattr(other, _MARK)
        raise
