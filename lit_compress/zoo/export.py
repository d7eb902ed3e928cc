"""``zoo.export``: measure a trained model and write it as a zoo entry, atomically.

The entry is assembled in a hidden staging folder (``<zoo>/.staging-<name>-*``) and renamed into place
only when complete, so a crash never leaves a half-written entry where the registry looks.
"""

from __future__ import annotations

import datetime as _dt
import errno
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from lit_compress._io import atomic_write_bytes, default_mode, sha256_bytes, sha256_file
from lit_compress.zoo.card import (
    Architecture,
    Bytes,
    Card,
    Compression,
    DatasetRef,
    FileEntry,
    Macs,
    Params,
    Recipe,
    Versions,
)
from lit_compress.zoo.evaluate import evaluate_on
from lit_compress.zoo.registry import CARD_FILE, zoo_dir
from lit_compress.zoo.storage import get_codec

REPO_ROOT = Path(__file__).resolve().parents[2]


def measure_entry(model: nn.Module, input_shape: list[int]) -> tuple[Params, Macs, dict[str, dict[str, Any]]]:
    """Parameter counts, per-example MACs and per-layer sparsity of ``model`` (the card's numbers)."""
    from lit_compress.measure import count_macs, count_params

    counts = count_params(model)
    macs = count_macs(model, input_shape=input_shape)
    layers = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() > 1:
            nonzero = int(weight.count_nonzero())
            layers[name] = {
                "params": weight.numel(),
                "nonzero": nonzero,
                "sparsity": round(1 - nonzero / weight.numel(), 6),
            }
    return (
        Params(dense=counts.total, nonzero=counts.nonzero),
        Macs(dense=round(macs.dense), effective=round(macs.effective)),
        layers,
    )


def dynamic_macs(
    model: nn.Module, macs: Macs, dataset: str, data_dir: str | Path | None = None
) -> tuple[Macs, dict[str, Any] | None]:
    """For a dynamic (gated) network: effective MACs = the mean per image over the test set, and the
    statistics behind it; ``(macs, None)`` unchanged for a static network."""
    from lit_compress.zoo.evaluate import per_image_statistics

    stats = per_image_statistics(model, dataset, "test", data_dir)
    if stats is None:
        return macs, None
    return Macs(dense=macs.dense, effective=round(stats["macs_mean"])), stats


def recipe_ref(recipe: str | Path | None, command: str | None = None) -> Recipe:
    """Card reference to the config that produced an entry: repo-relative path + sha256."""
    if recipe is None:
        return Recipe(path="", sha256="", command=command or "")
    path = Path(recipe).resolve()
    if not path.is_file():
        raise FileNotFoundError(
            f"recipe {str(recipe)!r} does not exist; pass the YAML config that trained the model"
        )
    try:
        rel = path.relative_to(REPO_ROOT).as_posix()
    except ValueError:
        rel = path.name
    return Recipe(path=rel, sha256=sha256_file(path), command=command or f"lit-compress fit --config {rel}")


def versions() -> Versions:
    import lightning
    import torch

    import lit_compress

    return Versions(
        lit_compress=lit_compress.__version__,
        torch=torch.__version__,
        lightning=lightning.__version__,
        python=platform.python_version(),
    )


def export(
    model: nn.Module,
    *,
    name: str,
    architecture: str,
    architecture_kwargs: dict[str, Any] | None = None,
    dataset: str,
    recipe: str | Path | None,
    recipe_command: str | None = None,
    methods: list[str] | None = None,
    bits: int = 32,
    compression_description: str = "",
    gating: dict[str, Any] | None = None,
    structure: dict[str, Any] | None = None,
    license: str = "Apache-2.0",
    paper: str = "",
    training: dict[str, Any] | None = None,
    notes: str = "",
    codec: str = "safetensors",
    zoo: str | Path | None = None,
    data_dir: str | Path | None = None,
    overwrite: bool = False,
    latency: bool = False,
) -> Card:
    """Evaluate ``model`` on ``dataset``'s official test set, measure it, and write the zoo entry ``name``.

    ``latency=True`` also times the model beside its dense reference architecture (batch 1 and 256, one
    thread; see :mod:`lit_compress.zoo.latency`). Returns the sealed card. Every number on it comes from
    this function's measurements.
    """
    from lit_compress.data import DATASETS

    if dataset not in DATASETS:
        raise ValueError(
            f"unknown dataset {dataset!r}; zoo entries are measured on one of {sorted(DATASETS)}"
        )
    model = model.cpu().eval()
    input_shape = list(DATASETS[dataset].image_shape)
    metrics = evaluate_on(model, dataset, "test", data_dir=data_dir)
    params, macs, layers = measure_entry(model, input_shape)
    macs, dynamic = dynamic_macs(model, macs, dataset, data_dir)
    if dynamic is not None:  # a gated net: its card carries the test-set statistics of its decisions
        gating = {**(gating or {}), "statistics": dynamic}
    chosen = get_codec(codec)
    weights_name = "model" + chosen.suffix
    blob = chosen.encode(dict(model.state_dict()), metadata={"name": name, "format": codec})
    card = Card(
        name=name,
        architecture=Architecture(name=architecture, kwargs=dict(architecture_kwargs or {})),
        structure=structure,
        dataset=DatasetRef(
            name=dataset, split="test", num_examples=metrics.num_examples, input_shape=input_shape
        ),
        compression=Compression(
            methods=list(methods or []),
            bits=bits,
            layers=layers,
            gating=gating,
            description=compression_description,
        ),
        metrics=metrics,
        params=params,
        macs=macs,
        bytes=Bytes(fp32=4 * params.dense, file=len(blob)),
        recipe=recipe_ref(recipe, recipe_command),
        versions=versions(),
        created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        files=[FileEntry(path=weights_name, format=codec, sha256=sha256_bytes(blob), bytes=len(blob))],
        license=license,
        paper=paper,
        training=dict(training or {}),
        notes=notes,
        latency=_latency(model, architecture, architecture_kwargs, input_shape, dataset, data_dir)
        if latency
        else None,
    ).seal()
    Card.from_dict(card.to_dict(), source=f"card {name!r}")  # validate before anything is written
    write_entry(card, {weights_name: blob}, zoo=zoo, overwrite=overwrite)
    return card


