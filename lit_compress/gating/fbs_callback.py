"""``FBS``: Feature Boosting and Suppression (Gao et al., ICLR 2019) for any LightningModule's conv layers.

How it plugs in (the mechanism is :mod:`lit_compress.gating.fbs`):

- ``setup`` (before the checkpoint restore, ``configure_optimizers`` and the DDP wrap): the targeted convs
  of the network and the BatchNorms right after them are swapped, in place, for ``FBSConv2d`` /
  ``FBSBatchNorm2d`` around the same Parameter objects, and each gated conv gets a new saliency
  ``predictor`` (a Linear). The predictors live *inside* the module, so the module's optimizer trains them,
  checkpoints save them and DDP syncs them; as a consequence the module's state_dict **gains** the keys
  ``<conv>.predictor.weight`` / ``<conv>.predictor.bias`` (existing keys are unchanged). Keeping them in
  the callback instead would put them outside the optimizer and the DDP wrapper, for no gain.
- ``inject="wrap"`` (default) wraps ``training_step`` (announced once, undone in ``teardown``) so the
  returned loss gains ``l1 * sum_l mean_b ||g_l(x)||_1``; with ``inject="explicit"`` the module calls
  ``lit_compress.compression_loss(self, loss)``.
- ``on_train_batch_start``: the density ``d`` of every gated layer is the schedule's value at the optimizer
  step (``trainer.global_step``), also before validation / test / predict.
- Validation: per-image MACs from the decisions taken (mean +- std over the last validation epoch, reduced
  over DDP ranks) for :meth:`FBS.compression_summary` and the zoo card.
- ``state_dict``: the schedule position (step, density) and the gated layer names (a resumed run with other
  targets is refused); predictors resume with the module's own state. Resume is exact.
- ``teardown`` leaves the gated layers in place (``trainer.test`` after ``fit`` sees the trained FBS net);
  :meth:`FBS.export` returns a copy for the zoo (structure kind ``fbs``).

DDP: the gate ``saliency * mask`` is differentiable wherever it is used, and suppressed channels still take
part in the graph (multiplied by 0), so every parameter gets a gradient each step and the default
``find_unused_parameters=False`` works. The one exception is ``boost=False`` with ``l1=0``: the predictors
then receive no gradient at all, which DDP reports as unused parameters; that configuration is refused under
DDP unless ``find_unused_parameters`` is on. Decisions are per image, so no cross-rank agreement is needed.
"""

from __future__ import annotations

import copy
import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lit_compress._flavour import lightning_callback
from lit_compress._loss_terms import compression_loss, register_loss_term, unregister_loss_term
from lit_compress.gating.fbs import (
    FBSConv2d,
    MacStatistics,
    apply_fbs,
    check_density,
    costly_gates,
    fbs_layers,
    kept_channels,
    plan_fbs,
    saliency_l1,
    set_density,
)
from lit_compress.schedules import Schedule, get_schedule
from lit_compress.targets import TargetSpec, select_parameters

LOSS_KEY = "fbs"
INJECT_MODES = ("wrap", "explicit")
PAPER = (
    "Gao, Zhao, Dudziak, Mullins, Xu. Dynamic Channel Pruning: Feature Boosting and Suppression. ICLR 2019."
)


