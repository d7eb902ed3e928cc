import copy
import io
import math

import pytest
import torch
from torch import nn

from lit_compress.models import create_model
from lit_compress.pruning import sparse_inference as si
from lit_compress.pruning.sparse_inference import SparseLinear, crossover, to_sparse_inference

pytestmark = pytest.mark.filterwarnings("ignore:.*[Ss]parse.*:UserWarning")


def _linear(in_f: int, out_f: int, sparsity: float, seed: int = 0, bias: bool = True, zero_rows=()):
    """A Linear with exactly round(sparsity * numel) zero weights (and the given all-zero output rows)."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f))
        if bias:
            layer.bias.copy_(torch.randn(out_f, generator=gen))
        idx = torch.randperm(in_f * out_f, generator=gen)[: round(sparsity * in_f * out_f)]
        layer.weight.view(-1)[idx] = 0.0
        for row in zero_rows:
            layer.weight[row] = 0.0
    return layer


def _zeros(t: torch.Tensor) -> float:
    return float((t == 0).float().mean())


def _by_hand(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """y[..., o] = sum_i x[..., i] W[o, i] + b[o], in float64 without a matmul kernel."""
    w = layer.weight.detach().double()
    y = (x.double().unsqueeze(-2) * w).sum(-1)
    return y if layer.bias is None else y + layer.bias.detach().double()


# ---------------------------------------------------------------------------------------------------------
# SparseLinear
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
@pytest.mark.parametrize("shape", [(1, 40), (7, 40), (2, 3, 40), (40,), (1, 1, 40)])
def test_sparse_linear_matches_dense(sparsity, shape):
    dense = _linear(40, 13, sparsity, zero_rows=(0, 5, 12))
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    y = sparse(x)
    assert y.shape == (*shape[:-1], 13)
    assert y.is_contiguous()
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), _by_hand(x, dense), rtol=1e-5, atol=1e-5)
    # all-zero rows give exactly the bias
    torch.testing.assert_close(y[..., 5], dense.bias[5].expand(shape[:-1]), rtol=0, atol=0)
    assert sparse.nnz == int((dense.weight != 0).sum())
    assert sparse.sparsity == pytest.approx(_zeros(dense.weight))


@pytest.mark.parametrize("batch", [1, 7])
def test_sparse_linear_without_bias_and_float64(batch):
    dense = _linear(30, 9, 0.8, bias=False).double()
    sparse = SparseLinear.from_dense(dense)
    assert sparse.bias is None and sparse.weight_values.dtype == torch.float64
    x = torch.randn(batch, 30, dtype=torch.float64)
    torch.testing.assert_close(sparse(x), _by_hand(x, dense), rtol=1e-12, atol=1e-12)


def test_sparse_linear_empty_batch_and_int32_indices():
    sparse = SparseLinear.from_dense(_linear(8, 4, 0.5))
    assert sparse(torch.randn(0, 8)).shape == (0, 4)
    assert sparse.weight_col_indices.dtype == torch.int32  # MKL's native index type: no per-call conversion
    assert sparse.weight_csr().layout == torch.sparse_csr


def test_weight_property_is_dense_copy_and_read_only():
    dense = _linear(10, 6, 0.7)
    sparse = SparseLinear.from_dense(dense)
    assert torch.equal(sparse.weight, dense.weight.detach())
    assert "weight" not in dict(sparse.named_parameters())
    with pytest.raises(AttributeError, match="read-only"):
        sparse.weight = torch.zeros(6, 10)
    with pytest.raises(TypeError, match="inference-only"):
        sparse.reset_parameters()
    assert "nnz=18" in repr(sparse) and "sparsity=0.700" in repr(sparse)


def test_set_weight_rebuilds_and_validates():
    sparse = SparseLinear(5, 3)
    x = torch.randn(4, 5)
    assert torch.equal(sparse(x), torch.zeros(4, 3))  # constructor: all-zero weight and bias
    new = torch.arange(15.0).view(3, 5) * (torch.arange(15).view(3, 5) % 2)
    sparse.set_weight(new)
    torch.testing.assert_close(sparse(x), x @ new.T)
    with pytest.raises(ValueError, match=r"shape \(5, 3\), expected \(3, 5\)"):
        sparse.set_weight(torch.zeros(5, 3))
    with pytest.raises(TypeError, match="float32 and float64"):
        sparse.set_weight(torch.zeros(3, 5, dtype=torch.bfloat16))


def test_csr_cache_follows_buffer_changes():
    sparse = SparseLinear.from_dense(_linear(6, 3, 0.5))
    x = torch.randn(2, 6)
    before = sparse(x)
    with torch.no_grad():
        sparse.weight_values.mul_(2.0)  # in place: the cached CSR tensor shares the storage
    torch.testing.assert_close(sparse(x) - sparse.bias, 2 * (before - sparse.bias))
    sparse.weight_values = sparse.weight_values * 0  # assignment drops the cache
    torch.testing.assert_close(sparse(x), sparse.bias.expand(2, 3))
    sparse.set_weight(torch.eye(3, 6))
    torch.testing.assert_close(sparse(x), x[:, :3] + sparse.bias)
    sparse.double()  # conversions rebuild it with the new dtype
    assert sparse.weight_csr().dtype == torch.float64 and sparse(x.double()).dtype == torch.float64


def test_bad_arguments_have_clear_messages():
    with pytest.raises(TypeError, match=r"expects an nn.Linear, got Conv2d"):
        SparseLinear.from_dense(nn.Conv2d(1, 2, 3))
    with pytest.raises(TypeError, match=r"bfloat16.*\.float\(\)"):
        SparseLinear.from_dense(nn.Linear(3, 2).to(torch.bfloat16))
    with pytest.raises(ValueError, match="in_features must be an int >= 0, got -1"):
        SparseLinear(-1, 3)
    sparse = SparseLinear.from_dense(nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 6\], got \(2, 5\)"):
        sparse(torch.randn(2, 5))


# ---------------------------------------------------------------------------------------------------------
# state_dict and copying
# ---------------------------------------------------------------------------------------------------------
def test_state_dict_is_the_dense_linear_one():
    dense = _linear(12, 5, 0.9)
    sparse = SparseLinear.from_dense(dense)
    state = sparse.state_dict()
    assert list(state) == list(dense.state_dict()) == ["weight", "bias"]
    assert state["weight"].layout == torch.strided
    fresh = nn.Linear(12, 5)
    fresh.load_state_dict(state)  # strict: a plain Linear loads the sparse module's checkpoint
    assert torch.equal(fresh.weight, dense.weight) and torch.equal(fresh.bias, dense.bias)

    back = SparseLinear(12, 5)
    assert not back.load_state_dict(dense.state_dict()).missing_keys  # and the reverse
    assert back.nnz == sparse.nnz
    x = torch.randn(3, 12)
    torch.testing.assert_close(back(x), dense(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(sparse.to_dense().weight, dense.weight)


def test_load_state_dict_errors_like_torch():
    sparse = SparseLinear(4, 3)
    with pytest.raises(RuntimeError, match=r"size mismatch for weight.*\(3, 3\).*\(3, 4\)"):
        sparse.load_state_dict({"weight": torch.zeros(3, 3), "bias": torch.zeros(3)})
    with pytest.raises(RuntimeError, match=r"Missing key.*weight"):
        sparse.load_state_dict({"bias": torch.zeros(3)})
    result = sparse.load_state_dict({"bias": torch.ones(3)}, strict=False)
    assert result.missing_keys == ["weight"] and not result.unexpected_keys
    model = nn.Sequential(SparseLinear(4, 3))
    with pytest.raises(RuntimeError, match=r"Unexpected key.*0.other"):
        model.load_state_dict({"0.weight": torch.zeros(3, 4), "0.bias": torch.zeros(3), "0.other": 1})


def test_deepcopy_pickle_and_dtype_moves():
    dense = _linear(9, 4, 0.6)
    sparse = SparseLinear.from_dense(dense)
    x = torch.randn(2, 9)
    sparse(x)  # fills the CSR cache, which can be neither deep-copied nor pickled
    twin = copy.deepcopy(sparse)
    buffer = io.BytesIO()
    torch.save(sparse, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for other in (twin, loaded):
        assert torch.equal(other(x), sparse(x))
    as64 = copy.deepcopy(sparse).double()
    assert as64.weight_col_indices.dtype == torch.int32
    torch.testing.assert_close(as64(x.double()), _by_hand(x, dense), rtol=1e-12, atol=1e-12)


def test_usable_with_autograd_after_inference_mode():
    sparse = SparseLinear.from_dense(_linear(6, 3, 0.5))
    with torch.inference_mode():
        sparse(torch.randn(2, 6))  # the cached CSR tensor is built here
    x = torch.randn(2, 6, requires_grad=True)
    sparse(x).sum().backward()
    torch.testing.assert_close(x.grad, sparse.weight.sum(0).expand(2, 6))


# ---------------------------------------------------------------------------------------------------------
# to_sparse_inference
# ---------------------------------------------------------------------------------------------------------
class _MyLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def _three_layer(sparsities=(0.5, 0.9, 0.95)):
    return nn.Sequential(
        _linear(20, 16, sparsities[0], seed=1),
        nn.ReLU(),
        _linear(16, 12, sparsities[1], seed=2),
        nn.ReLU(),
        _linear(12, 4, sparsities[2], seed=3),
    )


def test_converter_threshold_rule_without_timing():
    model = _three_layer()
    converted, report = to_sparse_inference(model, min_sparsity=0.9, measure=False)
    assert [type(converted[i]) for i in (0, 2, 4)] == [nn.Linear, SparseLinear, SparseLinear]
    assert [report[k]["chosen"] for k in ("0", "2", "4")] == ["dense", "csr", "csr"]
    assert report["0"]["sparsity"] == pytest.approx(0.5) and report["4"]["sparsity"] == pytest.approx(46 / 48)
    assert all(r["dense_us"] is None and r["sparse_us"] is None for r in report.values())
    assert all(type(m) is not SparseLinear for m in model.modules())  # the original is untouched
    x = torch.randn(7, 20)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)
    assert list(converted.state_dict()) == list(model.state_dict())

    everything, _ = to_sparse_inference(model, min_sparsity=0.0, measure=False)
    assert sum(isinstance(m, SparseLinear) for m in everything.modules()) == 3
    nothing, _ = to_sparse_inference(model, min_sparsity=1.0, measure=False)
    assert not any(isinstance(m, SparseLinear) for m in nothing.modules())


def test_converter_skips_subclasses_and_replaces_shared_layers_everywhere():
    shared = _linear(8, 8, 0.9)
    model = nn.Sequential(shared, nn.ReLU(), shared, _MyLinear(8, 8))
    converted, report = to_sparse_inference(model, min_sparsity=0.5, measure=False)
    assert isinstance(converted[0], SparseLinear) and converted[0] is converted[2]
    assert type(converted[3]) is _MyLinear and "3" not in report
    x = torch.randn(3, 8)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-6)
    single, _ = to_sparse_inference(_linear(8, 3, 0.9), min_sparsity=0.5, measure=False)
    assert isinstance(single, SparseLinear)


def test_converter_uses_csr_only_where_measured_faster(monkeypatch):
    # Deterministic stand-in for the timer: CSR is "faster" only for the 12 -> 4 layer.
    calls = []

    def fake_timer(layers, example, repeats, threads):
        dense, sparse = layers
        assert isinstance(sparse, SparseLinear) and example.shape[1] == dense.in_features
        calls.append(example.shape[0])
        return (10.0, 4.0) if dense.out_features == 4 else (10.0, 11.0)

    monkeypatch.setattr(si, "interleaved_latency_us", fake_timer)
    converted, report = to_sparse_inference(_three_layer(), batch_size=3, measure=True)
    assert calls == [3, 3, 3]
    assert [report[k]["chosen"] for k in ("0", "2", "4")] == ["dense", "dense", "csr"]
    assert report["4"]["dense_us"] == 10.0 and report["4"]["sparse_us"] == 4.0
    assert [type(converted[i]) for i in (0, 2, 4)] == [nn.Linear, nn.Linear, SparseLinear]
    # min_sparsity with measure=True only pre-filters: the 0.5-sparse layer is not even timed
    _, report = to_sparse_inference(_three_layer(), min_sparsity=0.9, measure=True)
    assert report["0"]["dense_us"] is None and report["0"]["chosen"] == "dense"


def test_converter_real_timing_is_consistent():
    converted, report = to_sparse_inference(_three_layer(), batch_size=2, threads=1, repeats=1)
    for name, entry in report.items():
        assert entry["dense_us"] > 0 and entry["sparse_us"] > 0
        assert entry["chosen"] == ("csr" if entry["sparse_us"] < entry["dense_us"] else "dense")
        assert isinstance(converted.get_submodule(name), SparseLinear) == (entry["chosen"] == "csr")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"min_sparsity": -0.1, "measure": False}, ValueError, r"min_sparsity must be a number in \[0, 1\]"),
        ({"min_sparsity": 1.5}, ValueError, "got 1.5"),
        ({"min_sparsity": "0.9"}, ValueError, "got '0.9'"),
        ({"min_sparsity": True}, ValueError, "got True"),
        ({"measure": False}, ValueError, "min_sparsity is required when measure=False"),
        ({"measure": "yes"}, TypeError, "measure must be True or False"),
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1, got 0"),
        ({"threads": 0}, ValueError, "threads"),
        ({"repeats": 0}, ValueError, "repeats must be an int >= 1"),
    ],
)
def test_converter_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        to_sparse_inference(_three_layer(), **kwargs)


def test_converter_rejects_non_module():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got dict"):
        to_sparse_inference({"fc": nn.Linear(2, 2)}, min_sparsity=0.5, measure=False)


def test_converter_keeps_unsupported_dtypes_dense():
    model = nn.Sequential(_linear(6, 4, 0.9)).to(torch.bfloat16)
    converted, report = to_sparse_inference(model, min_sparsity=0.5, measure=False)
    assert type(converted[0]) is nn.Linear and "dtype" in report["0"]["reason"]


def _magnitude_prune_(model: nn.Module, sparsity: float) -> None:
    """Zero the round(sparsity * n) smallest-|w| weights of every Linear (ties: lower flat index first)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                flat = module.weight.view(-1)
                order = torch.argsort(flat.abs(), stable=True)
                flat[order[: round(sparsity * flat.numel())]] = 0.0


