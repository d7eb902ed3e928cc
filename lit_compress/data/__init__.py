"""Real MNIST / Fashion-MNIST from the official IDX files, plus a synthetic datamodule for tests.

Training (the datamodules) and evaluation (:func:`load_split` + :func:`normalize`) share the same
verified files and the same preprocessing.
"""

from lit_compress.data.datamodules import (
    FashionMNISTDataModule,
    IDXDataModule,
    MNISTDataModule,
    SyntheticDataModule,
)
from lit_compress.data.idx import IdxFormatError, read_idx
from lit_compress.data.sources import (
    DATA_ENV_VAR,
    DATASETS,
    ChecksumMismatchError,
    DataFilesNotFoundError,
    DatasetSpec,
    get_spec,
    load_split,
    locate_files,
    normalize,
    resolve_data_root,
)

__all__ = [
    "DATASETS",
    "DATA_ENV_VAR",
    "ChecksumMismatchError",
    "DataFilesNotFoundError",
    "DatasetSpec",
    "FashionMNISTDataModule",
    "IDXDataModule",
    "IdxFormatError",
    "MNISTDataModule",
    "SyntheticDataModule",
    "get_spec",
    "load_split",
    "locate_files",
    "normalize",
    "read_idx",
    "resolve_data_root",
]
