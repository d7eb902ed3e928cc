"""Trained weight sharing (Han, Mao & Dally, Deep Compression, ICLR 2016): 1-D k-means and shared gradients.

Pure functions and one small helper class, no Lightning:

- :func:`kmeans_1d` clusters the surviving weights of one layer. In one dimension the nearest centroid of a
  value is decided by the midpoints between sorted centroids, so Lloyd's iterations run on the sorted values
  with ``searchsorted`` and a prefix sum: ``O(k log n)`` per iteration after one ``O(n log n)`` sort
  (300k weights x 256 clusters run 100 iterations in well under a second). It computes in float64 and is
  deterministic on the CPU, where the callback runs it: identical weights give identical clusters on every
  rank.
- :func:`init_centroids`: the paper's three initialisations. ``linear`` (evenly over ``[min, max]``) is the
  one it recommends: it keeps centroids for the rare large weights, which matter most.
- :class:`ClusterLayout` holds one layer's cluster index in the form the per-step hot path needs: replace
  each member's gradient by the sum of its cluster's gradients (the paper's centroid gradient), average
  optimizer state within clusters, and re-snap the weights to one value per cluster. Its per-cluster sums
  (:func:`cluster_sums`) are exact integer sums of fixed-point values, bit-identical on any device in any
  accumulation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INITS = ("linear", "random", "density")
EMPTY = ("relocate", "keep")  # what k-means does with a cluster that lost all its members
MAX_BITS = 8  # indices are stored as uint8


def check_bits(bits: object, name: str = "bits") -> int:
    """``bits`` as an int in ``1..MAX_BITS``, else a ValueError naming the value and the range."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(
            f"{name} must be an int in 1..{MAX_BITS} (2**bits shared values per layer; cluster indices are "
            f"stored as uint8), got {bits!r}"
        )
    return bits


def _flat64(values: torch.Tensor) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    flat = values.detach().flatten().to(torch.float64)
    if flat.numel() == 0:
        raise ValueError("cannot cluster an empty tensor: there are no values to share")
    if not torch.isfinite(flat).all():
        raise ValueError("cannot cluster values containing NaN or inf; the weights diverged")
    return flat


