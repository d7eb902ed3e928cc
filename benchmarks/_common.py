"""Shared pieces of the benchmark scripts: environment, data, trainer, evaluation, sparsity, tables.

The scripts in this folder are run as ``.venv/bin/python benchmarks/<script>.py``, so this module is
imported as ``_common`` (the script's folder is first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def add_common_args(parser: argparse.ArgumentParser, threads: int = 1) -> argparse.ArgumentParser:
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="data root holding mnist/ (IDX .gz files)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed_everything seed (same init for every method)"
    )
    parser.add_argument("--threads", type=int, default=threads, help="torch.set_num_threads")
    return parser


def setup_env(args: argparse.Namespace) -> None:
    """Offline, real data, fixed threads. Call before building data modules or models."""
    os.environ["LIT_COMPRESS_DATA"] = str(Path(args.data_dir).resolve())
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (sets its loggers' levels on import; override them after)

    # Lightning's info lines (GPU available, tips, ...) would drown the tables.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def machine_note(args: argparse.Namespace) -> str:
    import lightning

    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores visible, torch {torch.__version__} "
        f"({args.threads} thread(s)), lightning {lightning.__version__}, python {platform.python_version()}"
    )


def mnist(batch_size: int = 128, val_size: int = 5000, limit_train: int | None = None, augment: bool = False):
    """The real MNIST data module (training split minus ``val_size`` held-out images), set up for fit."""
    from lit_compress.data import MNISTDataModule

    dm = MNISTDataModule(
        batch_size=batch_size, val_size=val_size, augment=augment, limit_train=limit_train, download=False
    )
    dm.setup("fit")
    return dm


def steps_per_epoch(dm) -> int:
    """``len(train_dataloader)`` (no drop_last): optimizer steps in one epoch."""
    return math.ceil(len(dm.train_dataset) / dm.batch_size)


def make_trainer(callbacks: Sequence[Any] = (), validate: bool = False, **kwargs: Any):
    """The benchmarks' Trainer: CPU, deterministic, no logger / checkpoints / progress output.

    Validation is off by default (nothing reads it; every reported error is on the official test set).
    """
    import lightning.pytorch as L

    kwargs.setdefault("num_sanity_val_steps", 0)
    if not validate:
        kwargs.setdefault("limit_val_batches", 0)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=list(callbacks),
        **kwargs,
    )


def sgd(lr: float, momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0) -> Callable:
    return partial(torch.optim.SGD, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def cosine(t_max: int) -> Callable:
    return partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=t_max)


def classifier(model: str, optimizer: Callable, lr_scheduler: Callable | None = None, **kwargs: Any):
    from lit_compress.models import ImageClassifier

    return ImageClassifier(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, **kwargs)


def test_error(net: nn.Module) -> tuple[float, int]:
    """(error %, misclassified count) on the official 10k MNIST test set, via the zoo's evaluation."""
    from lit_compress.zoo.evaluate import evaluate_on

    metrics = evaluate_on(net, "mnist")
    return 100.0 * metrics.errors / metrics.num_examples, metrics.errors


def prunable_weights(net: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(f"{n}.weight", m.weight) for n, m in net.named_modules() if isinstance(m, PRUNABLE)]


def weight_sparsity(net: nn.Module) -> float:
    """Fraction of Conv/Linear weight entries that are exactly zero, measured on the model's own weights."""
    weights = [w.detach() for _, w in prunable_weights(net)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros / total


def nonzero_params(net: nn.Module) -> tuple[int, int]:
    """(nonzero, total) parameters of the whole net (weights and biases), via ``lit_compress.measure``."""
    from lit_compress.measure import count_params

    count = count_params(net)
    return count.nonzero, count.total


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["s"] = time.perf_counter() - start


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A GitHub-markdown table with padded columns (readable as plain text too)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) if rows else False for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)
    )
    out = [line(cells[0]), rule + "|", *(line(r) for r in cells[1:])]
    if title:
        out = [title, "", *out]
    return "\n".join(out)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("%x"))
    except ValueError:
        return False
    return True


def step_markers():
    """Two callbacks to place first and last: step start / end and epoch-end wall times."""
    from lightning.pytorch import Callback

    class First(Callback):
        def __init__(self) -> None:
            self.t0: float | None = None
            self.step_start: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            now = time.perf_counter()
            if self.t0 is None:
                self.t0 = now
            self.step_start.append(now)

    class Last(Callback):
        def __init__(self) -> None:
            self.t1 = 0.0
            self.step_end: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.step_end.append(time.perf_counter())

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.t1 = time.perf_counter()

    return First(), Last()


def in_memory_loader(num_batches: int, batch_size: int = 128):
    """MNIST training images normalised once, served in order from memory (no data-loading noise)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lit_compress.data import load_split, normalize

    images, labels = load_split("mnist", "train", download=False)
    n = num_batches * batch_size
    x = normalize(images[:n], "mnist").reshape(n, 1, 28, 28).contiguous()
    return DataLoader(TensorDataset(x, labels[:n].clone()), batch_size=batch_size, shuffle=False)
