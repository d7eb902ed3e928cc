"""``BlockDrop``: per-input residual-block skipping (Wu et al., CVPR 2018) for any LightningModule.

What it does to a run (the mechanism lives in :mod:`lit_compress.gating.blockdrop`):

- ``setup`` finds the residual blocks of ``pl_module.<model_attr>`` (default ``net``), swaps their class for a
  gated subclass (same parameters and state_dict keys), builds the policy network (seeded, identical on every
  rank) and its Adam optimizer, puts a forward pre-hook on the network that asks the policy for decisions,
  and (for ``fit``) wraps ``training_step``. ``teardown`` undoes all of it; ``trainer.test`` after ``fit``
  sets it up again with the trained policy.
- **Who owns the policy's optimizer: the callback.** The policy is not a submodule of the LightningModule,
  so the module's ``configure_optimizers``, checkpoint keys and DDP wrapper stay exactly as the user wrote
  them; the policy, its optimizer state and the curriculum stage live in this callback's ``state_dict``.
  Lightning still runs the one backward per step (the policy-gradient term is part of the returned loss);
  the callback all-reduces the policy gradients across ranks and steps its optimizer in
  ``on_before_optimizer_step``, i.e. exactly when the module's optimizer steps (gradient accumulation and
  AMP loss scaling are honoured). The backbone stays with the module's optimizer, frozen while the policy
  learns alone, as in the paper.
- **Stages (by epoch, like the paper's scripts).** Epochs ``0 .. curriculum_epochs - 1``: the backbone is
  frozen (eval mode, no gradient) and the policy learns the last ``c(e)`` blocks, the others kept on
  (:func:`~lit_compress.gating.blockdrop.learned_blocks`). ``training_step`` is then replaced by the policy
  step: sampled and greedy forwards of the frozen backbone, reward, REINFORCE loss (the user's own
  ``training_step`` does not run: there is nothing to train in the backbone). Later epochs: with
  ``finetune=True`` the joint stage: the user's ``training_step`` runs on the network with *sampled*
  decisions (so the backbone learns to work with dropped blocks, as the official ``finetune.py``) and the
  policy-gradient term is added to its loss; with ``finetune=False`` the policy keeps learning all blocks
  alone. Optionally (``freeze_policy_at``, not in the paper) a last **backbone** stage freezes the policy and
  trains the backbone alone under the policy's deterministic decisions, the ones inference takes, so the
  backbone adapts to the exact paths it will run; ``frozen_threshold`` moves the keep threshold for that
  stage and for inference (folded into the policy's output bias, so an exported network needs nothing new).
  Stages follow ``trainer.current_epoch``, which Lightning restores on resume.
- **Evaluation.** Decisions are thresholded at 0.5 (deterministic); in eval mode without autograd the dropped
  blocks are never computed (batch 1: skipped; batches: grouped per block). Validation and test record the
  decisions: blocks used (mean, std), block usage, histogram, distinct policies and per-image MACs (mean,
  std, policy included), logged as ``blockdrop/val_*`` and kept in ``statistics``.
- **DDP.** Training forwards use soft gating (every block runs, ``torch.where`` picks block or shortcut per
  sample), so every backbone parameter is used and plain DDP works. ``train_skip=True`` skips work in
  training too and then needs ``strategy="ddp_find_unused_parameters_true"`` (checked in ``setup``).
- **Resume.** ``state_dict`` holds the policy weights, the Adam state, the stage and the seed. Sampling uses
  a generator re-seeded from ``(seed, epoch, batch index, rank)`` at every step, so a resumed run draws the
  same decisions as an uninterrupted one without storing generator state.
- **Export.** :meth:`BlockDrop.export` returns a :class:`~lit_compress.gating.blockdrop.BlockDropNetwork`
  (gated backbone + policy, deterministic decisions, safetensors-friendly state_dict);
  :meth:`compression_summary` hands it to ``ZooExport`` with its ``blockdrop`` structure spec and the gating
  statistics.

Batches are ``(x, y)`` by default (``input_key`` / ``target_key`` select other positions or dict keys); the
network returns logits.
"""

from __future__ import annotations

import copy
import functools
import math
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lit_compress._flavour import lightning_callback
from lit_compress._loss_terms import compression_loss, register_loss_term, unregister_loss_term
from lit_compress.gating.blockdrop import (
    POLICY_ARCHS,
    BlockDropNetwork,
    GateState,
    PolicyNet,
    always_on_mask,
    block_costs,
    blockdrop_reward,
    bound_probs,
    find_blocks,
    gate_blocks,
    greedy_decisions,
    learned_blocks,
    reinforce_loss,
    summarize_decisions,
    ungate_blocks,
)

STATE_VERSION = 1
_HOOK_ATTRS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@dataclass
class _Capture:
    """The sampled forward of one joint-stage training step."""

    x: Tensor
    probs: Tensor
    sample: Tensor
    always_on: Tensor
    logits: Tensor | None = None
    consumed: bool = False


