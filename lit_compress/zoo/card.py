"""The zoo card: a versioned, strictly validated record of one compressed checkpoint.

Cards are JSON on disk. Every number in a card is written by :func:`lit_compress.zoo.export` from the
project's own measurement; ``card_sha256`` seals the rest of the card so that a hand edit is detected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from lit_compress.zoo.errors import CardValidationError

SCHEMA_VERSION = 1
NAME_PATTERN = re.compile(r"^[a-z0-9_]+-[a-z0-9_-]+\.[a-z0-9][a-z0-9_.-]*$")


@dataclass
class Architecture:
    name: str  # registered model name or "timm:<name>"
    kwargs: dict[str, Any]


@dataclass
class DatasetRef:
    name: str  # "mnist", "fashion-mnist"
    split: str  # split the metrics were measured on ("test": the official test set)
    num_examples: int
    input_shape: list[int]


@dataclass
class Compression:
    methods: list[str]  # [] for a dense reference
    bits: int  # weight bit width of the shipped file (32 = float32)
    layers: dict[str, dict[str, Any]]  # FQN -> {"sparsity": ..., "bits": ..., ...}
    gating: dict[str, Any] | None = None
    description: str = ""


@dataclass
class Metrics:
    top1: float  # fraction in [0, 1]
    errors: int  # misclassified examples
    num_examples: int


@dataclass
class Params:
    dense: int
    nonzero: int


@dataclass
class Macs:
    dense: int  # per example; only conv/linear multiply-accumulates (lit_compress.measure convention)
    effective: int


@dataclass
class Bytes:
    fp32: int  # 4 bytes per parameter of the dense model
    file: int  # bytes of the shipped weight file(s)


@dataclass
class Recipe:
    path: str  # relative to the repository root, e.g. "configs/lenet5-mnist-dense.yaml"
    sha256: str
    command: str


@dataclass
class Versions:
    lit_compress: str
    torch: str
    lightning: str
    python: str


@dataclass
class FileEntry:
    path: str  # relative to the entry's folder
    format: str  # codec name, e.g. "safetensors"
    sha256: str
    bytes: int


@dataclass
class Latency:
    """CPU latency of the shipped model beside its uncompressed reference, measured in one session.

    Wall-clock numbers vary between machines and runs; ``zoo verify`` re-measures them and only checks that a
    claimed speed-up (``speedup > 1``) still holds.
    """

    batch_size: int
    threads: int
    ms: float  # median milliseconds per batch, the shipped model
    reference_ms: float  # the same for the reference (the card's architecture without compression)
    reference: str  # what the reference is, e.g. "dense lenet5"
    speedup: float  # reference_ms / ms
    device: str = ""


@dataclass
class Card:
    name: str
    architecture: Architecture
    dataset: DatasetRef
    compression: Compression
    metrics: Metrics
    params: Params
    macs: Macs
    bytes: Bytes
    recipe: Recipe
    versions: Versions
    created: str  # ISO 8601 date-time (UTC)
    files: list[FileEntry]
    license: str
    paper: str
    structure: dict[str, Any] | None = None  # plain-data structure spec for physically pruned nets
    training: dict[str, Any] = field(default_factory=dict)  # wall time, epochs, steps, seed, device
    notes: str = ""
    latency: list[Latency] | None = None  # optional (cards of dense references usually have none)
    schema_version: int = SCHEMA_VERSION
    card_sha256: str = ""

    @property
    def compression_ratio(self) -> float:
        return self.params.dense / max(self.params.nonzero, 1)

    @property
    def size_ratio(self) -> float:
        return self.bytes.fp32 / max(self.bytes.file, 1)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in _OPTIONAL_FIELDS:  # absent rather than null: older cards and their seals stay valid
            if data.get(key) is None:
                data.pop(key, None)
        return data

    def seal(self) -> Card:
        """Set ``card_sha256`` from the card's other fields; returns self."""
        self.card_sha256 = content_hash(self.to_dict())
        return self

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "card", check_seal: bool = True) -> Card:
        try:
            card = _build(cls, data, source)
        except RecursionError:
            raise CardValidationError(f"{source}: the card is nested too deeply to be a card") from None
        _check_files(card.files, f"{source}.files")
        if card.schema_version != SCHEMA_VERSION:
            raise CardValidationError(
                f"{source}: schema_version {card.schema_version} is not supported by this lit_compress "
                f"(it reads version {SCHEMA_VERSION}); upgrade lit_compress or re-export the entry."
            )
        if not NAME_PATTERN.match(card.name):
            raise CardValidationError(
                f"{source}: name {card.name!r} is not of the form 'arch-dataset.tag' "
                "(lower case, e.g. 'lenet5-mnist.dense' or 'lenet_300_100-fashion-mnist.pruned-12x')."
            )
        if check_seal:
            expected = content_hash(card.to_dict())
            if card.card_sha256 != expected:
                raise CardValidationError(
                    f"{source}: card content does not match its card_sha256 (recorded "
                    f"{card.card_sha256 or '<empty>'}, computed {expected}); the card was edited after "
                    "export. Re-export the entry (its recipe is in the card) instead of editing numbers."
                )
        return card

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "card", check_seal: bool = True) -> Card:
        """Parse a card; ``text`` may be the raw bytes of ``card.json`` (they must be UTF-8)."""
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as err:
                raise CardValidationError(f"{source}: not UTF-8 text ({err}); a card is UTF-8 JSON") from err
        if not isinstance(text, str):
            raise TypeError(
                f"{source}: expected the card's JSON text (str or bytes), got {type(text).__name__}"
            )
        try:
            data = json.loads(text)
        except RecursionError:
            raise CardValidationError(f"{source}: not valid JSON (nested too deeply)") from None
        except ValueError as err:  # JSONDecodeError, and integers past Python's digit limit
            raise CardValidationError(f"{source}: not valid JSON ({err})") from err
        return cls.from_dict(data, source=source, check_seal=check_seal)


