"""Helpers shared by the measurement modules (not public API)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

Number = int | float


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, then restore every submodule's own ``training`` flag.

    Restoring per module (not ``model.train(was_training)``) keeps mixed states intact, e.g. a frozen
    batch-norm left in eval mode inside a training model.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the first parameter/buffer, dtype of the first floating one (else CPU, default dtype)."""
    device, dtype = None, None
    for t in (*model.parameters(), *model.buffers()):
        if device is None:
            device = t.device
        if dtype is None and t.is_floating_point():
            dtype = t.dtype
        if device is not None and dtype is not None:
            break
    return device or torch.device("cpu"), dtype or torch.get_default_dtype()


def check_input_shape(input_shape: object, what: str = "input_shape") -> tuple[int, ...]:
    """Validate a per-example shape (no batch dimension) and return it as a tuple of ints."""
    ok = (
        isinstance(input_shape, Sequence)
        and not isinstance(input_shape, str)
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)
    )
    if not ok:
        raise ValueError(
            f"{what} must be a sequence of positive ints without the batch dimension, got {input_shape!r}. "
            "Hint: for 28x28 grey images use [1, 28, 28]."
        )
    return tuple(int(d) for d in input_shape)


def random_batch(model: nn.Module, input_shape: Sequence[int], batch_size: int, seed: int = 0) -> Tensor:
    """A seeded standard-normal batch on the model's device and dtype.

    Random rather than zeros so that data-dependent (gated) nets take representative paths; seeded so
    that repeated measurements agree.
    """
    device, dtype = model_device_dtype(model)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *input_shape), generator=gen, dtype=torch.float32)
    return x.to(device=device, dtype=dtype)
