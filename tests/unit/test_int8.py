"""int8 QAT helpers: BN folding, int8 against fake-quant, plain-tensor state, structure spec, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from safetensors.torch import load, save
from torch import nn
from torch.ao.quantization import disable_observer
from torch.ao.quantization.observer import MovingAverageMinMaxObserver
from torch.nn.modules.batchnorm import _BatchNorm

from lit_compress.measure import count_macs, count_params
from lit_compress.models import create_model
from lit_compress.quantization.int8 import (
    Int8Network,
    Int8StateError,
    SharedRangeFakeQuantize,
    convert_int8,
    int8_state,
    int8_structure,
    is_int8_qat,
    load_int8_state,
    prepare_int8_qat,
)
from lit_compress.zoo.errors import ZooFormatError
from lit_compress.zoo.structure import apply_structure

EXAMPLE = torch.zeros(1, 1, 28, 28)
ARCHS = {"lenet5": {}, "resnet8": {"in_chans": 1}}


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes plus noise (as SyntheticDataModule), so a few steps give confident predictions."""
    prototypes = torch.randn(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    return prototypes[labels] + torch.randn(n, 1, 28, 28, generator=gen), labels


def train_qat(name: str, steps: int = 6, backend: str = "x86") -> torch.fx.GraphModule:
    torch.manual_seed(0)
    qat = prepare_int8_qat(create_model(name, **ARCHS[name]), EXAMPLE, backend)
    optimizer = torch.optim.Adam(qat.parameters(), lr=2e-3)
    for step in range(steps):
        x, y = synthetic(32, seed=100 + step)
        loss = F.cross_entropy(qat(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return qat.eval()


def calibrated(qat: torch.fx.GraphModule, x: torch.Tensor) -> torch.fx.GraphModule:
    """A copy whose activation ranges are exactly those of ``x`` (observers then frozen).

    Moving-average ranges lag a fast-changing net: QAT clips what lies beyond them at the 7-bit reduce_range
    limit while the int8 kernels do not, which is torch.ao's behaviour, not a conversion error. Comparing on
    the calibration batch itself isolates what convert_int8 does.
    """
    qat = copy.deepcopy(qat).eval()
    for module in qat.modules():
        if isinstance(module, MovingAverageMinMaxObserver):
            module.averaging_constant = 1.0
    with torch.no_grad():
        qat(x)
    return qat.apply(disable_observer)


@pytest.fixture(scope="module", params=list(ARCHS))
def trained(request) -> tuple[str, torch.fx.GraphModule]:
    return request.param, train_qat(request.param)


def weighted_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nnq.Linear | nnq.Conv2d)}


# -- fusion and BN folding -----------------------------------------------------------------------------------


def test_prepare_fuses_conv_bn_relu_and_leaves_the_float_model_alone():
    float_model = create_model("resnet8", in_chans=1)
    before = {n: p.detach().clone() for n, p in float_model.named_parameters()}
    rng = torch.random.get_rng_state()
    qat = prepare_int8_qat(float_model, EXAMPLE)
    assert torch.equal(torch.random.get_rng_state(), rng)  # training draws the same numbers
    assert qat.training and is_int8_qat(qat) and not is_int8_qat(float_model)
    assert type(qat.get_submodule("conv1")) is nniqat.ConvBnReLU2d
    assert type(qat.get_submodule("layer1.0.conv1")) is nniqat.ConvBnReLU2d
    assert type(qat.get_submodule("layer1.0.conv2")) is nniqat.ConvBn2d  # the ReLU comes after the add
    # Every BatchNorm left is the one inside a fused ConvBn (none is called on its own).
    fused_bns = {id(m.bn) for m in qat.modules() if isinstance(m, nniqat.ConvBn2d | nniqat.ConvBnReLU2d)}
    assert fused_bns and {id(m) for m in qat.modules() if isinstance(m, _BatchNorm)} == fused_bns
    assert {id(p) for p in qat.parameters()}.isdisjoint(id(p) for p in float_model.parameters())
    for name, p in float_model.named_parameters():
        assert torch.equal(p, before[name]), name
    lenet = prepare_int8_qat(create_model("lenet5"), EXAMPLE)
    assert type(lenet.get_submodule("fc1")) is nniqat.LinearReLU


def test_convert_folds_batchnorm_into_the_int8_conv_weights():
    qat = calibrated(train_qat("resnet8"), synthetic(64, seed=1)[0])
    int8 = convert_int8(qat)
    assert isinstance(int8, Int8Network) and not int8.training
    assert not any(isinstance(m, _BatchNorm) for m in int8.modules())
    assert type(int8.model.get_submodule("conv1")) is nniq.ConvReLU2d
    assert type(int8.model.get_submodule("layer1.0.conv2")) is nnq.Conv2d
    assert type(int8.model.get_submodule("fc")) is nnq.Linear
    folded = [n for n, m in qat.named_modules() if isinstance(m, nniqat.ConvBn2d | nniqat.ConvBnReLU2d)]
    assert len(folded) == 7
    for name in folded:
        fused, layer = qat.get_submodule(name), int8.model.get_submodule(name)
        bn = fused.bn
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # by hand: W' = W g / s, b' = beta - mu g / s
        w_fold = fused.weight * gain.reshape(-1, 1, 1, 1)
        b_fold = bn.bias - bn.running_mean * gain + (fused.bias * gain if fused.bias is not None else 0)
        weight = layer.weight()
        scale = weight.q_per_channel_scales().float()
        # The int8 scales are the ones QAT trained with (not a re-derived max|w| / 128 vs / 127.5).
        assert torch.equal(scale, fused.weight_fake_quant.scale), name
        assert torch.all(weight.q_per_channel_zero_points() == 0)  # symmetric
        step = scale.reshape(-1, 1, 1, 1)
        inside = w_fold.abs() <= 127 * step
        error = (weight.dequantize() - w_fold).abs()
        assert torch.all(error[inside] <= (step / 2 * (1 + 1e-4)).expand_as(error)[inside]), name
        torch.testing.assert_close(layer.bias(), b_fold.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_shared_fake_quantizer_observes_only_the_first_tensor_of_its_chain():
    qat = prepare_int8_qat(create_model("resnet8", in_chans=1), EXAMPLE)
    followers = [m for m in qat.modules() if isinstance(m, SharedRangeFakeQuantize)]
    assert followers, "torch.ao shares the pool / flatten fake-quantizer with the last ReLU's"
    leaders = {id(f.leader): f.leader for f in followers}
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in leaders}
    for i, leader in leaders.items():
        leader.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0].detach().clone()))
    x, _ = synthetic(8, seed=2)
    with torch.no_grad():
        out = qat(x)
    for i, leader in leaders.items():
        assert len(seen[i]) == 1  # the pooled / flattened copies go through the followers
        # A first observation sets the range exactly; a second one would move it by 1% towards its own.
        observer = leader.activation_post_process
        lo, hi = torch.aminmax(seen[i][0])
        assert observer.min_val == lo and observer.max_val == hi
    assert torch.isfinite(out).all()
    copied = copy.deepcopy(qat)
    for name, module in copied.named_modules():
        if isinstance(module, SharedRangeFakeQuantize):
            assert any(module.leader is m for m in copied.modules()), name  # not the original's leader


