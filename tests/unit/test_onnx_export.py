"""ONNX export: every graph is re-run here with onnxruntime and compared with PyTorch independently of the
exporter's own check, shapes are compared with the PyTorch model's parameters, refusals leave no file."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from lit_compress import zoo
from lit_compress.models.resnet_cifar import CifarResNet
from lit_compress.onnx_export import (
    FLOAT_ATOL,
    FLOAT_RTOL,
    INT8_STEPS,
    OnnxCheckError,
    OnnxExportError,
    export_onnx,
    load_and_check,
    main,
    onnx_tolerance,
)


def run_ort(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def initializers(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def conv_weight_shapes(path) -> list[tuple[int, ...]]:
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    return sorted(tuple(inits[n.input[1]].dims) for n in proto.graph.node if n.op_type == "Conv")


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(3 * 4 * 4, 5),
    )


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- float models --------------------------------------------------------------------------------------------


def test_tiny_cnn_matches_pytorch_at_any_batch_and_keeps_training_flags(tmp_path):
    model = tiny_cnn().train()  # dropout active: the export must still be the eval network
    report = export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    assert report.form == "float" and report.checked and report.batch_sizes == (1, 3)
    assert report.max_abs_diff <= report.tolerance
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[1:]] == [1, 8, 8]
    x = torch.randn(7, 1, 8, 8)
    got, want = run_ort(tmp_path / "m.onnx", x), eval_out(copy.deepcopy(model), x)
    assert got.shape == (7, 5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert report.bytes == (tmp_path / "m.onnx").stat().st_size
    assert leftovers(tmp_path) == ["m.onnx"]


def test_float_tolerance_is_relative_to_the_output_and_int8_adds_two_output_steps():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 2])
    ident = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    ref = torch.tensor([[3.0, -40.0]])
    assert onnx_tolerance(helper.make_model(ident), ref) == pytest.approx(FLOAT_ATOL + FLOAT_RTOL * 40.0)
    qdq = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "g",
        [x],
        [y],
        initializer=[
            numpy_helper.from_array(np.array(0.25, dtype=np.float32), "s"),
            numpy_helper.from_array(np.array(0, dtype=np.uint8), "z"),
        ],
    )
    expected = FLOAT_ATOL + FLOAT_RTOL * 40.0 + INT8_STEPS * 0.25
    assert onnx_tolerance(helper.make_model(qdq), ref) == pytest.approx(expected)


def test_dense_and_structured_lenet5_zoo_entries_export_with_their_own_shapes(tmp_path):
    dense = zoo.load("lenet5-mnist.dense")
    pruned, card = zoo.load("lenet5-mnist.structured-l1", return_card=True)
    for name, model in (("dense", dense), ("pruned", pruned)):
        report = export_onnx(model, tmp_path / f"{name}.onnx", input_shape=card.dataset.input_shape)
        inits = initializers(tmp_path / f"{name}.onnx")
        params = dict(model.named_parameters())
        assert {k: tuple(v.shape) for k, v in inits.items()} == {k: tuple(v.shape) for k, v in params.items()}
        for key, value in inits.items():  # the weights themselves, bit for bit
            assert np.array_equal(value, params[key].detach().numpy()), key
        assert report.max_abs_diff <= report.tolerance
    dense_convs, pruned_convs = (
        conv_weight_shapes(tmp_path / "dense.onnx"),
        conv_weight_shapes(tmp_path / "pruned.onnx"),
    )
    assert pruned_convs != dense_convs
    assert all(p[0] < d[0] for p, d in zip(sorted(pruned_convs), sorted(dense_convs), strict=True))
    assert (tmp_path / "pruned.onnx").stat().st_size < 0.5 * (tmp_path / "dense.onnx").stat().st_size


def test_structured_resnet14_graph_has_the_pruned_conv_shapes(tmp_path):
    model, card = zoo.load("resnet14-fashion-mnist.structured-l1", return_card=True)
    export_onnx(model, tmp_path / "r.onnx", input_shape=card.dataset.input_shape)
    # BatchNorm is folded into the convs by the exporter (new names), so compare the shapes as a multiset.
    want = sorted(tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv_weight_shapes(tmp_path / "r.onnx") == want
    dense = CifarResNet(depth=14, **card.architecture.kwargs)
    assert want != sorted(tuple(m.weight.shape) for m in dense.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(4, *card.dataset.input_shape)
    torch.testing.assert_close(run_ort(tmp_path / "r.onnx", x), eval_out(model, x), rtol=0, atol=1e-4)


def test_unstructured_sparse_exports_dense_with_the_zeros_stored(tmp_path):
    model, card = zoo.load("lenet5-mnist.pruned-12x", return_card=True)
    export_onnx(model, tmp_path / "s.onnx", input_shape=card.dataset.input_shape)
    inits = initializers(tmp_path / "s.onnx")
    for key, param in model.named_parameters():
        assert inits[key].shape == tuple(param.shape)
        assert np.count_nonzero(inits[key]) == int(torch.count_nonzero(param)), key
    total = sum(v.size for v in inits.values())
    assert sum(np.count_nonzero(v) for v in inits.values()) < total / 8  # 12x pruned, stored dense


def test_sparse_linear_layers_are_exported_as_dense_linear(tmp_path):
    from lit_compress.pruning.sparse_inference import SparseLinear, to_sparse_inference

    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        dense[0].weight.mul_(torch.rand_like(dense[0].weight) > 0.8)
    sparse, _ = to_sparse_inference(dense, min_sparsity=0.5, measure=False)
    assert isinstance(sparse[0], SparseLinear)
    report = export_onnx(sparse, tmp_path / "m.onnx", input_shape=(12,))
    assert isinstance(sparse[0], SparseLinear)  # the model itself is untouched
    assert any("SparseLinear" in note for note in report.notes)
    assert np.array_equal(initializers(tmp_path / "m.onnx")["0.weight"], dense[0].weight.detach().numpy())
    x = torch.randn(5, 12)
    torch.testing.assert_close(run_ort(tmp_path / "m.onnx", x), eval_out(dense, x), rtol=0, atol=1e-5)


# -- quantized (STE) and binary models -----------------------------------------------------------------------


def test_ste_quantized_layers_export_with_their_effective_weights(tmp_path):
    from lit_compress.quantization.modules import QuantConv2d, quantize_module

    torch.manual_seed(2)
    model = nn.Sequential(
        quantize_module(nn.Conv2d(1, 4, 3, padding=1), "binary", "sign"),
        nn.Flatten(),
        quantize_module(nn.Linear(64, 3), "dorefa_weight", "dorefa_activation"),
    )
    latent = model[0].weight.detach().clone()
    report = export_onnx(model, tmp_path / "q.onnx", input_shape=(1, 4, 4))
    assert isinstance(model[0], QuantConv2d) and torch.equal(model[0].weight, latent)  # untouched
    inits = initializers(tmp_path / "q.onnx")
    assert np.array_equal(inits["0.weight"], model[0].quantized_weight().detach().numpy())
    assert np.array_equal(inits["2.weight"], model[2].quantized_weight().detach().numpy())
    assert len(np.unique(np.abs(inits["0.weight"]))) <= 4  # binary: one magnitude per output channel
    assert report.max_abs_diff <= report.tolerance
    x = torch.randn(6, 1, 4, 4)
    torch.testing.assert_close(run_ort(tmp_path / "q.onnx", x), eval_out(model, x), rtol=0, atol=1e-5)


def test_binary_inference_layers_are_refused_and_nothing_is_written(tmp_path):
    from lit_compress.quantization.binary_inference import to_binary_inference
    from lit_compress.quantization.modules import quantize_module

    model = nn.Sequential(nn.Flatten(), quantize_module(nn.Linear(16, 3), "binary", "sign"))
    packed = to_binary_inference(copy.deepcopy(model))
    with pytest.raises(OnnxExportError, match="to_binary_inference"):
        export_onnx(packed, tmp_path / "b.onnx", input_shape=(1, 4, 4))
    assert leftovers(tmp_path) == []
    export_onnx(model, tmp_path / "b.onnx", input_shape=(1, 4, 4))  # what the message says works


# -- gated models --------------------------------------------------------------------------------------------


def test_fbs_zoo_entry_exports_its_gates_and_matches_the_skipping_model(tmp_path):
    from lit_compress.gating.fbs import fbs_layers

    model, card = zoo.load("cifarnet-fashion-mnist.fbs", return_card=True)
    report = export_onnx(model, tmp_path / "f.onnx", input_shape=card.dataset.input_shape)
    assert report.form == "fbs-dense-gates" and "TopK" in report.op_counts
    assert all(layer.skip for layer in fbs_layers(model).values())  # the zoo model keeps skipping
    x = torch.randn(5, *card.dataset.input_shape)
    torch.testing.assert_close(run_ort(tmp_path / "f.onnx", x), eval_out(model, x), rtol=0, atol=1e-4)


def test_blockdrop_network_is_refused_with_what_to_do_instead(tmp_path):
    from lit_compress.gating.blockdrop import BlockDropNetwork, PolicyNet

    torch.manual_seed(3)
    backbone = CifarResNet(depth=8, in_chans=1, width=4)
    blocks = ["layer1.0", "layer2.0", "layer3.0"]
    net = BlockDropNetwork(backbone, PolicyNet(3, in_chans=1, arch="cnn", width=4), blocks).eval()
    with pytest.raises(OnnxExportError, match=r"BlockDrop.*per image.*ungate_blocks"):
        export_onnx(net, tmp_path / "g.onnx", input_shape=(1, 8, 8))
    assert leftovers(tmp_path) == []


# -- faithfulness guards -------------------------------------------------------------------------------------


class DataBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().max()) > 100:  # Python control flow on a tensor value
            return x.flatten(1).sum(dim=1, keepdim=True)
        return -x.flatten(1).sum(dim=1, keepdim=True)


def test_data_dependent_branch_is_refused_by_default(tmp_path):
    with pytest.raises(OnnxExportError, match="Python control flow on tensor values"):
        export_onnx(DataBranch(), tmp_path / "d.onnx", input_shape=(3,))
    assert leftovers(tmp_path) == []


def test_numeric_check_catches_a_baked_branch_and_writes_nothing(tmp_path):
    sample = torch.full((2, 3), 1000.0)  # takes the other branch than the (small, random) trace input
    with pytest.raises(OnnxCheckError, match="differs from PyTorch"):
        export_onnx(DataBranch(), tmp_path / "d.onnx", input_shape=(3,), strict_trace=False, sample=sample)
    assert leftovers(tmp_path) == []
    old = tmp_path / "keep.onnx"
    old.write_bytes(b"previous")  # a failed export does not clobber an existing file either
    with pytest.raises(OnnxCheckError):
        export_onnx(DataBranch(), old, input_shape=(3,), strict_trace=False, sample=sample)
    assert old.read_bytes() == b"previous" and leftovers(tmp_path) == ["keep.onnx"]


def test_load_and_check_measures_the_difference(tmp_path):
    model = tiny_cnn()
    export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 8, 8), check=False)
    x = torch.randn(4, 1, 8, 8)
    assert load_and_check(tmp_path / "m.onnx", model, x) < 1e-5
    other = tiny_cnn()
    with torch.no_grad():
        other[-1].bias.add_(1.0)  # every logit moves by exactly 1
    assert load_and_check(tmp_path / "m.onnx", other, x) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(FileNotFoundError):
        load_and_check(tmp_path / "missing.onnx", model, x)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(input_shape=(0, 8)), TypeError, "positive ints"),
        (dict(input_shape=8), TypeError, "without the batch"),
        (dict(input_shape=(1, 8, 8), opset=7), ValueError, "opset must be"),
        (dict(input_shape=(1, 8, 8), exporter="jit"), ValueError, "'torchscript' or 'dynamo'"),
        (dict(input_shape=(1, 8, 8), sample=torch.zeros(2, 8, 8)), ValueError, r"shape \[batch"),
        (dict(input_shape=(1, 8, 8), atol=-1.0), ValueError, "atol must be"),
    ],
)
def test_bad_arguments_say_what_was_expected(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        export_onnx(tiny_cnn(), tmp_path / "m.onnx", **kwargs)
    assert leftovers(tmp_path) == []


def test_a_model_returning_a_tuple_is_refused(tmp_path):
    class Pair(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(OnnxExportError, match="one floating-point tensor"):
        export_onnx(Pair(), tmp_path / "p.onnx", input_shape=(2,))


# -- int8 ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_entry():
    """The zoo's int8 LeNet-5 (building its torch.ao template is the slow part: ~10 s on a busy CPU)."""
    return zoo.load("lenet5-mnist.int8-qat", return_card=True)