_OPTIONAL_FIELDS = ("latency",)  # added to schema 1 after release; omitted when unset


def content_hash(card_dict: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a card without ``card_sha256`` (and without unset optional fields)."""
    payload = {
        k: v for k, v in card_dict.items() if k != "card_sha256" and not (k in _OPTIONAL_FIELDS and v is None)
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _build(tp: Any, value: Any, path: str) -> Any:
    """Convert JSON data to ``tp`` (a dataclass or typing annotation), failing with the field's path."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise CardValidationError(f"{path}: expected an object, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise CardValidationError(
                f"{path}: unknown field(s) {unknown}; valid fields are {sorted(fields)}"
            )
        missing = [
            n
            for n, f in fields.items()
            if n not in value
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise CardValidationError(f"{path}: missing required field(s) {missing}")
        return tp(**{n: _build(hints[n], v, f"{path}.{n}") for n, v in value.items()})
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _build(option, value, path)
            except CardValidationError as err:
                errors.append(str(err))
        raise CardValidationError(errors[0] if len(errors) == 1 else f"{path}: no type matches: {errors}")
    if origin is list:
        if not isinstance(value, list):
            raise CardValidationError(f"{path}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_build(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CardValidationError(f"{path}: expected an object, got {type(value).__name__}")
        _, item = typing.get_args(tp)
        for k in value:
            _check_text(k, f"{path} key")
        return {str(k): _build(item, v, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        _check_plain(value, path)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CardValidationError(f"{path}: expected a number, got {value!r:.80}")
        if not math.isfinite(value):
            raise CardValidationError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise CardValidationError(f"{path}: expected {tp.__name__}, got {value!r:.80}")
        if tp is str:
            _check_text(value, path)
        return value
    raise TypeError(f"card schema uses an unsupported annotation {tp!r} at {path}")


_MAX_DEPTH = 32  # free-form values (constructor kwargs, structure specs) nested deeper are not a card's


def _check_text(value: object, path: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise CardValidationError(f"{path}: text is not valid UTF-8 ({err})") from None


def _check_plain(value: Any, path: str) -> None:
    """A free-form value must be plain JSON data: finite numbers, UTF-8 text, string keys, bounded depth
    (so that hashing and writing the card cannot fail later). Iterative: no recursion on hostile depth."""
    stack = [(value, path, 0)]
    while stack:
        v, where, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise CardValidationError(f"{where}: nested more than {_MAX_DEPTH} levels deep")
        if v is None or isinstance(v, (bool, int)):
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                raise CardValidationError(f"{where}: expected a finite number, got {v!r}")
        elif isinstance(v, str):
            _check_text(v, where)
        elif isinstance(v, (list, tuple)):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(v))
        elif isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise CardValidationError(f"{where}: keys must be strings, got {k!r:.80}")
                _check_text(k, f"{where} key")
                stack.append((item, f"{where}.{k}", depth + 1))
        else:
            raise CardValidationError(f"{where}: expected JSON data, got a {type(v).__name__}")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_files(files: list[FileEntry], path: str) -> None:
    """Each file must be a plain relative path inside the entry's folder (a card must not make the loader
    read ``../../somewhere``), with a well-formed sha256 and a non-negative size."""
    for i, f in enumerate(files):
        where = f"{path}[{i}]"
        parts = f.path.replace("\\", "/").split("/")
        if not f.path or f.path.startswith("/") or any(p in ("", ".", "..") for p in parts) or ":" in f.path:
            raise CardValidationError(
                f"{where}.path: {f.path!r} must be a relative path inside the entry's folder "
                "(e.g. 'model.safetensors'), without '..', '.', empty or absolute parts"
            )
        if not _SHA256.fullmatch(f.sha256):
            raise CardValidationError(
                f"{where}.sha256: expected 64 lowercase hex digits, got {f.sha256!r:.80}"
            )
        if f.bytes < 0:
            raise CardValidationError(f"{where}.bytes: expected a non-negative size, got {f.bytes}")
