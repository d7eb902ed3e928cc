"""Factorization: low-rank (truncated SVD) and depthwise-separable replacement of layers.

The mechanisms (:mod:`~lit_compress.factorization.lowrank`, :mod:`~lit_compress.factorization.depthwise`)
turn one trained layer into a pair of plain ``nn.Linear`` / ``nn.Conv2d`` layers; the callbacks
``LowRank`` and ``DepthwiseSeparable`` do it inside a Lightning ``fit`` and record a structure spec
(:mod:`~lit_compress.factorization.spec`, kinds ``"lowrank"`` and ``"depthwise"``) so the zoo rebuilds the
factorized architecture before loading its weights.
"""

from lit_compress.factorization.depthwise import (
    DepthwiseSeparableConv2d,
    PatchMoment,
    check_separable_target,
    depthwise_from_kernel,
    depthwise_ratio,
    fit_depthwise,
    input_patches,
    output_error,
    patch_moment,
)
from lit_compress.factorization.lowrank import (
    CONV_SCHEMES,
    LowRankConv2d,
    LowRankLinear,
    check_factorizable,
    factorize,
    factorized_weight_count,
    layer_matrix,
    max_rank,
    rank_for_budget,
    rank_for_energy,
    singular_values,
)
from lit_compress.factorization.spec import (
    DEPTHWISE_KIND,
    LOWRANK_KIND,
    apply_factorization,
    build_depthwise,
    build_lowrank,
    dense_reference,
    factorization_spec,
    factorized_modules,
    verify_spec,
)

__all__ = [
    "CONV_SCHEMES",
    "DEPTHWISE_KIND",
    "LOWRANK_KIND",
    "DepthwiseSeparable",
    "DepthwiseSeparableConv2d",
    "LowRank",
    "LowRankConv2d",
    "LowRankLinear",
    "PatchMoment",
    "apply_factorization",
    "build_depthwise",
    "build_lowrank",
    "check_factorizable",
    "check_separable_target",
    "dense_reference",
    "depthwise_from_kernel",
    "depthwise_ratio",
    "factorization_spec",
    "factorize",
    "factorized_modules",
    "factorized_weight_count",
    "fit_depthwise",
    "input_patches",
    "layer_matrix",
    "max_rank",
    "output_error",
    "patch_moment",
    "rank_for_budget",
    "rank_for_energy",
    "replace_in_optimizer",
    "restore_factorization",
    "singular_values",
    "verify_spec",
]


def __getattr__(name: str):
    if name in ("LowRank", "DepthwiseSeparable", "replace_in_optimizer", "restore_factorization"):
        from lit_compress.factorization import callback  # imports Lightning

        return getattr(callback, name)
    raise AttributeError(f"module 'lit_compress.factorization' has no attribute {name!r}")
