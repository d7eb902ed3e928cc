"""Scores -> masks, and the per-step mask mechanics."""

import pytest
import torch

from lit_compress.pruning.masks import (
    PreparedMasks,
    _mask_from_order,
    global_masks,
    layerwise_masks,
    mask_optimizer_state,
    sparsity_stats,
)


def test_threshold_selection_equals_a_stable_sort_including_ties_and_inf():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        n = int(torch.randint(1, 200, (1,), generator=g))
        flat = torch.randint(0, 5, (n,), generator=g).float()  # many ties
        flat[torch.rand(n, generator=g) < 0.2] = -torch.inf
        prune = int(torch.randint(0, n + 1, (1,), generator=g))
        expected = torch.ones(n, dtype=torch.bool)
        expected[torch.argsort(flat, stable=True)[:prune]] = False
        assert torch.equal(_mask_from_order(flat, prune, flat.shape), expected)


def test_layerwise_prunes_the_lowest_scores_of_each_tensor():
    scores = {"a": torch.tensor([[4.0, 1.0], [3.0, 2.0]]), "b": torch.arange(10.0)}
    masks = layerwise_masks(scores, {"a": 0.5, "b": 0.3})
    assert masks["a"].tolist() == [[True, False], [True, False]]
    assert masks["b"].tolist() == [False] * 3 + [True] * 7


def test_cumulative_masks_never_revive_a_pruned_weight():
    first = layerwise_masks({"w": torch.tensor([0.1, 5.0, 3.0, 4.0])}, {"w": 0.25})
    # The pruned weight now has the highest score, but stays pruned; one more goes.
    second = layerwise_masks({"w": torch.tensor([9.0, 5.0, 3.0, 4.0])}, {"w": 0.5}, first)
    assert second["w"].tolist() == [False, True, False, True]


def test_nan_scores_are_pruned_first():
    masks = layerwise_masks({"w": torch.tensor([1.0, float("nan"), 2.0, 3.0])}, {"w": 0.25})
    assert masks["w"].tolist() == [True, False, True, True]


def test_global_ranks_across_tensors():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([10.0, 20.0, 0.5])}
    masks = global_masks(scores, 0.5)
    assert masks["a"].tolist() == [False, False, True] and masks["b"].tolist() == [True, True, False]
    stats = sparsity_stats(masks)
    assert stats["global"] == pytest.approx(0.5) and stats["a"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_sparsity_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        layerwise_masks({"w": torch.ones(4)}, {"w": bad})


def test_prepared_masks_zero_weights_as_positive_zero_and_gradients():
    w = torch.nn.Parameter(torch.tensor([-1.0, 2.0, -3.0, 4.0]))
    w.grad = torch.ones(4)
    prepared = PreparedMasks({"w": w}, {"w": torch.tensor([False, True, False, True])})
    prepared.zero_gradients()
    prepared.zero_weights()
    assert w.grad.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert w.detach().tolist() == [0.0, 2.0, 0.0, 4.0]
    assert not torch.signbit(w.detach()[[0, 2]]).any()  # +0.0, not -0.0: bit-level zero for sparse storage


def test_optimizer_state_of_pruned_weights_is_zeroed():
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones(4)
    opt.step()
    mask = torch.tensor([True, False, True, False])
    mask_optimizer_state([opt], {"w": w}, {"w": mask})
    for key in ("exp_avg", "exp_avg_sq"):
        assert opt.state[w][key][~mask].eq(0).all() and opt.state[w][key][mask].ne(0).all()
