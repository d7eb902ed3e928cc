"""Name -> builder registry for reference networks, plus ``timm:<name>`` for any timm model."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
TIMM_PREFIX = "timm:"


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model builder under ``name`` (``create_model(name, **kwargs)``)."""

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS and _BUILDERS[name] is not builder:
            raise ValueError(f"model name {name!r} is already registered by {_BUILDERS[name]!r}")
        _BUILDERS[name] = builder
        return builder

    return decorator


def list_models() -> list[str]:
    """Registered reference model names (timm models are reachable as ``timm:<name>``)."""
    return sorted(_BUILDERS)


def create_model(name: str, weights: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model, or a timm model via ``timm:<name>`` (never downloads weights).

    ``weights`` optionally names a local ``.safetensors`` (or a ``weights_only`` torch) state_dict file.
    """
    if name.startswith(TIMM_PREFIX):
        model = _create_timm(name[len(TIMM_PREFIX) :], **kwargs)
    elif name in _BUILDERS:
        model = _BUILDERS[name](**kwargs)
    else:
        close = difflib.get_close_matches(name, list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Valid names: {', '.join(list_models())}, "
            f"or '{TIMM_PREFIX}<timm model name>' (e.g. '{TIMM_PREFIX}resnet18')."
        )
    if weights is not None:
        from lit_compress.models.weights import load_state_dict_file

        model.load_state_dict(load_state_dict_file(weights))
    return model


def _create_timm(timm_name: str, **kwargs: Any) -> nn.Module:
    import timm

    if kwargs.pop("pretrained", False):
        raise ValueError(
            f"pretrained=True for 'timm:{timm_name}' would download weights from a hub; lit_compress "
            "never does that. Download the weights yourself and pass weights='<path to file>'."
        )
    if not timm.is_model(timm_name):
        close = difflib.get_close_matches(timm_name, timm.list_models(), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise ValueError(f"unknown timm model {timm_name!r}.{hint} See timm.list_models().")
    return timm.create_model(timm_name, pretrained=False, **kwargs)