# -- int8 against fake-quant ---------------------------------------------------------------------------------


def test_int8_network_matches_the_fake_quantized_network(trained):
    _, qat = trained
    x, _ = synthetic(256, seed=3)
    qat = calibrated(qat, x)
    int8 = convert_int8(qat)
    with torch.no_grad():
        fake, real = qat(x), int8(x)
    output_scale = list(weighted_layers(int8.model).values())[-1].scale
    assert (fake - real).abs().max() <= 2 * output_scale + 1e-6
    assert (fake - real).abs().mean() <= 0.1 * output_scale
    assert (fake.argmax(1) == real.argmax(1)).float().mean() >= 0.99
    assert int8.model.training is False and torch.backends.quantized.engine == "x86"


# -- plain-tensor state ------------------------------------------------------------------------------------


def test_int8_state_is_plain_int8_and_restores_bit_exactly(trained):
    name, qat = trained
    int8 = convert_int8(qat)
    state = int8.state_dict()
    assert all(isinstance(t, torch.Tensor) and not t.is_quantized for t in state.values())
    layers = weighted_layers(int8.model)
    weights = {f"{n}.weight" for n in layers}
    assert weights <= set(state) and all(state[k].dtype == torch.int8 for k in weights)
    n_weights = sum(state[k].numel() for k in weights)
    assert sum(state[k].nbytes for k in weights) == n_weights  # one byte per weight
    blob = save(state)
    float_bytes = 4 * sum(p.numel() for p in create_model(name, **ARCHS[name]).parameters())
    assert len(blob) < 0.3 * float_bytes

    template = apply_structure(create_model(name, **ARCHS[name]), int8_structure(int8))
    assert isinstance(template, Int8Network)
    result = template.load_state_dict(load(blob))
    assert not result.missing_keys and not result.unexpected_keys
    for layer_name, layer in layers.items():
        restored = template.model.get_submodule(layer_name)
        a, b = layer.weight(), restored.weight()
        assert torch.equal(a.int_repr(), b.int_repr()), layer_name
        assert torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales()), layer_name
        assert torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points()), layer_name
        assert torch.equal(layer.bias(), restored.bias()), layer_name
        assert (restored.scale, restored.zero_point) == (layer.scale, layer.zero_point), layer_name
    for key, buffer in int8.model.named_buffers():
        assert torch.equal(buffer, template.model.get_buffer(key)), key
    x, _ = synthetic(64, seed=4)
    assert torch.equal(template(x), int8(x))
    assert template.state_dict().keys() == state.keys()
    assert all(torch.equal(template.state_dict()[k], v) for k, v in state.items())