def _latency(
    model: nn.Module,
    architecture: str,
    kwargs: dict[str, Any] | None,
    input_shape: list[int],
    dataset: str,
    data_dir: str | Path | None,
):
    from lit_compress.zoo.evaluate import timing_images
    from lit_compress.zoo.latency import measure_card_latency

    inputs = timing_images(model, dataset, data_dir)  # real images for a gated net, else random
    return measure_card_latency(model, architecture, dict(kwargs or {}), input_shape, inputs=inputs)


def write_entry(
    card: Card, blobs: dict[str, bytes], zoo: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Write card + files into a staging folder, then rename it to ``<zoo>/<name>`` in one step.

    Any failure (disk full, read-only or unwritable folder, an interrupt) removes the staging folder and
    leaves the zoo as it was: no new entry, no temporary files, and on ``overwrite`` the old entry back in
    place. File-system errors are re-raised as the same ``OSError`` subclass (same ``errno``) with a
    message naming the entry, the zoo folder and the path that failed.
    """
    root = zoo_dir(zoo)
    final = root / card.name
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(err, card.name, root) from err
    if final.exists() and not overwrite:
        raise FileExistsError(
            f"zoo entry {card.name!r} already exists at {final}; pass overwrite=True (CLI: --overwrite) "
            "to replace it, or choose another tag."
        )
    staging: Path | None = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{card.name}-", dir=root))
        staging.chmod(default_mode(directory=True))
        for rel, data in blobs.items():
            atomic_write_bytes(staging / rel, data)
        atomic_write_bytes(staging / CARD_FILE, card.to_json().encode())
        if final.exists():
            _replace_entry(staging, final)
        else:
            os.rename(staging, final)
    except BaseException as err:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            raise _write_error(err, card.name, root) from err
        raise
    return final


def _replace_entry(staging: Path, final: Path) -> None:
    """Swap a complete staged entry in for the existing ``final``; on failure put the old entry back."""
    # Two renames: the old entry moves aside (hidden) before the new one takes its name.
    retired = Path(tempfile.mkdtemp(prefix=f".retired-{final.name}-", dir=final.parent))
    try:
        os.rename(final, retired / final.name)
    except BaseException:
        shutil.rmtree(retired, ignore_errors=True)
        raise
    try:
        os.rename(staging, final)
    except BaseException as err:
        try:
            os.rename(retired / final.name, final)
        except OSError as restore_err:  # pragma: no cover - a rename back within one folder failing
            raise OSError(
                getattr(err, "errno", None) or restore_err.errno,
                f"{err}; the previous entry could not be moved back ({restore_err}): it is intact at "
                f"{retired / final.name}, move it to {final} by hand",
            ) from err
        shutil.rmtree(retired, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)


_READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _write_error(err: OSError, name: str, root: Path) -> OSError:
    """``err`` again (same errno, hence the same ``OSError`` subclass), saying what was not written where."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space, or export to another folder (zoo=..., CLI: --zoo)"
    elif err.errno in _READ_ONLY_ERRNOS:
        hint = (
            "the zoo folder is not writable: fix its permissions or export to a writable folder "
            "(zoo=..., CLI: --zoo)"
        )
    else:
        hint = "fix the cause above and export again"
    where = err.filename if err.filename is not None else root
    message = (
        f"cannot write zoo entry {name!r} into {root}: {err.strerror or err} (at {where}); nothing was "
        f"written, the zoo folder holds no partial entry; {hint}"
    )
    if err.errno is None:
        return OSError(message)
    return OSError(err.errno, message)
