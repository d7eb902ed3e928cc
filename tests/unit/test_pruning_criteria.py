"""lit_compress.pruning.criteria: every score against a hand computation with plain autograd."""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lit_compress.pruning.criteria import (
    Criterion,
    GraSPCriterion,
    MagnitudeCriterion,
    OBDCriterion,
    ScoringContext,
    SNIPCriterion,
    WoodFisherCriterion,
    get_criterion,
    list_criteria,
    register_criterion,
    split_batch,
)

DATA_CRITERIA = ["snip", "taylor", "obd", "grasp", "woodfisher"]
ALL_CRITERIA = ["magnitude", "random", *DATA_CRITERIA]

X1 = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.5, 2.0], [-1.0, 1.0, 0.0], [2.0, 0.0, 1.0]]).double()
Y1 = torch.tensor([0, 1, 1, 0])
X2 = torch.tensor([[0.0, 1.0, 1.0], [1.5, -1.0, 0.5], [-0.5, -2.0, 1.0]], dtype=torch.float64)
Y2 = torch.tensor([1, 0, 1])


def linear() -> nn.Linear:
    """nn.Linear(3, 2) in float64 with hand-set weights."""
    lin = nn.Linear(3, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.1, -0.3]]))
        lin.bias.copy_(torch.tensor([0.1, -0.2]))
    return lin


def ce_loss(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    return lambda batch: F.cross_entropy(model(batch[0]), batch[1])


def make_ctx(
    model: nn.Module,
    batches: list[Any] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    **kwargs: Any,
) -> ScoringContext:
    batches = [(X1, Y1)] if batches is None else batches
    return ScoringContext(
        model=model,
        params=dict(model.named_parameters()),
        masks=kwargs.pop("masks", {}),
        loss_fn=loss_fn or ce_loss(model),
        batches=lambda: iter(batches),
        **kwargs,
    )


def grads_of(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*model.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params)))


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [grads_of(model, F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])) for i in range(len(x))]


