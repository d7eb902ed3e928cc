"""The zoo's one evaluation routine: top-1 and error count on a dataset's official test split.

Export and verify both call :func:`evaluate_on`, so a card's numbers and their re-measurement come from
the same code (same preprocessing as the datamodules: ``lit_compress.data.normalize``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lit_compress.zoo.card import Metrics


@torch.inference_mode()
def evaluate_on(
    model: nn.Module,
    dataset: str,
    split: str = "test",
    data_dir: str | Path | None = None,
    batch_size: int = 1000,
) -> Metrics:
    from lit_compress.data import load_split, normalize

    images, labels = load_split(dataset, split, data_dir=data_dir)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    errors = 0
    try:
        for start in range(0, len(labels), batch_size):
            x = normalize(images[start : start + batch_size], dataset).to(device)
            predicted = model(x).argmax(dim=1).cpu()
            errors += int((predicted != labels[start : start + batch_size]).sum())
    finally:
        model.train(was_training)
    n = len(labels)
    return Metrics(top1=(n - errors) / n, errors=errors, num_examples=n)


def image_batches(
    dataset: str, split: str = "test", data_dir: str | Path | None = None, batch_size: int = 1000
) -> Iterator[torch.Tensor]:
    """The split's images, normalised as :func:`evaluate_on` feeds them, in batches (no labels)."""
    from lit_compress.data import load_split, normalize

    images, _ = load_split(dataset, split, data_dir=data_dir)
    for start in range(0, len(images), batch_size):
        yield normalize(images[start : start + batch_size], dataset)


def per_image_statistics(
    model: nn.Module, dataset: str, split: str = "test", data_dir: str | Path | None = None
) -> dict | None:
    """Per-image MAC (and decision) statistics of a dynamic network over the split; None for a static one.

    Gated networks (BlockDrop, FBS) spend different work on each image, so their card reports the mean over
    the real test set instead of the count of one example input.
    """
    if not any(type(m).__module__.startswith("lit_compress.gating") for m in model.modules()):
        return None
    from lit_compress.gating.statistics import dynamic_statistics

    return dynamic_statistics(model, image_batches(dataset, split, data_dir))


def timing_images(
    model: nn.Module, dataset: str, data_dir: str | Path | None = None, count: int = 512
) -> torch.Tensor | None:
    """The first ``count`` test images (normalised) for timing a dynamic network; None for a static one,
    which is timed on random input (its work does not depend on the data)."""
    if not any(type(m).__module__.startswith("lit_compress.gating") for m in model.modules()):
        return None
    return next(image_batches(dataset, "test", data_dir, batch_size=count))
