"""lit_compress.pruning.neuron_criteria (maxout win counts, neuron correlations) and models.maxout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_compress.models.maxout import Maxout, MaxoutMLP
from lit_compress.models.registry import create_model
from lit_compress.pruning.criteria import ScoringContext, get_criterion
from lit_compress.pruning.masks import layerwise_masks
from lit_compress.pruning.neuron_criteria import (
    CorrelationCriterion,
    MaxoutActivityCriterion,
    correlation_scores,
    maxout_scores,
)


def ctx_for(
    model: nn.Module,
    names: list[str],
    batches: list[Any],
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    masks: dict[str, torch.Tensor] | None = None,
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ScoringContext:
    params = dict(model.named_parameters())
    extra = {} if all_reduce_mean is None else {"all_reduce_mean": all_reduce_mean}
    return ScoringContext(
        model=model,
        params={n: params[n] for n in names},
        masks=masks or {},
        loss_fn=loss_fn or (lambda x: model(x).sum()),
        batches=lambda: list(batches),
        **extra,
    )


# ------------------------------------------------------------------------------------------ maxout model


def test_maxout_module_takes_max_over_adjacent_pieces():
    x = torch.tensor([[1.0, 5.0, -2.0, 3.0, 0.0, 7.0]])
    assert torch.equal(Maxout(2)(x), torch.tensor([[5.0, 3.0, 7.0]]))
    assert torch.equal(Maxout(3)(x), torch.tensor([[5.0, 7.0]]))
    conv_out = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).view(2, 4, 3, 3)
    expected = torch.maximum(conv_out[:, 0::2], conv_out[:, 1::2])  # units = channel pairs (0,1), (2,3)
    assert torch.equal(Maxout(2)(conv_out), expected)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        Maxout(4)(x)
    with pytest.raises(ValueError, match="pieces must be a positive int"):
        Maxout(0)


def test_maxout_mlp_shapes_registry_and_goodfellow_parameter_count():
    net = create_model("maxout_mlp")
    assert isinstance(net, MaxoutMLP)
    assert sum(p.numel() for p in net.parameters()) == 784 * 1200 + 1200 + 240 * 1200 + 1200 + 240 * 10 + 10
    small = MaxoutMLP(units=(6, 4), pieces=3, img_size=4)
    assert small(torch.randn(5, 1, 4, 4)).shape == (5, 10)
    assert [m.out_features for m in small.hidden] == [18, 12]
    with pytest.raises(ValueError, match="units must be a non-empty list"):
        MaxoutMLP(units=())


# ------------------------------------------------------------------------------------ maxout activity


def hand_maxout() -> tuple[nn.Module, list[torch.Tensor]]:
    """Linear(2, 4) -> Maxout(2) -> Linear(2, 1); pieces (rows) 0,1 form unit 0 and rows 2,3 unit 1."""
    lin = nn.Linear(2, 4)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]))
        lin.bias.zero_()
    model = nn.Sequential(lin, Maxout(2), nn.Linear(2, 1))
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0], [-1.0, -2.0], [1.0, 5.0], [3.0, 0.0]])
    # pre-activations z = [x0, x1, x0 + x1, -x0]:
    #   [2, 1, 3, -2]  -> unit 0: piece 0, unit 1: piece 0 (row 2)
    #   [0, 3, 3, 0]   -> unit 0: piece 1, unit 1: row 2
    #   [-1, -2, -3, 1]-> unit 0: piece 0, unit 1: row 3
    #   [1, 5, 6, -1]  -> unit 0: piece 1, unit 1: row 2
    #   [3, 0, 3, -3]  -> unit 0: piece 0, unit 1: row 2
    return model, [x[:3], x[3:]]


def test_maxout_win_counts_by_hand():
    model, batches = hand_maxout()
    crit = MaxoutActivityCriterion()
    freq, pieces = crit.win_frequencies(ctx_for(model, ["0.weight"], batches))
    assert pieces == {"0.weight": 2}
    torch.testing.assert_close(freq["0.weight"], torch.tensor([3, 2, 4, 1], dtype=torch.float64) / 5)
    # per_unit: score = freq - level (level 0 = the unit's most active piece).
    scores = crit.scores(ctx_for(model, ["0.weight", "0.bias"], batches))
    rows = torch.tensor([0.6, 0.4 - 1, 0.8, 0.2 - 1])
    torch.testing.assert_close(scores["0.weight"], rows[:, None].expand(4, 2))
    torch.testing.assert_close(scores["0.bias"], rows)
    layer = MaxoutActivityCriterion(ranking="layer").scores(ctx_for(model, ["0.weight"], batches))
    torch.testing.assert_close(layer["0.weight"][:, 0], torch.tensor([0.6, 0.4, 0.8, 0.2]))
    # The model is left as it was: train mode (scoring ran in eval mode), no hooks.
    assert model.training and not model[0]._forward_hooks and not model[1]._forward_pre_hooks


def test_maxout_conv_counts_every_position_against_a_loop():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 6, 3, padding=1)
    model = nn.Sequential(conv, Maxout(3), nn.Flatten(), nn.LazyLinear(1))
    x = torch.randn(4, 2, 5, 5)
    model(x)  # materialise the lazy layer
    freq, _ = MaxoutActivityCriterion().win_frequencies(ctx_for(model, ["0.weight"], [x[:1], x[1:]]))
    z = conv(x).detach()
    wins = torch.zeros(6)
    for n in range(4):
        for i in range(5):
            for j in range(5):
                for unit in range(2):
                    pieces = [float(z[n, unit * 3 + p, i, j]) for p in range(3)]
                    wins[unit * 3 + pieces.index(max(pieces))] += 1
    torch.testing.assert_close(freq["0.weight"], (wins / 100).double())


def test_maxout_per_unit_ranking_drops_least_active_piece_of_every_unit_first():
    freq = torch.tensor([0.1, 0.6, 0.3, 0.05, 0.05, 0.9], dtype=torch.float64)  # 2 units x 3 pieces
    scores = maxout_scores(freq, 3)
    mask = layerwise_masks({"w": scores}, {"w": 1 / 3})["w"]  # prune 2 of 6: one per unit
    assert mask.tolist() == [False, True, True, False, True, True]  # equal counts: lower index first
    layer_mask = layerwise_masks({"w": maxout_scores(freq, 3, ranking="layer")}, {"w": 0.5})["w"]
    assert layer_mask.tolist() == [False, True, True, False, False, True]  # can take two from one unit
    # Dead pieces are out of the ranks: unit 0 has one alive piece left, which is its most active.
    alive = torch.tensor([False, False, True, True, True, True])
    dead = maxout_scores(freq, 3, alive)
    assert dead[:2].tolist() == [-3.0, -3.0]
    assert dead[2] == pytest.approx(0.3)  # level 0: kept until every other piece is gone
    assert dead[3:].tolist() == pytest.approx([0.05 - 2, 0.05 - 1, 0.9])


def test_maxout_counts_are_all_reduced_across_ranks():
    """Rank 1 sees batch B, rank 0 batch A: with a mean all-reduce both must get the counts of A + B."""
    model, (a, b) = hand_maxout()
    seen: list[torch.Tensor] = []

    def record(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        return t

    crit = MaxoutActivityCriterion(ranking="layer")
    crit.scores(ctx_for(model, ["0.weight"], [b], all_reduce_mean=record))
    other = seen[0]
    ddp = crit.scores(ctx_for(model, ["0.weight"], [a], all_reduce_mean=lambda t: (t + other) / 2))
    single = crit.scores(ctx_for(model, ["0.weight"], [a, b]))
    torch.testing.assert_close(ddp["0.weight"], single["0.weight"])


def test_maxout_refuses_a_layer_not_followed_by_a_maxout():
    model, batches = hand_maxout()
    with pytest.raises(ValueError, match=r"layer '2' is not followed by a maxout.*include: \['0'\]"):
        MaxoutActivityCriterion().scores(ctx_for(model, ["0.weight", "2.weight"], batches))
    plain = nn.Sequential(nn.Linear(2, 4), nn.ReLU())
    with pytest.raises(ValueError, match="has no Maxout module"):
        MaxoutActivityCriterion().scores(ctx_for(plain, ["0.weight"], batches))
    wrong_dim = nn.Sequential(nn.Linear(2, 4), Maxout(2, dim=0))
    with pytest.raises(ValueError, match=r"Maxout\(dim=-1\)"):
        MaxoutActivityCriterion().scores(ctx_for(wrong_dim, ["0.weight"], batches))
    with pytest.raises(ValueError, match="needs data"):
        MaxoutActivityCriterion().scores(ScoringContext(model, {"0.weight": model[0].weight}, {}))
    with pytest.raises(ValueError, match="ranking must be one of"):
        MaxoutActivityCriterion(ranking="unit")


def test_pruning_callback_accepts_maxout_activity_by_name(tmp_path):
    import lightning.pytorch as L

    from lit_compress.data import SyntheticDataModule
    from lit_compress.models.classifier import ImageClassifier
    from lit_compress.pruning.callback import Pruning

    torch.manual_seed(0)
    module = ImageClassifier(
        model="maxout_mlp",
        model_kwargs={"units": [8, 6], "pieces": 2, "img_size": 8},
        optimizer=lambda p: torch.optim.SGD(p, lr=0.0),
    )
    cb = Pruning(sparsity=0.5, criterion="maxout_activity", include=["net.hidden.*"], verbose=False)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, SyntheticDataModule(num_train=64, input_shape=(1, 8, 8)))
    for name, units in (("net.hidden.0.weight", 8), ("net.hidden.1.weight", 6)):
        rows = cb.masks[name].reshape(units * 2, -1)
        assert torch.equal(rows.all(1), rows.any(1))  # whole rows (pieces) kept or dropped
        assert rows.all(1).view(units, 2).sum(1).tolist() == [1] * units  # one piece left per unit


# ------------------------------------------------------------------------------------------ correlation


def numpy_corr(x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """r[j, i] = corrcoef(z[:, j], x[:, i]); 0 for constant columns."""
    r = np.zeros((z.shape[1], x.shape[1]))
    for j in range(z.shape[1]):
        for i in range(x.shape[1]):
            if x[:, i].std() > 0 and z[:, j].std() > 0:
                r[j, i] = np.corrcoef(z[:, j], x[:, i])[0, 1]
    return r


def test_linear_correlations_match_numpy():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(40, 5, dtype=torch.float64)
    x[:, 3] = 2.5  # a constant input (an always-on pixel): r = 0
    model = nn.Sequential(lin, nn.Tanh())
    r = CorrelationCriterion().correlations(ctx_for(model, ["0.weight"], [x[:15], x[15:]]))["0.weight"]
    expected = numpy_corr(x.numpy(), lin(x).detach().numpy())
    np.testing.assert_allclose(r.numpy(), expected, atol=1e-10)
    assert torch.all(r[:, 3] == 0)


@pytest.mark.parametrize(
    "kwargs", [{"padding": 1}, {"padding": 1, "stride": 2, "groups": 2}, {"padding": "same", "dilation": 2}]
)
def test_conv2d_correlations_pool_positions_like_a_loop(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **kwargs).double()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    r = CorrelationCriterion(max_chunk_elements=500).correlations(
        ctx_for(nn.Sequential(conv), ["0.weight"], [x[:2], x[2:]])
    )["0.weight"]
    z = conv(x).detach().numpy()
    pad = conv._reversed_padding_repeated_twice  # (left, right, top, bottom)
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (pad[2], pad[3]), (pad[0], pad[1])))
    s, d, g = conv.stride[0], conv.dilation[0], conv.groups
    cin, cout = 4 // g, 6 // g
    expected = np.zeros(tuple(conv.weight.shape))
    for j in range(6):
        grp = j // cout
        fields, outs = [], []
        for n in range(3):
            for oi in range(z.shape[2]):
                for oj in range(z.shape[3]):
                    win = xp[
                        n,
                        grp * cin : (grp + 1) * cin,
                        oi * s : oi * s + 2 * d + 1 : d,
                        oj * s : oj * s + 2 * d + 1 : d,
                    ]
                    fields.append(win.reshape(-1))
                    outs.append([z[n, j, oi, oj]])
        expected[j] = numpy_corr(np.array(fields), np.array(outs))[0].reshape(cin, 3, 3)
    np.testing.assert_allclose(r.numpy(), expected, atol=1e-10)


def test_correlation_scores_by_hand():
    r = torch.tensor([[0.9, -0.5, 0.2, -0.1]])
    w = torch.tensor([[1.0, -1.0, -1.0, 1.0]])  # consistent, consistent, inconsistent, inconsistent
    assert correlation_scores(r, w).tolist() == [[2.0, 2.0, 0.0, 0.0]]  # each alone in its group
    flat = correlation_scores(r, w, per_neuron=False)
    torch.testing.assert_close(flat, torch.tensor([[2.45, 2.25, 0.1, 0.05]], dtype=torch.float64))
    plain = correlation_scores(r, w, sign_consistent=False, per_neuron=False)
    torch.testing.assert_close(plain, torch.tensor([[0.45, 0.25, 0.1, 0.05]], dtype=torch.float64))
    # Per-neuron quantiles within (row, sign of r, tier): positives 0.3 < 0.6 < 0.9, negatives 0.2 < 0.8.
    r2 = torch.tensor([[0.9, 0.3, 0.6, -0.2, -0.8]])
    w2 = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0]])
    expected = 2 + torch.tensor([[2 / 3, 0.0, 1 / 3, 0.0, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(correlation_scores(r2, w2), expected)
    # Pruned entries leave their groups: with 0.9 pruned, 0.3 and 0.6 rank 0 and 1/2.
    alive = torch.tensor([[False, True, True, True, True]])
    expected = torch.tensor([[0.0, 2.0, 2.5, 2.0, 2.5]], dtype=torch.float64)
    torch.testing.assert_close(correlation_scores(r2, w2, alive), expected)


def test_sign_consistent_connections_are_kept_first():
    torch.manual_seed(1)
    r = torch.rand(6, 10) * 2 - 1
    w = torch.randn(6, 10)
    consistent = torch.sign(w) == torch.sign(r)
    share = 1 - consistent.float().mean().item()
    mask = layerwise_masks({"w": correlation_scores(r, w)}, {"w": share})["w"]
    assert torch.equal(mask, consistent)  # pruning exactly the inconsistent share removes exactly them
    # Without sign consistency a strongly anti-aligned connection survives.
    loose = layerwise_masks({"w": correlation_scores(r, w, sign_consistent=False)}, {"w": share})["w"]
    assert not torch.equal(loose, consistent)


def test_per_neuron_selection_keeps_the_same_share_of_every_neuron():
    r = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.04, 0.03, 0.02, 0.01]])  # neuron 1 weakly correlated
    w = torch.ones(2, 4)
    per_neuron = layerwise_masks({"w": correlation_scores(r, w)}, {"w": 0.5})["w"]
    assert per_neuron.tolist() == [[True, True, False, False], [True, True, False, False]]
    layer = layerwise_masks({"w": correlation_scores(r, w, per_neuron=False)}, {"w": 0.5})["w"]
    assert layer.tolist() == [[True] * 4, [False] * 4]  # one ranking over the layer empties neuron 1


def test_correlation_statistics_are_all_reduced_across_ranks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3).double())
    x = torch.randn(30, 4, dtype=torch.float64)
    seen: list[torch.Tensor] = []
    crit = CorrelationCriterion()
    crit.correlations(ctx_for(model, ["0.weight"], [x[20:]], all_reduce_mean=lambda t: seen.append(t) or t))
    ddp = crit.correlations(
        ctx_for(model, ["0.weight"], [x[:20]], all_reduce_mean=lambda t: (t + seen[0]) / 2)
    )
    single = crit.correlations(ctx_for(model, ["0.weight"], [x]))
    torch.testing.assert_close(ddp["0.weight"], single["0.weight"])


def test_correlation_refuses_bias_conv1d_and_layers_that_do_not_run():
    model = nn.Sequential(nn.Linear(3, 2), nn.Conv1d(1, 1, 1), nn.Linear(2, 2))
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="not a weight"):
        CorrelationCriterion().scores(ctx_for(model, ["0.bias"], [x], loss_fn=lambda b: model[0](b).sum()))
    with pytest.raises(ValueError, match="only Linear and Conv2d"):
        CorrelationCriterion().scores(ctx_for(model, ["1.weight"], [x], loss_fn=lambda b: model[0](b).sum()))
    with pytest.raises(ValueError, match="'2' did not run"):
        CorrelationCriterion().scores(
            ctx_for(model, ["0.weight", "2.weight"], [x], loss_fn=lambda b: model[0](b).sum())
        )
    with pytest.raises(ValueError, match="sign_consistent must be true or false"):
        CorrelationCriterion(sign_consistent="yes")


def test_registered_names_and_scores_shape():
    assert isinstance(get_criterion("correlation"), CorrelationCriterion)
    assert isinstance(get_criterion("maxout_activity", ranking="layer"), MaxoutActivityCriterion)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(16, 4)
    ctx = ctx_for(model, ["0.weight", "2.weight"], [x], loss_fn=lambda b: F.relu(model(b)).sum())
    scores = CorrelationCriterion().scores(ctx)
    assert {k: tuple(v.shape) for k, v in scores.items()} == {"0.weight": (3, 4), "2.weight": (2, 3)}
    assert all(v.dtype == torch.float32 for v in scores.values())