def flat_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Cross-entropy as a function of the concatenated (weight, bias) vector."""

    def f(theta: torch.Tensor) -> torch.Tensor:
        w, b = theta[:6].view(2, 3), theta[6:]
        return F.cross_entropy(functional_call(model, {"weight": w, "bias": b}, (x,)), y)

    return f


def theta_of(model: nn.Linear) -> torch.Tensor:
    return torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])


# --------------------------------------------------------------------------------------- data-free


def test_magnitude_is_abs_weight() -> None:
    model = linear()
    scores = get_criterion("magnitude").scores(make_ctx(model))
    torch.testing.assert_close(scores["weight"], model.weight.detach().abs())
    torch.testing.assert_close(scores["bias"], model.bias.detach().abs())


def test_random_is_seeded_reproducible_and_order_independent() -> None:
    model = linear()
    crit = get_criterion("random")
    a = crit.scores(make_ctx(model, generator_seed=7))
    b = crit.scores(make_ctx(model, generator_seed=7, step=100))
    c = crit.scores(make_ctx(model, generator_seed=8))
    for fqn in a:
        torch.testing.assert_close(a[fqn], b[fqn], rtol=0, atol=0)
        assert not torch.equal(a[fqn], c[fqn])
        assert a[fqn].shape == model.get_parameter(fqn).shape
        assert a[fqn].min() >= 0 and a[fqn].max() < 1
    reordered = make_ctx(model, generator_seed=7)
    reordered.params = dict(reversed(list(reordered.params.items())))
    d = crit.scores(reordered)
    torch.testing.assert_close(d["weight"], a["weight"], rtol=0, atol=0)
    assert not torch.equal(a["weight"].reshape(-1)[:2], a["bias"])  # parameters get different streams


# ------------------------------------------------------------------------------------ gradient-based


def test_snip_is_abs_weight_times_mean_gradient() -> None:
    model = linear()
    seen = []

    def batches() -> Any:
        for b in [(X1, Y1), (X2, Y2), (X1 * 3, Y1)]:
            seen.append(b)
            yield b

    ctx = make_ctx(model)
    ctx.batches = batches
    scores = SNIPCriterion(num_batches=2).scores(ctx)
    assert len(seen) == 2
    g1 = grads_of(model, F.cross_entropy(model(X1), Y1))
    g2 = grads_of(model, F.cross_entropy(model(X2), Y2))
    for fqn, p in model.named_parameters():
        expected = (p.detach() * (g1[fqn] + g2[fqn]) / 2).abs()
        torch.testing.assert_close(scores[fqn], expected)


def test_snip_gradient_by_hand_formula() -> None:
    """d CE / dW = (softmax(z) - onehot(y))^T x / N for a linear layer."""
    model = linear()
    scores = get_criterion("snip").scores(make_ctx(model))
    delta = torch.softmax(model(X1), dim=1).detach() - F.one_hot(Y1, 2).double()
    grad_w = delta.T @ X1 / len(X1)
    torch.testing.assert_close(scores["weight"], (model.weight.detach() * grad_w).abs())
    torch.testing.assert_close(scores["bias"], (model.bias.detach() * delta.mean(0)).abs())


def test_taylor_averages_abs_per_batch() -> None:
    model = linear()
    scores = get_criterion("taylor", num_batches=8).scores(make_ctx(model, [(X1, Y1), (X2, Y2)]))
    g1 = grads_of(model, F.cross_entropy(model(X1), Y1))
    g2 = grads_of(model, F.cross_entropy(model(X2), Y2))
    for fqn, p in model.named_parameters():
        w = p.detach()
        torch.testing.assert_close(scores[fqn], ((w * g1[fqn]).abs() + (w * g2[fqn]).abs()) / 2)


@pytest.mark.parametrize("microbatch_size", [1, 2])
def test_obd_fisher_is_mean_squared_microbatch_gradient(microbatch_size: int) -> None:
    model = linear()
    crit = OBDCriterion(hessian="fisher", microbatch_size=microbatch_size)
    scores = crit.scores(make_ctx(model, [(X1, Y1), (X2, Y2)]))
    grads = []  # explicit loop over microbatches (batch boundaries respected: 4 -> 2+2, 3 -> 2+1)
    for xb, yb in [(X1, Y1), (X2, Y2)]:
        for i in range(0, len(xb), microbatch_size):
            sl = slice(i, i + microbatch_size)
            grads.append(grads_of(model, F.cross_entropy(model(xb[sl]), yb[sl])))
    if microbatch_size == 1:
        assert len(grads) == len(X1) + len(X2) == 7
    for fqn, p in model.named_parameters():
        fisher = torch.stack([g[fqn] ** 2 for g in grads]).mean(0)
        torch.testing.assert_close(scores[fqn], 0.5 * fisher * p.detach() ** 2)


def test_obd_fisher_accepts_dict_batches() -> None:
    model = linear()
    tuple_scores = OBDCriterion().scores(make_ctx(model))
    dict_ctx = make_ctx(model, [{"x": X1, "y": Y1}], loss_fn=lambda b: F.cross_entropy(model(b["x"]), b["y"]))
    dict_scores = OBDCriterion().scores(dict_ctx)
    for fqn in tuple_scores:
        torch.testing.assert_close(dict_scores[fqn], tuple_scores[fqn])


def test_obd_hutchinson_matches_exact_hessian_diagonal_on_linear_regression() -> None:
    model = linear()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    t = torch.randn(16, 2, generator=gen, dtype=torch.float64)

    def mse(theta: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {"weight": theta[:6].view(2, 3), "bias": theta[6:]}, (x,))
        return F.mse_loss(out, t)

    h_diag = torch.autograd.functional.hessian(mse, theta_of(model)).diagonal()
    crit = OBDCriterion(hessian="hutchinson", num_batches=4, hutchinson_samples=600)
    ctx = make_ctx(model, [(x, t)] * 4, loss_fn=lambda b: F.mse_loss(model(b[0]), b[1]))
    scores = crit.scores(ctx)
    estimate = torch.cat([scores["weight"].reshape(-1), scores["bias"]]) / (0.5 * theta_of(model) ** 2)
    torch.testing.assert_close(estimate, h_diag, rtol=0.1, atol=0.05)


def test_obd_hutchinson_exact_for_diagonal_hessian_and_clamps_negative_curvature() -> None:
    model = linear()
    c = torch.tensor([[1.0, 2.0, 3.0], [-1.0, -2.0, 0.5]], dtype=torch.float64)

    def loss_fn(batch: Any) -> torch.Tensor:  # Hessian diag(2c) for the weight, 0 for the bias
        return (c * model.weight**2).sum() + 0.0 * model(batch[0]).sum()

    scores = OBDCriterion(hessian="hutchinson", hutchinson_samples=3).scores(make_ctx(model, loss_fn=loss_fn))
    expected = 0.5 * (2 * c).clamp_min(0) * model.weight.detach() ** 2
    torch.testing.assert_close(scores["weight"], expected)
    assert (scores["weight"][c < 0] == 0).all()
    torch.testing.assert_close(scores["bias"], torch.zeros_like(model.bias))


@pytest.mark.parametrize("n_batches", [1, 2])
def test_grasp_is_weight_times_exact_hessian_gradient(n_batches: int) -> None:
    model = linear()
    data = [(X1, Y1), (X2, Y2)][:n_batches]
    scores = GraSPCriterion(num_batches=n_batches).scores(make_ctx(model, data))

    def mean_loss(theta: torch.Tensor) -> torch.Tensor:
        return sum(flat_loss(model, x, y)(theta) for x, y in data) / n_batches

    theta = theta_of(model).requires_grad_(True)
    g = torch.autograd.grad(mean_loss(theta), theta)[0]
    hessian = torch.autograd.functional.hessian(mean_loss, theta.detach())
    expected = theta.detach() * (hessian @ g)
    torch.testing.assert_close(torch.cat([scores["weight"].reshape(-1), scores["bias"]]), expected)


# -------------------------------------------------------------------------------------- woodfisher


def dense_obs(grads: list[torch.Tensor], w: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(saliency, inverse Fisher) of a flat weight vector with the dense empirical Fisher."""
    g = torch.stack(grads)
    fisher = damp * torch.eye(len(w), dtype=w.dtype) + g.T @ g / len(grads)
    inv = torch.linalg.inv(fisher)
    return w**2 / (2 * inv.diagonal()), inv


