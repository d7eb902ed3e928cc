"""``LowRank`` and ``DepthwiseSeparable``: replace layers of any LightningModule's network during ``fit``.

Both callbacks change the architecture once, at optimizer step ``step`` (default 0: the first training
batch, after ``init_from`` weights and any resumed checkpoint have been loaded), then training fine-tunes the
smaller network. They share the mechanics of :class:`_Replacement`:

- ``setup``: resolve the targeted layers (FQN globs, errors for globs matching nothing and for layers that
  cannot be replaced) so bad input fails before training; arrange for a resumed checkpoint to load.
- ``on_train_batch_start`` at step ``step``: compute each replacement, swap it into the network, point every
  optimizer at the new parameters (they take the replaced layer's place in its param group, with fresh
  optimizer state; see :func:`replace_in_optimizer`), re-wrap DDP.
- ``state_dict``: whether the change happened, its structure spec (plain JSON) and the per-layer record.
- ``export`` / ``compression_summary``: the plain factorized network and its spec for the zoo
  (:class:`~lit_compress.zoo.ZooExport` collects ``network`` and ``structure``).

**Resume.** Lightning restores the module's weights before the callback state, and only after ``setup``, so
``setup`` wraps the LightningModule's ``on_load_checkpoint`` (undone in ``teardown``, as
:class:`~lit_compress.pruning.structured.StructuredPruning` does): it reads this callback's saved spec from
``checkpoint["callbacks"][state_key]`` and rebuilds the factorized layers in the fresh network before the
weights load; optimizers are configured afterwards, on the new parameters.
``trainer.validate/test(ckpt_path=...)`` work the same way; :func:`restore_factorization` does it for a
checkpoint loaded by hand.

Recovering by distillation needs nothing here: put :class:`~lit_compress.distillation.Distillation` (teacher
``zoo:<dense entry>``) on the same Trainer.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lit_compress._flavour import lightning_callback
from lit_compress._strategy import spawns_workers
from lit_compress.factorization.depthwise import (
    PatchMoment,
    check_separable_target,
    depthwise_from_kernel,
    depthwise_ratio,
    fit_depthwise,
)
from lit_compress.factorization.lowrank import (
    CONV_SCHEMES,
    check_factorizable,
    factorize,
    factorized_weight_count,
    max_rank,
    rank_for_budget,
    rank_for_energy,
    singular_values,
)
from lit_compress.factorization.spec import (
    DEPTHWISE_KIND,
    LOWRANK_KIND,
    apply_factorization,
    factorization_spec,
    factorized_modules,
    verify_spec,
)
from lit_compress.measure._util import eval_mode
from lit_compress.pruning.callback import _all_reduce_mean, scoring_batches, scoring_loss_fn
from lit_compress.pruning.structured.callback import _rewrap_ddp
from lit_compress.targets import network_of

__all__ = [
    "DEPTHWISE_INITS",
    "DepthwiseSeparable",
    "LowRank",
    "replace_in_optimizer",
    "restore_factorization",
]

DEPTHWISE_INITS = ("activations", "kernel")


def replace_in_optimizer(optimizer: Any, old: nn.Module, new: nn.Module) -> None:
    """Put ``new``'s parameters where ``old``'s were in ``optimizer``'s param groups, dropping old state.

    The replacement weights take the old weight's position (and group: its weight decay, learning rate),
    the new bias the old bias's; their optimizer state (momentum, Adam moments) starts fresh. Parameters of
    ``old`` the optimizer did not hold (frozen layers) bring none of ``new``'s in. With ``self.parameters()``
    in module order, the group stays in module order, so a resumed run's freshly configured optimizer lines
    up with the saved optimizer state.
    """
    opt = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    weights = [m.weight for m in new if getattr(m, "weight", None) is not None]
    biases = [m.bias for m in new if getattr(m, "bias", None) is not None]
    successors = {id(old.weight): weights}
    if getattr(old, "bias", None) is not None:
        successors[id(old.bias)] = biases
    else:
        weights.extend(biases)
    for group in opt.param_groups:
        params = []
        for p in group["params"]:
            if id(p) in successors:
                opt.state.pop(p, None)
                params.extend(successors[id(p)])
            else:
                params.append(p)
        group["params"] = params


def restore_factorization(net: nn.Module, state_or_spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild the factorized layers of a :class:`LowRank` / :class:`DepthwiseSeparable` state (its
    ``state_dict()``, e.g. ``checkpoint["callbacks"][callback.state_key]``) or spec in a freshly built
    ``net`` (in place), so the checkpoint's weights load into it."""
    spec = state_or_spec.get("spec") if "kind" not in state_or_spec else state_or_spec
    return apply_factorization(net, None if spec is None else dict(spec))