@lightning_callback
class BlockDrop:
    """Learn a policy that skips residual blocks per input (BlockDrop), then fine-tune backbone and policy.

    Args:
        include, exclude: FQN globs of the blocks to gate, relative to the network (e.g. ``["layer3.*"]``).
        types: block class names to gate (default ``BasicBlock`` and ``Bottleneck`` with a known shortcut:
            lit_compress CIFAR ResNets, torchvision and timm ResNets).
        model_attr: attribute of the LightningModule holding the network (``""``: the module itself).
        policy: ``resnet8`` (the paper's CIFAR policy) or ``cnn`` (2 strided convs, far cheaper).
        policy_width: channels of the policy's first layer.
        policy_downsample: average-pool factor applied to the policy's input (1 = full resolution).
        curriculum_epochs: epochs of curriculum learning with a frozen backbone (default: one per gated
            block, the paper's pace); 0 skips the curriculum.
        finetune: after the curriculum, train backbone (the module's optimizer) and policy jointly.
        freeze_policy_at: first epoch of the backbone stage (policy frozen, backbone trained under the
            policy's deterministic decisions); ``None``: no such stage. Must not precede the curriculum's end.
        init_policy_from: start the policy from a trained BlockDrop zoo entry's policy (``"zoo:<entry>"``,
            hash-checked; same gated blocks and policy configuration), e.g. to add a backbone stage to a
            finished run with a fresh learning-rate schedule (the backbone comes from the module's own
            ``init_from``); a resumed checkpoint's policy takes precedence.
        frozen_threshold: keep threshold from the backbone stage on, in (0, 1): a block is kept when its
            probability is at least this (the paper's 0.5 keeps more blocks than a higher value). Folded
            into the policy's output bias at the stage's start, once (resume-safe).
        gamma: penalty of a wrong prediction (reward ``-gamma``), >= 0.
        alpha: exploration bound of the sampling probabilities, in (0.5, 1] (official code: 0.8).
        entropy_weight: entropy bonus weight (official curriculum: 0.1).
        policy_lr, joint_policy_lr: Adam learning rates of the policy while it learns alone / jointly
            (official: 1e-3 and 1e-4).
        policy_weight_decay: Adam weight decay of the policy.
        input_key, target_key: where the input and the labels are in a batch (index or dict key).
        train_skip: skip dropped blocks in training forwards too (faster; under DDP it needs
            ``strategy="ddp_find_unused_parameters_true"``, and batch norm then sees only the kept samples).
        seed: seeds the policy initialisation and the sampling (identical on every rank).
        verbose: print one-line notices (rank zero).
    """

    def __init__(
        self,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        types: list[str] | None = None,
        model_attr: str = "net",
        policy: str = "resnet8",
        policy_width: int = 16,
        policy_downsample: int = 1,
        curriculum_epochs: int | None = None,
        finetune: bool = True,
        freeze_policy_at: int | None = None,
        frozen_threshold: float = 0.5,
        init_policy_from: str | None = None,
        gamma: float = 5.0,
        alpha: float = 0.8,
        entropy_weight: float = 0.1,
        policy_lr: float = 1e-3,
        joint_policy_lr: float = 1e-4,
        policy_weight_decay: float = 0.0,
        input_key: int | str = 0,
        target_key: int | str = 1,
        train_skip: bool = False,
        seed: int = 0,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if policy not in POLICY_ARCHS:
            raise ValueError(f"policy must be one of {POLICY_ARCHS}, got {policy!r}")
        _check_int("policy_width", policy_width, 1)
        _check_int("policy_downsample", policy_downsample, 1)
        if curriculum_epochs is not None:
            _check_int("curriculum_epochs", curriculum_epochs, 0)
        if freeze_policy_at is not None:
            _check_int("freeze_policy_at", freeze_policy_at, 0)
        _check_number("frozen_threshold", frozen_threshold, low=0.0, high=1.0, low_inclusive=False)
        if frozen_threshold == 1.0:
            raise ValueError("frozen_threshold must be below 1 (a threshold of 1 drops every block), got 1.0")
        if frozen_threshold != 0.5 and freeze_policy_at is None:
            raise ValueError(
                f"frozen_threshold={frozen_threshold:g} applies from the backbone stage on, but "
                "freeze_policy_at is not set; set freeze_policy_at to the epoch that stage starts"
            )
        if init_policy_from is not None and not (
            isinstance(init_policy_from, str) and init_policy_from.startswith("zoo:")
        ):
            raise ValueError(
                f"init_policy_from must name a BlockDrop zoo entry as 'zoo:<entry name>', got "
                f"{init_policy_from!r}; e.g. init_policy_from: zoo:resnet32-fashion-mnist.blockdrop"
            )
        _check_number("gamma", gamma, low=0.0)
        _check_number("alpha", alpha, low=0.5, high=1.0, low_inclusive=False)
        _check_number("entropy_weight", entropy_weight, low=0.0)
        _check_number("policy_lr", policy_lr, low=0.0, low_inclusive=False)
        _check_number("joint_policy_lr", joint_policy_lr, low=0.0, low_inclusive=False)
        _check_number("policy_weight_decay", policy_weight_decay, low=0.0)
        for name, value in (("finetune", finetune), ("train_skip", train_skip), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be true or false, got {value!r}")
        for name, value in (("input_key", input_key), ("target_key", target_key)):
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise TypeError(f"{name} must be a batch index (int) or a dict key (str), got {value!r}")
        if not isinstance(model_attr, str):
            raise TypeError(f"model_attr must be an attribute name (str), got {model_attr!r}")
        _check_int("seed", seed, 0)
        for name, value in (("include", include), ("exclude", exclude), ("types", types)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ValueError(
                    f'{name} must be a list of strings, got {value!r}; e.g. {name}: ["layer3.*"]'
                )
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude or [])
        self.types = list(types) if types is not None else None
        self.model_attr = model_attr
        self.policy_arch, self.policy_width, self.policy_downsample = policy, policy_width, policy_downsample
        self.curriculum_epochs_arg = curriculum_epochs
        self.finetune = finetune
        self.freeze_policy_at = freeze_policy_at
        self.frozen_threshold = float(frozen_threshold)
        self.init_policy_from = init_policy_from
        self.gamma, self.alpha, self.entropy_weight = float(gamma), float(alpha), float(entropy_weight)
        self.policy_lr, self.joint_policy_lr = float(policy_lr), float(joint_policy_lr)
        self.policy_weight_decay = float(policy_weight_decay)
        self.input_key, self.target_key = input_key, target_key
        self.train_skip = train_skip
        self.seed = seed
        self.verbose = verbose
        # Built in setup (they depend on the network) and kept across fit -> test.
        self.blocks: list[str] = []
        self.policy: PolicyNet | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.statistics: dict[str, dict[str, Any]] = {}
        self.learned: int | None = None  # blocks the policy decides in the current / last trained epoch
        self.epoch = 0
        self.policy_steps = 0
        self.threshold_folded = False  # frozen_threshold is in the policy's output bias
        self._state: GateState | None = None
        self._pending: dict[str, Any] | None = None
        self._module: nn.Module | None = None
        self._trainer: Any = None
        self._handles: list[Any] = []
        self._batch_idx = 0
        self._batch: Any = None
        self._in_step = False
        self._capture: _Capture | None = None
        self._capturing = False
        self._saved_modes: list[tuple[nn.Module, bool]] | None = None
        self._recording = False
        self._recorded: list[Tensor] = []
        self._example: Tensor | None = None
        self._notified = False

    # -- derived settings --------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def curriculum_epochs(self) -> int:
        return self.num_blocks if self.curriculum_epochs_arg is None else self.curriculum_epochs_arg

    def stage(self, epoch: int) -> str:
        """``curriculum`` (frozen backbone, growing set of learned blocks), ``joint``, ``policy`` (the policy
        learns alone) or ``backbone`` (frozen policy, the backbone trains under its decisions)."""
        if epoch < self.curriculum_epochs:
            return "curriculum"
        if self.freeze_policy_at is not None and epoch >= self.freeze_policy_at:
            return "backbone"
        return "joint" if self.finetune else "policy"

    def _frozen(self, epoch: int) -> bool:
        """Whether the backbone is frozen (the policy learns alone) in ``epoch``."""
        return self.stage(epoch) in ("curriculum", "policy")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(model_attr=self.model_attr, include=self.include, types=self.types)

    # -- Lightning hooks -----------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._check_strategy(trainer)
            if not pl_module.automatic_optimization:
                raise ValueError(
                    "BlockDrop needs automatic optimization (the module's optimizer steps once per "
                    "training_step); this module sets automatic_optimization = False"
                )
        net = self._network(pl_module)
        blocks = find_blocks(net, self.include, self.exclude, self.types)
        if self.blocks and blocks != self.blocks:
            raise ValueError(
                f"this BlockDrop callback was trained on blocks {self.blocks} but the network now has "
                f"{blocks}; use a new callback for a different network"
            )
        self.blocks = blocks
        if self.policy is None:
            self._build_policy(net)
            if self.init_policy_from is not None:
                self._load_policy(self.init_policy_from)
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._apply_state(pending)
        if self.learned is None:
            self.learned = learned_blocks(trainer.current_epoch, self.num_blocks, self.curriculum_epochs)
        self._state = GateState(self.num_blocks, train_skip=self.train_skip)
        gate_blocks(net, self.blocks, self._state)
        self._handles = [
            net.register_forward_pre_hook(self._before_network),
            net.register_forward_hook(self._after_network),
        ]
        self._module, self._trainer = pl_module, trainer
        if stage == "fit":
            self._wrap_training_step(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.blocks:
            ungate_blocks(self._network(pl_module), self.blocks)
        unregister_loss_term(pl_module, "blockdrop")
        wrapped = pl_module.__dict__.get("training_step")
        if wrapped is not None and getattr(wrapped, "__blockdrop__", None) is self:
            previous = wrapped.__blockdrop_previous__
            if previous is None:
                del pl_module.training_step
            else:
                pl_module.training_step = previous
        self._restore_modes()
        self._recording = False
        self._capture = None
        self._in_step = False

    def on_fit_start(self, trainer, pl_module) -> None:
        self._ensure_device(pl_module.device)
        max_epochs = trainer.max_epochs
        if (
            self.finetune
            and trainer.max_steps in (-1, None)
            and isinstance(max_epochs, int)
            and 0 < max_epochs <= self.curriculum_epochs
        ):
            raise ValueError(
                f"BlockDrop(finetune=True): the curriculum takes {self.curriculum_epochs} epochs but the run "
                f"has max_epochs={max_epochs}, so the joint fine-tuning stage would never run; raise "
                "max_epochs, shorten curriculum_epochs, or set finetune: false"
            )
        if self.freeze_policy_at is not None and self.freeze_policy_at < self.curriculum_epochs:
            raise ValueError(
                f"BlockDrop(freeze_policy_at={self.freeze_policy_at}): the curriculum takes "
                f"{self.curriculum_epochs} epochs, and a policy frozen before it ends would keep blocks on "
                "that it never learned to decide; set freeze_policy_at >= curriculum_epochs"
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.epoch = trainer.current_epoch
        self._batch_idx = batch_idx
        self.learned = learned_blocks(self.epoch, self.num_blocks, self.curriculum_epochs)
        stage = self.stage(self.epoch)
        if stage == "backbone":
            self._fold_threshold()
            self.policy.eval()  # its batch norm uses running statistics, as at inference
        else:
            self.policy.train()
        frozen = self._frozen(self.epoch)
        if frozen:
            net = self._network(pl_module)
            if self._saved_modes is None:
                self._saved_modes = [(m, m.training) for m in net.modules()]
            net.eval()  # batch norm of the frozen backbone keeps its statistics (the paper's rnet.eval())
        else:
            self._restore_modes()
        lr = self.policy_lr if frozen else self.joint_policy_lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.verbose and trainer.is_global_zero and batch_idx == 0:
            if stage == "backbone":
                print(
                    f"[lit_compress] BlockDrop epoch {self.epoch}: backbone stage, policy frozen (keep "
                    f"threshold {self.frozen_threshold:g}), backbone trains under its decisions"
                )
            else:
                print(
                    f"[lit_compress] BlockDrop epoch {self.epoch}: {stage} stage, policy learns "
                    f"the last {self.learned} of {self.num_blocks} blocks"
                    + (", backbone frozen" if frozen else ", backbone trains jointly")
                )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = list(self.policy.parameters())
        if all(p.grad is None for p in params):
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        if trainer.world_size > 1:
            # Gradients and the policy's batch-norm statistics are averaged in one collective, so every rank
            # holds the same policy (same decisions at evaluation) after every step.
            buffers = [b for b in self.policy.buffers() if b.is_floating_point()]
            packed = torch.cat([flat, *(b.reshape(-1).to(flat.dtype) for b in buffers)])
            packed = trainer.strategy.reduce(packed, reduce_op="mean")
            flat, offset = packed[: flat.numel()], flat.numel()
            for b in buffers:
                b.copy_(packed[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:  # AMP: the loss was scaled, the module optimizer is unscaled by Lightning
            flat = flat / scaler.get_scale()
        if not bool(torch.isfinite(flat).all()):
            self.optimizer.zero_grad(set_to_none=True)
            return
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.policy_steps += 1
        if self._frozen(trainer.current_epoch):  # nothing may move the frozen backbone
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start_recording()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start_recording()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        stats = self._finish_recording(trainer, pl_module)
        if stats is None or trainer.sanity_checking:
            return
        self.statistics["val"] = stats
        self._log_statistics(pl_module, "val", stats)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        stats = self._finish_recording(trainer, pl_module)
        if stats is not None:
            self.statistics["test"] = stats
            self._log_statistics(pl_module, "test", stats)

    def state_dict(self) -> dict[str, Any]:
        if self.policy is None:
            return {}
        return {
            "version": STATE_VERSION,
            "blocks": list(self.blocks),
            "policy_config": self.policy.config(),
            "policy": {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "epoch": self.epoch,
            "learned": self.learned,
            "policy_steps": self.policy_steps,
            "threshold_folded": self.threshold_folded,
            "seed": self.seed,
            "statistics": copy.deepcopy(self.statistics),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("version") != STATE_VERSION:
            raise ValueError(
                f"BlockDrop state version {state_dict.get('version')!r} is not {STATE_VERSION}; this "
                "checkpoint was written by another lit_compress version"
            )
        if self.policy is None:  # not set up yet: applied in setup
            self._pending = state_dict
            return
        self._apply_state(state_dict)

    # -- public API ----------------------------------------------------------------------------------------

    def export(self, pl_module: nn.Module) -> BlockDropNetwork:
        """The gated network and the policy in one module (eval mode, deterministic decisions).

        A copy: the training run is not affected. The blocks kept on by an unfinished curriculum stay on.
        Its ``state_dict`` (``backbone.*`` = the network's own keys, ``policy.*``) stores as safetensors;
        :meth:`structure_spec` is what the zoo needs to rebuild it around a fresh network.
        """
        if self.policy is None:
            raise RuntimeError("BlockDrop.export: the callback has no policy yet; run trainer.fit first")
        backbone = _hook_free_copy(self._network(pl_module))
        policy = copy.deepcopy(self.policy).to(next(backbone.parameters()).device)
        return BlockDropNetwork(backbone, policy, self.blocks, self._always_on_indices()).eval()

    def structure_spec(self, inner: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``blockdrop`` structure spec of :meth:`export`'s network (plain data for a zoo card)."""
        from lit_compress.gating.structure import blockdrop_structure

        if self.policy is None:
            raise RuntimeError(
                "BlockDrop.structure_spec: the callback has no policy yet; run trainer.fit first"
            )
        return blockdrop_structure(self.blocks, self.policy.config(), self._always_on_indices(), inner)

    def compression_summary(self) -> dict[str, Any]:
        """What this callback did, for zoo cards: methods, description, the exported network, its structure
        spec, and ``gating`` statistics (test, else validation) when measured."""
        stats = self.statistics.get("test") or self.statistics.get("val")
        measured = ""
        if stats:
            measured = f"; {stats['blocks_mean']:.2f} of {stats['blocks']} blocks used on average"
            if "macs_mean" in stats:
                measured += (
                    f", {stats['macs_mean']:,.0f} +- {stats['macs_std']:,.0f} MACs per image "
                    f"({stats['mac_reduction']:.2f}x fewer than the static backbone, policy included)"
                )
            measured += f", {stats['distinct_policies']} distinct policies"
        stages = f"{self.curriculum_epochs} curriculum epoch(s)" + (
            " then joint fine-tuning" if self.finetune else ""
        )
        if self.init_policy_from is not None:
            stages = f"policy from {self.init_policy_from}, " + stages
        if self.freeze_policy_at is not None:
            stages += (
                f", backbone-only fine-tuning under the frozen policy from epoch {self.freeze_policy_at}"
                f" (keep threshold {self.frozen_threshold:g})"
            )
        summary: dict[str, Any] = {
            "methods": ["blockdrop"],
            "description": f"BlockDrop over {self.num_blocks} residual blocks ({self.policy_arch} policy, "
            f"gamma={self.gamma:g}, {stages}){measured}",
        }
        if self.policy is not None:
            summary["gating"] = {
                "method": "blockdrop",
                "gated_blocks": list(self.blocks),
                "policy": self.policy.config(),
                "always_on": self._always_on_indices(),
                **({"statistics": stats} if stats else {}),
            }
        if self.policy is not None and self._module is not None:
            summary["network"] = self.export(self._module)
            summary["structure"] = self.structure_spec()
        return summary

    # -- the policy step (frozen backbone) and the joint-stage loss term -----------------------------------

    def _policy_step(self, pl_module, batch: Any) -> Tensor:
        x, y = self._batch_input(batch), self._batch_target(batch)
        net = self._network(pl_module)
        always_on = always_on_mask(self.num_blocks, self.learned, x.device)
        probs = self._probs(x)
        sample = self._sample(probs, always_on)
        greedy = greedy_decisions(probs.detach(), always_on)
        with torch.no_grad():
            logits_sample = self._forced_forward(net, x, sample)
            logits_greedy = self._forced_forward(net, x, greedy)
        return self._policy_loss(pl_module, probs, sample, greedy, logits_sample, logits_greedy, y, always_on)

    def _joint_term(self, task_loss: Tensor) -> Tensor:
        capture = self._capture
        if capture is None or capture.consumed:
            if self._in_step:
                raise RuntimeError(
                    f"BlockDrop: training_step never ran the network pl_module.{self.model_attr or '<self>'} "
                    "with autograd on; set model_attr to the attribute your training_step calls"
                )
            return task_loss
        capture.consumed = True
        if capture.logits is None:
            raise RuntimeError("BlockDrop: the sampled forward of the network did not finish")
        y = self._batch_target(self._batch)
        greedy = greedy_decisions(capture.probs.detach(), capture.always_on)
        with torch.no_grad():
            logits_greedy = self._forced_forward(self._network(self._module), capture.x, greedy)
        policy_loss = self._policy_loss(
            self._module,
            capture.probs,
            capture.sample,
            greedy,
            capture.logits,
            logits_greedy,
            y,
            capture.always_on,
        )
        return task_loss + policy_loss

    def _policy_loss(
        self,
        pl_module,
        probs: Tensor,
        sample: Tensor,
        greedy: Tensor,
        logits_sample: Tensor,
        logits_greedy: Tensor,
        y: Tensor,
        always_on: Tensor,
    ) -> Tensor:
        if y.shape[0] != probs.shape[0]:
            raise ValueError(
                f"BlockDrop: the batch's targets (target_key={self.target_key!r}) hold {y.shape[0]} labels "
                f"but the network saw {probs.shape[0]} inputs; set target_key to the labels' position"
            )
        reward, correct = blockdrop_reward(logits_sample, y, sample, self.gamma)
        baseline, _ = blockdrop_reward(logits_greedy, y, greedy, self.gamma)
        loss = reinforce_loss(
            bound_probs(probs, self.alpha), sample, reward - baseline, ~always_on, self.entropy_weight
        )
        if getattr(pl_module, "_current_fx_name", None) == "training_step":
            log = functools.partial(
                pl_module.log, on_step=True, on_epoch=True, batch_size=y.shape[0], sync_dist=_distributed()
            )
            log("blockdrop/reward", reward.mean())
            log("blockdrop/train_acc", correct.float().mean())
            log("blockdrop/train_blocks", sample.float().sum(dim=1).mean(), prog_bar=True)
            log("blockdrop/policy_loss", loss.detach())
            log("blockdrop/learned_blocks", float(self.learned))
        return loss

    # -- network hooks -------------------------------------------------------------------------------------

    def _before_network(self, module: nn.Module, args: tuple) -> None:
        state = self._state
        if state is None or state.forced is not None or not args or not isinstance(args[0], Tensor):
            return
        x = args[0]
        always_on = always_on_mask(self.num_blocks, self.learned, x.device)
        if self._in_step and self._capture is None and module.training and torch.is_grad_enabled():
            probs = self._probs(x)
            sample = self._sample(probs, always_on)
            self._capture = _Capture(x=x, probs=probs, sample=sample, always_on=always_on)
            self._capturing = True
            state.decisions = sample
            return
        # Any other forward (validation, another callback's measurement, a second call in training_step)
        # takes deterministic decisions from the policy in eval mode: its batch norm must learn statistics
        # only from the forwards that train it.
        training = self.policy.training
        self.policy.eval()
        try:
            with torch.no_grad():
                state.decisions = greedy_decisions(self._probs(x), always_on)
        finally:
            self.policy.train(training)

    def _after_network(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self._state
        if state is None:
            return
        if self._capturing:
            self._capturing = False
            self._capture.logits = _logits(output)
        elif self._recording and state.forced is None and state.decisions is not None:
            self._recorded.append(state.decisions.detach().cpu())
            if self._example is None:
                self._example = args[0][:1].detach()
        state.decisions = None

    def _forced_forward(self, net: nn.Module, x: Tensor, decisions: Tensor) -> Tensor:
        state = self._state
        saved = state.forced
        state.forced = decisions
        try:
            return _logits(net(x))
        finally:
            state.forced = saved

    # -- helpers -------------------------------------------------------------------------------------------

    def _network(self, pl_module: nn.Module) -> nn.Module:
        if self.model_attr == "":
            return pl_module
        net = getattr(pl_module, self.model_attr, None)
        if not isinstance(net, nn.Module):
            children = [n for n, _ in pl_module.named_children()]
            raise ValueError(
                f"BlockDrop(model_attr={self.model_attr!r}): the LightningModule has no nn.Module attribute "
                f"of that name; its submodules are {children} (use '' for the module itself)"
            )
        return net

    def _build_policy(self, net: nn.Module) -> None:
        conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise ValueError("BlockDrop: the network has no Conv2d layer to tell its input channels from")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.policy = PolicyNet(
                self.num_blocks,
                in_chans=conv.in_channels,
                arch=self.policy_arch,
                width=self.policy_width,
                downsample=self.policy_downsample,
            )
        device = next(net.parameters()).device
        self.policy.to(device)
        self.optimizer = torch.optim.Adam(
            self.policy.parameters(), lr=self.policy_lr, weight_decay=self.policy_weight_decay
        )

    def _apply_state(self, state: dict[str, Any]) -> None:
        if list(state["blocks"]) != self.blocks:
            raise ValueError(
                f"the checkpoint's BlockDrop gated blocks {state['blocks']} differ from this network's "
                f"{self.blocks}; resume with the same network and include/exclude/types"
            )
        if state["policy_config"] != self.policy.config():
            raise ValueError(
                f"the checkpoint's BlockDrop policy {state['policy_config']} differs from the configured one "
                f"{self.policy.config()}; resume with the same policy, policy_width and policy_downsample"
            )
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.learned = int(state["learned"])
        self.policy_steps = int(state["policy_steps"])
        self.threshold_folded = bool(state.get("threshold_folded", False))  # absent before the stage existed
        self.seed = int(state["seed"])  # the sampling stream continues the checkpointed run's
        self.statistics = copy.deepcopy(state.get("statistics", {}))

    def _load_policy(self, source: str) -> None:
        from lit_compress import zoo

        name = source[len("zoo:") :]
        model = zoo.load(name)
        if not isinstance(model, BlockDropNetwork):
            raise ValueError(
                f"BlockDrop(init_policy_from={source!r}): that entry is a {type(model).__name__}, not a "
                "BlockDrop network; name an entry made by BlockDrop (its card's structure kind is "
                "'blockdrop')"
            )
        if model.blocks != self.blocks or model.policy.config() != self.policy.config():
            raise ValueError(
                f"BlockDrop(init_policy_from={source!r}): the entry gates {model.blocks} with policy "
                f"{model.policy.config()}, this callback gates {self.blocks} with policy "
                f"{self.policy.config()}; use the entry's include/types and policy, policy_width, "
                "policy_downsample"
            )
        if model.always_on:
            raise ValueError(
                f"BlockDrop(init_policy_from={source!r}): the entry's curriculum was unfinished (blocks "
                f"{model.always_on} always on), so its policy never learned to decide them"
            )
        device = next(self.policy.parameters()).device
        self.policy.load_state_dict({k: v.to(device) for k, v in model.policy.state_dict().items()})

    def _fold_threshold(self) -> None:
        """Put ``frozen_threshold`` into the policy (once): ``sigmoid(z) >= t`` iff ``z - logit(t) >= 0``."""
        if self.threshold_folded:
            return
        if self.frozen_threshold != 0.5:
            self.policy.shift_logits(-math.log(self.frozen_threshold / (1.0 - self.frozen_threshold)))
        self.threshold_folded = True

    def _ensure_device(self, device: torch.device) -> None:
        if next(self.policy.parameters()).device == torch.device(device):
            return
        self.policy.to(device)
        if self.optimizer.state:  # re-cast Adam's moments to the parameters' new device
            self.optimizer.load_state_dict(self.optimizer.state_dict())

    def _probs(self, x: Tensor) -> Tensor:
        self._ensure_device(x.device)
        dtype = next(self.policy.parameters()).dtype
        return torch.sigmoid(self.policy(x if x.dtype == dtype else x.to(dtype)).float())

    def _sample(self, probs: Tensor, always_on: Tensor) -> Tensor:
        rank = getattr(self._trainer, "global_rank", 0)
        key = f"{self.seed}:{self.epoch}:{self._batch_idx}:{rank}".encode()
        generator = torch.Generator(device=probs.device)
        generator.manual_seed(zlib.crc32(key))
        sample = torch.bernoulli(bound_probs(probs.detach(), self.alpha), generator=generator).bool()
        return sample | always_on

    def _always_on_indices(self) -> list[int]:
        learned = self.num_blocks if self.learned is None else self.learned
        return list(range(self.num_blocks - learned))

    def _batch_input(self, batch: Any) -> Tensor:
        return _batch_item(batch, self.input_key, "input_key")

    def _batch_target(self, batch: Any) -> Tensor:
        return _batch_item(batch, self.target_key, "target_key")

    def _wrap_training_step(self, trainer, pl_module) -> None:
        register_loss_term(pl_module, "blockdrop", self._joint_term)
        previous = pl_module.__dict__.get("training_step")
        original = pl_module.training_step
        inner_applies_terms = hasattr(original, "__lit_compress_wrapped__")

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._batch = args[0] if args else kwargs.get("batch")
            if self._frozen(trainer.current_epoch):
                return self._policy_step(pl_module, self._batch)
            # Backbone stage: _in_step stays False, so the network takes the policy's greedy decisions.
            joint = self.stage(trainer.current_epoch) == "joint"
            self._capture, self._capturing, self._in_step = None, False, joint
            try:
                output = original(*args, **kwargs)
                if inner_applies_terms:  # another lit_compress wrapper calls compression_loss already
                    return output
                return _with_loss(output, lambda loss: compression_loss(pl_module, loss))
            finally:
                self._in_step = False
                self._capture = None

        training_step.__lit_compress_wrapped__ = original  # type: ignore[attr-defined]
        training_step.__blockdrop__ = self  # type: ignore[attr-defined]
        training_step.__blockdrop_previous__ = previous  # type: ignore[attr-defined]
        pl_module.training_step = training_step
        if self.verbose and not self._notified and trainer.is_global_zero:
            print(
                f"[lit_compress] BlockDrop gates {self.num_blocks} blocks of {type(pl_module).__name__}."
                f"{self.model_attr} and wraps training_step: policy-only steps during the "
                f"{self.curriculum_epochs}-epoch curriculum, then "
                + ("the task loss + the policy-gradient term" if self.finetune else "policy-only steps")
                + (
                    f", from epoch {self.freeze_policy_at} the task loss alone under the frozen policy"
                    if self.freeze_policy_at is not None
                    else ""
                )
                + "; undone at teardown"
            )
            self._notified = True

    def _check_strategy(self, trainer) -> None:
        from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

        strategy = trainer.strategy
        if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
            raise ValueError(
                f"BlockDrop supports single-device and DDP training, not {type(strategy).__name__}; use "
                "strategy='ddp' (the policy is small and lives outside the sharded model)"
            )
        if (
            isinstance(strategy, DDPStrategy)
            and self.train_skip
            and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)
        ):
            raise ValueError(
                "BlockDrop(train_skip=True) leaves the dropped blocks' parameters out of the backward, which "
                "plain DDP rejects; use strategy='ddp_find_unused_parameters_true' (or DDPStrategy("
                "find_unused_parameters=True)), or train_skip=false (soft gating, every parameter used)"
            )

    def _restore_modes(self) -> None:
        if self._saved_modes is not None:
            for module, training in self._saved_modes:
                module.training = training
            self._saved_modes = None

    def _start_recording(self) -> None:
        self._recording = True
        self._recorded = []
        self._example = None
        if self.policy is not None:
            self.policy.eval()

    def _finish_recording(self, trainer, pl_module) -> dict[str, Any] | None:
        self._recording = False
        local = (
            torch.cat(self._recorded) if self._recorded else torch.zeros(0, self.num_blocks, dtype=torch.bool)
        )
        decisions = _gather_decisions(trainer, local)
        self._recorded = []
        if decisions.shape[0] == 0:
            return None
        costs = None
        if self._example is not None:  # static per-block MACs on this input shape (same on every rank)
            costs = block_costs(self._network(pl_module), self.blocks, self._example, self.policy)
        return summarize_decisions(decisions, costs, self.blocks)

    def _log_statistics(self, pl_module, split: str, stats: dict[str, Any]) -> None:
        for key in (
            "blocks_mean",
            "blocks_std",
            "distinct_policies",
            "macs_mean",
            "macs_std",
            "mac_reduction",
        ):
            if key in stats:
                # Identical on every rank (computed from all ranks' decisions); sync_dist only averages them.
                pl_module.log(f"blockdrop/{split}_{key}", float(stats[key]), sync_dist=_distributed())


# -- module-level helpers --------------------------------------------------------------------------------


def _batch_item(batch: Any, key: int | str, what: str) -> Tensor:
    try:
        item = batch[key]
    except (KeyError, IndexError, TypeError) as err:
        kind = type(batch).__name__
        keys = (
            list(batch)
            if isinstance(batch, Mapping)
            else f"{len(batch)} items"
            if hasattr(batch, "__len__")
            else ""
        )
        raise ValueError(
            f"BlockDrop: cannot take {what}={key!r} from a batch of type {kind} ({keys}); batches are (x, y) "
            f"by default, set {what} to the right index or dict key"
        ) from err
    if not isinstance(item, Tensor):
        raise TypeError(f"BlockDrop: batch[{key!r}] ({what}) is a {type(item).__name__}, expected a tensor")
    return item


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"BlockDrop: the network returned {type(output).__name__}; expected a tensor of logits (or a "
        "tuple/dict whose first item / 'logits' is one)"
    )


def _with_loss(output: Any, transform) -> Any:
    if isinstance(output, Tensor):
        return transform(output)
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return {**output, "loss": transform(output["loss"])}
    if output is None:
        return None
    raise TypeError(
        f"training_step returned {type(output).__name__}; BlockDrop needs the loss tensor or a dict with a "
        "'loss' tensor"
    )


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _gather_decisions(trainer, local: Tensor) -> Tensor:
    if (
        trainer.world_size <= 1
        or not torch.distributed.is_available()
        or not torch.distributed.is_initialized()
    ):
        return local
    parts: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(parts, local)
    return torch.cat(parts)


def _hook_free_copy(module: nn.Module) -> nn.Module:
    """``copy.deepcopy(module)`` without the forward/backward hooks of any submodule.

    Hooks are often bound methods of callbacks (this one, Distillation's): deep-copying them would copy the
    callbacks, their trainers and teachers along with the network.
    """
    saved = []
    for m in module.modules():
        hooks = {a: m.__dict__[a] for a in _HOOK_ATTRS if a in m.__dict__}
        saved.append((m, hooks))
        for attr in hooks:
            m.__dict__[attr] = OrderedDict()
    try:
        return copy.deepcopy(module)
    finally:
        for m, hooks in saved:
            m.__dict__.update(hooks)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _check_number(
    name: str, value: Any, low: float, high: float | None = None, low_inclusive: bool = True
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value >= low if low_inclusive else value > low) and (high is None or value <= high)
    if not ok:
        bound = f"{'[' if low_inclusive else '('}{low:g}, {'inf)' if high is None else f'{high:g}]'}"
        raise ValueError(f"{name} must be a number in {bound}, got {value!r}")