def test_int8_zoo_entry_exports_as_qdq_within_two_output_steps(tmp_path, int8_entry):
    model, card = int8_entry
    report = export_onnx(model, tmp_path / "q.onnx", input_shape=card.dataset.input_shape)
    assert report.form == "int8-qdq"
    assert report.op_counts["QuantizeLinear"] >= 4 and report.op_counts["DequantizeLinear"] >= 4
    scale = model.model.fc2.scale  # the quantized output's step
    assert report.tolerance == pytest.approx(INT8_STEPS * scale, rel=0.05)
    x = torch.randn(16, *card.dataset.input_shape)
    diff = (run_ort(tmp_path / "q.onnx", x) - eval_out(model, x)).abs()
    assert float(diff.max()) <= INT8_STEPS * scale + 1e-5
    steps = diff / scale
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # both sides land on the same output grid
    # int8 weights are stored as int8 (one byte each): the file is about a quarter of the float one
    assert report.bytes < 0.3 * card.params.dense * 4


def test_int8_qat_graph_is_refused_with_the_conversion_hint(tmp_path, int8_entry):
    from lit_compress.quantization.int8 import prepare_int8_qat

    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    qat = prepare_int8_qat(net, torch.zeros(1, 1, 6, 6))
    with pytest.raises(OnnxExportError, match="convert_int8"):
        export_onnx(qat, tmp_path / "q.onnx", input_shape=(1, 6, 6))
    assert leftovers(tmp_path) == []