def test_per_tensor_weights_round_trip_on_qnnpack():
    previous = torch.backends.quantized.engine
    int8 = convert_int8(train_qat("lenet5", steps=2, backend="qnnpack"))
    assert torch.backends.quantized.engine == previous
    state = int8_state(int8)
    assert state["conv1.weight_scale"].dim() == 0 and "conv1.weight_axis" not in state  # per tensor
    template = apply_structure(create_model("lenet5"), int8_structure(int8))
    template.load_state_dict(state)
    x, _ = synthetic(16, seed=5)
    assert torch.equal(template(x), int8(x))
    assert torch.backends.quantized.engine == previous


def test_load_int8_state_names_what_does_not_fit():
    int8 = convert_int8(train_qat("lenet5", steps=1))
    state = int8_state(int8)
    template = convert_int8(prepare_int8_qat(create_model("lenet5"), EXAMPLE))
    missing = {k: v for k, v in state.items() if k != "fc2.bias"}
    with pytest.raises(Int8StateError, match=r"missing keys \['fc2.bias'\]") as err:
        load_int8_state(template, missing)
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, ValueError)
    with pytest.raises(RuntimeError, match=r"unexpected keys \['extra'\]"):
        template.load_state_dict({**state, "extra": torch.zeros(1)})
    wrong = {**state, "conv1.weight": state["conv1.weight"].float()}
    with pytest.raises(Int8StateError, match=r"'conv1.weight' is torch.float32.*expects torch.int8"):
        template.load_state_dict(wrong)
    # strict=False: what is there loads, the rest keeps the template's values.
    keep = template.model.fc2.bias().clone()
    result = template.load_state_dict(missing, strict=False)
    assert result.missing_keys == ["fc2.bias"] and result.unexpected_keys == []
    assert torch.equal(template.model.fc2.bias(), keep)
    assert torch.equal(template.model.conv1.weight().int_repr(), int8.model.conv1.weight().int_repr())


# -- measurement ---------------------------------------------------------------------------------------------


def test_int8_network_reports_its_parameters_and_macs():
    int8 = convert_int8(train_qat("lenet5", steps=1))
    counts = count_params(int8)
    assert counts.total == 431_080 and counts.trainable == 0  # Caffe's LeNet-5, as the float model
    codes = [m.weight().int_repr() for m in weighted_layers(int8.model).values()]
    biases = [m.bias() for m in weighted_layers(int8.model).values()]
    assert counts.nonzero == sum(int(c.count_nonzero()) for c in codes + biases)
    assert count_macs(int8, input_shape=[1, 28, 28]).dense == 2_293_000
    assert next(int8.parameters()).device.type == "cpu"

    resnet = convert_int8(prepare_int8_qat(create_model("resnet8", in_chans=1), EXAMPLE))
    float_resnet = create_model("resnet8", in_chans=1)
    channels = sum(m.num_features for m in float_resnet.modules() if isinstance(m, nn.BatchNorm2d))
    # Folding turns each BN's (gamma, beta) into one conv bias per channel.
    assert count_params(resnet).total == count_params(float_resnet).total - channels
    assert (
        count_macs(resnet, input_shape=[1, 28, 28]).dense
        == count_macs(float_resnet, input_shape=[1, 28, 28]).dense
    )


# -- BN patterns that cannot be folded, bad input -----------------------------------------------------------


class BnAfterRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 26 * 26, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.bn(F.relu(self.conv(x))), 1))


class ConvFeedsTwo(BnAfterRelu):
    def forward(self, x):
        y = self.conv(x)
        return self.fc(torch.flatten(self.bn(y) + y, 1))


class BnAtInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.conv, self.fc = nn.BatchNorm2d(1), nn.Conv2d(1, 4, 3), nn.Linear(4 * 26 * 26, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(self.bn(x)), 1))


