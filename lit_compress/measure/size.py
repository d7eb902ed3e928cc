"""Model size in bytes: the fp32 convention, the in-memory state_dict, and files on disk."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from .params import count_params


def fp32_bytes(model: nn.Module) -> int:
    """``4 * number of parameters`` (shared ones once), the dense fp32 size used by Han et al.

    LeNet-300-100 has 266,610 parameters, so 1,066,440 bytes. Buffers are not included.
    """
    return 4 * count_params(model).total


def state_dict_bytes(model: nn.Module) -> int:
    """Sum of ``nbytes`` of the tensors in ``model.state_dict()`` (parameters and buffers, actual dtypes).

    Tensors that are views of the same memory (tied weights appear under two keys) are counted once,
    as a serialiser would store them once. Non-tensor extra state is ignored.
    """
    seen: set[tuple[int, int, int]] = set()
    total = 0
    for value in model.state_dict().values():
        if not isinstance(value, Tensor):
            continue
        nbytes = value.numel() * value.element_size()
        key = (value.data_ptr(), nbytes, value.element_size())
        if value.data_ptr() and key in seen:
            continue
        seen.add(key)
        total += nbytes
    return total


def file_bytes(path: str | os.PathLike) -> int:
    """Size of the file at ``path`` in bytes."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"cannot measure the size of {str(p)!r}: no such file.")
    return p.stat().st_size