def test_woodfisher_matches_dense_obs_when_one_block_covers_the_layer() -> None:
    model = linear()
    damp = 1e-3
    crit = WoodFisherCriterion(block_size=128, num_gradients=7, damp=damp)
    ctx = make_ctx(model, [(X1, Y1), (X2, Y2)])
    scores = crit.scores(ctx)
    pe = per_example_grads(model, X1, Y1) + per_example_grads(model, X2, Y2)
    w = model.weight.detach().reshape(-1)
    saliency, inv = dense_obs([g["weight"].reshape(-1) for g in pe], w, damp)
    torch.testing.assert_close(scores["weight"].reshape(-1), saliency)
    b_saliency, _ = dense_obs([g["bias"] for g in pe], model.bias.detach(), damp)
    torch.testing.assert_close(scores["bias"], b_saliency)

    prune = saliency.argsort()[:2]  # prune the two least salient weights now
    new_mask = torch.ones(6, dtype=torch.bool)
    new_mask[prune] = False
    expected = w.clone()
    for q in prune:
        expected -= w[q] / inv[q, q] * inv[:, q]
    expected[prune] = 0.0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = {"weight": new_mask.view(2, 3), "bias": torch.ones(2, dtype=torch.bool)}
    updates = crit.update_weights(ctx, masks)
    assert updates is not None and set(updates) == {"weight"}  # nothing pruned in the bias
    torch.testing.assert_close(updates["weight"].reshape(-1), expected)
    for n, p in model.named_parameters():  # proposes, never applies
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)


def test_woodfisher_blocks_are_independent_dense_obs_problems() -> None:
    model = linear()
    crit = WoodFisherCriterion(block_size=4, num_gradients=4, damp=1e-2)
    scores = crit.scores(make_ctx(model, [(X1, Y1)]))
    pe = per_example_grads(model, X1, Y1)
    w = model.weight.detach().reshape(-1)
    for block in (slice(0, 4), slice(4, 6)):  # 6 weights: a block of 4 and a zero-padded block of 2
        saliency, _ = dense_obs([g["weight"].reshape(-1)[block] for g in pe], w[block], 1e-2)
        torch.testing.assert_close(scores["weight"].reshape(-1)[block], saliency)


def test_woodfisher_restricts_to_surviving_weights_and_never_revives() -> None:
    model = linear()
    old = torch.tensor([[True, False, True], [True, True, True]])
    with torch.no_grad():
        model.weight.mul_(old)
    crit = WoodFisherCriterion(num_gradients=4, damp=1e-3)
    ctx = make_ctx(model, masks={"weight": old})
    scores = crit.scores(ctx)
    keep = old.reshape(-1).nonzero().squeeze(1)
    pe = per_example_grads(model, X1, Y1)
    w = model.weight.detach().reshape(-1)
    saliency, inv = dense_obs([g["weight"].reshape(-1)[keep] for g in pe], w[keep], 1e-3)
    torch.testing.assert_close(scores["weight"].reshape(-1)[keep], saliency)

    new = old.clone()
    new[1, 2] = False  # flat index 5 = position 4 among the survivors
    updates = crit.update_weights(ctx, {"weight": new})
    expected = w.clone()
    expected[keep] -= w[5] / inv[4, 4] * inv[:, 4]
    expected[5] = 0.0
    torch.testing.assert_close(updates["weight"].reshape(-1), expected)
    assert updates["weight"][0, 1] == 0  # the previously pruned weight stays dead


