"""Tiny LightningModules of each namespace, importable by LightningCLI class_path (test_namespace_runs.py).

``model`` names a lit_compress reference model built as ``self.net``; the data are 8 random images of the
model's input shape (2 batches of 4), seeded, so runs are cheap and repeatable.
"""

from __future__ import annotations

import lightning.pytorch as L
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lit_compress.models import create_model


def _mixin(base: type) -> type:
    class Tiny(base):
        def __init__(self, model: str = "lenet_300_100", model_kwargs: dict | None = None, lr: float = 0.05):
            super().__init__()
            self.save_hyperparameters()
            self.net = create_model(model, **(model_kwargs or {}))
            self.lr = lr

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val/loss", F.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

        def _data(self):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(8, 1, 28, 28, generator=gen)
            return DataLoader(TensorDataset(x, torch.randint(0, 10, (8,), generator=gen)), batch_size=4)

        def train_dataloader(self):
            return self._data()

        def val_dataloader(self):
            return self._data()

    return Tiny


TinyL = type("TinyL", (_mixin(L.LightningModule),), {"__module__": __name__})
TinyPL = type("TinyPL", (_mixin(pl.LightningModule),), {"__module__": __name__})
