"""lit_compress.data on the real MNIST / Fashion-MNIST files stored in the workspace's shared/data.

Expected values (counts, per-class histograms) are copied from shared/data/README.md, not from
the package, so the package's own specs are checked too.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from lit_compress.data import (
    DATASETS,
    FashionMNISTDataModule,
    MNISTDataModule,
    load_split,
    locate_files,
    normalize,
    sources,
)

# <workspace>/main/tests/integration/this_file -> <workspace>/shared/data
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"

README_COUNTS = {
    "mnist": {
        "train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
        "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    },
    "fashion-mnist": {"train": [6000] * 10, "test": [1000] * 10},
}
MODULES = {"mnist": MNISTDataModule, "fashion-mnist": FashionMNISTDataModule}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(sources, "DOWNLOAD_ROUTES", [])  # never download, even if files are missing


def _require(dataset: str) -> Path:
    folder = SHARED_DATA / dataset
    if not all((folder / f.filename).is_file() for f in DATASETS[dataset].files.values()):
        pytest.skip(f"real {dataset} files not found in {folder} (the workspace's shared/data)")
    return SHARED_DATA


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_official_files_verify(dataset):
    root = _require(dataset)
    files = locate_files(dataset, root, download=False)
    for role, path in files.items():
        f = DATASETS[dataset].files[role]
        assert path == root / dataset / f.filename
        # Byte-identical to the official files: the md5 rule, not the content fallback, applies.
        assert sources._digest(path, "md5") == f.md5
        assert sources._digest(path, "sha256") == f.sha256


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_counts_and_histograms(dataset):
    root = _require(dataset)
    for split, n in [("train", 60000), ("test", 10000)]:
        images, labels = load_split(dataset, split, root, download=False)
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert torch.bincount(labels, minlength=10).tolist() == README_COUNTS[dataset][split]
        if split == "train":
            x = normalize(images, dataset)
            # The spec's mean/std are the training-set statistics.
            assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_datamodule_defaults(dataset):
    root = _require(dataset)
    dm = MODULES[dataset](data_dir=str(root), download=False)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (55000, 5000, 10000)
    torch.manual_seed(0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (128, 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (128,)
    assert abs(x.mean().item()) < 0.25 and 0.7 < x.std().item() < 1.3
    xt, yt = next(iter(dm.test_dataloader()))
    assert xt.shape == (1000, 1, 28, 28)
    # Evaluation code path (load_split + normalize) sees exactly what the test loader yields.
    images, labels = load_split(dataset, "test", root, download=False)
    assert torch.equal(xt, normalize(images[:1000], dataset)) and torch.equal(yt, labels[:1000])


def test_torchvision_layout(tmp_path):
    root = _require("mnist")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in DATASETS["mnist"].files.values():
        (raw / f.filename).symlink_to(root / "mnist" / f.filename)
    files = locate_files("mnist", tmp_path, download=False)
    assert files["train_images"] == raw / "train-images-idx3-ubyte.gz"
    assert load_split("mnist", "test", tmp_path)[0].shape == (10000, 28, 28)


@pytest.mark.skipif(shutil.which("gzip") is None, reason="GNU gzip not on PATH")
def test_npm_rebuild_is_byte_identical(tmp_path):
    """The npm route's recompression reproduces the official .gz bytes (README recipe)."""
    root = _require("mnist")
    for role in ("test_labels", "test_images"):
        f = DATASETS["mnist"].files[role]
        raw = gzip.decompress((root / "mnist" / f.filename).read_bytes())
        rebuilt = sources._gzip_like_official(raw, f, tmp_path)
        assert hashlib.md5(rebuilt).hexdigest() == f.md5, f"{role}: GNU gzip output differs"


def test_torchvision_accepts_the_files(tmp_path):
    """torchvision's own MNIST class takes the shared files as already downloaded (no network)."""
    import torchvision.datasets

    root = _require("mnist")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in DATASETS["mnist"].files.values():
        (raw / f.filename).symlink_to(root / "mnist" / f.filename)
    test_set = torchvision.datasets.MNIST(str(tmp_path), train=False, download=True)
    images, labels = load_split("mnist", "test", root, download=False)
    assert torch.equal(test_set.data, images) and torch.equal(test_set.targets, labels)
