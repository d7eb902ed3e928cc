"""``WeightSharing``: Deep Compression's trained quantization injected into any LightningModule.

Han, Mao & Dally (ICLR 2016), section 3: per layer, the surviving (nonzero) weights are clustered by
k-means into ``2**bits`` shared values (linear initialisation over ``[min, max]``), every weight is replaced
by its centroid, then the centroids are fine-tuned: a centroid's gradient is the sum of its members'
gradients, and pruned weights stay exactly zero.

No parameter is added or renamed (the user's state_dict keys never change): the layer's own weight tensor
holds the shared values. The callback wires :mod:`lit_compress.deep_compression.weight_sharing` to hooks:

- ``on_train_batch_start`` at ``start_step``: cluster, write the centroids into the weights and average
  every per-element optimizer state (momentum, Adam moments) within each cluster.
- ``on_before_optimizer_step``: each member's gradient becomes the sum of its cluster's gradients, pruned
  gradients 0. Members then have equal value, gradient and optimizer state, so any element-wise optimizer
  (SGD, momentum, weight decay, Adam) moves them together: the centroid moves by the summed gradient.
- ``on_train_batch_end``: re-snap every member to its cluster's value and pruned weights to +0.0, so
  last-bit rounding differences can never break the sharing.
- ``state_dict``: cluster indices (uint8) and masks keyed by FQN, for an exact resume.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lit_compress._flavour import lightning_callback, registered_implementations
from lit_compress.deep_compression.weight_sharing import (
    EMPTY,
    INITS,
    MAX_BITS,
    ClusterLayout,
    check_bits,
    kmeans_1d,
)
from lit_compress.targets import DEFAULT_TYPES, TargetSpec, select_parameters

# The paper's choice (AlexNet, VGG-16): 8 bits for convolutions, 5 for fully connected layers.
PAPER_BITS = {"Conv1d": 8, "Conv2d": 8, "Conv3d": 8, "Linear": 5}
ON_TOO_FEW = ("error", "reduce")
REDUCTIONS = ("sum", "mean")
# Callbacks whose events zero weights: clustering must come after their last event.
PRUNING_CALLBACKS = ("Pruning", "StructuredPruning")


@lightning_callback
class WeightSharing:
    """Share weights by per-layer k-means and fine-tune the shared values (Deep Compression).

    Args:
        bits: index bits per layer (``2**bits`` shared values, 1..8): one int for every layer, or a dict
            keyed by layer type (class name, subclasses included), e.g. ``{Conv2d: 8, Linear: 5}``.
            ``None``: the paper's 8 bits for convolutions and 5 for linear layers.
        layer_bits: per-layer overrides, module FQN glob -> bits (first matching pattern wins), e.g.
            ``{"net.head": 4}``; like ``Pruning``'s ``layer_sparsity``. A pattern matching no target is
            an error.
        include, exclude, types: which layers' weights are shared (FQN globs of modules and class names);
            see :class:`lit_compress.targets.TargetSpec`. Biases are never shared (as in the paper).
        init: centroid initialisation: ``linear`` (the paper's recommendation), ``random`` (Forgy) or
            ``density`` (evenly spaced in the CDF).
        kmeans_iters: most Lloyd iterations per layer (it stops earlier once the partition is stable).
        empty_clusters: ``relocate`` (default) moves a centroid that lost all its members onto the weight
            farthest from its cluster's mean (scikit-learn's rule), so all ``2**bits`` values are used;
            ``keep`` is textbook Lloyd, where linear initialisation on a pruned layer leaves the centroids
            that start in the pruned gap around zero unused (see
            :func:`~lit_compress.deep_compression.weight_sharing.kmeans_1d`).
        start_step: optimizer step at which the weights are clustered. ``None``: right after the last
            event of every ``Pruning`` / ``StructuredPruning`` callback on the trainer (its
            ``schedule.last_step() + 1``), or 0 without one, so ``[Pruning(...), WeightSharing()]`` prunes,
            retrains and then shares in one fit. An explicit step must come after the last pruning event.
        on_too_few: a layer with fewer surviving weights than ``2**bits``: ``error`` (default; the message
            names the layer and the counts) or ``reduce`` (one cluster per surviving weight, with a
            one-time warning; a fully pruned layer is then left as it is).
        gradient: ``sum`` (the paper: a centroid's gradient is the sum of its members' gradients) or
            ``mean`` (the average, which keeps the step size of plain SGD independent of cluster size).
        seed: seeds the ``random`` initialisation (identical on every rank).
        verbose: print one line when the weights are clustered (rank zero).

    After clustering, :attr:`assignments` (FQN -> uint8 cluster index, the weight's shape; 0 where pruned),
    :attr:`masks` (FQN -> bool, True where a weight is shared, False where pruned) and :meth:`codebooks`
    (FQN -> the current shared values) describe the layers; ``codebooks()[n][assignments[n]] * masks[n]``
    equals the weight.
    """

    def __init__(
        self,
        bits: int | dict[str, int] | None = None,
        layer_bits: dict[str, int] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        types: list[str] | None = None,
        init: str = "linear",
        kmeans_iters: int = 100,
        empty_clusters: str = "relocate",
        start_step: int | None = None,
        on_too_few: str = "error",
        gradient: str = "sum",
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if bits is None:
            bits = dict(PAPER_BITS)
            self._default_bits = True
        else:
            self._default_bits = False
        if isinstance(bits, dict):
            for key, value in bits.items():
                if not isinstance(key, str):
                    raise TypeError(f"bits keys must be layer class names (str), got {key!r}")
                check_bits(value, f"bits[{key!r}]")
        else:
            check_bits(bits)
        if layer_bits is not None and not isinstance(layer_bits, dict):
            raise TypeError(
                f'layer_bits must be a dict of FQN glob -> bits, e.g. {{"net.fc3": 4}}, got {layer_bits!r}'
            )
        for pattern, value in (layer_bits or {}).items():
            check_bits(value, f"layer_bits[{pattern!r}]")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if isinstance(kmeans_iters, bool) or not isinstance(kmeans_iters, int) or kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be a positive int, got {kmeans_iters!r}")
        if empty_clusters not in EMPTY:
            raise ValueError(f"empty_clusters must be one of {EMPTY}, got {empty_clusters!r}")
        if start_step is not None and (
            isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0
        ):
            raise ValueError(
                f"start_step must be an optimizer step (int >= 0) or None (after the last pruning event), "
                f"got {start_step!r}"
            )
        if on_too_few not in ON_TOO_FEW:
            raise ValueError(f"on_too_few must be one of {ON_TOO_FEW}, got {on_too_few!r}")
        if gradient not in REDUCTIONS:
            raise ValueError(f"gradient must be one of {REDUCTIONS}, got {gradient!r}")
        self.bits: int | dict[str, int] = dict(bits) if isinstance(bits, dict) else bits
        self.layer_bits = {str(k): int(v) for k, v in (layer_bits or {}).items()}
        self.targets = TargetSpec(
            include=tuple(include or ("*",)),
            exclude=tuple(exclude or ()),
            types=tuple(types or DEFAULT_TYPES),
            parameter="weight",
        )
        self.init = init
        self.kmeans_iters = kmeans_iters
        self.empty_clusters = empty_clusters
        self.start_step = start_step
        self.on_too_few = on_too_few
        self.gradient = gradient
        self.seed = seed
        self.verbose = verbose
        # State (in state_dict).
        self.clustered = False
        self.cluster_step: int | None = None
        self.assignments: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.num_clusters: dict[str, int] = {}
        self.weight_bits: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        # Runtime only.
        self._params: dict[str, nn.Parameter] = {}
        self._layouts: dict[str, ClusterLayout] = {}
        self._start: int | None = None

    # -- Lightning hooks -------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            include=list(self.targets.include),
            exclude=list(self.targets.exclude),
            types=list(self.targets.types),
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Fail before training on patterns or bits that match nothing.
        self.weight_bits = self._resolve_bits(pl_module, select_parameters(pl_module, self.targets))

    def on_train_start(self, trainer, pl_module) -> None:
        last = _last_pruning_step(trainer)
        if self.start_step is None:
            self._start = 0 if last is None else last + 1
        elif last is not None and self.start_step <= last:
            raise ValueError(
                f"WeightSharing(start_step={self.start_step}) would cluster while pruning is still going on "
                f"(its last event is at optimizer step {last}); a later pruning event would break the "
                f"shared values. Use start_step >= {last + 1}, or start_step: null to follow the pruning "
                "schedule automatically"
            )
        else:
            self._start = self.start_step
        total = trainer.estimated_stepping_batches
        if not self.clustered and math.isfinite(total) and self._start >= total:
            raise ValueError(
                f"weight sharing starts at optimizer step {self._start}, but the run has only {int(total)} "
                "steps (max_steps / max_epochs); train longer so the shared values can be fine-tuned, or "
                "lower start_step"
            )
        if self.clustered:  # restored from a checkpoint: rebuild the hot path, weights are already shared
            self._params = self._current_params(pl_module, check_state=True)
            self._build_layouts()
            self._snap()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Once only: gradient accumulation calls this hook once per micro-batch.
        if not self.clustered and self._start is not None and trainer.global_step >= self._start:
            self._cluster(trainer, pl_module, trainer.global_step)

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for name, layout in self._layouts.items():
            grad = self._params[name].grad
            if grad is not None:
                grad.copy_(layout.shared_gradient(grad, self.gradient))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._snap()

    def state_dict(self) -> dict[str, Any]:
        return {
            "clustered": self.clustered,
            "cluster_step": self.cluster_step,
            "assignments": {k: v.detach().cpu() for k, v in self.assignments.items()},
            "masks": {k: v.detach().cpu() for k, v in self.masks.items()},
            "num_clusters": dict(self.num_clusters),
            "weight_bits": dict(self.weight_bits),
            "history": list(self.history),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clustered = bool(state_dict["clustered"])
        step = state_dict.get("cluster_step")
        self.cluster_step = None if step is None else int(step)
        self.assignments = {k: v.to(torch.uint8) for k, v in state_dict["assignments"].items()}
        self.masks = {k: v.bool() for k, v in state_dict["masks"].items()}
        self.num_clusters = {k: int(v) for k, v in state_dict["num_clusters"].items()}
        self.weight_bits = {k: int(v) for k, v in state_dict.get("weight_bits", {}).items()}
        self.history = list(state_dict.get("history", []))

    # -- public views ------------------------------------------------------------------------------------

    def codebooks(self) -> dict[str, torch.Tensor]:
        """FQN -> the current shared values of the layer (ascending at clustering, then fine-tuned).

        Read from the weights themselves (each cluster's first member), so it is always exactly what the
        model computes with. Empty before the weights are clustered.
        """
        return {
            name: layout.centroids(self._params[name]).detach().cpu().clone()
            for name, layout in self._layouts.items()
        }

    def compression_summary(self) -> dict[str, Any]:
        """What this callback did, for zoo cards (:class:`~lit_compress.zoo.ZooExport` collects it).

        ``bits`` is the widest index of any layer (a zoo card holds one number), ``weight_bits`` the
        index bits per FQN. Before the weights were clustered (the run ended before ``start_step``) the
        summary claims nothing: ``methods`` is empty and ``bits`` absent.
        """
        if not self.clustered:
            return {
                "methods": [],
                "description": f"weight sharing configured ({self._bits_text()}) but not applied: the run "
                "ended before its start step",
                "weight_bits": dict(self.weight_bits),
            }
        counts = ", ".join(f"{_module_name(n)} {self.num_clusters[n]}" for n in self.num_clusters)
        return {
            "methods": ["weight_sharing:kmeans"],
            "description": f"trained weight sharing (Han et al. 2016): {self.init}-initialised k-means of "
            f"the nonzero weights at step {self.cluster_step}, {self._bits_text()}, {self.gradient} of "
            f"member gradients per centroid; shared values per layer: {counts}",
            "bits": max(self.weight_bits.values()),
            "weight_bits": dict(self.weight_bits),
        }

    # -- mechanics --------------------------------------------------------------------------------------

    def bits_for(self, param_name: str, module: nn.Module) -> int:
        """Index bits of one target: its first matching ``layer_bits`` glob, else its type's ``bits``."""
        module_name = _module_name(param_name)
        for pattern, value in self.layer_bits.items():
            if fnmatch.fnmatchcase(module_name, pattern):
                return value
        if isinstance(self.bits, int):
            return self.bits
        for cls in type(module).__mro__:
            if cls.__name__ in self.bits:
                return self.bits[cls.__name__]
        raise ValueError(
            f"layer {module_name!r} ({type(module).__name__}) has no bits: bits has entries for "
            f"{sorted(self.bits)}; add '{type(module).__name__}: <bits>' to bits or a layer_bits pattern "
            "for it"
        )

    def _resolve_bits(self, pl_module: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, int]:
        modules = {name: pl_module.get_submodule(_module_name(name)) for name in params}
        for pattern in self.layer_bits:
            if not any(fnmatch.fnmatchcase(_module_name(n), pattern) for n in params):
                raise ValueError(
                    f"layer_bits pattern {pattern!r} matches no targeted layer; targeted: "
                    f"{[_module_name(n) for n in params]}"
                )
        if isinstance(self.bits, dict) and not self._default_bits:
            seen = {cls.__name__ for m in modules.values() for cls in type(m).__mro__}
            unused = [key for key in self.bits if key not in seen]
            if unused:
                raise ValueError(
                    f"bits keys {unused} name no targeted layer type; targeted types: "
                    f"{sorted({type(m).__name__ for m in modules.values()})} (keys are class names such as "
                    "Conv2d or Linear; use layer_bits for FQN patterns)"
                )
        return {name: self.bits_for(name, modules[name]) for name in params}

    def _current_params(self, pl_module: nn.Module, check_state: bool = False) -> dict[str, nn.Parameter]:
        # Selected again rather than kept from setup: structured pruning may have replaced the parameters.
        params = select_parameters(pl_module, self.targets)
        if check_state:
            if list(params) != list(self.assignments):
                raise ValueError(
                    f"WeightSharing: the checkpoint shared the weights of {list(self.assignments)}, this run "
                    f"targets {list(params)}; use the same include / exclude / types as the run that wrote it"
                )
            for name, param in params.items():
                if tuple(param.shape) != tuple(self.assignments[name].shape):
                    raise ValueError(
                        f"WeightSharing: {name} has shape {tuple(param.shape)} but the checkpoint's clusters "
                        f"have shape {tuple(self.assignments[name].shape)}"
                    )
        return params

    @torch.no_grad()
    def _cluster(self, trainer, pl_module, step: int) -> None:
        self._params = self._current_params(pl_module)
        self.weight_bits = self._resolve_bits(pl_module, self._params)
        assignments, masks, counts, centroids, stats = {}, {}, {}, {}, {}
        reduced = []
        for i, (name, param) in enumerate(self._params.items()):
            flat = param.detach().to("cpu", torch.float64).flatten()
            mask = flat != 0
            survivors = flat[mask]
            k = 2 ** self.weight_bits[name]
            if survivors.numel() < k:
                if self.on_too_few == "error":
                    raise ValueError(
                        f"WeightSharing: layer {_module_name(name)!r} has {survivors.numel()} surviving "
                        f"(nonzero) weights, fewer than the {k} = 2**{self.weight_bits[name]} shared values "
                        f"asked for; lower its bits (layer_bits: {{{_module_name(name)!r}: "
                        f"{max(1, int(survivors.numel()).bit_length() - 1)}}}), exclude it, or set "
                        "on_too_few: reduce"
                    )
                reduced.append(f"{_module_name(name)} ({survivors.numel()} < {k})")
                k = survivors.numel()
            index = torch.zeros(flat.numel(), dtype=torch.uint8)
            if k > 0:
                result = kmeans_1d(
                    survivors, k, self.init, self.kmeans_iters, seed=self.seed + i, empty=self.empty_clusters
                ).compacted()
                index[mask] = result.labels.to(torch.uint8)
                centroids[name] = result.centroids
                shared = result.centroids[result.labels]
                stats[name] = float(torch.sqrt(torch.mean((shared - survivors) ** 2)))
            else:
                centroids[name] = torch.zeros(0, dtype=torch.float64)
                stats[name] = 0.0
            assignments[name] = index.view(param.shape)
            masks[name] = mask.view(param.shape)
            counts[name] = int(centroids[name].numel())
        if reduced:
            rank_zero_warn(
                f"WeightSharing: fewer surviving weights than shared values in {', '.join(reduced)}; each of "
                "their surviving weights keeps its own value (on_too_few='reduce')",
                category=UserWarning,
            )
        self.assignments, self.masks, self.num_clusters = assignments, masks, counts
        self._build_layouts()
        for name, layout in self._layouts.items():
            param = self._params[name]
            param.copy_(layout.expand(centroids[name].to(param.device), param))
        self._average_optimizer_state(trainer)
        self.clustered, self.cluster_step = True, step
        self._report(trainer, step, stats)

    def _build_layouts(self) -> None:
        self._layouts = {
            name: ClusterLayout(self.assignments[name], self.masks[name], self.num_clusters[name], p.device)
            for name, p in self._params.items()
        }

    @torch.no_grad()
    def _average_optimizer_state(self, trainer) -> None:
        """Make momentum buffers and Adam moments equal within each cluster (0 where pruned).

        Only then do members that share a value and a gradient also take identical optimizer steps.
        """
        by_id = {id(self._params[name]): layout for name, layout in self._layouts.items()}
        for optimizer in trainer.optimizers:
            for param, state in optimizer.state.items():
                layout = by_id.get(id(param))
                if layout is None:
                    continue
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value.copy_(layout.averaged(value))

    @torch.no_grad()
    def _snap(self) -> None:
        for name, layout in self._layouts.items():
            layout.snap(self._params[name])

    def _bits_text(self) -> str:
        if isinstance(self.bits, int):
            text = f"{self.bits} bits"
        else:
            text = "bits " + ", ".join(f"{k} {v}" for k, v in self.bits.items())
        return text + (f", overrides {self.layer_bits}" if self.layer_bits else "")

    def _report(self, trainer, step: int, rmse: dict[str, float]) -> None:
        record = {
            "step": step,
            **{f"clusters/{n}": self.num_clusters[n] for n in self.num_clusters},
            **{f"rmse/{n}": v for n, v in rmse.items()},
        }
        self.history.append(record)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({f"weight_sharing/rmse/{k}": v for k, v in rmse.items()}, step=step)
            if self.verbose:
                layers = ", ".join(
                    f"{_module_name(n)} {self.weight_bits[n]}b/{self.num_clusters[n]} values"
                    for n in self.num_clusters
                )
                print(f"[lit_compress] step {step}: weight sharing -> {layers}")


def _last_pruning_step(trainer) -> int | None:
    """The last optimizer step at which any pruning callback on the trainer changes weights, or None."""
    impls = tuple(cls for name, cls in registered_implementations().items() if name in PRUNING_CALLBACKS)
    steps = [
        cb.schedule.last_step()
        for cb in trainer.callbacks
        if isinstance(cb, impls) and hasattr(getattr(cb, "schedule", None), "last_step")
    ]
    return max(steps) if steps else None


def _module_name(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0]


__all__ = ["MAX_BITS", "PAPER_BITS", "WeightSharing"]
