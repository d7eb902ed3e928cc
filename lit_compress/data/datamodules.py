"""LightningDataModules: real MNIST / Fashion-MNIST from IDX files, and a synthetic one for tests.

Data stays in memory as uint8 tensors; each batch is normalised with
:func:`lit_compress.data.sources.normalize`, the same function evaluation code uses. The datasets
are index-based map-style datasets, so Lightning's DistributedSampler injection works unchanged;
``__getitems__`` lets the DataLoader fetch a whole batch with a few vectorised tensor ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lit_compress.data.sources import get_spec, load_split, locate_files, normalize, resolve_data_root

__all__ = [
    "FashionMNISTDataModule",
    "IDXDataModule",
    "ImageTensorDataset",
    "MNISTDataModule",
    "SyntheticDataModule",
    "random_translate",
]


def random_translate(images: torch.Tensor, max_shift: int = 2) -> torch.Tensor:
    """Shift each image of ``[B, H, W]`` by its own random (dy, dx) in ``[-max_shift, max_shift]``.

    Pixels shifted in are zero (background). Uses the global torch RNG, which Lightning seeds
    (``seed_everything``) and DataLoader re-seeds per worker.
    """
    if max_shift <= 0 or images.numel() == 0:
        return images
    b, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(0, 2 * max_shift + 1, (2, b))
    rows = torch.arange(h)[None, :] + offsets[0][:, None]  # [B, H]
    cols = torch.arange(w)[None, :] + offsets[1][:, None]  # [B, W]
    return padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


class ImageTensorDataset(Dataset):
    """uint8 images ``[N, H, W]`` + int64 labels; items are ``(float image [1, H, W], int label)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, dataset: str, augment: bool = False):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.dataset = dataset
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        raw = self.images[idx]
        if self.augment:
            raw = random_translate(raw)
        images = normalize(raw, self.dataset)
        return list(zip(images.unbind(0), self.labels[idx].tolist()))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]


