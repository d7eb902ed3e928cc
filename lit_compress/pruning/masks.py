"""Scores -> boolean masks, and keeping masked weights at exactly zero.

Masks are ``True`` where a weight is kept. Targets are cumulative: a mask for sparsity 0.9 zeroes 90%
of the targeted weights, and weights pruned earlier stay pruned (their score is forced to -inf).
Ties are broken by a stable sort on the flattened index, so every rank computes identical masks
from identical scores.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


def _num_to_prune(numel: int, sparsity: float) -> int:
    return min(numel, round(sparsity * numel))


def _validate_sparsity(name: str, sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity for {name!r} must be in [0, 1), got {sparsity}")


def _masked_scores(score: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    flat = score.detach().flatten().float().clone()
    flat[torch.isnan(flat)] = -torch.inf  # a NaN score never keeps a weight alive
    if mask is not None:
        flat[~mask.flatten()] = -torch.inf
    return flat


def _mask_from_order(flat_scores: torch.Tensor, prune: int, shape: torch.Size) -> torch.Tensor:
    """Prune the ``prune`` lowest scores; among equal scores at the threshold, the lowest indices first.

    Same result as a stable ascending sort, from a k-th value selection (several times faster).
    """
    mask = torch.ones(flat_scores.numel(), dtype=torch.bool, device=flat_scores.device)
    if prune:
        threshold = torch.kthvalue(flat_scores.cpu(), prune).values.to(flat_scores.device)
        below = flat_scores < threshold
        mask[below] = False
        ties = torch.nonzero(flat_scores == threshold).flatten()
        mask[ties[: prune - int(below.sum())]] = False
    return mask.view(shape)


def layerwise_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: Mapping[str, float],
    current: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One mask per tensor, each pruning ``sparsity[name]`` of that tensor's entries."""
    masks = {}
    for name, score in scores.items():
        _validate_sparsity(name, sparsity[name])
        flat = _masked_scores(score, None if current is None else current.get(name))
        masks[name] = _mask_from_order(flat, _num_to_prune(flat.numel(), sparsity[name]), score.shape)
    return masks


def global_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    current: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Masks from one ranking over all tensors: ``sparsity`` of all their entries together is pruned.

    Scores are compared across layers as they are; criteria whose scales differ per layer (e.g. magnitude
    on layers with very different fan-in) can empty a layer, which is reported by :func:`sparsity_stats`.
    """
    _validate_sparsity("global", sparsity)
    names = list(scores)
    flats = [_masked_scores(scores[n], None if current is None else current.get(n)) for n in names]
    sizes = [f.numel() for f in flats]
    joined = torch.cat(flats)
    mask = _mask_from_order(joined, _num_to_prune(joined.numel(), sparsity), joined.shape)
    return {n: m.view(scores[n].shape) for n, m in zip(names, torch.split(mask, sizes))}


@torch.no_grad()
def apply_masks(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Set the masked entries of each parameter to +0.0 in place.

    ``masked_fill`` rather than multiplying by the mask: ``w * 0`` is ``-0.0`` for negative ``w``, whose bit
    pattern is not zero, which would defeat sparse storage and bit-level checks.
    """
    for name, mask in masks.items():
        params[name].masked_fill_(~mask.to(params[name].device), 0.0)


@torch.no_grad()
def mask_optimizer_state(
    optimizers: Iterable[torch.optim.Optimizer],
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
) -> None:
    """Zero every per-element optimizer state (momentum, Adam moments) of masked weights.

    Without this a momentum buffer filled before pruning keeps pushing a pruned weight away from zero.
    """
    by_id = {id(params[name]): mask for name, mask in masks.items()}
    for optimizer in optimizers:
        for param, state in optimizer.state.items():
            mask = by_id.get(id(param))
            if mask is None:
                continue
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    value.mul_(mask.to(value.device, value.dtype))


def sparsity_stats(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Per-tensor sparsity plus ``"global"`` over all masked entries."""
    stats = {name: 1.0 - mask.float().mean().item() for name, mask in masks.items()}
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    stats["global"] = pruned / total if total else 0.0
    return stats


class PreparedMasks:
    """Masks laid out for the per-step hot path, built once each time the masks change.

    Every optimizer step zeroes the gradients of pruned weights and re-zeroes the weights after the step;
    converting or inverting bool masks there would allocate on every step, so the float keep-masks (for
    gradients) and the inverted bool masks (for weights) are made here, on each parameter's device.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]):
        self._entries = [(params[n], m.to(params[n].device, params[n].dtype)) for n, m in masks.items()]

    @torch.no_grad()
    def zero_gradients(self) -> None:
        for param, keep in self._entries:
            if param.grad is not None:
                param.grad.mul_(keep)

    @torch.no_grad()
    def zero_weights(self) -> None:
        # A multiply by the float mask is ~10x cheaper than masked_fill_; adding +0.0 turns the -0.0 that
        # ``negative * 0`` yields into +0.0 (pruned slots are finite: their gradients are masked).
        for param, keep in self._entries:
            param.mul_(keep).add_(0.0)
