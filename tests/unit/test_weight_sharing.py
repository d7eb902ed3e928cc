"""1-D k-means and the shared-gradient layout of trained weight sharing (Deep Compression)."""

from __future__ import annotations

import pytest
import torch

from lit_compress.deep_compression.weight_sharing import (
    ClusterLayout,
    KMeansResult,
    assign,
    check_bits,
    cluster_sums,
    init_centroids,
    kmeans_1d,
)


def lloyd_reference(values: torch.Tensor, init: torch.Tensor, empty: str, iters: int = 1000):
    """Textbook Lloyd with an explicit distance matrix: argmin assignment, mean update; an empty cluster
    keeps its centroid, or (``relocate``) takes the distinct value farthest from its own cluster's mean."""
    x = values.double().flatten()
    c = init.double().clone()
    labels = None
    for _ in range(iters):
        new = torch.argmin((x[:, None] - c[None, :]).abs(), dim=1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        empties = []
        for j in range(c.numel()):
            members = x[labels == j]
            if members.numel():
                c[j] = members.mean()
            else:
                empties.append(j)
        if empty == "relocate" and empties:
            distance = {}
            for value, label in zip(x.tolist(), labels.tolist()):
                distance[value] = abs(value - c[label].item())
            far = sorted(distance, key=distance.get, reverse=True)[: len(empties)]
            for j, value in zip(empties, far):
                if distance[value] > 0:
                    c[j] = value
    return c, labels


def test_hand_example():
    values = torch.tensor([1.0, -0.9, 0.1, -1.0, 0.2, 0.9])
    result = kmeans_1d(values, 3)
    # linear init [-1, 0, 1] -> clusters {-1, -0.9}, {0.1, 0.2}, {0.9, 1.0}; one update, then stable.
    torch.testing.assert_close(result.centroids, torch.tensor([-0.95, 0.15, 0.95], dtype=torch.float64))
    assert result.labels.tolist() == [2, 0, 1, 0, 1, 2]
    assert result.converged and result.iterations == 1
    assert result.counts().tolist() == [2, 2, 2]


@pytest.mark.parametrize("empty", ["relocate", "keep"])
@pytest.mark.parametrize("init", ["linear", "random", "density"])
@pytest.mark.parametrize("k", [2, 7, 32])
def test_matches_brute_force_lloyd(init, k, empty):
    generator = torch.Generator().manual_seed(k)
    # Heavy-tailed like trained weights: linear init leaves empty clusters in the tails.
    values = torch.randn(1000, generator=generator) ** 3
    start = init_centroids(values, k, init, seed=3)
    ref_centroids, ref_labels = lloyd_reference(values, start, empty)
    result = kmeans_1d(values, k, init=init, iters=1000, seed=3, empty=empty)
    assert result.converged
    torch.testing.assert_close(torch.sort(result.centroids).values, torch.sort(ref_centroids).values)
    # Same partition: every value is replaced by the same centroid.
    torch.testing.assert_close(result.centroids[result.labels], ref_centroids[ref_labels])
    for j in range(k):  # a non-empty centroid is exactly its members' mean
        members = values.double()[result.labels == j]
        if members.numel():
            torch.testing.assert_close(result.centroids[j], members.mean())


def test_relocation_uses_every_centroid_on_a_pruned_layer():
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(5000, generator=generator) * 2 - 1
    survivors = weights[weights.abs() > 0.8]  # magnitude pruning: a gap around zero
    kept = kmeans_1d(survivors, 32, empty="keep")
    relocated = kmeans_1d(survivors, 32, empty="relocate")
    assert int((kept.counts() == 0).sum()) > 20  # linear init: centroids in the gap stay empty
    assert int((relocated.counts() == 0).sum()) == 0

    def error(r):
        return float(((r.centroids[r.labels] - survivors.double()) ** 2).mean())

    assert error(relocated) < error(kept) / 4


def test_linear_init_spans_min_to_max_evenly():
    values = torch.tensor([0.3, -2.0, 0.1, 5.0, 1.0, 2.0, 2.0, 2.0])
    c = init_centroids(values, 8, "linear")
    assert c[0].item() == -2.0 and c[-1].item() == 5.0
    torch.testing.assert_close(c[1:] - c[:-1], torch.full((7,), 1.0, dtype=torch.float64))


def test_density_init_takes_evenly_spaced_quantiles():
    values = torch.arange(100.0).flip(0)
    c = init_centroids(values, 4, "density")
    assert c.tolist() == [12.0, 37.0, 62.0, 87.0]  # the (i + 0.5) / 4 quantiles of 0..99


def test_random_init_draws_distinct_values_reproducibly():
    values = torch.arange(1000.0)
    a = init_centroids(values, 16, "random", seed=1)
    assert torch.equal(a, init_centroids(values, 16, "random", seed=1))
    assert not torch.equal(a, init_centroids(values, 16, "random", seed=2))
    assert a.unique().numel() == 16 and torch.all(a == a.round()) and torch.all(a[1:] > a[:-1])


def test_assign_nearest_with_ties_to_the_smaller_centroid():
    centroids = torch.tensor([1.0, -1.0, 0.0])  # any order
    values = torch.tensor([[-0.7, -0.5, 0.2], [0.5, 0.51, 3.0]])
    # -0.5 is halfway between -1 and 0 -> -1 (index 1); 0.5 between 0 and 1 -> 0 (index 2).
    assert assign(values, centroids).tolist() == [[1, 1, 2], [2, 0, 0]]


def test_duplicate_values_and_compaction():
    values = torch.tensor([0.5, 0.5, -0.25, 0.5, 2.0, -0.25, 0.5, 0.5])
    result = kmeans_1d(values, 8)
    assert (result.counts() == 0).sum() == 5  # linear init over [-0.25, 2]: 5 empty intervals
    compact = result.compacted()
    assert compact.centroids.tolist() == [-0.25, 0.5, 2.0]
    assert compact.labels.tolist() == [1, 1, 0, 1, 2, 0, 1, 1]
    assert torch.equal(compact.centroids[compact.labels], result.centroids[result.labels])


def test_stops_at_iters_with_members_at_their_cluster_mean():
    values = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    result = kmeans_1d(values, 64, iters=2)
    assert result.iterations == 2 and not result.converged
    sums = torch.zeros(64, dtype=torch.float64).index_add_(0, result.labels, values.double())
    counts = result.counts()
    used = counts > 0
    torch.testing.assert_close(result.centroids[used], sums[used] / counts[used])


def test_300k_weights_256_clusters():
    # Sizes of a real layer (speed is measured by benchmarks/deep_compression.py, not asserted here).
    values = torch.randn(300_000, generator=torch.Generator().manual_seed(0)) * 0.05
    result = kmeans_1d(values, 256, iters=100)
    assert result.labels.shape == (300_000,) and int(result.labels.max()) < 256
    assert int(result.counts().gt(0).sum()) == 256


def test_deterministic():
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(5))
    a, b = kmeans_1d(values, 32, "random", seed=9), kmeans_1d(values.clone(), 32, "random", seed=9)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: kmeans_1d(torch.ones(3), 4), ValueError, "needs at least 4 values, got 3"),
        (lambda: kmeans_1d(torch.ones(0), 1), ValueError, "empty tensor"),
        (lambda: kmeans_1d(torch.tensor([1.0, float("nan")]), 1), ValueError, "NaN"),
        (lambda: kmeans_1d(torch.ones(3), 2, init="kmeans++"), ValueError, "init must be one of"),
        (lambda: kmeans_1d(torch.ones(3), 2, iters=0), ValueError, "iters must be a positive int"),
        (lambda: kmeans_1d(torch.ones(3), 2, empty="drop"), ValueError, "empty must be one of"),
        (lambda: kmeans_1d([1.0, 2.0], 1), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("bits", [0, 9, True, 2.0, "8"])
def test_check_bits_rejects(bits):
    with pytest.raises(ValueError, match=r"bits must be an int in 1\.\.8.*got"):
        check_bits(bits)


def test_check_bits_accepts_range():
    assert [check_bits(b) for b in range(1, 9)] == list(range(1, 9))


# -- ClusterLayout -------------------------------------------------------------------------------------


def small_layout():
    index = torch.tensor([[0, 1, 0], [2, 1, 0]], dtype=torch.uint8)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return ClusterLayout(index, mask, 3), index, mask


def test_shared_gradient_is_the_sum_of_member_gradients():
    layout, _, _ = small_layout()
    grad = torch.tensor([[1.0, 2.0, 100.0], [4.0, 8.0, 16.0]])
    # cluster 0: positions (0,0), (1,2) -> 1 + 16; cluster 1: (0,1), (1,1) -> 2 + 8; cluster 2: 4; pruned 0.
    expected = torch.tensor([[17.0, 10.0, 0.0], [4.0, 10.0, 17.0]])
    assert torch.equal(layout.shared_gradient(grad), expected)
    mean = torch.tensor([[8.5, 5.0, 0.0], [4.0, 5.0, 8.5]])
    assert torch.equal(layout.shared_gradient(grad, "mean"), mean)
    assert torch.equal(layout.averaged(grad), mean)
    assert layout.cluster_sums(grad).tolist() == [17.0, 10.0, 4.0]


@pytest.mark.parametrize("exact", [False, True])
def test_cluster_sums_against_a_loop(exact):
    generator = torch.Generator().manual_seed(0)
    # Magnitudes over ten decades, as gradients have.
    values = torch.randn(1000, generator=generator) * 10.0 ** torch.randint(
        -8, 2, (1000,), generator=generator
    )
    index = torch.randint(0, 7, (1000,), generator=generator)
    expected = torch.stack([values[index == j].double().sum() for j in range(7)])
    torch.testing.assert_close(cluster_sums(values, index, 7, exact), expected, rtol=1e-12, atol=1e-14)


def test_cluster_sums_do_not_depend_on_accumulation_order():
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(5000, generator=generator) * torch.rand(5000, generator=generator) ** 8
    index = torch.randint(0, 5, (5000,), generator=generator)
    perm = torch.randperm(5000, generator=generator)
    exact = cluster_sums(values, index, 5, exact=True)
    assert torch.equal(exact, cluster_sums(values[perm], index[perm], 5, exact=True))
    float_sums = torch.zeros(5, dtype=torch.float64)
    assert not torch.equal(  # plain float accumulation does depend on the order
        float_sums.index_add(0, index, values.double()),
        float_sums.index_add(0, index[perm], values[perm].double()),
    )


def test_exact_cluster_sums_edge_cases():
    def sums(values, index, k):
        return cluster_sums(torch.tensor(values), torch.tensor(index, dtype=torch.long), k, exact=True)

    assert sums([0.0, 0.0, 0.0, 0.0], [0, 1, 1, 0], 3).tolist() == [0.0, 0.0, 0.0]
    assert sums([], [], 2).tolist() == [0.0, 0.0]
    assert sums([1.0, 2.0**-140], [0, 1], 2).tolist() == [1.0, 0.0]  # below 2**-60 of the largest: 0
    assert sums([3e-40, 1e-40], [0, 0], 1).item() == pytest.approx(4e-40)  # tiny but alone: kept
    assert sums([1.0, float("inf")], [0, 1], 2).isnan().all()
    assert sums([1.0, 2.0, 4.0], [1, 1, 0], 2).tolist() == [4.0, 3.0]


@pytest.mark.parametrize("exact", [False, True])
def test_layout_sums_both_ways(exact):
    generator = torch.Generator().manual_seed(2)
    index = torch.randint(0, 9, (40, 30), generator=generator)
    mask = torch.rand(40, 30, generator=generator) > 0.5
    grad = torch.randn(40, 30, generator=generator)
    grad[~mask] = 1e6  # huge pruned gradients change nothing
    layout = ClusterLayout(index, mask, 9)
    layout.exact = exact
    expected = torch.zeros(40, 30)
    for j in range(9):
        members = mask & (index == j)
        expected[members] = grad[members].double().sum().float()
    torch.testing.assert_close(layout.shared_gradient(grad), expected, rtol=1e-6, atol=1e-6)


def test_snap_and_centroids():
    layout, _, _ = small_layout()
    weight = torch.tensor([[0.5, -1.0, 3.0], [2.0, -1.0000001, 0.5000001]])
    assert layout.centroids(weight).tolist() == [0.5, -1.0, 2.0]
    layout.snap(weight)
    assert weight.tolist() == [[0.5, -1.0, 0.0], [2.0, -1.0, 0.5]]
    assert layout.expand(torch.tensor([7.0, 8.0, 9.0]), weight).tolist() == [[7, 8, 0], [9, 8, 7]]


def test_layout_rejects_empty_clusters_and_bad_shapes():
    with pytest.raises(ValueError, match=r"clusters \[3\] have no member"):
        ClusterLayout(torch.tensor([0, 1, 2]), torch.ones(3, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="out of range"):
        ClusterLayout(torch.tensor([0, 5]), torch.ones(2, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="differs from mask shape"):
        ClusterLayout(torch.zeros(2, 2), torch.ones(4, dtype=torch.bool), 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.Adam([p], lr=0.01),
        lambda p: torch.optim.SGD([p], lr=0.01, momentum=0.9, weight_decay=1e-2),
    ],
)
def test_averaged_optimizer_state_keeps_members_together(make):
    """Equal value + summed gradient + averaged state: an element-wise optimizer moves a cluster as one."""

    def run(average_state: bool) -> float:
        generator = torch.Generator().manual_seed(0)
        param = torch.nn.Parameter(torch.randn(64, 33, generator=generator))
        optimizer = make(param)
        for _ in range(3):  # optimizer state built up before clustering, different for every weight
            param.grad = torch.randn(param.shape, generator=generator)
            optimizer.step()
        result = kmeans_1d(param.detach(), 8).compacted()
        layout = ClusterLayout(result.labels, param.detach() != 0, result.centroids.numel())
        with torch.no_grad():
            param.copy_(layout.expand(result.centroids, param))
            if average_state:
                for value in optimizer.state[param].values():
                    if value.shape == param.shape:
                        value.copy_(layout.averaged(value))
        for _ in range(20):
            param.grad = layout.shared_gradient(torch.randn(param.shape, generator=generator))
            optimizer.step()
        shared = layout.expand(layout.centroids(param), param)
        return float((param.detach() - shared).abs().max())

    assert run(average_state=True) < 1e-6
    assert run(average_state=False) > 1e-3  # without it the members drift apart


def test_kmeans_result_counts():
    result = KMeansResult(torch.zeros(3), torch.tensor([0, 2, 2]), 1, True)
    assert result.counts().tolist() == [1, 0, 2]
