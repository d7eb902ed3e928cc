"""Resuming with another set of lit_compress callbacks than the run that wrote the checkpoint.

Lightning stores each callback's state under its ``state_key`` (class name + the arguments that identify it)
and hands a callback only the state stored under its own key; everything else is skipped silently. For
compression state that silence loses work: masks that vanish let pruned weights grow back, a schedule with
other arguments restarts from scratch. So, when a checkpoint is restored (``on_load_checkpoint``, before any
``load_state_dict``):

* a lit_compress callback whose **class** has state in the checkpoint under **another key** (its arguments
  changed: other sparsity, other layers, other quantizer) is an error naming both keys;
* lit_compress state in the checkpoint that **no callback of this run** will take (the callback was removed)
  gives a warning naming what is dropped;
* a callback with no state of its class in the checkpoint (it was added) starts fresh, as documented in
  ``docs/faults.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_CHECKED = "_lit_compress_checked_checkpoints"


def _class_of_key(key: str) -> str:
    return key.split("{", 1)[0]


def check_callback_states(callback: Any, trainer: Any, checkpoint: Mapping[str, Any]) -> None:
    """Raise if ``callback``'s class has state under another key; warn (once per checkpoint) about
    lit_compress state no callback of ``trainer`` will load."""
    from lit_compress._flavour import implementation_of, registered_implementations

    saved = checkpoint.get("callbacks")
    if not isinstance(saved, Mapping):
        return
    ours = set(registered_implementations())
    name = implementation_of(callback)
    key = getattr(callback, "state_key", None)
    keys = {getattr(cb, "state_key", None) for cb in getattr(trainer, "callbacks", None) or []}
    unclaimed = [k for k in saved if _class_of_key(str(k)) == name and k not in keys]
    if key is not None and key not in saved and unclaimed:
        raise ValueError(
            f"cannot resume {name}: the checkpoint holds {name} state under {unclaimed}, but this run's "
            f"{name} is {key!r} (other arguments). Resume with the arguments of the run that wrote the "
            "checkpoint, or start a new fit from its weights without ckpt_path (see docs/faults.md, "
            '"Resuming with other callbacks"), so no saved masks, schedule or policy are silently dropped.'
        )
    done = trainer.__dict__.setdefault(_CHECKED, set())
    if id(checkpoint) in done:
        return
    done.add(id(checkpoint))
    dropped = [k for k in saved if _class_of_key(str(k)) in ours and k not in keys]
    if dropped:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"the checkpoint holds compression state that no callback of this run loads, so it is dropped: "
            f"{dropped}. Add the same callbacks with the same arguments to resume it (pruned weights, for "
            "one, grow back without their masks).",
            category=UserWarning,
        )
