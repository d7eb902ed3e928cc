"""Which Lightning strategies lit_compress callbacks run under: one check, run before every callback's setup.

lit_compress callbacks hold masks, codebooks, quantizers and gates keyed by fully-qualified parameter names
and act on full, unsharded weights, identical on every rank (see DESIGN.md, "DDP-safe by construction").
That holds on a single device, under DDP (``strategy="ddp"``) and under the spawning DDP variants. It does
not hold under the sharding strategies:

- ``FSDPStrategy`` flattens and shards parameters across ranks: a rank holds a slice of each weight, so masks
  and codebooks computed on full weights cannot be applied, magnitude criteria see a shard, and module
  surgery after the wrap would desynchronise the flat parameters. Measurements (``CompressionSummary``,
  ``ZooExport``) run a forward pass and read weights on rank zero only, which under FSDP is a collective:
  the other ranks never join and the run hangs, or only one shard is counted.
- ``DeepSpeedStrategy`` (ZeRO) partitions parameters / gradients / optimizer state and owns the optimizer
  step, so a callback's gradient masks and post-step projections do not see the weights it expects.
- ``ModelParallelStrategy`` (tensor parallelism with DTensor) turns weights into sharded DTensors.

Every lit_compress callback is therefore refused under these strategies at ``setup`` with a message that
names the supported alternative. Strategies are recognised by class name (anywhere in the class's MRO), so
the check covers ``lightning.pytorch.strategies`` and ``pytorch_lightning.strategies`` alike, user subclasses,
and does not need ``deepspeed`` installed.

Some callbacks also cannot run under the *spawning* DDP variants (``ddp_spawn``, ``ddp_fork``,
``ddp_notebook``): there the fit runs in worker processes and Lightning copies only the weights back into
the main process's module, with ``strict=False``. A callback that replaces the network inside the workers
would leave the main process with the original network and silently drop whatever did not match.
:data:`SPAWN_REFUSED` lists the callbacks refused there unconditionally; callbacks whose refusal depends on
their options (``StructuredPruning(remove="immediately")``, ``LowRank``, ``DepthwiseSeparable``,
``DepthPruning``) check it in their own ``setup`` (they can use :func:`spawns_workers`).
"""

from __future__ import annotations

from typing import Any

SUPPORTED = "lit_compress callbacks support single-device training, DDP (strategy='ddp') and ddp_spawn"

#: Strategy class name -> why lit_compress callbacks cannot run under it.
SHARDED_STRATEGIES: dict[str, str] = {
    "FSDPStrategy": (
        "FSDP flattens and shards parameters across ranks, so masks, codebooks and quantizers keyed by "
        "parameter name on full weights cannot apply (and rank-zero measurements would hang on FSDP's "
        "collectives)"
    ),
    "DeepSpeedStrategy": (
        "DeepSpeed (ZeRO) partitions parameters, gradients and optimizer state and owns the optimizer step, "
        "so gradient masks and post-step projections on full weights cannot apply"
    ),
    "ModelParallelStrategy": (
        "ModelParallelStrategy shards weights as DTensors (tensor parallelism), so masks, codebooks and "
        "quantizers on full weights cannot apply"
    ),
}

#: Callback implementation name -> why it is refused under spawning strategies (ddp_spawn / ddp_fork).
SPAWN_REFUSED: dict[str, str] = {
    "Int8QAT": (
        "Int8QAT replaces the network by its fused, fake-quantized QAT version inside the worker processes, "
        "but with a spawning strategy (ddp_spawn, ddp_fork, ddp_notebook) Lightning copies only the weights "
        "whose names match back into the main process's float network (strict=False): the trained QAT "
        "network, its observer ranges and Int8QAT.export() would be lost (and a network prepared before the "
        "spawn cannot be pickled)"
    ),
}

#: Callback implementation name -> what stays behind in the workers under spawning strategies (warned about).
SPAWN_WARNED: dict[str, str] = {
    "FBS": "the saliency predictors and gated layers",
    "BlockDrop": "the trained policy network",
}

_SPAWN_LAUNCHERS = ("_MultiProcessingLauncher",)


def _class_names(obj: object) -> set[str]:
    return {cls.__name__ for cls in type(obj).__mro__}


def sharded_strategy(trainer: Any) -> str | None:
    """The name of the sharding strategy ``trainer`` runs under (FSDP, DeepSpeed, model parallel), else None.

    Recognised by class name in either Lightning namespace; a ``trainer`` without a ``strategy`` (None, or a
    bare object in unit tests) counts as single-device.
    """
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:
        return None
    names = _class_names(strategy)
    return next((name for name in SHARDED_STRATEGIES if name in names), None)


def spawns_workers(trainer: Any) -> bool:
    """Whether the strategy fits in worker processes and copies the weights back (ddp_spawn / ddp_fork).

    Recognised by the launcher's class name, so ``pytorch_lightning`` trainers are recognised too (an
    ``isinstance`` check against ``lightning.pytorch``'s launcher class misses them).
    """
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return launcher is not None and bool(_class_names(launcher) & set(_SPAWN_LAUNCHERS))


def implementation_name(callback: object) -> str:
    """The lit_compress implementation a callback object comes from (its class name for user subclasses)."""
    from lit_compress._flavour import implementation_of

    return implementation_of(callback) or type(callback).__name__


def check_strategy(trainer: Any, callback: object) -> None:
    """Raise ValueError if ``callback`` cannot run under ``trainer``'s strategy; called before every setup.

    Runs before the callback's own ``setup`` (wired by :func:`lit_compress._flavour.make_flavour`), in the
    process that fits: for ``ddp_spawn`` that is each worker, which is fine because the refusal depends on
    the strategy only.
    """
    name = implementation_name(callback)
    sharded = sharded_strategy(trainer)
    if sharded is not None:
        strategy = type(trainer.strategy).__name__
        raise ValueError(
            f"{name} cannot run under {strategy}: {SHARDED_STRATEGIES[sharded]}. {SUPPORTED}; "
            "use strategy='ddp' (one process per device; launch the script directly or with torchrun) "
            "or strategy='ddp_spawn'."
        )
    if name in SPAWN_REFUSED and spawns_workers(trainer):
        raise ValueError(
            f"{SPAWN_REFUSED[name]}. Use strategy='ddp' (one process per device, launched as a "
            "script or by torchrun) or a single device."
        )
    if name in SPAWN_WARNED and spawns_workers(trainer):
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"{name} under a spawning strategy (ddp_spawn / ddp_fork): training is correct and identical on "
            f"every rank, but {SPAWN_WARNED[name]} live in the worker processes; after fit() the main "
            "process gets back only the weights whose names match, so a trainer.test(), export or zoo export "
            "there sees the ungated network. Export inside the run (ZooExport) or use strategy='ddp'.",
            category=UserWarning,
        )