def test_woodfisher_uses_num_gradients_and_warns_when_short() -> None:
    model = linear()
    scores = WoodFisherCriterion(num_gradients=3, damp=1e-3).scores(make_ctx(model, [(X1, Y1), (X2, Y2)]))
    pe = per_example_grads(model, X1[:3], Y1[:3])
    saliency, _ = dense_obs([g["bias"] for g in pe], model.bias.detach(), 1e-3)
    torch.testing.assert_close(scores["bias"], saliency)
    with pytest.warns(UserWarning, match="only 4 of num_gradients=64"):
        WoodFisherCriterion().scores(make_ctx(model))


def test_woodfisher_update_requires_fresh_scores() -> None:
    model = linear()
    crit = WoodFisherCriterion(num_gradients=4)
    masks = {"weight": torch.zeros(2, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match="call scores"):
        crit.update_weights(make_ctx(model), masks)
    crit.scores(make_ctx(model, step=3))
    with pytest.raises(ValueError, match=r"step 4 .* step 3"):
        crit.update_weights(make_ctx(model, step=4), masks)
    nothing_pruned = {"weight": torch.ones(2, 3, dtype=torch.bool)}
    assert crit.update_weights(make_ctx(model, step=3), nothing_pruned) is None


def test_woodfisher_memory_limit_names_the_parameter() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))  # 4096 weights * 128 * 4 B = 2 MB
    ctx = make_ctx(model, [(torch.randn(2, 64), torch.tensor([0, 1]))])
    expected = r"max_memory_mb=1\b.*'0\.weight'.*smaller block_size \(block_size=32 would fit"
    with pytest.raises(ValueError, match=expected):
        WoodFisherCriterion(max_memory_mb=1).scores(ctx)


# ---------------------------------------------------------------------------------------- contract


def small_kwargs(name: str) -> dict[str, Any]:
    return {"obd": {"microbatch_size": 2}, "woodfisher": {"microbatch_size": 2, "num_gradients": 2}}.get(
        name, {}
    )


