"""Binary-training networks (binary_mlp, binary_lenet5) and the layer selection of their recipes."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

import lit_compress.models.binary_nets  # noqa: F401  (registers binary_mlp / binary_lenet5)
from lit_compress.models import create_model
from lit_compress.models.binary_nets import BinaryLeNet5, BinaryMLP
from lit_compress.models.classifier import ImageClassifier
from lit_compress.quantization.callback import Quantization
from lit_compress.quantization.quantizers import IdentityQuantizer, SignQuantizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = ("binaryconnect-mlp-mnist", "bnn-mlp-mnist", "bnn-lenet5-mnist")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def mlp_params_by_hand(widths: list[int], classes: int, output_bn: bool) -> int:
    """Linear ``a*b + b`` per layer, BatchNorm ``2*b`` (gamma, beta) per hidden layer (and on the logits)."""
    total = 0
    for i in range(len(widths) - 1):
        a, b = widths[i], widths[i + 1]
        total += a * b + b + 2 * b
    total += widths[-1] * classes + classes
    return total + (2 * classes if output_bn else 0)


# -- shapes, parameter counts, names -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["binary_mlp", "binary_lenet5"])
@pytest.mark.parametrize("activation", ["relu", "hardtanh"])
def test_output_shape_and_every_parameter_trains(name, activation):
    kwargs = {"hidden": [16, 8]} if name == "binary_mlp" else {"widths": [4, 6, 8]}
    model = create_model(name, num_classes=7, activation=activation, output_bn=True, **kwargs)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 7)
    out.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lenet_accepts_32px_rgb():
    net = BinaryLeNet5(widths=(4, 6, 8), in_chans=3, img_size=32)
    assert net.fc1.in_features == 6 * 5 * 5
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_binaryconnect_and_bnn_mlp_parameter_counts():
    # BinaryConnect: 784-1024-1024-1024-10 with BatchNorm after each hidden Linear.
    bc = BinaryMLP()
    assert n_params(bc) == mlp_params_by_hand([784, 1024, 1024, 1024], 10, False) == 2_919_434
    # BNN (Torch7): 784-2048-2048-2048-10, BatchNorm on the logits too.
    bnn = BinaryMLP(hidden=(2048, 2048, 2048), activation="hardtanh", output_bn=True)
    assert n_params(bnn) == mlp_params_by_hand([784, 2048, 2048, 2048], 10, True) == 10_033_182
    assert n_params(BinaryMLP(hidden=[5], bias=False)) == 784 * 5 + 2 * 5 + 5 * 10


def test_binary_lenet5_parameter_count():
    # conv1 1*32*25+32, bn1 2*32, conv2 32*64*25+64, bn2 2*64, fc1 (64*4*4)*512+512, bn3 2*512, fc2 512*10+10.
    by_hand = (25 * 32 + 32) + 64 + (32 * 64 * 25 + 64) + 128 + (1024 * 512 + 512) + 1024 + (5120 + 10)
    assert n_params(BinaryLeNet5()) == by_hand == 583_242
    assert n_params(BinaryLeNet5(output_bn=True)) == by_hand + 20


def test_layer_names_in_registration_order():
    mlp = BinaryMLP(hidden=[8, 8, 8], output_bn=True)
    linear = [n for n, m in mlp.named_modules() if isinstance(m, nn.Linear)]
    norms = [n for n, m in mlp.named_modules() if isinstance(m, nn.BatchNorm1d)]
    assert linear == ["hidden.0", "hidden.1", "hidden.2", "head"]
    assert norms == ["bn.0", "bn.1", "bn.2", "head_bn"]
    assert isinstance(BinaryMLP(hidden=[8]).head_bn, nn.Identity)
    lenet = BinaryLeNet5(widths=(4, 6, 8))
    layers = [n for n, m in lenet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.BatchNorm1d))]
    assert layers == ["conv1", "conv2", "fc1", "bn3", "fc2"]
    assert [n for n, m in lenet.named_modules() if isinstance(m, nn.BatchNorm2d)] == ["bn1", "bn2"]


# -- forward against a hand-written reference ---------------------------------------------------------


@pytest.mark.parametrize("activation,fn", [("relu", F.relu), ("hardtanh", F.hardtanh)])
def test_mlp_forward_matches_reference(activation, fn):
    torch.manual_seed(0)
    net = BinaryMLP(hidden=[12, 9], activation=activation, output_bn=True, img_size=4)
    for bn in [*net.bn, net.head_bn]:  # non-trivial running statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
    net.eval()
    x = torch.randn(5, 1, 4, 4)

    def bn(m, h):
        return (h - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias

    h = x.flatten(1)
    for layer, norm in zip(net.hidden, net.bn, strict=True):
        h = fn(bn(norm, h @ layer.weight.T + layer.bias))
    ref = bn(net.head_bn, h @ net.head.weight.T + net.head.bias)
    torch.testing.assert_close(net(x), ref)


def test_lenet_forward_matches_reference():
    torch.manual_seed(0)
    net = BinaryLeNet5(widths=(3, 4, 5), activation="hardtanh").eval()
    x = torch.randn(2, 1, 28, 28)

    def block(conv, bn, h):
        return F.hardtanh(F.max_pool2d(bn(conv(h)), 2))

    h = block(net.conv2, net.bn2, block(net.conv1, net.bn1, x)).flatten(1)
    ref = net.fc2(F.hardtanh(net.bn3(net.fc1(h))))
    torch.testing.assert_close(net(x), ref)


def test_hardtanh_bounds_activations_and_relu_does_not():
    torch.manual_seed(0)
    seen: dict[str, torch.Tensor] = {}
    for activation in ("relu", "hardtanh"):
        net = BinaryMLP(hidden=[64, 64], activation=activation)
        net.head.register_forward_pre_hook(lambda m, a, act=activation: seen.__setitem__(act, a[0]))
        net(torch.randn(32, 1, 28, 28) * 10)
    assert seen["hardtanh"].abs().max() <= 1.0 and seen["hardtanh"].min() < 0
    assert seen["relu"].min() >= 0 and seen["relu"].max() > 1.0


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="activation must be one of"):
        BinaryMLP(activation="tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        BinaryLeNet5(activation="sign")
    with pytest.raises(ValueError, match="hidden must be a non-empty list"):
        BinaryMLP(hidden=[])
    with pytest.raises(ValueError, match="hidden must be a non-empty list"):
        BinaryMLP(hidden=[10, 0])
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\)"):
        BinaryMLP(dropout=1.0)
    with pytest.raises(ValueError, match="input_dropout"):
        BinaryMLP(input_dropout=-0.1)
    with pytest.raises(ValueError, match="widths must be three positive ints"):
        BinaryLeNet5(widths=(32, 64))
    with pytest.raises(ValueError, match="does not divide evenly"):
        BinaryLeNet5(img_size=30)
    with pytest.raises(ValueError, match="output_bn must be true or false"):
        BinaryMLP(output_bn="yes")


# -- the recipes' layer selection ---------------------------------------------------------------------


def load_recipe(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def quantize_like_recipe(name: str):
    """The recipe's ImageClassifier (its model and model_kwargs) with its Quantization callbacks set up."""
    recipe = load_recipe(name)
    init = recipe["model"]["init_args"]
    module = ImageClassifier(model=init["model"], model_kwargs=init["model_kwargs"])
    callbacks = [
        Quantization(**{**c.get("init_args", {}), "verbose": False})
        for c in recipe["trainer"]["callbacks"]
        if c["class_path"].endswith(".Quantization")
    ]
    for cb in callbacks:
        cb.setup(SimpleNamespace(is_global_zero=True), module, "fit")
    return module, callbacks


