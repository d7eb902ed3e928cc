"""Networks shaped for binary training: BinaryConnect / BNN MLPs and a BatchNorm LeNet-5 for MNIST.

Binary weights (``+-1``, or ``+-alpha`` for XNOR) make a layer's output scale meaningless, so every binary
layer is followed by a BatchNorm, as in BinaryConnect (Courbariaux et al. 2015) and BNN (Hubara, Courbariaux
et al. 2016). The networks themselves are ordinary float nets: the
:class:`~lit_compress.quantization.callback.Quantization` callback swaps their ``Linear`` / ``Conv2d`` layers
for quantized ones by name, so the same net trains dense, BinaryConnect, BNN or XNOR.

BNN binarises *activations* through the next layer's input quantizer (``sign``), so the activation here is
``hardtanh`` (its derivative ``1{|x| <= 1}`` is BNN's straight-through estimator of sign, and it keeps the
sign unchanged). A ReLU before a sign-binarised layer would make every input ``+1``: use ``relu`` only for
BinaryConnect (real activations). Likewise dropout *before* a sign-binarised layer turns dropped units into
``+1`` (``sign(0) = +1``), not into zeros: keep ``dropout=0`` for BNN / XNOR hidden layers (``input_dropout``
acts on the real-valued input of the first layer and is safe).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from lit_compress.models.registry import register_model

ACTIVATIONS = ("relu", "hardtanh")


def _activation(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "hardtanh":
        return nn.Hardtanh(-1.0, 1.0)
    raise ValueError(
        f"activation must be one of {ACTIVATIONS} (relu for BinaryConnect, hardtanh for BNN / XNOR), "
        f"got {name!r}"
    )


def _check_probability(name: str, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


class BinaryMLP(nn.Module):
    """Flatten -> [Linear -> BatchNorm -> activation -> Dropout] x len(hidden) -> Linear (-> BatchNorm).

    Layers are ``hidden.<i>`` (Linear), ``bn.<i>`` (BatchNorm1d) and ``head`` (Linear), registered in that
    order, so the ``Quantization`` callback's ``skip_first_last`` sees ``hidden.0`` first and ``head`` last.
    ``output_bn=True`` adds ``head_bn``, a BatchNorm1d on the logits (BNN's output layer).

    BinaryConnect's MNIST net is ``hidden=(1024, 1024, 1024), activation="relu"``; BNN's is
    ``hidden=(2048,) * 3`` (Torch7) or ``(4096,) * 3`` (Theano), ``activation="hardtanh", output_bn=True``.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (1024, 1024, 1024),
        activation: str = "relu",
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        bias: bool = True,
        output_bn: bool = False,
    ):
        super().__init__()
        if isinstance(hidden, (str, bytes)):
            raise ValueError(f"hidden must be a non-empty list of positive widths, got {hidden!r}")
        hidden = list(hidden)
        if not hidden or any(isinstance(h, bool) or not isinstance(h, int) or h <= 0 for h in hidden):
            raise ValueError(f"hidden must be a non-empty list of positive int widths, got {hidden!r}")
        _check_probability("dropout", dropout)
        _check_probability("input_dropout", input_dropout)
        _check_bool("bias", bias)
        _check_bool("output_bn", output_bn)
        self.activation_name = activation
        widths = [in_chans * img_size * img_size, *hidden]
        self.input_dropout = nn.Dropout(input_dropout)
        self.hidden = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in itertools.pairwise(widths))
        self.bn = nn.ModuleList(nn.BatchNorm1d(h) for h in hidden)
        self.head = nn.Linear(widths[-1], num_classes, bias=bias)
        self.head_bn: nn.Module = nn.BatchNorm1d(num_classes) if output_bn else nn.Identity()
        self.act = _activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(torch.flatten(x, 1))
        for layer, bn in zip(self.hidden, self.bn, strict=True):
            x = self.dropout(self.act(bn(layer(x))))
        return self.head_bn(self.head(x))


class BinaryLeNet5(nn.Module):
    """LeNet-5 for binary training: conv-BN-pool-act, conv-BN-pool-act, fc-BN-act, fc (-> BN).

    Layers ``conv1``, ``bn1``, ``conv2``, ``bn2``, ``fc1``, ``bn3``, ``fc2`` (and ``bn_out`` with
    ``output_bn=True``), registered in forward order. 5x5 convolutions without padding and 2x2 max pooling:
    a 28x28 image becomes ``widths[1] x 4 x 4`` before ``fc1``. ``widths`` = (conv1 channels, conv2
    channels, fc1 units), default (32, 64, 512). ``dropout`` acts on ``fc1``'s activations only (the input
    of the last layer, which binary recipes keep real).
    """

    def __init__(
        self,
        widths: Sequence[int] = (32, 64, 512),
        activation: str = "relu",
        dropout: float = 0.0,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = 28,
        bias: bool = True,
        output_bn: bool = False,
    ):
        super().__init__()
        if isinstance(widths, (str, bytes)) or len(widths) != 3:
            raise ValueError(f"widths must be three positive ints (conv1, conv2, fc1), got {widths!r}")
        if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
            raise ValueError(f"widths must be three positive ints (conv1, conv2, fc1), got {widths!r}")
        if img_size < 16 or (img_size - 4) % 2 or ((img_size - 4) // 2 - 4) % 2:
            raise ValueError(f"img_size={img_size} does not divide evenly through LeNet-5; use 28 or 32")
        _check_probability("dropout", dropout)
        _check_bool("bias", bias)
        _check_bool("output_bn", output_bn)
        c1, c2, units = widths
        side = ((img_size - 4) // 2 - 4) // 2
        self.activation_name = activation
        self.conv1 = nn.Conv2d(in_chans, c1, kernel_size=5, bias=bias)
        self.bn1 = nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5, bias=bias)
        self.bn2 = nn.BatchNorm2d(c2)
        self.fc1 = nn.Linear(c2 * side * side, units, bias=bias)
        self.bn3 = nn.BatchNorm1d(units)
        self.fc2 = nn.Linear(units, num_classes, bias=bias)
        self.bn_out: nn.Module = nn.BatchNorm1d(num_classes) if output_bn else nn.Identity()
        self.pool = nn.MaxPool2d(2)
        self.act = _activation(activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.pool(self.bn1(self.conv1(x))))
        x = self.act(self.pool(self.bn2(self.conv2(x))))
        x = self.dropout(self.act(self.bn3(self.fc1(torch.flatten(x, 1)))))
        return self.bn_out(self.fc2(x))


@register_model("binary_mlp")
def binary_mlp(**kwargs) -> BinaryMLP:
    return BinaryMLP(**kwargs)


@register_model("binary_lenet5")
def binary_lenet5(**kwargs) -> BinaryLeNet5:
    return BinaryLeNet5(**kwargs)
