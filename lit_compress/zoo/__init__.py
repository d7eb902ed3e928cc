"""The lit_compress model zoo: verifiable compressed checkpoints.

from lit_compress import zoo
zoo.list_models("*mnist*")
model = zoo.load("lenet5-mnist.dense")      # sha256-checked, eval mode
zoo.card("lenet5-mnist.dense").metrics.top1
"""

from lit_compress.zoo.card import SCHEMA_VERSION, Card
from lit_compress.zoo.errors import (
    CardValidationError,
    ModelNotFoundError,
    ZooError,
    ZooFormatError,
    ZooIntegrityError,
)
from lit_compress.zoo.export import export, write_entry
from lit_compress.zoo.loader import load
from lit_compress.zoo.registry import card, list_models, zoo_dir
from lit_compress.zoo.storage import Codec, get_codec, register_codec
from lit_compress.zoo.structure import register_structure
from lit_compress.zoo.verify import verify, verify_entry

__all__ = [
    "SCHEMA_VERSION",
    "Card",
    "CardValidationError",
    "Codec",
    "ModelNotFoundError",
    "ZooError",
    "ZooExport",
    "ZooFormatError",
    "ZooIntegrityError",
    "card",
    "export",
    "get_codec",
    "list_models",
    "load",
    "register_codec",
    "register_structure",
    "verify",
    "verify_entry",
    "write_entry",
    "zoo_dir",
]


def __getattr__(name: str):
    # The callback imports Lightning; plain loading does not need it.
    if name == "ZooExport":
        from lit_compress.zoo.from_lightning import ZooExport

        return ZooExport
    raise AttributeError(f"module 'lit_compress.zoo' has no attribute {name!r}")