def quantizers(module: nn.Module) -> dict[str, tuple[str, str]]:
    """``{fqn: (weight quantizer name, input quantizer name)}`` of every quantized Linear / Conv2d."""
    return {
        n: (m.weight_quantizer.name, m.input_quantizer.name)
        for n, m in module.named_modules()
        if hasattr(m, "weight_quantizer")
    }


def test_binaryconnect_recipe_binarises_every_weight_and_no_activation():
    module, (cb,) = quantize_like_recipe("binaryconnect-mlp-mnist")
    assert cb.layers == ["net.hidden.0", "net.hidden.1", "net.hidden.2", "net.head"]
    assert set(quantizers(module).values()) == {("binary", "identity")}
    assert cb.weight_quantizer.mode == "deterministic"
    assert isinstance(module.net.act, nn.ReLU) and isinstance(module.net.head_bn, nn.BatchNorm1d)


def test_bnn_mlp_recipe_binarises_all_weights_and_every_input_but_the_images():
    module, (bnn, first) = quantize_like_recipe("bnn-mlp-mnist")
    assert bnn.layers == ["net.hidden.1", "net.hidden.2", "net.head"]
    assert first.layers == ["net.hidden.0"]
    assert quantizers(module) == {
        "net.hidden.0": ("sign", "identity"),  # real pixels in, binary weights (as in BNN)
        "net.hidden.1": ("sign", "sign"),
        "net.hidden.2": ("sign", "sign"),
        "net.head": ("sign", "sign"),  # binary input, real output (followed by head_bn)
    }
    net = module.net
    assert isinstance(net.head_bn, nn.BatchNorm1d) and isinstance(net.act, nn.Hardtanh)
    # Functional check on a random batch: each layer computes with sign(W) and, past the first, sign(x).
    inputs: dict[str, torch.Tensor] = {}
    for name in ("hidden.0", "hidden.1", "head"):
        net.get_submodule(name).register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0]))
    net.eval()
    net(torch.randn(4, 1, 28, 28))
    sign = SignQuantizer()
    for name, binary_input in (("hidden.0", False), ("hidden.1", True), ("head", True)):
        layer = net.get_submodule(name)
        x = inputs[name]
        assert x.unique().numel() > 2  # real-valued (hard-tanh) activations reach the layer ...
        expected = F.linear(sign(x) if binary_input else x, sign(layer.weight), layer.bias)
        torch.testing.assert_close(layer(x), expected)  # ... which binarises them only past the first


