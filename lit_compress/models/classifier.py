"""A generic image-classification LightningModule: a registered network by name, cross-entropy loss."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.classification import MulticlassAccuracy

from lit_compress.models.registry import create_model


class ImageClassifier(L.LightningModule):
    """Network ``self.net = create_model(model, **model_kwargs)``; logs loss, top-1 and the test error count.

    ``init_from`` starts from trained weights: ``"zoo:<entry name>"`` (sha256-checked zoo entry of the same
    architecture; a BlockDrop entry gives its backbone's weights, its policy goes to
    ``BlockDrop(init_policy_from=...)``) or a local ``.safetensors`` / tensor-only file. This is how
    compression recipes start from a dense reference (Han et al.: train, prune, retrain).

    The optimizer and LR scheduler are dependency-injected, so a YAML recipe picks them::

        model:
          class_path: lit_compress.models.ImageClassifier
          init_args:
            model: lenet5
            optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.01, momentum: 0.9}}
            lr_scheduler: {class_path: torch.optim.lr_scheduler.CosineAnnealingLR, init_args: {T_max: 20}}
    """

    def __init__(
        self,
        model: str = "lenet5",
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
        init_from: str | None = None,
    ):
        super().__init__()
        if lr_scheduler_interval not in ("epoch", "step"):
            raise ValueError(
                f"lr_scheduler_interval must be 'epoch' or 'step', got {lr_scheduler_interval!r}"
            )
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        model_kwargs = dict(model_kwargs or {})
        model_kwargs.setdefault("num_classes", num_classes)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model_name = model
        self.model_kwargs = model_kwargs
        self.net = create_model(model, **model_kwargs)
        if init_from is not None:
            self.net.load_state_dict(_initial_state(init_from))
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        self.label_smoothing = label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        errors = self._eval_step(batch, "test", self.test_acc)
        # Summed (not averaged) over batches and ranks: the exact number of misclassified test images.
        self.log("test/errors", errors, on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=True)

    def _eval_step(self, batch, stage: str, metric: MulticlassAccuracy) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=stage == "val", sync_dist=True)
        metric(logits, y)
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val")
        return (logits.argmax(dim=1) != y).sum().float()

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.lr_scheduler_interval},
        }


def _initial_state(source: str) -> dict[str, torch.Tensor]:
    if source.startswith("zoo:"):
        from lit_compress import zoo
        from lit_compress.gating.blockdrop import BlockDropNetwork

        model = zoo.load(source[len("zoo:") :])
        if isinstance(model, BlockDropNetwork):  # gated blocks keep the architecture's state_dict keys
            model = model.backbone
        return model.state_dict()
    from lit_compress.models.weights import load_state_dict_file

    return load_state_dict_file(source)
