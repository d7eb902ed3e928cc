"""Reference networks (registered by name), the timm bridge and the generic ImageClassifier."""

from lit_compress.models import (  # noqa: F401  (register builders)
    binary_nets,
    cifarnet,
    lenet,
    maxout,
    mlp,
    resnet_cifar,
)
from lit_compress.models.binary_nets import BinaryLeNet5, BinaryMLP
from lit_compress.models.cifarnet import CifarNet
from lit_compress.models.lenet import LeNet5, LeNet300100
from lit_compress.models.maxout import Maxout, MaxoutMLP
from lit_compress.models.mlp import MLP
from lit_compress.models.registry import TIMM_PREFIX, create_model, list_models, register_model
from lit_compress.models.resnet_cifar import CifarResNet

__all__ = [
    "MLP",
    "TIMM_PREFIX",
    "BinaryLeNet5",
    "BinaryMLP",
    "CifarNet",
    "CifarResNet",
    "ImageClassifier",
    "LeNet5",
    "LeNet300100",
    "Maxout",
    "MaxoutMLP",
    "create_model",
    "list_models",
    "register_model",
]


def __getattr__(name: str):
    # ImageClassifier imports Lightning; keep `import lit_compress.models` cheap for zoo-only users.
    if name == "ImageClassifier":
        from lit_compress.models.classifier import ImageClassifier

        return ImageClassifier
    raise AttributeError(f"module 'lit_compress.models' has no attribute {name!r}")