def test_lenet_300_100_pruned_to_95_percent_predicts_the_same():
    torch.manual_seed(0)
    lenet = create_model("lenet_300_100").eval()
    _magnitude_prune_(lenet, 0.95)
    converted, report = to_sparse_inference(lenet, min_sparsity=0.9, measure=False)
    assert set(report) == {"fc1", "fc2", "fc3"}
    assert all(
        r["chosen"] == "csr" and r["sparsity"] == pytest.approx(0.95, abs=1e-3) for r in report.values()
    )
    assert all(isinstance(getattr(converted, n), SparseLinear) for n in ("fc1", "fc2", "fc3"))
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = lenet(x), converted(x)
        one = converted(x[:1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one, expected[:1], rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    reloaded = create_model("lenet_300_100")
    reloaded.load_state_dict(converted.state_dict())  # the sparse model's checkpoint is the dense one
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), lenet.state_dict().values()))


# ---------------------------------------------------------------------------------------------------------
# crossover and timing
# ---------------------------------------------------------------------------------------------------------
def test_crossover_is_lowest_sparsity_from_which_csr_always_wins(monkeypatch):
    wins_at = {0.5: True, 0.6: False, 0.7: False, 0.8: True, 0.9: True, 0.95: True}  # 0.5: a noisy win

    def fake_timer(layers, example, repeats, threads):
        dense, sparse = layers
        sparsity = round(_zeros(dense.weight), 2)
        assert sparse.sparsity == pytest.approx(sparsity, abs=1e-2)
        return (10.0, 5.0) if wins_at[sparsity] else (10.0, 20.0)

    monkeypatch.setattr(si, "interleaved_latency_us", fake_timer)
    assert crossover(20, 10, sparsities=[0.95, 0.5, 0.6, 0.7, 0.8, 0.9]) == 0.8
    wins_at[0.95] = False
    assert crossover(20, 10, sparsities=list(wins_at)) is None