@pytest.mark.parametrize(
    "model, reason",
    [
        (BnAfterRelu, r"'bn': its input is relu\(\.\.\.\), not a Conv / Linear layer"),
        (ConvFeedsTwo, r"'bn': the output of Conv2d 'conv' also feeds \['add'\]"),
        (BnAtInput, r"'bn': its input is the network's input 'x'"),
    ],
)
def test_batchnorm_that_cannot_be_folded_is_an_error_naming_it(model, reason):
    with pytest.raises(ValueError, match=rf"cannot fold BatchNorm layer\(s\) of {model.__name__}.*{reason}"):
        prepare_int8_qat(model(), EXAMPLE)


def test_allow_unfolded_bn_keeps_a_quantized_batchnorm_and_rebuilds_it():
    torch.manual_seed(0)
    qat = prepare_int8_qat(BnAfterRelu(), EXAMPLE, allow_unfolded_bn=True)
    x, _ = synthetic(32, seed=6)
    qat(x)
    qat = calibrated(qat, x)
    int8 = convert_int8(qat)
    assert isinstance(int8.model.bn, nnq.BatchNorm2d)
    spec = int8_structure(int8)
    assert spec["allow_unfolded_bn"] is True
    torch.manual_seed(1)
    template = apply_structure(BnAfterRelu(), spec)
    template.load_state_dict(int8_state(int8))
    assert torch.equal(template(x), int8(x))
    with torch.no_grad():
        assert (template(x) - qat(x)).abs().max() <= 2 * int8.model.fc.scale + 1e-6


def test_linear_batchnorm1d_is_folded():
    class LinearBn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(784, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(F.relu(self.bn(self.fc1(torch.flatten(x, 1)))))

    qat = prepare_int8_qat(LinearBn(), EXAMPLE)
    assert type(qat.get_submodule("fc1")) is nniqat.LinearBn1d
    qat(synthetic(8, seed=7)[0])
    assert not any(isinstance(m, _BatchNorm) for m in convert_int8(qat).modules())


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 3)

    def forward(self, x):
        return self.fc(x.flatten(1)) if x.sum() > 0 else -self.fc(x.flatten(1))


def test_untraceable_model_error_names_the_submodule():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = DataDependent()

        def forward(self, x):
            return self.head(x)

    with pytest.raises(
        ValueError, match=r"cannot trace Outer with torch.fx \(in submodule 'head', a DataDep"
    ):
        prepare_int8_qat(Outer(), EXAMPLE)
    with pytest.raises(ValueError, match=r"cannot trace DataDependent with torch.fx: TraceError"):
        prepare_int8_qat(DataDependent(), EXAMPLE)


def test_bad_arguments_are_refused_with_the_valid_choices():
    lenet = create_model("lenet5")
    with pytest.raises(ValueError, match=r"backend must be one of \[.*'x86'.*\].*got 'tpu'"):
        prepare_int8_qat(lenet, EXAMPLE, backend="tpu")
    with pytest.raises(ValueError, match=r"qconfig must be one of \['default'\], got 'per_tensor'"):
        prepare_int8_qat(lenet, EXAMPLE, qconfig="per_tensor")
    with pytest.raises(TypeError, match="example_input must be a batched tensor"):
        prepare_int8_qat(lenet, [1, 28, 28])
    with pytest.raises(TypeError, match="expected a model returned by prepare_int8_qat"):
        convert_int8(lenet)
    qat = prepare_int8_qat(lenet, EXAMPLE)
    with pytest.raises(ValueError, match="already has int8 fake-quantizers"):
        prepare_int8_qat(qat, EXAMPLE)


def test_structure_spec_is_plain_data_and_checked_by_the_builder():
    int8 = convert_int8(prepare_int8_qat(create_model("lenet5"), EXAMPLE))
    spec = int8_structure(int8)
    assert json.loads(json.dumps(spec)) == spec
    assert spec == {
        "kind": "int8",
        "version": 1,
        "backend": "x86",
        "qconfig": "default",
        "example_input_shape": [1, 28, 28],
        "allow_unfolded_bn": False,
        "inner": None,
    }
    with pytest.raises(ZooFormatError, match="int8 structure spec must be version 1"):
        apply_structure(create_model("lenet5"), {**spec, "version": 2})
    with pytest.raises(ZooFormatError, match="does not fit the architecture: int8 backend must be one of"):
        apply_structure(create_model("lenet5"), {**spec, "backend": "tpu"})


def test_int8_forward_runs_under_deterministic_algorithms_and_restores_the_flag():
    """Trainer(deterministic=True) turns the check on; torch.ao's int8 kernels are not flagged so."""
    torch.manual_seed(0)
    net = convert_int8(prepare_int8_qat(create_model("lenet5"), torch.randn(2, 1, 28, 28)))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = net(torch.randn(3, 1, 28, 28))
        assert out.shape == (3, 10)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(previous)