@lightning_callback
class FBS:
    """Feature Boosting and Suppression: per-image channel gating of conv layers, trained from a dense net.

    Args:
        density: fraction ``d`` in ``(0, 1]`` of each gated conv's output channels computed per image (the
            top ``ceil(d * C)`` saliencies), a number or a :class:`~lit_compress.schedules.Schedule` of the
            optimizer step (e.g. ``Linear`` from 1.0 to the target: annealing from the dense net).
        l1: weight ``lambda >= 0`` of the L1 penalty on the saliencies (the paper uses 1e-8 on ImageNet).
        boost: multiply kept channels by their saliency (True, the paper) or by 1 (ablation / testing).
        include, exclude: module FQN globs in the LightningModule (``"net.features.*"``) selecting the
            ``Conv2d`` layers to gate. Default: every ``Conv2d`` (``groups=1``) of the network whose input is
            a previous layer's output (the first conv, which reads the image, is left out). An explicitly
            included conv that cannot be gated (no predecessor features, grouped) is a ValueError.
        network: FQN of the network inside the LightningModule (``"auto"``: its ``net`` attribute when
            there is one, else the module itself; ``""`` is the module itself). It is traced with torch.fx.
        inject: ``wrap`` (wrap ``training_step``) or ``explicit`` (the module calls
            ``lit_compress.compression_loss(self, loss)``).
        skip_at_eval: in eval mode compute only the kept channels (see :mod:`lit_compress.gating.fbs`); False
            computes every channel and masks (the reference the fast path is tested against).
        seed: seeds the predictors' initialisation (identical on every rank).
        verbose: print the gated layers once (rank zero).
    """

    def __init__(
        self,
        density: float | Schedule = 0.5,
        l1: float = 1e-8,
        boost: bool = True,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        network: str = "auto",
        inject: str = "wrap",
        skip_at_eval: bool = True,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(density, Schedule):
            check_density(density(0), "density (the schedule's value at step 0)")
        else:
            check_density(density)
        if isinstance(l1, bool) or not isinstance(l1, numbers.Real) or not math.isfinite(l1) or l1 < 0:
            raise ValueError(f"l1 must be a number >= 0 (the paper uses 1e-8), got {l1!r}")
        for arg, value in (("boost", boost), ("skip_at_eval", skip_at_eval), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise TypeError(f"{arg} must be true or false, got {value!r}")
        if inject not in INJECT_MODES:
            raise ValueError(f"inject must be one of {INJECT_MODES}, got {inject!r}")
        if not isinstance(network, str):
            raise TypeError(
                f"network must be a module FQN string ('auto', '' or e.g. 'net'), got {network!r}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        for arg, value in (("include", include), ("exclude", exclude)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ValueError(
                    f'{arg} must be a list of FQN globs, got {value!r}; e.g. {arg}: ["net.features.*"]'
                )
        self.density = get_schedule(density)
        self.l1 = float(l1)
        self.boost = boost
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude or [])
        self.network = network
        self.inject = inject
        self.skip_at_eval = skip_at_eval
        self.seed = seed
        self.verbose = verbose
        # State (state_dict): the schedule position; the gated layers' names.
        self.step = 0
        self.current_density = self._density_at(0)
        self.layer_names: list[str] = []
        self.mac_stats: MacStatistics | None = None  # last validation epoch's per-image MACs
        self._module: nn.Module | None = None
        self._layers: dict[str, FBSConv2d] = {}
        self._notified = False
        self._samples: list[Tensor] = []
        self._static_macs: tuple[float, int] | None = None  # (effective of non-FBS layers, dense) per image
        self._cost_checked = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, boost=self.boost)

    # -- Lightning hooks -------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._module = pl_module
        network, prefix = self._network(pl_module)
        layers = fbs_layers(network)
        if not layers:  # first setup of this module (a later stage, e.g. test after fit, reuses the swap)
            targets, strict = self._targets(pl_module, prefix)
            plans = plan_fbs(network, targets, density=self.current_density, boost=self.boost, strict=strict)
            layers = apply_fbs(network, plans, generator=torch.Generator().manual_seed(self.seed))
            for layer in layers.values():
                layer.skip = self.skip_at_eval
            if self.verbose and not self._notified and trainer.is_global_zero:
                gated = ", ".join(
                    f"{prefix}{n} ({kept_channels(self.current_density, m.out_channels)}/{m.out_channels})"
                    for n, m in layers.items()
                )
                print(
                    f"[lit_compress] FBS gates {len(layers)} conv layers: {gated}; saliency predictors are "
                    f"new parameters of the module (state_dict keys <conv>.predictor.weight/bias)"
                )
        if self.layer_names and self.layer_names != list(layers):
            self._refuse_layers(self.layer_names, list(layers))
        self._layers = layers
        self.layer_names = list(layers)
        self._check_ddp(trainer)
        set_density(self._layers.values(), self.current_density)
        if self.l1 > 0:
            register_loss_term(pl_module, LOSS_KEY, self._add_l1)
            if self.inject == "wrap" and "training_step" not in pl_module.__dict__:
                self._wrap_training_step(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        unregister_loss_term(pl_module, LOSS_KEY)
        wrapped = pl_module.__dict__.get("training_step")
        if wrapped is not None and getattr(wrapped, "__lit_compress_fbs__", False):
            del pl_module.training_step
        for layer in self._layers.values():
            layer.fbs_state.reset()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._set_step(trainer.global_step)
        for layer in self._layers.values():
            layer.fbs_state.saliency = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._cost_checked:
            self._cost_checked = True
            self._warn_costly_gates(trainer)
        pending = any(layer.fbs_state.saliency is not None for layer in self._layers.values())
        for layer in self._layers.values():
            layer.fbs_state.saliency = None  # free the step's graph
        if pending and self.l1 > 0 and self.inject == "explicit":
            raise RuntimeError(
                "FBS(inject='explicit'): training_step ran the gated network but never called "
                "lit_compress.compression_loss(self, loss), so the L1 saliency penalty was not applied; "
                "return that value, or use inject='wrap'"
            )

    def on_validation_start(self, trainer, pl_module) -> None:
        self._set_step(trainer.global_step)

    def on_test_start(self, trainer, pl_module) -> None:
        self._set_step(trainer.global_step)

    def on_predict_start(self, trainer, pl_module) -> None:
        self._set_step(trainer.global_step)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._samples = []
        for layer in self._layers.values():
            layer.fbs_state.record = True

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        for layer in self._layers.values():
            layer.fbs_state.sample_macs = None

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        per_layer = [layer.fbs_state.sample_macs for layer in self._layers.values()]
        if not per_layer or any(v is None for v in per_layer):
            return  # the gated layers did not run on this batch
        total = torch.stack(per_layer).sum(dim=0)
        if self._static_macs is None:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if not isinstance(x, Tensor):
                return
            self._static_macs = self._measure_static(x[:1])
        self._samples.append(total + self._static_macs[0])

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        for layer in self._layers.values():
            layer.fbs_state.record = False
        samples = torch.cat(self._samples) if self._samples else torch.zeros(0, dtype=torch.float64)
        self._samples = []
        device = samples.device if samples.numel() else getattr(pl_module, "device", torch.device("cpu"))
        big = torch.finfo(torch.float64).max
        local = torch.tensor(
            [
                samples.numel(),
                float(samples.sum()),
                float((samples**2).sum()),
                float(samples.min()) if samples.numel() else big,
                -float(samples.max()) if samples.numel() else big,
            ],
            dtype=torch.float64,
            device=device,
        )
        gathered = pl_module.all_gather(local) if trainer.world_size > 1 else local
        gathered = gathered.reshape(-1, 5)
        count = float(gathered[:, 0].sum())
        if count == 0 or self._static_macs is None:
            return
        mean = float(gathered[:, 1].sum()) / count
        var = max(float(gathered[:, 2].sum()) / count - mean * mean, 0.0)
        self.mac_stats = MacStatistics(
            mean=mean,
            std=math.sqrt(var),
            min=float(gathered[:, 3].min()),
            max=-float(gathered[:, 4].min()),
            images=int(count),
            dense=self._static_macs[1],
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "step": self.step,
            "density": self.current_density,
            "layers": list(self.layer_names),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = list(state_dict.get("layers", []))
        if self._layers and saved and saved != list(self._layers):
            self._refuse_layers(saved, list(self._layers))
        self.layer_names = saved or self.layer_names
        self._set_step(int(state_dict["step"]))

    # -- export and summary ----------------------------------------------------------------------------

    def export(self, pl_module: nn.Module | None = None) -> nn.Module:
        """A copy of the gated network in eval mode (FBS layers, predictors, the current density).

        Its state_dict holds the original keys plus the predictors'; the zoo stores it with the ``fbs``
        structure spec (:func:`lit_compress.gating.fbs_structure.fbs_structure`).
        """
        module = pl_module if pl_module is not None else self._module
        if module is None:
            raise RuntimeError("FBS.export: the callback has not been set up on a module yet (run fit first)")
        network, _ = self._network(module)
        if not fbs_layers(network):
            raise RuntimeError("FBS.export: the network has no FBS layers; was the callback's setup run?")
        exported = copy.deepcopy(network).eval()
        set_density(exported, self.current_density)
        return exported

    def compression_summary(self) -> dict[str, Any]:
        """What this callback did, for zoo cards: ``methods``, ``description``, ``density``,
        ``macs_per_image`` (mean/std/min/max/images/dense/reduction of the last validation epoch, or None),
        ``gating`` (the same for the card's gating field), and the final ``network`` with its ``structure``
        spec (kind ``fbs``)."""
        d = self.current_density
        stats = self.mac_stats.to_dict() if self.mac_stats is not None else None
        s = self.mac_stats
        macs = (
            f"; {s.mean:,.0f} +- {s.std:,.0f} MACs per image vs {s.dense:,} dense ({s.reduction:.2f}x fewer, "
            f"{s.images} validation images)"
            if s is not None
            else ""
        )
        layers = {
            name: {"kept": kept_channels(d, m.out_channels), "channels": m.out_channels}
            for name, m in self._layers.items()
        }
        summary: dict[str, Any] = {
            "methods": ["fbs"],
            "description": f"FBS (Gao et al. 2019) on {len(layers)} conv layers: top {d:.3g} of the channels "
            f"per image, {'boosted by' if self.boost else 'not scaled by'} their saliencies, L1 {self.l1:g}"
            + macs,
            "density": d,
            "macs_per_image": stats,
            "gating": {
                "method": "fbs",
                "paper": PAPER,
                "density": d,
                "boost": self.boost,
                "l1": self.l1,
                "layers": layers,
                "macs_per_image": stats,
            },
            "network": None,
            "structure": None,
        }
        if self._module is not None and self._layers:
            from lit_compress.gating.fbs_structure import fbs_structure

            network = self.export(self._module)
            summary["network"] = network
            summary["structure"] = fbs_structure(network)
        return summary

    # -- helpers ---------------------------------------------------------------------------------------

    def _density_at(self, step: int) -> float:
        return check_density(float(self.density(step)), f"density (the schedule's value at step {step})")

    def _warn_costly_gates(self, trainer) -> None:
        """Once, after the first training forward: name the gated convs whose predictor costs at least what
        gating them saves at the schedule's final density (they make the network slower, not faster)."""
        final = self._density_at(10**12)
        if final >= 1.0:
            return  # nothing is gated away: no layer can save anything
        costly = costly_gates(self._layers, final)
        if costly and trainer.is_global_zero:
            from lightning.pytorch.utilities import rank_zero_warn

            _, prefix = self._network(self._module)
            listed = ", ".join(
                f"{prefix}{n} (predictor {p:,} vs saved {s:,} MACs)" for n, (p, s) in costly.items()
            )
            rank_zero_warn(
                f"FBS: gating these convs adds work at density {final:g} (their saliency predictor costs at "
                f"least the MACs the gate saves; typically convs on 1x1 maps): {listed}. Exclude them "
                f"(exclude: {sorted(prefix + n for n in costly)}).",
                category=UserWarning,
            )

    def _set_step(self, step: int) -> None:
        self.step = int(step)
        self.current_density = self._density_at(self.step)
        if self._layers:
            set_density(self._layers.values(), self.current_density)

    def _network(self, pl_module: nn.Module) -> tuple[nn.Module, str]:
        name = self.network
        if name == "auto":
            net = getattr(pl_module, "net", None)
            return (net, "net.") if isinstance(net, nn.Module) else (pl_module, "")
        if name == "":
            return pl_module, ""
        try:
            return pl_module.get_submodule(name), f"{name}."
        except AttributeError:
            children = [n for n, _ in pl_module.named_children()]
            raise ValueError(
                f"FBS(network={name!r}): the LightningModule has no submodule {name!r}; its children are "
                f"{children} ('' is the module itself, 'auto' its 'net' attribute)"
            ) from None

    def _targets(self, pl_module: nn.Module, prefix: str) -> tuple[list[str] | None, bool]:
        """Conv FQNs inside the network (None: the default selection) and whether each must be gatable."""
        if self.include is None and not self.exclude:
            return None, False
        spec = TargetSpec(include=self.include or ["*"], exclude=self.exclude, types=("Conv2d",))
        names = [n[: -len(".weight")] for n in select_parameters(pl_module, spec)]
        outside = [n for n in names if not n.startswith(prefix)]
        if outside and self.include is not None:
            raise ValueError(
                f"FBS include selects {outside}, outside the network {prefix[:-1] or '<module>'!r}; FBS "
                f"gates convs of the network only (write globs like '{prefix}features.*')"
            )
        inside = [n[len(prefix) :] for n in names if n.startswith(prefix)]
        if not inside:
            raise ValueError(
                f"FBS include {self.include} / exclude {self.exclude} select no conv of the network"
            )
        return inside, self.include is not None

    def _refuse_layers(self, saved: list[str], current: list[str]) -> None:
        raise ValueError(
            f"this checkpoint gated the layers {saved}, the FBS callback now gates {current}; resume with "
            "the original include/exclude or start a new run"
        )

    def _check_ddp(self, trainer) -> None:
        ddp_kwargs = getattr(getattr(trainer, "strategy", None), "_ddp_kwargs", None)
        if ddp_kwargs is None or self.boost or self.l1 > 0:
            return
        if not ddp_kwargs.get("find_unused_parameters", False):
            raise ValueError(
                "FBS(boost=False, l1=0) under DDP: the saliency predictors get no gradient (the gate is a "
                "0/1 mask and there is no L1 term), which DDP reports as unused parameters. Set l1 > 0 or "
                "boost=True, or use strategy='ddp_find_unused_parameters_true'"
            )

    def _wrap_training_step(self, trainer, pl_module) -> None:
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return _with_loss(original(*args, **kwargs), lambda loss: compression_loss(pl_module, loss))

        training_step.__lit_compress_wrapped__ = original  # type: ignore[attr-defined]
        training_step.__lit_compress_fbs__ = True  # type: ignore[attr-defined]
        pl_module.training_step = training_step
        if self.verbose and trainer.is_global_zero and not self._notified:
            print(
                f"[lit_compress] FBS wraps {type(pl_module).__name__}.training_step: the returned loss gains "
                f"{self.l1:g} * (L1 of the saliencies); undone at teardown"
            )
        self._notified = True

    def _add_l1(self, loss: Tensor) -> Tensor:
        term = saliency_l1(self._layers.values())
        if term is None:
            if torch.is_grad_enabled() and self._module is not None and self._module.training:
                raise RuntimeError(
                    "FBS: training_step returned a loss but no gated layer ran a training forward in it, so "
                    "there are no saliencies to penalise; does training_step call the network "
                    f"({self.network!r})?"
                )
            return loss
        module = self._module
        if module is not None and _logging_step(module):
            module.log("fbs/saliency_l1", term.detach(), on_step=True, on_epoch=False)
            module.log("fbs/density", self.current_density, on_step=True, on_epoch=False)
        return loss + self.l1 * term

    @torch.no_grad()
    def _measure_static(self, x: Tensor) -> tuple[float, int]:
        """Per-image effective MACs of the non-FBS layers and dense MACs of the whole network (one image)."""
        from lit_compress.measure import count_macs

        network, _ = self._network(self._module)
        report = count_macs(network, x)
        static = sum(layer.effective for layer in report.layers if layer.name not in self._layers)
        return float(static), round(report.dense)


def _logging_step(module: nn.Module) -> bool:
    """Whether the loggers write at this step (``self.log`` costs milliseconds: skip it when they won't)."""
    trainer = getattr(module, "_trainer", None)
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def _with_loss(output: Any, transform) -> Any:
    """Apply ``transform`` to the loss in a ``training_step`` output (tensor or dict with ``"loss"``)."""
    if isinstance(output, Tensor):
        return transform(output)
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return {**output, "loss": transform(output["loss"])}
    if output is None:
        return None  # the step was skipped by the module
    raise TypeError(
        f"training_step returned {type(output).__name__}; FBS needs the loss tensor or a dict with a 'loss' "
        "tensor (or use inject='explicit' and lit_compress.compression_loss)"
    )