def test_dynamo_exporter_refuses_int8(tmp_path, int8_entry):
    model, card = int8_entry
    with pytest.raises(OnnxExportError, match="exporter='torchscript'"):
        export_onnx(model, tmp_path / "q.onnx", input_shape=card.dataset.input_shape, exporter="dynamo")


# -- CLI -----------------------------------------------------------------------------------------------------


def test_cli_exports_a_zoo_entry_with_the_cards_input_shape(tmp_path, capsys):
    out = tmp_path / "lenet.onnx"
    assert main(["lenet5-mnist.structured-l1", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["input_shape"] == [1, 28, 28] and printed["path"] == str(out)
    assert printed["max_abs_diff"] <= printed["tolerance"]
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(
        run_ort(out, x), eval_out(zoo.load("lenet5-mnist.structured-l1"), x), rtol=0, atol=1e-4
    )


def test_cli_errors_exit_2_and_write_nothing(tmp_path, capsys):
    assert main(["no-such-model.dense", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "error:" in capsys.readouterr().err
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(b"")
    assert main([str(ckpt), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["lenet5-mnist.dense", "--out", str(tmp_path / "x.onnx"), "--input-shape", "1,x"]) == 2
    assert leftovers(tmp_path) == ["run.ckpt"]


def test_an_input_shape_the_model_cannot_run_is_reported_as_such(tmp_path):
    with pytest.raises(OnnxExportError, match=r"does not run on a batch of shape \[2, 1, 28\]"):
        export_onnx(tiny_cnn(), tmp_path / "m.onnx", input_shape=(1, 28))
    assert leftovers(tmp_path) == []


def test_cli_exports_an_image_classifier_checkpoint(tmp_path, capsys):
    from lit_compress.models import create_model

    torch.manual_seed(4)
    net = create_model("lenet_300_100")
    ckpt = {
        "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
        "hyper_parameters": {"model": "lenet_300_100", "model_kwargs": {}},
    }
    torch.save(ckpt, tmp_path / "run.ckpt")
    out = tmp_path / "mlp.onnx"
    assert main([str(tmp_path / "run.ckpt"), "--out", str(out), "--input-shape", "1,28,28"]) == 0
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(run_ort(out, x), eval_out(net, x), rtol=0, atol=1e-5)
    wrong = dict(ckpt, hyper_parameters={"model": "lenet5", "model_kwargs": {}})
    torch.save(wrong, tmp_path / "wrong.ckpt")
    assert (
        main([str(tmp_path / "wrong.ckpt"), "--out", str(tmp_path / "w.onnx"), "--input-shape", "1,28,28"])
        == 2
    )
    assert "do not fit a freshly built 'lenet5'" in capsys.readouterr().err


@pytest.mark.slow  # the dynamo exporter takes ~10 s even for an MLP on a busy 2-core machine
def test_dynamo_exporter_writes_an_equivalent_graph_for_a_float_model(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    report = export_onnx(model, tmp_path / "d.onnx", input_shape=(1, 4, 4), exporter="dynamo")
    assert report.exporter == "dynamo" and report.opset >= 18
    x = torch.randn(5, 1, 4, 4)
    torch.testing.assert_close(run_ort(tmp_path / "d.onnx", x), eval_out(model, x), rtol=0, atol=1e-5)


def test_int8_export_works_after_a_deterministic_run_and_keeps_the_flag(tmp_path, int8_entry):
    """Trainer(deterministic=True) leaves torch's determinism flag on in the process; int8 tracing needs an
    op without a deterministic kernel, so the export lifts the flag for the trace and restores it."""
    model, card = int8_entry
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        report = export_onnx(model, tmp_path / "int8.onnx", input_shape=tuple(card.dataset.input_shape))
        assert report.form == "int8-qdq"
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