def _check_int(name: str, value: object, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an int >= {minimum}{extra}, got {value!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


class IDXDataModule(L.LightningDataModule):
    """Base for IDX-file datasets; subclasses fix :attr:`dataset_name`.

    Args:
        data_dir: data root (see :func:`~lit_compress.data.sources.resolve_data_root`); ``None``
            means ``$LIT_COMPRESS_DATA`` or ``~/.cache/lit_compress/data``.
        batch_size: training batch size.
        eval_batch_size: validation / test batch size.
        val_size: images held out of the 60k training set for validation, chosen by a seeded
            permutation; ``0`` disables validation.
        split_seed: seed of that permutation (independent of the global seed).
        num_workers: DataLoader workers (0 = load in the main process; data is in memory anyway).
        augment: random translation by up to 2 px (zero fill) on training batches.
        limit_train: keep only the first ``limit_train`` training images after the split.
        download: let :meth:`prepare_data` fetch missing files.
    """

    dataset_name: str = ""

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        split_seed: int = 0,
        num_workers: int = 0,
        augment: bool = False,
        limit_train: int | None = None,
        download: bool = True,
    ):
        super().__init__()
        if not self.dataset_name:
            raise TypeError("IDXDataModule is a base class; use MNISTDataModule or FashionMNISTDataModule")
        spec = get_spec(self.dataset_name)
        if data_dir is not None and not isinstance(data_dir, str):
            data_dir = str(data_dir)  # accept a Path from Python callers; hparams stay YAML-friendly
        _check_int("batch_size", batch_size, 1)
        _check_int("eval_batch_size", eval_batch_size, 1)
        _check_int("val_size", val_size, 0)
        _check_int("split_seed", split_seed, 0)
        _check_int("num_workers", num_workers, 0)
        _check_int("limit_train", limit_train, 1, allow_none=True)
        _check_bool("augment", augment)
        _check_bool("download", download)
        if val_size >= spec.train_size:
            raise ValueError(
                f"val_size={val_size} leaves no training data: {spec.display_name} has "
                f"{spec.train_size} training images"
            )
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.split_seed = split_seed
        self.num_workers = num_workers
        self.augment = augment
        self.limit_train = limit_train
        self.download = download
        self.num_classes: int = spec.num_classes
        self.input_shape: tuple[int, ...] = tuple(spec.image_shape)
        self.class_names: tuple[str, ...] = spec.class_names
        self.train_dataset: ImageTensorDataset | None = None
        self.val_dataset: ImageTensorDataset | None = None
        self.test_dataset: ImageTensorDataset | None = None

    def prepare_data(self) -> None:
        """Locate, verify and if allowed download the files (Lightning runs this on one process)."""
        locate_files(self.dataset_name, resolve_data_root(self.data_dir), download=self.download)

    def setup(self, stage: str | None = None) -> None:
        """Load the splits that ``stage`` needs (idempotent)."""
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            self._setup_train_val()
        if stage in (None, "test", "predict") and self.test_dataset is None:
            images, labels = load_split(self.dataset_name, "test", self.data_dir, download=False)
            self.test_dataset = ImageTensorDataset(images, labels, self.dataset_name)

    def _setup_train_val(self) -> None:
        images, labels = load_split(self.dataset_name, "train", self.data_dir, download=False)
        n = len(labels)
        if self.val_size >= n:
            raise ValueError(
                f"val_size={self.val_size} leaves no training data: the training set has {n} images"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
        if self.limit_train is not None:
            train_idx = train_idx[: self.limit_train]
        # Indexing copies, so the shared load_split cache is never modified.
        self.train_dataset = ImageTensorDataset(
            images[train_idx], labels[train_idx], self.dataset_name, augment=self.augment
        )
        if self.val_size > 0:
            self.val_dataset = ImageTensorDataset(images[val_idx], labels[val_idx], self.dataset_name)

    def _require(self, ds: Dataset | None, stage: str) -> Dataset:
        if ds is None:
            raise RuntimeError(f"call setup({stage!r}) (or use a Trainer) before asking for its dataloader")
        return ds

    def train_dataloader(self) -> DataLoader:
        ds = self._require(self.train_dataset, "fit")
        return _loader(ds, self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        """Validation loader; an empty list when ``val_size=0``, which makes Lightning skip validation."""
        if self.val_size == 0:
            return []
        ds = self._require(self.val_dataset, "fit")
        return _loader(ds, self.eval_batch_size, shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The official test set, unshuffled."""
        ds = self._require(self.test_dataset, "test")
        return _loader(ds, self.eval_batch_size, shuffle=False, num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


class MNISTDataModule(IDXDataModule):
    """MNIST (LeCun et al.): 60k/10k 28x28 greyscale digits, 10 classes."""

    dataset_name = "mnist"


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST (Zalando): 60k/10k 28x28 greyscale clothing images, 10 classes."""

    dataset_name = "fashion-mnist"


class SyntheticDataModule(L.LightningDataModule):
    """Tiny deterministic random data with a learnable signal, for fast tests.

    Each class has a fixed random prototype image; a sample is its class prototype plus Gaussian
    noise of the same scale, so a linear model beats chance within a few steps. Data depends only
    on ``seed`` (not on the global RNG). Batches are ``(float32 [B, *input_shape], int64 [B])``.
    """

    dataset_name = "synthetic"

    def __init__(
        self,
        num_train: int = 256,
        num_val: int = 64,
        num_test: int = 64,
        input_shape: Sequence[int] = (1, 28, 28),
        num_classes: int = 10,
        batch_size: int = 32,
        seed: int = 0,
        shuffle: bool = True,
    ):
        super().__init__()
        _check_bool("shuffle", shuffle)
        _check_int("num_train", num_train, 1)
        _check_int("num_val", num_val, 0)
        _check_int("num_test", num_test, 0)
        _check_int("num_classes", num_classes, 2)
        _check_int("batch_size", batch_size, 1)
        _check_int("seed", seed, 0)
        shape = tuple(input_shape) if isinstance(input_shape, Sequence) else ()
        if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise ValueError(f"input_shape must be a non-empty list of positive ints, got {input_shape!r}")
        self.save_hyperparameters()
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.input_shape: tuple[int, ...] = shape
        self.num_classes = num_classes
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle  # False: a fixed batch order, for exact resume comparisons
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    def _make(self, n: int, prototypes: torch.Tensor, gen: torch.Generator) -> TensorDataset:
        labels = torch.randperm(n, generator=gen) % self.num_classes
        noise = torch.randn((n, *self.input_shape), generator=gen)
        return TensorDataset(prototypes[labels] + noise, labels)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        gen = torch.Generator().manual_seed(self.seed)
        prototypes = torch.randn((self.num_classes, *self.input_shape), generator=gen)
        self.train_dataset = self._make(self.num_train, prototypes, gen)
        self.val_dataset = self._make(self.num_val, prototypes, gen) if self.num_val else None
        self.test_dataset = self._make(self.num_test, prototypes, gen) if self.num_test else None

    def _loader(self, ds: TensorDataset | None, shuffle: bool) -> DataLoader | list:
        if ds is None:
            return []
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        if self.train_dataset is None:
            self.setup("test")
        return self._loader(self.test_dataset, shuffle=False)
