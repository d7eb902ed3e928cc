"""Unstructured pruning: criteria (which weights matter), schedules (when, how far), masks, callback.

from lit_compress.pruning import Pruning
Trainer(callbacks=[Pruning(sparsity=0.92, criterion="magnitude", schedule="iterative",
                           schedule_args={"rounds": 3, "steps_per_round": 2000})])
"""

from lit_compress.pruning import neuron_criteria  # noqa: F401  (registers "maxout_activity", "correlation")
from lit_compress.pruning.criteria import Criterion, ScoringContext, get_criterion, register_criterion
from lit_compress.pruning.masks import apply_masks, global_masks, layerwise_masks, sparsity_stats
from lit_compress.pruning.schedules import (
    DenseSparseDense,
    Gradual,
    Iterative,
    LotteryTicket,
    OneShot,
    PruningSchedule,
    get_pruning_schedule,
    register_pruning_schedule,
)
from lit_compress.pruning.sensitivity import (
    load_plan,
    plan_from_sensitivity,
    save_plan,
    sensitivity_analysis,
)
from lit_compress.pruning.sparse_inference import SparseLinear, crossover, to_sparse_inference

__all__ = [
    "Criterion",
    "DenseSparseDense",
    "DepthPruning",
    "Gradual",
    "Iterative",
    "LotteryTicket",
    "OneShot",
    "Pruning",
    "PruningSchedule",
    "ScoringContext",
    "SparseLinear",
    "StructuredPruning",
    "apply_masks",
    "crossover",
    "get_criterion",
    "get_pruning_schedule",
    "global_masks",
    "layerwise_masks",
    "load_plan",
    "plan_from_sensitivity",
    "register_criterion",
    "register_pruning_schedule",
    "save_plan",
    "sensitivity_analysis",
    "sparsity_stats",
    "to_sparse_inference",
]


def __getattr__(name: str):
    if name == "Pruning":  # the callbacks import Lightning
        from lit_compress.pruning.callback import Pruning

        return Pruning
    if name == "StructuredPruning":
        from lit_compress.pruning.structured.callback import StructuredPruning

        return StructuredPruning
    if name == "DepthPruning":
        from lit_compress.pruning.depth_callback import DepthPruning

        return DepthPruning
    raise AttributeError(f"module 'lit_compress.pruning' has no attribute {name!r}")
