"""Masks are identical on every rank under 2-process DDP on the CPU (gloo, ddp_spawn)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import pytest
import torch

from lit_compress.data import SyntheticDataModule
from lit_compress.models import ImageClassifier
from lit_compress.pruning import OneShot
from lit_compress.pruning.callback import Pruning


class SaveMasksPerRank(L.Callback):
    """ddp_spawn runs the fit in child processes: each rank writes what its Pruning callback holds."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        pruning = next(cb for cb in trainer.callbacks if isinstance(cb, Pruning))
        weights = {n: p.detach().cpu() for n, p in pl_module.named_parameters()}
        torch.save(
            {"masks": {k: v.cpu() for k, v in pruning.masks.items()}, "weights": weights},
            Path(self.folder) / f"rank{trainer.global_rank}.pt",
        )


@pytest.mark.parametrize("criterion", ["magnitude", "random", "snip"])
def test_masks_identical_across_two_ranks(tmp_path, criterion):
    torch.manual_seed(0)
    model = ImageClassifier(model="mlp", model_kwargs={"hidden": [32]})
    pruning = Pruning(sparsity=0.8, criterion=criterion, schedule=OneShot(step=2), data_batches=2)
    trainer = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[pruning, SaveMasksPerRank(str(tmp_path))],
        default_root_dir=tmp_path,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, SyntheticDataModule(num_train=128, batch_size=16))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["masks"] and ranks[0]["masks"].keys() == ranks[1]["masks"].keys()
    for name in ranks[0]["masks"]:
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name]), name
        assert 1 - ranks[0]["masks"][name].float().mean().item() == pytest.approx(0.8, abs=0.01)
    for name, w in ranks[0]["weights"].items():
        torch.testing.assert_close(w, ranks[1]["weights"][name])
