"""The zoo card: a versioned, strictly validated record of one compressed checkpoint.

Cards are JSON on disk. Every number in a card is written by :func:`lit_compress.zoo.export` from the
project's own measurement; ``card_sha256`` seals the rest of the card so that a hand edit is detected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
        card = _build(cls, data, source)
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
    def from_json(cls, text: str, *, source: str = "card", check_seal: bool = True) -> Card:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
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
        return {str(k): _build(item, v, f"{path}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CardValidationError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp in (int, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise CardValidationError(f"{path}: expected {tp.__name__}, got {value!r}")
        return value
    raise TypeError(f"card schema uses an unsupported annotation {tp!r} at {path}")
