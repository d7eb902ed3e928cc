"""``Distillation``: teacher soft targets and feature hints injected into any LightningModule.

How it plugs in (no change to the user's module):

- ``__init__`` loads the teacher (:func:`~lit_compress.distillation.teacher.load_teacher`), frozen and in eval
  mode, held by the callback: outside the optimizer, the checkpoint and the DDP wrapper.
- ``setup`` puts forward hooks on the student network (``student_module``) and on hinted layers, creates the
  learned hint adapters as a submodule of the LightningModule (``distillation_adapters``) *before*
  ``configure_optimizers`` so the optimizer, checkpoints and DDP see them, and registers a loss transform.
- ``inject="wrap"`` (default) wraps ``training_step`` (announced once, undone in ``teardown``): its returned
  loss (a tensor, or the ``"loss"`` of a dict) becomes ``(1 - alpha) * task + alpha * soft + sum(hints)``.
  With ``inject="explicit"`` the module calls ``lit_compress.compression_loss(self, loss)`` itself.
- The teacher runs under ``no_grad`` on exactly the input the student network received (captured by the hook),
  so preprocessing inside ``training_step`` is shared, and extra calls of ``training_step`` (e.g. a pruning
  criterion's scoring batches) are distilled on their own batch.

The student's logits are the output of the *first* forward of ``student_module`` in each training step.
Temperature and alpha are :mod:`lit_compress.schedules` schedules of the optimizer step (or constants).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lit_compress._flavour import lightning_callback
from lit_compress._loss_terms import compression_loss, register_loss_term, unregister_loss_term
from lit_compress.distillation.losses import LOGIT_LOSSES, attention_transfer, hint_loss
from lit_compress.distillation.teacher import load_teacher, weights_fingerprint
from lit_compress.schedules import Schedule, get_schedule

ADAPTERS_ATTR = "distillation_adapters"
HINT_KINDS = ("hint", "attention")
INJECT_MODES = ("wrap", "explicit")


@dataclass(frozen=True)
class Hint:
    """One intermediate-feature term: ``weight * loss(adapter(student feature), teacher feature)``.

    ``student`` is a module FQN inside the LightningModule (e.g. ``net.conv2``), ``teacher`` one inside the
    teacher network. ``kind="hint"`` (FitNets) regresses the teacher feature through a learned adapter
    (1x1 conv for ``[B, C, H, W]``, linear for ``[B, F]``) when the shapes differ; ``kind="attention"``
    matches spatial attention maps (no adapter needed).
    """

    student: str
    teacher: str
    weight: float = 1.0
    kind: str = "hint"

    def __post_init__(self) -> None:
        if self.kind not in HINT_KINDS:
            raise ValueError(f"hint kind must be one of {HINT_KINDS}, got {self.kind!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or self.weight < 0:
            raise ValueError(f"hint weight must be a number >= 0, got {self.weight!r}")


def _as_hint(value: Any) -> Hint:
    if isinstance(value, Hint):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"student", "teacher", "weight", "kind"}
        if unknown or not {"student", "teacher"} <= set(value):
            raise ValueError(
                "a hint is a mapping with keys student, teacher and optionally weight, kind; "
                f"got {dict(value)}"
            )
        return Hint(**value)
    raise TypeError(f"hints must be mappings like {{student: net.conv2, teacher: conv2}}, got {value!r}")


def _find_module(root: nn.Module, fqn: str, where: str) -> nn.Module:
    modules = dict(root.named_modules())
    if fqn in modules:
        return modules[fqn]
    close = difflib.get_close_matches(fqn, [n for n in modules if n], n=5, cutoff=0.4)
    hint = f"; close names: {close}" if close else f"; available: {[n for n in modules if n][:20]}"
    raise ValueError(f"{where}: no module named {fqn!r}{hint}")


def _first_tensor(output: Any, what: str) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"{what} returned {type(output).__name__}; expected a tensor of logits (or a tuple/dict "
        "whose first item / 'logits' is one)"
    )


def _make_adapter(student: Tensor, teacher: Tensor, hint: Hint) -> nn.Module | None:
    if student.shape == teacher.shape:
        return None
    if student.dim() == 4 and teacher.dim() == 4 and student.shape[-2:] == teacher.shape[-2:]:
        return nn.Conv2d(student.shape[1], teacher.shape[1], kernel_size=1, bias=False)
    if student.dim() == 2 and teacher.dim() == 2:
        return nn.Linear(student.shape[1], teacher.shape[1], bias=False)
    raise ValueError(
        f"hint {hint.student} -> {hint.teacher}: student feature {tuple(student.shape[1:])} cannot be "
        f"adapted to teacher feature {tuple(teacher.shape[1:])} (adapters change channels/features only, "
        "spatial sizes must agree); pick layers with the same spatial size or use kind: attention"
    )


@lightning_callback
class Distillation:
    """Knowledge distillation from a frozen teacher into any LightningModule.

    Args:
        teacher: ``"zoo:<entry>"``, a zoo entry name, a Lightning ``.ckpt`` path, ``{model, model_kwargs,
            weights}``, ``{class_path, init_args, weights}`` or an ``nn.Module`` (see
            :mod:`lit_compress.distillation.teacher`).
        temperature: softmax temperature ``T > 0`` (a float or a :class:`~lit_compress.schedules.Schedule`).
        alpha: weight of the distillation term in ``[0, 1]``; the task loss gets ``1 - alpha`` (float or
            schedule). Hinton et al. put most weight on the soft targets.
        loss: ``kl`` (Hinton soft targets, scaled by ``T^2``) or ``mse`` (Ba & Caruana logit matching).
        hints: intermediate-feature terms, each ``{student, teacher, weight, kind}`` (see :class:`Hint`);
            they are added on top of the weighted logit terms.
        student_module: FQN of the student network inside the LightningModule whose output are the logits
            (``"auto"``: the ``net`` attribute when there is one, else the LightningModule itself, which
            fits modules calling ``self(x)``; ``""`` is the LightningModule).
        inject: ``wrap`` (wrap ``training_step``) or ``explicit`` (the module calls
            ``lit_compress.compression_loss(self, loss)``).
        example_input_shape: input shape ``[C, H, W]`` for sizing hint adapters; by default the first
            training batch (or ``example_input_array``) is used.
        verbose: print the one-time notices (rank zero).
    """

    def __init__(
        self,
        teacher: Any,
        temperature: float | Schedule = 4.0,
        alpha: float | Schedule = 0.9,
        loss: str = "kl",
        hints: list[dict[str, Any]] | None = None,
        student_module: str = "auto",
        inject: str = "wrap",
        example_input_shape: list[int] | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if loss not in LOGIT_LOSSES:
            raise ValueError(f"loss must be one of {sorted(LOGIT_LOSSES)}, got {loss!r}")
        if inject not in INJECT_MODES:
            raise ValueError(f"inject must be one of {INJECT_MODES}, got {inject!r}")
        _check_value("temperature", temperature, low=0.0, low_inclusive=False)
        _check_value("alpha", alpha, low=0.0, high=1.0)
        self.temperature = get_schedule(temperature)
        self.alpha = get_schedule(alpha)
        self.loss_name = loss
        self.hints = [_as_hint(h) for h in (hints or [])]
        self.student_module = student_module
        self.inject = inject
        self.example_input_shape = list(example_input_shape) if example_input_shape else None
        self.verbose = verbose
        self.teacher_spec = teacher if isinstance(teacher, (str, dict)) else type(teacher).__name__
        self.teacher = load_teacher(teacher)
        self.teacher_fingerprint = weights_fingerprint(self.teacher)
        for hint in self.hints:
            _find_module(self.teacher, hint.teacher, "hint teacher layer")
        self._handles: list[Any] = []
        self._module: nn.Module | None = None
        self._step = 0
        self._student: tuple[tuple, dict, Tensor] | None = None  # (args, kwargs, logits) of the first call
        self._student_features: dict[int, Tensor] = {}
        self._teacher_features: dict[int, Tensor] = {}
        self._seen_forward = False
        self._notified = False

    @property
    def state_key(self) -> str:
        # Not keyed by the teacher spec: a resumed run with another teacher must find (and refuse) the state.
        return self._generate_state_key(loss=self.loss_name)

    # -- Lightning hooks -------------------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._module = pl_module
        student = self._student_net(pl_module)
        student_layers = [_find_module(pl_module, h.student, "hint student layer") for h in self.hints]
        if any(h.kind == "hint" for h in self.hints) and not hasattr(pl_module, ADAPTERS_ATTR):
            self._create_adapters(trainer, pl_module, student, student_layers)
        self._handles.append(student.register_forward_hook(self._on_student_forward, with_kwargs=True))
        for i, layer in enumerate(student_layers):
            self._handles.append(
                layer.register_forward_hook(functools.partial(self._keep_student_feature, i))
            )
        for i, hint in enumerate(self.hints):
            layer = self.teacher.get_submodule(hint.teacher)
            self._handles.append(
                layer.register_forward_hook(functools.partial(self._keep_teacher_feature, i))
            )
        register_loss_term(pl_module, "distillation", self._combine)
        if self.inject == "wrap" and "training_step" not in pl_module.__dict__:
            original = pl_module.training_step

            @functools.wraps(original)
            def training_step(*args: Any, **kwargs: Any) -> Any:
                self._reset()  # a fresh capture for every call, including a pruning criterion's scoring calls
                return _with_loss(original(*args, **kwargs), lambda loss: compression_loss(pl_module, loss))

            training_step.__lit_compress_wrapped__ = original  # type: ignore[attr-defined]
            pl_module.training_step = training_step
            if self.verbose and not self._notified and trainer.is_global_zero:
                print(
                    f"[lit_compress] Distillation wraps {type(pl_module).__name__}.training_step: the "
                    "returned loss becomes (1 - alpha) * task + alpha * distillation (+ hints); "
                    "undone at teardown"
                )
                self._notified = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        unregister_loss_term(pl_module, "distillation")
        wrapped = pl_module.__dict__.get("training_step")
        if wrapped is not None and hasattr(wrapped, "__lit_compress_wrapped__"):
            del pl_module.training_step
        self._reset()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step
        self._reset()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.inject != "explicit":
            return  # the wrapper raised already if the student did not run
        if self._student is not None:
            raise RuntimeError(
                "Distillation(inject='explicit'): training_step ran the student but never called "
                "lit_compress.compression_loss(self, loss); return that value, or use inject='wrap'"
            )
        if not self._seen_forward:
            raise RuntimeError(self._no_forward_message(pl_module))

    def on_validation_start(self, trainer, pl_module) -> None:
        self.teacher.eval()

    def state_dict(self) -> dict[str, Any]:
        return {"teacher_fingerprint": self.teacher_fingerprint}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("teacher_fingerprint")
        if saved is not None and saved != self.teacher_fingerprint:
            raise ValueError(
                f"this checkpoint was trained with a different teacher (weights sha256 {saved[:12]}...) than "
                f"the one configured now ({self.teacher_fingerprint[:12]}..., from {self.teacher_spec!r}); "
                "resume with the original teacher or start a new run"
            )

    def compression_summary(self) -> dict[str, Any]:
        hints = f", {len(self.hints)} feature hint(s)" if self.hints else ""
        return {
            "methods": [f"distillation:{self.loss_name}"],
            "description": f"distilled from {self.teacher_spec} ({self.loss_name}, "
            f"T={self.temperature(self._step):g}, alpha={self.alpha(self._step):g}{hints})",
        }

    # -- capture ---------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._student = None
        self._student_features.clear()
        self._teacher_features.clear()
        self._seen_forward = False

    def _on_student_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # Training steps run with grad enabled; validation / test / predict loops do not.
        if not torch.is_grad_enabled() or self._student is not None:
            return
        self._student = (args, kwargs, _first_tensor(output, "the student network"))
        self._seen_forward = True

    def _keep_student_feature(self, index: int, module: nn.Module, args: tuple, output: Any) -> None:
        if torch.is_grad_enabled() and index not in self._student_features:
            self._student_features[index] = _first_tensor(output, f"hint layer {self.hints[index].student}")

    def _keep_teacher_feature(self, index: int, module: nn.Module, args: tuple, output: Any) -> None:
        self._teacher_features[index] = _first_tensor(output, f"teacher layer {self.hints[index].teacher}")

    # -- the loss --------------------------------------------------------------------------------------

    def _combine(self, task_loss: Tensor) -> Tensor:
        """``task_loss`` -> the distillation objective for the student forward captured in this step."""
        module = self._module
        if self._student is None:
            if module is not None and torch.is_grad_enabled():
                raise RuntimeError(self._no_forward_message(module))
            return task_loss
        args, kwargs, student_logits = self._student
        self._student = None  # the next student forward (another training_step call) is captured afresh
        teacher_logits = self._teacher_forward(args, kwargs)
        step = self._step
        temperature, alpha = float(self.temperature(step)), float(self.alpha(step))
        _check_value("temperature (schedule value)", temperature, low=0.0, low_inclusive=False)
        _check_value("alpha (schedule value)", alpha, low=0.0, high=1.0)
        soft = LOGIT_LOSSES[self.loss_name](student_logits, teacher_logits, temperature)
        total = (1.0 - alpha) * task_loss + alpha * soft
        hint_total = self._hint_loss(module)
        if hint_total is not None:
            total = total + hint_total
        if module is not None and _logging_step(module):
            log = functools.partial(
                module.log, on_step=True, on_epoch=False, batch_size=student_logits.shape[0]
            )
            log("distill/task_loss", task_loss.detach())
            log("distill/soft_loss", soft.detach())
            if hint_total is not None:
                log("distill/hint_loss", hint_total.detach())
            log("distill/temperature", temperature)
            log("distill/alpha", alpha)
        self._student_features.clear()
        self._teacher_features.clear()
        return total

    @torch.no_grad()
    def _teacher_forward(self, args: tuple, kwargs: dict) -> Tensor:
        self._teacher_features.clear()
        device = next((a.device for a in args if isinstance(a, Tensor)), None)
        first = next(self.teacher.parameters(), None)
        if device is not None and first is not None and first.device != device:
            self.teacher.to(device)
        if self.teacher.training:  # something called .train() on it: the teacher always runs in eval mode
            self.teacher.eval()
        return _first_tensor(self.teacher(*args, **kwargs), "the teacher")

    def _hint_loss(self, module: nn.Module | None) -> Tensor | None:
        if not self.hints:
            return None
        adapters = getattr(module, ADAPTERS_ATTR, None) if module is not None else None
        total: Tensor | None = None
        for i, hint in enumerate(self.hints):
            if i not in self._student_features:
                raise RuntimeError(
                    f"hint layer {hint.student!r} did not run during the student forward; is it part of the "
                    "student network's forward pass?"
                )
            student, teacher = self._student_features[i], self._teacher_features[i]
            if hint.kind == "attention":
                term = attention_transfer(student, teacher)
            else:
                key = str(i)
                if adapters is not None and key in adapters:
                    student = adapters[key](student)
                term = hint_loss(student, teacher)
            term = hint.weight * term
            total = term if total is None else total + term
        return total

    # -- setup helpers ---------------------------------------------------------------------------------

    def _student_net(self, pl_module: nn.Module) -> nn.Module:
        name = self.student_module
        if name == "auto":
            net = getattr(pl_module, "net", None)
            return net if isinstance(net, nn.Module) else pl_module
        return pl_module if name == "" else _find_module(pl_module, name, "student_module")

    def _no_forward_message(self, pl_module: nn.Module) -> str:
        return (
            f"Distillation: no forward of the student network "
            f"({self.student_module!r} -> {type(self._student_net(pl_module)).__name__}) was seen in "
            "training_step; set student_module to the attribute your training_step calls (e.g. 'model', or "
            "'' for a module that calls self(x))"
        )

    @torch.no_grad()
    def _create_adapters(self, trainer, pl_module, student: nn.Module, layers: list[nn.Module]) -> None:
        example = self._example_input(trainer, pl_module)
        captured: dict[int, Tensor] = {}
        from_teacher: dict[int, Tensor] = {}
        handles = [
            layer.register_forward_hook(
                lambda m, a, o, i=i: captured.__setitem__(i, _first_tensor(o, "hint"))
            )
            for i, layer in enumerate(layers)
        ] + [
            self.teacher.get_submodule(h.teacher).register_forward_hook(
                lambda m, a, o, i=i: from_teacher.__setitem__(i, _first_tensor(o, "hint"))
            )
            for i, h in enumerate(self.hints)
        ]
        was_training = student.training
        try:
            student.eval()
            device = next((p.device for p in student.parameters()), torch.device("cpu"))
            student(example.to(device))
            self.teacher.to(device)
            self.teacher(example.to(device))
        finally:
            student.train(was_training)
            for handle in handles:
                handle.remove()
        adapters = nn.ModuleDict()
        for i, hint in enumerate(self.hints):
            if hint.kind == "hint":
                adapter = _make_adapter(captured[i], from_teacher[i], hint)
                if adapter is not None:
                    adapters[str(i)] = adapter.to(device)
        if len(adapters):
            pl_module.add_module(ADAPTERS_ATTR, adapters)

    def _example_input(self, trainer, pl_module) -> Tensor:
        if self.example_input_shape:
            return torch.zeros(2, *self.example_input_shape)
        example = getattr(pl_module, "example_input_array", None)
        if isinstance(example, Tensor):
            return example
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            batch = next(iter(datamodule.train_dataloader()))
            tensor = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(tensor, Tensor):
                return tensor[:2]
        raise ValueError(
            "Distillation: feature hints need an example input to size their adapters; pass "
            "example_input_shape=[C, H, W] or set the module's example_input_array"
        )


def _logging_step(module: nn.Module) -> bool:
    """Whether the loggers write at this step: ``self.log`` costs milliseconds, so skip it when they won't.

    Step-level values logged on other steps are never written (``log_every_n_steps``), so nothing is lost.
    """
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
        f"training_step returned {type(output).__name__}; Distillation needs the loss tensor or a dict "
        "with a 'loss' tensor (or use inject='explicit' and lit_compress.compression_loss)"
    )


def _check_value(
    name: str, value: Any, low: float, high: float | None = None, low_inclusive: bool = True
) -> None:
    if isinstance(value, Schedule):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or a lit_compress.schedules.Schedule, got {value!r}")
    too_low = value < low if low_inclusive else value <= low
    if too_low or (high is not None and value > high):
        bounds = f"{'[' if low_inclusive else '('}{low:g}, {high:g}]" if high is not None else f"> {low:g}"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