@pytest.mark.parametrize("name", ALL_CRITERIA)
@pytest.mark.parametrize("training", [True, False])
def test_criteria_are_read_only(name: str, training: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    model.train(training)
    model[1].train(not training)  # mixed modes must come back exactly
    model[0].bias.requires_grad_(False)  # a frozen target
    sentinel = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n]
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    modes_before = [m.training for m in model.modules()]
    rng_before = torch.get_rng_state()
    crit = get_criterion(name, **small_kwargs(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = crit.scores(make_ctx(model, [(X1, Y1)] * 2))
    for n, p in model.named_parameters():
        assert scores[n].shape == p.shape and scores[n].dtype == torch.float64
        assert not scores[n].requires_grad and torch.isfinite(scores[n]).all()
        torch.testing.assert_close(p.detach(), params_before[n], rtol=0, atol=0)
        assert p.grad is sentinel[n] and (p.grad == 7).all()
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, buffers_before[n], rtol=0, atol=0)
    assert [m.training for m in model.modules()] == modes_before
    assert torch.equal(torch.get_rng_state(), rng_before)


@pytest.mark.parametrize("name", DATA_CRITERIA)
@pytest.mark.parametrize("missing", ["loss_fn", "batches"])
def test_data_criteria_without_data_raise_clear_error(name: str, missing: str) -> None:
    ctx = make_ctx(linear())
    setattr(ctx, missing, None)
    crit = get_criterion(name)
    assert crit.needs_data
    with pytest.raises(ValueError, match=rf"{name!r} needs data.*{missing}=None.*use magnitude or random"):
        crit.scores(ctx)


@pytest.mark.parametrize("name", ["magnitude", "random"])
def test_data_free_criteria_need_no_data(name: str) -> None:
    model = linear()
    ctx = ScoringContext(model=model, params=dict(model.named_parameters()), masks={})
    assert not get_criterion(name).needs_data
    assert set(get_criterion(name).scores(ctx)) == {"weight", "bias"}


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_statistics_go_through_all_reduce_mean(name: str) -> None:
    calls: list[torch.Size] = []

    def spy(t: torch.Tensor) -> torch.Tensor:
        calls.append(t.shape)
        return t

    model = linear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_criterion(name, **small_kwargs(name)).scores(make_ctx(model, all_reduce_mean=spy))
    assert calls


def test_scores_use_the_reduced_statistics() -> None:
    model = linear()
    plain = get_criterion("snip").scores(make_ctx(model))
    doubled = get_criterion("snip").scores(make_ctx(model, all_reduce_mean=lambda t: 2 * t))
    for fqn in plain:
        torch.testing.assert_close(doubled[fqn], 2 * plain[fqn])


def test_loss_fn_errors_are_clear() -> None:
    model = linear()
    bad_shape = make_ctx(model, loss_fn=lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none"))
    with pytest.raises(ValueError, match=r"scalar tensor, got \(4,\).*\.mean\(\)"):
        get_criterion("snip").scores(bad_shape)

    def no_graph(batch: Any) -> torch.Tensor:
        with torch.no_grad():
            return F.cross_entropy(model(batch[0]), batch[1])

    with pytest.raises(ValueError, match="no autograd graph"):
        get_criterion("snip").scores(make_ctx(model, loss_fn=no_graph))
    with pytest.raises(ValueError, match="yielded no batches"):
        get_criterion("taylor").scores(make_ctx(model, []))


def test_constructor_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match="num_batches must be a positive int, got 0"):
        SNIPCriterion(num_batches=0)
    with pytest.raises(ValueError, match="Did you mean 'fisher'"):
        OBDCriterion(hessian="fischer")
    with pytest.raises(ValueError, match="damp must be a positive"):
        WoodFisherCriterion(damp=0.0)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        WoodFisherCriterion(block_size=True)


def test_split_batch_slices_every_batch_tensor() -> None:
    weights = torch.ones(7)  # not per-example: passed through
    pair = collections.namedtuple("pair", "x y")
    parts = split_batch((X1, {"y": Y1, "w": weights}, pair(X1, Y1), "tag"), 3)
    assert len(parts) == 2
    x, d, p, tag = parts[1]
    assert torch.equal(x, X1[3:]) and torch.equal(d["y"], Y1[3:]) and d["w"] is weights
    assert isinstance(p, pair) and torch.equal(p.y, Y1[3:]) and tag == "tag"
    with pytest.raises(ValueError, match="no tensor with a batch dimension"):
        split_batch(["a", 1], 2)


# ---------------------------------------------------------------------------------------- registry


def test_registry_lookups() -> None:
    assert set(ALL_CRITERIA) <= set(list_criteria())
    assert isinstance(get_criterion("magnitude"), MagnitudeCriterion)
    assert get_criterion(SNIPCriterion, num_batches=3).num_batches == 3
    inst = OBDCriterion(hessian="hutchinson")
    assert get_criterion(inst) is inst
    dotted = get_criterion("lit_compress.pruning.criteria.WoodFisherCriterion", block_size=16)
    assert isinstance(dotted, WoodFisherCriterion) and dotted.block_size == 16
    assert get_criterion("grasp").name == "grasp"
    with pytest.raises(ValueError, match="either the instance"):
        get_criterion(inst, num_batches=2)
    with pytest.raises(TypeError):
        get_criterion(nn.Linear)
    with pytest.raises(ValueError, match="does not name a Criterion"):
        get_criterion("torch.nn.Linear")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg'"):
        get_criterion("no_such_pkg.Thing")


def test_unknown_name_lists_names_and_close_matches() -> None:
    expected = r"unknown pruning criterion 'magnitud'\. Did you mean 'magnitude'"
    with pytest.raises(ValueError, match=expected) as e:
        get_criterion("magnitud")
    for name in ALL_CRITERIA:
        assert name in str(e.value)


def test_register_custom_criterion() -> None:
    @register_criterion("_test_ones")
    class Ones(Criterion):
        def scores(self, ctx: ScoringContext) -> dict[str, torch.Tensor]:
            return {n: torch.ones_like(p) for n, p in ctx.params.items()}

    assert Ones.name == "_test_ones" and isinstance(get_criterion("_test_ones"), Ones)
    assert Criterion().update_weights(make_ctx(linear()), {}) is None
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("magnitude")(Ones)
