"""``compression_loss``: the explicit door for loss terms that compression callbacks contribute.

Callbacks that add a term to the training loss (distillation, regularisers) register a transform on the
LightningModule during ``setup`` and remove it in ``teardown``. By default they wrap ``training_step`` to
apply it; a module that prefers to see it can call :func:`compression_loss` itself (and the callback is
configured with ``inject="explicit"``)::

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return lit_compress.compression_loss(self, loss)

Either way the terms reach the optimizer through the one backward of the returned loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LossTransform = Callable[[torch.Tensor], torch.Tensor]
_ATTR = "_lit_compress_loss_terms"


def register_loss_term(module: nn.Module, key: str, transform: LossTransform) -> None:
    """Attach ``transform`` (task loss -> combined loss) to ``module`` under ``key`` (replaces same key)."""
    terms: dict[str, LossTransform] = module.__dict__.setdefault(_ATTR, {})
    terms[key] = transform


def unregister_loss_term(module: nn.Module, key: str) -> None:
    module.__dict__.get(_ATTR, {}).pop(key, None)


def compression_loss(module: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` combined with every term the compression callbacks of this run registered on ``module``.

    Returns ``loss`` unchanged when no callback registered anything (e.g. plain validation or inference).
    """
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"compression_loss(module, loss) needs the task loss tensor as its second argument, got "
            f"{type(loss).__name__}"
        )
    for transform in list(module.__dict__.get(_ATTR, {}).values()):
        loss = transform(loss)
    return loss