def _check_k(k: object, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (the number of clusters) must be a positive int, got {k!r}")
    if k > n:
        raise ValueError(f"k-means with k={k} clusters needs at least {k} values, got {n}; lower k")
    return k


def init_centroids(values: torch.Tensor, k: int, method: str = "linear", seed: int = 0) -> torch.Tensor:
    """``k`` initial centroids (float64, ascending) for the values, by one of the paper's methods.

    - ``linear``: evenly spaced over ``[min, max]`` (the paper's recommendation: large weights keep their
      own centroids even though few weights are large).
    - ``random`` (Forgy): ``k`` distinct positions of the values drawn with a generator seeded by ``seed``.
    - ``density``: evenly spaced in the empirical CDF, i.e. the ``(i + 0.5) / k`` quantiles: centroids
      crowd around the peak of the weight distribution.
    """
    flat = _flat64(values)
    k = _check_k(k, flat.numel())
    if method == "linear":
        low, high = float(flat.min()), float(flat.max())
        return torch.linspace(low, high, k, dtype=torch.float64, device=flat.device)
    if method == "random":
        generator = torch.Generator().manual_seed(int(seed))
        picks = torch.randperm(flat.numel(), generator=generator)[:k].to(flat.device)
        return torch.sort(flat[picks]).values
    if method == "density":
        ordered = torch.sort(flat).values
        positions = ((torch.arange(k, dtype=torch.float64) + 0.5) * flat.numel() / k).long()
        return ordered[positions.clamp_(max=flat.numel() - 1).to(flat.device)]
    raise ValueError(f"init must be one of {INITS}, got {method!r}")


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index (int64, shape of ``values``) of the nearest centroid of each value.

    A value exactly halfway between two centroids goes to the smaller one (the first in ascending order),
    so the result does not depend on floating-point accident. ``centroids`` may be in any order.
    """
    flat = _flat64(values)
    ordered, perm = torch.sort(centroids.detach().flatten().to(device=flat.device, dtype=torch.float64))
    midpoints = (ordered[1:] + ordered[:-1]) / 2
    return perm[torch.searchsorted(midpoints, flat)].view(values.shape)


@dataclass(frozen=True)
class KMeansResult:
    """Centroids (float64 ``[k]``), labels (int64, one per value), iterations run, whether it converged.

    Each non-empty cluster's centroid is the mean of its members. An empty cluster (fewer distinct values
    than ``k``, or ``empty="keep"`` with linear init, where some intervals of ``[min, max]`` hold no weight)
    keeps the centroid it had in the last assignment; :meth:`compacted` drops those.
    """

    centroids: torch.Tensor
    labels: torch.Tensor
    iterations: int
    converged: bool

    def counts(self) -> torch.Tensor:
        """Members per cluster (int64 ``[k]``)."""
        return torch.bincount(self.labels.flatten(), minlength=self.centroids.numel())

    def compacted(self) -> KMeansResult:
        """The same clustering without empty clusters, centroids ascending, labels renumbered."""
        used = self.counts() > 0
        keep = torch.nonzero(used).flatten()
        centroids, order = torch.sort(self.centroids[keep])
        renumber = torch.full_like(used, -1, dtype=torch.long)
        renumber[keep[order]] = torch.arange(keep.numel(), device=keep.device)
        return KMeansResult(centroids, renumber[self.labels], self.iterations, self.converged)


def kmeans_1d(
    values: torch.Tensor,
    k: int,
    init: str = "linear",
    iters: int = 100,
    seed: int = 0,
    empty: str = "relocate",
) -> KMeansResult:
    """Lloyd's k-means of 1-D ``values`` (any shape, flattened) into ``k`` clusters.

    Iterates assign (nearest centroid) / update (cluster means) until the partition stops changing or
    ``iters`` updates have run; the labels are those of the last assignment and every non-empty centroid
    is the mean of its members. Ties go to the smaller centroid, as in :func:`assign`.

    ``empty`` decides what happens to a cluster that loses all its members. ``keep`` is textbook Lloyd: it
    stays empty. Linear initialisation on a pruned layer (whose surviving weights are bimodal, with a gap
    around zero) then wastes every centroid that starts in the gap: a 5-bit layer pruned to 90% can end up
    with only ~6 shared values. ``relocate`` (default, scikit-learn's rule, which the open-source Deep
    Compression implementations inherit) moves each empty centroid onto one of the distinct values farthest
    from their own cluster's mean, so all ``k`` values are used whenever there are ``k`` distinct values.
    """
    flat = _flat64(values)
    n = flat.numel()
    k = _check_k(k, n)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if empty not in EMPTY:
        raise ValueError(f"empty must be one of {EMPTY}, got {empty!r}")
    ordered, order = torch.sort(flat)
    prefix = torch.cat([ordered.new_zeros(1), torch.cumsum(ordered, 0)])
    first_of_value = torch.ones(n, dtype=torch.bool, device=flat.device)
    first_of_value[1:] = ordered[1:] != ordered[:-1]
    cluster_ids = torch.arange(k, device=flat.device)
    centroids = init_centroids(flat, k, init, seed)
    zero, end = torch.zeros(1, dtype=torch.long, device=flat.device), torch.full_like(order[:1], n)
    bounds, converged, iterations = None, False, 0
    while True:
        # Cluster j holds ordered[bounds[j]:bounds[j + 1]]: the values up to and including midpoint j.
        midpoints = (centroids[1:] + centroids[:-1]) / 2
        new_bounds = torch.cat([zero, torch.searchsorted(ordered, midpoints, right=True), end])
        if bounds is not None and torch.equal(new_bounds, bounds):
            converged = True
            break
        bounds, assigned_with = new_bounds, centroids
        if iterations == iters:
            break
        iterations += 1
        counts = bounds[1:] - bounds[:-1]
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        means = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if empty == "relocate" and bool((counts == 0).any()):
            means = _relocate_empty(ordered, first_of_value, counts, means, cluster_ids)
        # Sorted so that midpoints separate neighbours. Without relocation each new centroid lies inside its
        # own cluster's interval, so the order is already preserved.
        centroids = torch.sort(means).values
    counts = bounds[1:] - bounds[:-1]
    sorted_labels = torch.repeat_interleave(cluster_ids, counts)
    labels = torch.empty_like(sorted_labels)
    labels[order] = sorted_labels
    # Exact means of the final partition (a prefix-sum difference loses a few bits on long sums).
    sums = torch.zeros(k, dtype=torch.float64, device=flat.device).index_add_(0, labels, flat)
    means = torch.where(counts > 0, sums / counts.clamp(min=1), assigned_with)
    return KMeansResult(means, labels.view(values.shape), iterations, converged)


def _relocate_empty(
    ordered: torch.Tensor,
    first_of_value: torch.Tensor,
    counts: torch.Tensor,
    means: torch.Tensor,
    cluster_ids: torch.Tensor,
) -> torch.Tensor:
    """Move empty clusters' centroids onto the distinct values farthest from their cluster's mean."""
    empties = torch.nonzero(counts == 0).flatten()
    distance = (ordered - means[torch.repeat_interleave(cluster_ids, counts)]).abs()
    distance = torch.where(first_of_value, distance, -1.0)  # each distinct value at most once
    far, where = torch.topk(distance, min(empties.numel(), distance.numel()))
    movable = int((far > 0).sum())  # values already at a centroid cannot start a new cluster
    means = means.clone()
    means[empties[:movable]] = ordered[where[:movable]]
    return means


def cluster_sums(
    values: torch.Tensor, index: torch.Tensor, num_clusters: int, exact: bool | None = None
) -> torch.Tensor:
    """Float64 sum of ``values`` per cluster (``index`` int64 in ``[0, num_clusters)``, same numel).

    The result must not depend on the order of accumulation, or DDP ranks drift apart bit by bit. On the
    CPU, ``index_add`` accumulates serially in element order, which is deterministic (``exact=False``, the
    default there). On a GPU, float ``index_add`` / ``scatter_add`` (and float ``cumsum``, ``bincount``)
    accumulate in a racy order, so by default (``exact=True`` off the CPU) the values are scaled by a power
    of two (from their largest magnitude) to 64-bit integers and summed exactly: integer addition is
    associative. Each value is then rounded to ``2**-(62 - log2(n))`` of the largest one, finer than the
    float32 resolution of any sum. Non-finite inputs make every sum NaN.
    """
    flat = values.detach().flatten().to(torch.float64)
    idx = index.flatten().to(device=flat.device, dtype=torch.long)
    if exact is None:
        exact = flat.device.type != "cpu"
    if not exact or flat.numel() == 0:
        return flat.new_zeros(num_clusters).index_add_(0, idx, flat)
    peak = flat.abs().amax()
    _, exponent = torch.frexp(peak)  # peak < 2**exponent
    headroom = 62 - flat.numel().bit_length()  # n values of magnitude < 2**headroom sum below 2**62
    scale = torch.pow(2.0, (headroom - exponent).clamp(max=900).to(torch.float64))
    fixed = torch.round(flat * scale).to(torch.long)
    sums = torch.zeros(num_clusters, dtype=torch.long, device=flat.device).index_add_(0, idx, fixed)
    return sums.to(torch.float64) / scale + peak * 0  # + peak * 0: inf / NaN inputs give NaN sums


class ClusterLayout:
    """One layer's clusters, laid out once for the per-step work of trained weight sharing.

    Args:
        index: cluster of each weight (any integer dtype, the weight's shape); ignored where ``mask`` is
            False.
        mask: True for clustered (surviving) weights, False for pruned ones, which stay exactly zero.
        num_clusters: number of clusters; every cluster must have at least one member.
        device: where the hot path runs (the parameter's device).

    Pruned weights point at an extra cluster ``num_clusters`` whose value and gradient are always zero, so
    every operation is one gather over the whole tensor.
    """

    def __init__(
        self,
        index: torch.Tensor,
        mask: torch.Tensor,
        num_clusters: int,
        device: torch.device | str | None = None,
    ) -> None:
        if index.shape != mask.shape:
            raise ValueError(f"index shape {tuple(index.shape)} differs from mask shape {tuple(mask.shape)}")
        device = torch.device(device) if device is not None else index.device
        self.shape = index.shape
        self.num_clusters = int(num_clusters)
        mask = mask.to(device=device, dtype=torch.bool).flatten()
        full = torch.where(mask, index.to(device=device, dtype=torch.long).flatten(), self.num_clusters)
        if bool(mask.any()) and int(full[mask].max()) >= self.num_clusters:
            raise ValueError(
                f"cluster index {int(full[mask].max())} is out of range for {self.num_clusters} clusters"
            )
        self.index = full  # int64, flattened, pruned -> num_clusters
        counts = torch.bincount(full, minlength=self.num_clusters + 1)[: self.num_clusters]
        if bool((counts == 0).any()):
            raise ValueError(
                f"clusters {torch.nonzero(counts == 0).flatten().tolist()} have no member; compact the "
                "clustering first (KMeansResult.compacted())"
            )
        self.counts = counts.to(torch.float64)
        # First member of every cluster: the weight the cluster's value is read from when re-snapping.
        positions = torch.arange(full.numel(), device=device)
        first = torch.full((self.num_clusters + 1,), full.numel(), dtype=torch.long, device=device)
        first.scatter_reduce_(0, full, positions, reduce="amin")
        self.first_member = first[: self.num_clusters]
        self._keep = mask.to(torch.float64)
        self.exact = device.type != "cpu"  # see cluster_sums

    def _sums(self, flat: torch.Tensor) -> torch.Tensor:
        if self.exact:  # pruned entries zeroed first, so they cannot coarsen the fixed-point scale
            flat = flat.to(torch.float64) * self._keep
        return cluster_sums(flat, self.index, self.num_clusters + 1, self.exact)[: self.num_clusters]

    def _broadcast(self, per_cluster: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        extended = torch.cat([per_cluster.to(like.dtype), like.new_zeros(1)])
        return torch.index_select(extended, 0, self.index).view(like.shape)  # ~9x faster than [index]

    def cluster_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Float64 sum over each cluster's members (pruned entries excluded)."""
        return self._sums(values.flatten())

    def shared_gradient(self, grad: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Each member's gradient replaced by its cluster's ``sum`` (the paper) or ``mean``; pruned: 0."""
        sums = self._sums(grad.flatten())
        if reduce == "mean":
            sums = sums / self.counts
        elif reduce != "sum":
            raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
        return self._broadcast(sums, grad)

    def averaged(self, values: torch.Tensor) -> torch.Tensor:
        """Each member's entry replaced by its cluster's mean; pruned entries 0 (for optimizer state)."""
        return self._broadcast(self._sums(values.flatten()) / self.counts, values)

    def centroids(self, weight: torch.Tensor) -> torch.Tensor:
        """The shared value of each cluster, read from its first member (``[num_clusters]``)."""
        return torch.index_select(weight.detach().flatten(), 0, self.first_member)

    def expand(self, centroids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like ``like`` holding each member's centroid and +0.0 where pruned."""
        return self._broadcast(centroids, like)

    @torch.no_grad()
    def snap(self, weight: torch.Tensor) -> None:
        """In place: every member takes its cluster's value (its first member's), pruned entries +0.0.

        Members receive identical gradients and hold identical optimizer state, so an element-wise
        optimizer keeps them equal; this guards against last-bit differences (vectorised and scalar code
        paths may round differently), so sharing is exact however long the run.
        """
        weight.copy_(self._broadcast(self.centroids(weight), weight))