def test_default_skip_first_last_would_keep_the_bnn_head_real():
    """Why the BNN recipe sets ``skip_first_last: false``: the default keeps ``head`` real."""
    module = ImageClassifier(model="binary_mlp", model_kwargs={"hidden": [8, 8, 8], "output_bn": True})
    cb = Quantization(method="bnn", verbose=False)
    cb.setup(SimpleNamespace(is_global_zero=True), module, "fit")
    assert cb.layers == ["net.hidden.1", "net.hidden.2"]


def test_bnn_lenet_recipe_keeps_first_conv_and_last_fc_real():
    module, (cb,) = quantize_like_recipe("bnn-lenet5-mnist")
    assert cb.layers == ["net.conv2", "net.fc1"]
    assert quantizers(module) == {"net.conv2": ("sign", "sign"), "net.fc1": ("sign", "sign")}
    assert type(module.net.conv1) is nn.Conv2d and type(module.net.fc2) is nn.Linear
    assert isinstance(module.net.act, nn.Hardtanh)
    assert isinstance(cb.activation_quantizer, SignQuantizer)
    assert not isinstance(cb.weight_quantizer, IdentityQuantizer)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_writes_a_bitpacked_zoo_entry_and_documents_run_and_resume(name):
    recipe = load_recipe(name)
    callbacks = recipe["trainer"]["callbacks"]
    zoo = callbacks[-1]
    assert zoo["class_path"] == "lit_compress.zoo.ZooExport"
    args = zoo["init_args"]
    assert args["codec"] == "bitpacked" and args["latency"] is True and args["paper"]
    assert args["recipe"] == f"configs/{name}.yaml"
    checkpoint = next(c for c in callbacks if c["class_path"].endswith("ModelCheckpoint"))
    assert checkpoint["init_args"]["dirpath"] == f"runs/{name}/checkpoints"
    assert checkpoint["init_args"]["save_last"] is True
    header = (CONFIGS / f"{name}.yaml").read_text().split("\nseed_everything")[0]
    assert f"lit-compress fit --config configs/{name}.yaml" in header
    assert f"--ckpt_path runs/{name}/checkpoints/last.ckpt" in header
    assert recipe["model"]["init_args"]["model"] in ("binary_mlp", "binary_lenet5")
