"""The ``fbs`` structure kind: zoo entries whose conv layers are FBS-gated (Gao et al., ICLR 2019).

The gates are part of the model's function, so a zoo card records them as plain data::

    {"kind": "fbs", "version": 1,
     "layers": {"features.1.0": {"density": 0.4, "boost": true, "norm": "features.1.1", "source": null,
                                 "expand_after": null, "linear": null},
                ...},
     "inner": <another structure spec or null>}

The loader rebuilds the architecture, applies ``inner`` (e.g. removed channels), then swaps the listed convs
and BatchNorms for :class:`~lit_compress.gating.fbs.FBSConv2d` / ``FBSBatchNorm2d`` (with fresh predictors)
and the Linear that reads a compact output for an ``FBSLinear`` (same parameters) before the weights,
predictors included, are loaded strictly. The plan (which BatchNorm each gate follows, which conv reads
which compact output, where a compact output is scattered back or which Linear reads it) is on the card, so
nothing is traced at load time, except for cards written before ``expand_after`` / ``linear`` existed: their
network is traced once to find those (the gated network computes the same either way; if tracing fails the
compact outputs are scattered back at their gate points, as such cards were run before).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lit_compress.gating.fbs import LayerPlan, apply_fbs, layer_plans, plan_tails
from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.structure import apply_structure, register_structure

KIND = "fbs"
VERSION = 1
TAIL_KEYS = frozenset({"expand_after", "linear"})  # layer keys added after version 1 cards were written


def fbs_structure(network: nn.Module, inner: dict[str, Any] | None = None) -> dict[str, Any]:
    """The structure spec of an FBS-gated ``network`` (its layers' current plans, density included)."""
    plans = layer_plans(network)
    if not plans:
        raise ValueError(f"{type(network).__name__} has no FBS layers; nothing to describe")
    return {
        "kind": KIND,
        "version": VERSION,
        "layers": {name: plan.to_dict() for name, plan in plans.items()},
        "inner": inner,
    }


@register_structure(KIND)
def build_fbs(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    if spec.get("version") != VERSION or not isinstance(spec.get("layers"), dict) or not spec["layers"]:
        raise ZooFormatError(
            f"fbs structure spec must be version {VERSION} with a non-empty 'layers' mapping, got version "
            f"{spec.get('version')!r} and layers {type(spec.get('layers')).__name__}"
        )
    model = apply_structure(model, spec.get("inner"))
    try:
        plans = {name: LayerPlan.from_dict(data, name) for name, data in spec["layers"].items()}
        if any(not set(data) >= TAIL_KEYS for data in spec["layers"].values()):
            plans = _found_tails(model, plans)
        # Predictors are overwritten by the entry's weights; a fixed seed keeps building deterministic.
        apply_fbs(model, plans, generator=torch.Generator().manual_seed(0))
    except (ValueError, TypeError) as err:
        raise ZooFormatError(f"fbs structure spec does not fit the architecture: {err}") from err
    return model


def _found_tails(model: nn.Module, plans: dict[str, LayerPlan]) -> dict[str, LayerPlan]:
    """``plans`` (from a card that predates ``expand_after`` / ``linear``) with those found by tracing the
    ungated ``model``; unchanged (scatter at the gate points) when the model cannot be traced."""
    try:
        return plan_tails(model, plans)
    except ValueError:
        return plans
