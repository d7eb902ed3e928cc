"""Load a teacher network and freeze it.

A teacher is given as (YAML-friendly) data:

- ``"zoo:<entry>"`` or a bare zoo entry name: :func:`lit_compress.zoo.load` (sha256-checked);
- a path to a Lightning ``.ckpt`` of an :class:`~lit_compress.models.ImageClassifier` (architecture from its
  hyper-parameters, weights under ``net.``; read with ``weights_only=True``);
- ``{"model": "<registered name>", "model_kwargs": {...}, "weights": "<file>"}``: a model from the registry
  with weights from a ``.safetensors`` / tensor file;
- ``{"class_path": "pkg.Module", "init_args": {...}, "weights": "<file>"}``: any importable ``nn.Module``;
- an ``nn.Module`` instance (Python API).

The returned network is frozen (``requires_grad=False``) and in eval mode. It is never registered as a
submodule of the student, so it stays out of the optimizer, the checkpoint and the DDP wrapper.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["TeacherLoadError", "freeze", "load_teacher", "weights_fingerprint"]


class TeacherLoadError(ValueError):
    """The teacher specification could not be turned into a network."""


_SPEC_HELP = (
    "expected 'zoo:<entry>', a zoo entry name, a Lightning .ckpt path, "
    "{'model': name, 'model_kwargs': {...}, 'weights': file}, "
    "{'class_path': 'pkg.Class', 'init_args': {...}, 'weights': file} or an nn.Module"
)


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every parameter frozen."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of ``model``'s state_dict (identifies a teacher on resume)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_teacher(spec: Any) -> nn.Module:
    """Build the frozen, eval-mode teacher described by ``spec`` (see the module docstring)."""
    try:
        model = _build(spec)
    except TeacherLoadError:
        raise
    except Exception as err:
        raise TeacherLoadError(f"could not load the teacher {spec!r}: {type(err).__name__}: {err}") from err
    return freeze(model)


def _build(spec: Any) -> nn.Module:
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, (str, Path)):
        text = str(spec)
        if text.startswith("zoo:"):
            return _from_zoo(text[len("zoo:") :])
        path = Path(text)
        if path.suffix == ".ckpt" or path.is_file():
            return _from_checkpoint(path)
        return _from_zoo(text)
    if isinstance(spec, dict):
        unknown = set(spec) - {"model", "model_kwargs", "class_path", "init_args", "weights"}
        if unknown or ("model" in spec) == ("class_path" in spec):
            raise TeacherLoadError(f"teacher spec {spec!r} is not understood; {_SPEC_HELP}")
        if "model" in spec:
            from lit_compress.models import create_model

            model = create_model(spec["model"], **dict(spec.get("model_kwargs") or {}))
        else:
            model = _import(spec["class_path"])(**dict(spec.get("init_args") or {}))
        if spec.get("weights"):
            from lit_compress.models.weights import load_state_dict_file

            model.load_state_dict(load_state_dict_file(spec["weights"]))
        return model
    raise TeacherLoadError(
        f"teacher must be a string, a mapping or an nn.Module, got {type(spec).__name__}; {_SPEC_HELP}"
    )


def _from_zoo(name: str) -> nn.Module:
    from lit_compress import zoo

    try:
        return zoo.load(name)
    except zoo.ModelNotFoundError as err:
        raise TeacherLoadError(f"teacher {name!r}: {err}") from err


def _from_checkpoint(path: Path) -> nn.Module:
    from lit_compress.models import create_model
    from lit_compress.zoo.from_lightning import _architecture, network_state_from_checkpoint

    if not path.is_file():
        raise TeacherLoadError(f"teacher checkpoint {str(path)!r} does not exist; {_SPEC_HELP}")
    state, hparams = network_state_from_checkpoint(path)
    arch, kwargs = _architecture(hparams)
    model = create_model(arch, **kwargs)
    model.load_state_dict(state)
    return model


def _import(class_path: str) -> type:
    module_name, _, attr = str(class_path).rpartition(".")
    if not module_name:
        raise TeacherLoadError(f"class_path {class_path!r} must be 'package.module.ClassName'")
    cls = getattr(importlib.import_module(module_name), attr, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TeacherLoadError(f"class_path {class_path!r} does not name an nn.Module subclass")
    return cls