class _Replacement:
    """Shared machinery of the layer-replacing callbacks (see the module docstring)."""

    kind = ""  # structure spec kind
    method = ""  # compression method name on zoo cards
    _types: tuple[type[nn.Module], ...] = ()

    def __init__(
        self,
        include: list[str] | None,
        exclude: list[str] | None,
        step: int,
        model_attr: str | None,
        verbose: bool,
    ) -> None:
        super().__init__()
        for arg, value in (("include", include), ("exclude", exclude)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ValueError(f'{arg} must be a list of glob strings, got {value!r}; e.g. {arg}: ["fc*"]')
        if include is not None and not include:
            raise ValueError("include is empty: nothing would be replaced; use ['*'] for every layer")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(
                f"step must be an optimizer step >= 0 (0 = the first training batch), got {step!r}"
            )
        if model_attr is not None and (not isinstance(model_attr, str) or not model_attr):
            raise ValueError(
                f"model_attr must be an attribute name such as 'net', or null; got {model_attr!r}"
            )
        self.include = None if include is None else list(include)
        self.exclude = list(exclude or [])
        self.step = step
        self.model_attr = model_attr
        self.verbose = verbose
        # State (state_dict).
        self.applied = False
        self.applied_step: int | None = None
        self.spec: dict[str, Any] | None = None  # this callback's own layers (no inner spec)
        self.layers: dict[str, dict[str, Any]] = {}  # per replaced layer: what was done, numbers
        self.skipped: dict[str, str] = {}  # layer -> why it was left as it was
        # Runtime.
        self._module: nn.Module | None = None
        self._net: nn.Module | None = None
        self._patched: tuple[nn.Module, bool, Any] | None = None

    # -- to be provided by the subclasses -------------------------------------------------------------------

    def _default_include(self) -> list[str]:
        return ["*"]

    def _check_targets(self, targets: dict[str, nn.Module]) -> None:
        """Raise for targeted layers that cannot be replaced (called in ``setup``, before training)."""

    def _replacements(self, trainer, pl_module, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """Layer FQN -> its replacement; fills ``self.layers`` and ``self.skipped``."""
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    # -- Lightning hooks ------------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and not self.applied and trainer is not None and spawns_workers(trainer):
            raise ValueError(
                f"{type(self).__name__} changes the network's layers inside the worker processes, but with a "
                "spawning strategy (ddp_spawn, ddp_fork, ddp_notebook) Lightning copies the final weights "
                "back into the main process's module, which keeps its dense layers. Use strategy='ddp' (one "
                "process per device, launched as scripts or by torchrun)."
            )
        self._module = pl_module
        self._net = self._network(pl_module)
        self._patch_on_load_checkpoint(pl_module)
        if stage == "fit" and not self.applied:
            self._check_targets(self._targets(self._net))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._patched is not None:
            module, had_own, original = self._patched
            if had_own:
                module.on_load_checkpoint = original
            else:
                del module.on_load_checkpoint
            self._patched = None

    def on_train_start(self, trainer, pl_module) -> None:
        total = trainer.estimated_stepping_batches
        if not self.applied and isinstance(total, (int, float)) and self.step >= total:
            raise ValueError(
                f"{type(self).__name__}(step={self.step}) acts at optimizer step {self.step}, but the run "
                f"has only {int(total)} steps (max_steps / max_epochs); lower step or train longer"
            )
        if self.applied and self.spec and not self._restored(self._net):
            raise RuntimeError(
                f"{type(self).__name__} restored a state in which layers were replaced, but the network "
                "still has its original layers. Hint: resume through trainer.fit(..., ckpt_path=...) with "
                "this callback on the Trainer, or call lit_compress.factorization.restore_factorization "
                "first."
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.applied or trainer.global_step < self.step:
            return
        self._apply(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "applied_step": self.applied_step,
            "spec": self.spec,
            "layers": {k: dict(v) for k, v in self.layers.items()},
            "skipped": dict(self.skipped),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = bool(state_dict["applied"])
        step = state_dict.get("applied_step")
        self.applied_step = None if step is None else int(step)
        self.spec = state_dict.get("spec")
        self.layers = {k: dict(v) for k, v in (state_dict.get("layers") or {}).items()}
        self.skipped = dict(state_dict.get("skipped") or {})

    # -- export ---------------------------------------------------------------------------------------------

    def export(self, pl_module: nn.Module) -> tuple[nn.Module, dict[str, Any] | None]:
        """A plain copy of the network (eval mode, frozen) and the structure spec that rebuilds it from its
        dense architecture (None when no layer is factorized). Layers of both factorization kinds are
        described (the other kind as ``inner``), so two such callbacks in one run give the same spec."""
        plain = _frozen_copy(self._network(pl_module))
        spec = factorization_spec(plain, self.kind)
        verify_spec(plain, spec)
        return plain, spec

    def compression_summary(self) -> dict[str, Any]:
        """What this callback did, for zoo cards: ``methods``, ``description``, ``structure`` (the spec or
        None), ``network`` (the plain network from :meth:`export`, or None before it has seen a module)."""
        summary: dict[str, Any] = {
            "methods": [self.method],
            "description": self._describe(),
            "structure": None,
            "network": None,
        }
        if self._module is not None:
            summary["network"], summary["structure"] = self.export(self._module)
        return summary

    # -- mechanics ------------------------------------------------------------------------------------------

    @property
    def _prefix(self) -> str:
        return "" if self.model_attr is None else f"{self.model_attr}."

    def _matches(self, name: str, pattern: str) -> bool:
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(self._prefix + name, pattern)

    def _network(self, pl_module: nn.Module) -> nn.Module:
        return network_of(pl_module, self.model_attr, type(self).__name__)

    def _targets(self, net: nn.Module) -> dict[str, nn.Module]:
        """Targeted layers (FQN inside the network -> module): exactly the ``_types``, outside pairs that are
        already factorized. Globs that match nothing are errors listing the candidates."""
        inside = tuple(f"{n}." for n in factorized_modules(net))
        candidates = {
            name: m
            for name, m in net.named_modules()
            if name and type(m) in self._types and not name.startswith(inside)
        }
        include = self.include if self.include is not None else self._default_include()
        kinds = "/".join(t.__name__ for t in self._types)
        for arg, patterns in (("include", include), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(self._matches(n, pattern) for n in candidates):
                    close = difflib.get_close_matches(
                        pattern.removeprefix(self._prefix), list(candidates), 4, 0.3
                    )
                    raise ValueError(
                        f"{type(self).__name__}: {arg} pattern {pattern!r} matches no {kinds} layer. "
                        f"Close names: {close or 'none'}; all candidates: {list(candidates)}"
                    )
        targets = {
            n: m
            for n, m in candidates.items()
            if any(self._matches(n, p) for p in include)
            and not any(self._matches(n, p) for p in self.exclude)
        }
        if not targets:
            raise ValueError(
                f"{type(self).__name__}: include {include} minus exclude {self.exclude} selects nothing"
            )
        return targets

    def _apply(self, trainer, pl_module) -> None:
        net = self._net if self._net is not None else self._network(pl_module)
        targets = self._targets(net)
        self._check_targets(targets)
        self.layers, self.skipped = {}, {}
        replacements = self._replacements(trainer, pl_module, targets)
        for fqn, new in replacements.items():
            old = net.get_submodule(fqn)
            parent, _, child = fqn.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, new)
            for optimizer in trainer.optimizers:
                replace_in_optimizer(optimizer, old, new)
        self.applied, self.applied_step = True, trainer.global_step
        spec = factorization_spec(net, self.kind)
        own = {k: v for k, v in (spec or {}).get("modules", {}).items() if k in replacements}
        self.spec = {**spec, "modules": own, "inner": None} if own and spec else None
        if replacements:
            _rewrap_ddp(trainer)
        self._report(trainer)

    def _report(self, trainer) -> None:
        if not (self.verbose and trainer.is_global_zero):
            return
        print(f"[lit_compress] step {self.applied_step}: {self._describe()}")
        for name, reason in self.skipped.items():
            print(f"[lit_compress]   {name} left as it is: {reason}")

    def _restored(self, net: nn.Module | None) -> bool:
        return net is not None and all(
            n in factorized_modules(net) for n in (self.spec or {}).get("modules", {})
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_module=None, _net=None, _patched=None)  # runtime fields belong to one process
        return state

    # -- resume ---------------------------------------------------------------------------------------------

    def _patch_on_load_checkpoint(self, pl_module: nn.Module) -> None:
        if self._patched is not None:
            return
        had_own = "on_load_checkpoint" in vars(pl_module)
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> Any:
            state = (checkpoint.get("callbacks") or {}).get(self.state_key)
            if state and state.get("applied") and state.get("spec"):
                self._restore_from(state["spec"])
            return original(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint
        self._patched = (pl_module, had_own, original)

    def _restore_from(self, spec: Mapping[str, Any]) -> None:
        net = self._net
        assert net is not None
        present = factorized_modules(net)
        missing = {k: v for k, v in spec["modules"].items() if k not in present}
        if missing:
            apply_factorization(net, {**spec, "modules": missing, "inner": None})


def _frozen_copy(net: nn.Module) -> nn.Module:
    import copy

    plain = copy.deepcopy(net).eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    return plain


def _per_layer(value: Any, name: str, check) -> Any:
    """Validate a scalar or a ``{glob: scalar}`` mapping with ``check(label, value)``."""
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"{name} is an empty mapping; give {{glob: value}} pairs, e.g. {{fc1: ...}}")
        for key, v in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{name} keys must be FQN glob strings, got {key!r}")
            check(f"{name}[{key!r}]", v)
        return dict(value)
    check(name, value)
    return value


def _check_rank(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{label} must be a positive int (the number of singular values kept), got {value!r}"
        )


def _check_energy(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{label} must be a number in (0, 1] (0.9 keeps 90% of sum(s^2)), got {value!r}")


def _check_budget(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(
            f"{label} must be a number in (0, 1) (0.25: the factors keep a quarter of the layer's weights), "
            f"got {value!r}"
        )


@lightning_callback
class LowRank(_Replacement):
    """Factorize ``Linear`` / ``Conv2d`` layers by truncated SVD at step ``step``, then fine-tune.

    Each targeted layer ``W`` (``r x c`` as a matrix, see :mod:`lit_compress.factorization.lowrank`) becomes
    two layers of rank ``K`` with ``K (r + c)`` weights. ``K`` comes from exactly one of:

    Args:
        rank: ``K`` itself, an int or ``{glob: int}`` (first matching glob wins). A rank above
            ``min(r, c)`` is an error naming the layer and the bound.
        energy: keep the smallest ``K`` whose singular values hold this fraction of ``sum(s^2)`` (in
            ``(0, 1]``; a float or ``{glob: float}``), measured on the weights at step ``step``.
        param_budget: the largest ``K`` whose factors fit in this fraction of the layer's weights (in
            ``(0, 1)``; a float or ``{glob: float}``); biases are kept as they are.
        include, exclude: FQN globs of the layers (``nn.Linear`` / ``nn.Conv2d`` exactly), matched with and
            without the ``model_attr`` prefix (``"fc1"`` or ``"net.fc1"``). Default: the keys of a mapping
            given above, else every layer. A glob that matches nothing is an error listing the layers;
            grouped convolutions cannot be factorized (exclude them).
        conv_scheme: ``"channel"`` (``k x k`` conv to ``K`` channels, then ``1 x 1``) or ``"spatial"``
            (``k x 1`` then ``1 x k``, Jaderberg et al. 2014).
        step: optimizer step at which the layers are factorized (0: the first training batch).
        model_attr: attribute of the LightningModule holding the network (``"net"``); None for the module.
        verbose: print what was factorized (rank zero).

    A layer whose ``K`` does not reduce its weights (``K (r + c) >= r c``) is left as it is, with a note in
    :attr:`skipped` and the printed report.
    """

    kind = LOWRANK_KIND
    method = "low_rank_svd"
    _types = (nn.Linear, nn.Conv2d)

    def __init__(
        self,
        rank: int | dict[str, int] | None = None,
        energy: float | dict[str, float] | None = None,
        param_budget: float | dict[str, float] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        conv_scheme: str = "channel",
        step: int = 0,
        model_attr: str | None = "net",
        verbose: bool = True,
    ) -> None:
        given = {
            k: v
            for k, v in (("rank", rank), ("energy", energy), ("param_budget", param_budget))
            if v is not None
        }
        if len(given) != 1:
            raise ValueError(
                "LowRank needs exactly one of rank, energy or param_budget (how the rank of each layer is "
                f"chosen); got {sorted(given) or 'none'}. E.g. energy: 0.9 or rank: {{fc1: 64}}"
            )
        if conv_scheme not in CONV_SCHEMES:
            close = difflib.get_close_matches(str(conv_scheme), CONV_SCHEMES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"conv_scheme must be one of {CONV_SCHEMES}, got {conv_scheme!r}.{hint}")
        super().__init__(include, exclude, step, model_attr, verbose)
        ((self.mode, value),) = given.items()
        check = {"rank": _check_rank, "energy": _check_energy, "param_budget": _check_budget}[self.mode]
        self.value = _per_layer(value, self.mode, check)
        self.conv_scheme = conv_scheme

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            **{self.mode: self.value},
            include=self.include,
            exclude=self.exclude,
            conv_scheme=self.conv_scheme,
            step=self.step,
            model_attr=self.model_attr,
        )

    def _default_include(self) -> list[str]:
        return list(self.value) if isinstance(self.value, dict) else ["*"]

    def _value_for(self, name: str) -> Any:
        if not isinstance(self.value, dict):
            return self.value
        return next(v for pattern, v in self.value.items() if self._matches(name, pattern))

    def _check_targets(self, targets: dict[str, nn.Module]) -> None:
        for name, layer in targets.items():
            check_factorizable(layer, name, self.conv_scheme)
        if isinstance(self.value, dict):
            unmatched = [n for n in targets if not any(self._matches(n, p) for p in self.value)]
            if unmatched:
                raise ValueError(
                    f"LowRank: targeted layers {unmatched} match no key of {self.mode} {self.value}; add a "
                    "glob for them (e.g. '*') or exclude them"
                )
            for pattern in self.value:
                if not any(self._matches(n, pattern) for n in targets):
                    raise ValueError(
                        f"LowRank: {self.mode} key {pattern!r} matches no targeted layer; "
                        f"targeted: {list(targets)}"
                    )
        for name, layer in targets.items():
            if self.mode == "rank":
                rank, bound = self._value_for(name), max_rank(layer, self.conv_scheme)
                if rank > bound:
                    raise ValueError(
                        f"LowRank: rank {rank} for {name} exceeds its maximum rank {bound} (the smaller "
                        f"side of its {self.conv_scheme if isinstance(layer, nn.Conv2d) else 'weight'} "
                        f"matrix); use a rank <= {bound}"
                    )
            elif self.mode == "param_budget":
                rank_for_budget(layer, self._value_for(name), self.conv_scheme, name)

    def _replacements(self, trainer, pl_module, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {}
        scheme = self.conv_scheme
        for name, layer in targets.items():
            values = singular_values(layer, scheme)
            value = self._value_for(name)
            if self.mode == "rank":
                rank = value
            elif self.mode == "energy":
                rank = rank_for_energy(values, value)
            else:
                rank = rank_for_budget(layer, value, scheme, name)
            before = layer.weight.numel()
            after = factorized_weight_count(layer, rank, scheme)
            if after >= before:
                self.skipped[name] = (
                    f"rank {rank} would keep {after:,} weights >= the layer's {before:,} "
                    f"(rank must be below {before / (after / rank):.1f})"
                )
                continue
            out[name] = factorize(layer, rank, scheme, name)
            sq = values**2
            self.layers[name] = {
                "type": type(layer).__name__,
                "rank": rank,
                "max_rank": len(values),
                "energy": float(sq[:rank].sum() / sq.sum()) if float(sq.sum()) > 0 else 1.0,
                "weights_before": before,
                "weights_after": after,
            }
        return out

    def _describe(self) -> str:
        how = {"rank": "rank", "energy": "energy", "param_budget": "parameter budget"}[self.mode]
        text = f"truncated-SVD low-rank factorization ({how} {self.value}, conv scheme {self.conv_scheme})"
        if self.layers:
            parts = [
                f"{n} rank {r['rank']}/{r['max_rank']} ({r['weights_before']:,} -> {r['weights_after']:,} "
                f"weights, {r['energy']:.1%} energy)"
                for n, r in self.layers.items()
            ]
            text += ": " + "; ".join(parts)
        elif self.applied:
            text += ": no layer factorized"
        return text


@lightning_callback
class DepthwiseSeparable(_Replacement):
    """Replace standard ``Conv2d`` layers by depthwise + pointwise pairs at step ``step``, then fine-tune.

    See :mod:`lit_compress.factorization.depthwise` for the pair and its initialisation.

    Args:
        include, exclude: FQN globs of the layers (``nn.Conv2d`` exactly), matched with and without the
            ``model_attr`` prefix; default every ``Conv2d``. Grouped / depthwise convs and 1 x 1 kernels
            cannot be replaced (an error: exclude them).
        multiplier: depthwise filters per input channel (MobileNet: 1), an int or ``{glob: int}``; below
            ``min(out_channels, k^2)``. The weights shrink by ``m / N + m / k^2``; a layer where that is not
            below 1 is left as it is, with a note.
        init: ``"activations"`` (default): kernel SVD, then alternating least squares on the layer's inputs
            from ``data_batches`` training batches (through the module's ``training_step``, in eval mode,
            without gradients); ``"kernel"``: the per-channel kernel SVD only (no data).
        data_batches: training batches whose activations ``init="activations"`` uses.
        iterations: alternating least-squares rounds.
        step: optimizer step at which the layers are replaced (0: the first training batch).
        model_attr: attribute of the LightningModule holding the network (``"net"``); None for the module.
        verbose: print what was replaced (rank zero).

    Recorded per layer (:attr:`layers`): the weight ratio ``m / N + m / k^2`` against the measured parameter
    ratio (biases included), and with ``init="activations"`` the relative output error on the sampled data
    of the kernel SVD and of the final fit.
    """

    kind = DEPTHWISE_KIND
    method = "depthwise_separable"
    _types = (nn.Conv2d,)

    def __init__(
        self,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        multiplier: int | dict[str, int] = 1,
        init: str = "activations",
        data_batches: int = 8,
        iterations: int = 10,
        step: int = 0,
        model_attr: str | None = "net",
        verbose: bool = True,
    ) -> None:
        if init not in DEPTHWISE_INITS:
            close = difflib.get_close_matches(str(init), DEPTHWISE_INITS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"init must be one of {DEPTHWISE_INITS}, got {init!r}.{hint}")
        for label, value in (("data_batches", data_batches), ("iterations", iterations)):
            if (
                isinstance(value, bool)
                or not isinstance(value, int)
                or value < (1 if label == "data_batches" else 0)
            ):
                raise ValueError(
                    f"{label} must be an int >= {1 if label == 'data_batches' else 0}, got {value!r}"
                )
        super().__init__(include, exclude, step, model_attr, verbose)

        def check(label: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"{label} must be a positive int (depthwise filters per input channel), got {value!r}"
                )

        self.multiplier = _per_layer(multiplier, "multiplier", check)
        self.init = init
        self.data_batches = data_batches
        self.iterations = iterations

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            include=self.include,
            exclude=self.exclude,
            multiplier=self.multiplier,
            init=self.init,
            step=self.step,
            model_attr=self.model_attr,
        )

    def _multiplier_for(self, name: str) -> int:
        if not isinstance(self.multiplier, dict):
            return self.multiplier
        found = [v for pattern, v in self.multiplier.items() if self._matches(name, pattern)]
        if not found:
            raise ValueError(
                f"DepthwiseSeparable: layer {name} matches no key of multiplier {self.multiplier}; add a "
                "glob for it (e.g. '*') or exclude it"
            )
        return found[0]

    def _check_targets(self, targets: dict[str, nn.Module]) -> None:
        for name, layer in targets.items():
            check_separable_target(layer, name, self._multiplier_for(name))
        if isinstance(self.multiplier, dict):
            for pattern in self.multiplier:
                if not any(self._matches(n, pattern) for n in targets):
                    raise ValueError(
                        f"DepthwiseSeparable: multiplier key {pattern!r} matches no targeted layer; "
                        f"targeted: {list(targets)}"
                    )

    def _replacements(self, trainer, pl_module, targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
        chosen = {}
        for name, layer in targets.items():
            m = self._multiplier_for(name)
            ratio = depthwise_ratio(layer, m)
            if ratio >= 1.0:
                self.skipped[name] = (
                    f"multiplier {m}: m/N + m/k^2 = {ratio:.3f} >= 1, the pair would not be smaller"
                )
            else:
                chosen[name] = (layer, m)
        moments = self._moments(trainer, pl_module, chosen) if self.init == "activations" and chosen else {}
        out: dict[str, nn.Module] = {}
        for name, (layer, m) in chosen.items():
            record: dict[str, Any] = {"multiplier": m, "ratio_formula": depthwise_ratio(layer, m)}
            if name in moments:
                new, errors = fit_depthwise(layer, moments[name], m, self.iterations, name)
                record.update(error_kernel_svd=errors[0], error_fitted=min(errors))
            else:
                new = depthwise_from_kernel(layer, m, name)
            before = sum(p.numel() for p in layer.parameters())
            after = sum(p.numel() for p in new.parameters())
            record.update(params_before=before, params_after=after, ratio_measured=after / before)
            self.layers[name] = record
            out[name] = new
        return out

    def _moments(self, trainer, pl_module, chosen: dict[str, tuple[nn.Module, int]]) -> dict[str, Tensor]:
        """Patch second moments of every chosen conv's input, from one pass over ``data_batches`` batches."""
        if not pl_module.automatic_optimization:
            raise ValueError(
                "DepthwiseSeparable(init='activations') runs training_step on sampled batches, but this "
                "module uses manual optimization (training_step steps the optimizer itself); use "
                "init='kernel'"
            )
        accumulators = {name: PatchMoment(layer) for name, (layer, _) in chosen.items()}
        handles = [
            layer.register_forward_pre_hook(lambda mod, args, acc=accumulators[name]: acc.add(args[0]))
            for name, (layer, _) in chosen.items()
        ]
        loss = scoring_loss_fn(pl_module)
        try:  # fork_rng: a fresh loader iterator draws from the global RNG; the run's data order is kept
            with torch.random.fork_rng(devices=[]), eval_mode(pl_module), torch.no_grad():
                for batch in scoring_batches(trainer, self.data_batches, "depthwise-separable fit")():
                    loss(batch)
        finally:
            for handle in handles:
                handle.remove()
        reduce = _all_reduce_mean(trainer)
        device = next(pl_module.parameters()).device

        def reduced(t: Tensor) -> Tensor:
            return reduce(t.to(device)).to("cpu", torch.float64)

        return {name: acc.value(reduced) for name, acc in accumulators.items()}

    def _describe(self) -> str:
        text = f"depthwise-separable replacement (multiplier {self.multiplier}, init {self.init})"
        if self.layers:
            parts = []
            for n, r in self.layers.items():
                part = (
                    f"{n}: {r['params_before']:,} -> {r['params_after']:,} params "
                    f"(ratio {r['ratio_measured']:.3f}, m/N + m/k^2 = {r['ratio_formula']:.3f})"
                )
                if "error_fitted" in r:
                    part += (
                        f", output error {r['error_kernel_svd']:.3f} (kernel SVD) -> {r['error_fitted']:.3f}"
                    )
                parts.append(part)
            text += ": " + "; ".join(parts)
        elif self.applied:
            text += ": no layer replaced"
        return text