def test_crossover_runs_for_real_and_validates():
    result = crossover(16, 8, batch_size=2, sparsities=(0.5, 0.99), threads=1, repeats=1)
    assert result in (None, 0.5, 0.99)
    with pytest.raises(ValueError, match="each sparsity must be a number in"):
        crossover(16, 8, sparsities=(0.5, 1.2))
    with pytest.raises(ValueError, match="non-empty sequence"):
        crossover(16, 8, sparsities=())
    with pytest.raises(ValueError, match="in_features must be an int >= 1"):
        crossover(0, 8)


def test_interleaved_latency_restores_threads_and_alternates():
    before = torch.get_num_threads()
    calls = []
    fns = [lambda x, k=k: calls.append(k) for k in "abc"]
    times = si.interleaved_latency_us(fns, torch.zeros(1), repeats=3, threads=1, min_block_s=0.0)
    assert torch.get_num_threads() == before
    assert len(times) == 3 and all(t > 0 for t in times)
    # warm-up (1 + 3 calls each), then rounds starting with a, b, c in turn (one call per block)
    assert calls[12:] == list("abcbcacab")
    with pytest.raises(ValueError, match="candidates is empty"):
        si.interleaved_latency_us([], torch.zeros(1))


def test_count_params_counts_csr_weights_of_converted_models():
    from lit_compress.measure import count_params

    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p[p.abs() < p.abs().quantile(0.95)] = 0
    converted, _ = to_sparse_inference(model, min_sparsity=0.9, measure=False)
    before, after = count_params(model), count_params(converted)
    assert (after.total, after.nonzero) == (before.total, before.nonzero)
