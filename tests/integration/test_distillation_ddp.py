"""Distillation under 2-process DDP on the CPU (gloo, ddp_spawn): each rank has its own frozen teacher copy,
hint adapters are synchronised like the student, and the ranks end with identical weights."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as L
import torch

from lit_compress.data import SyntheticDataModule
from lit_compress.distillation import Distillation
from lit_compress.models import ImageClassifier, create_model


class SavePerRank(L.Callback):
    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        distillation = next(cb for cb in trainer.callbacks if isinstance(cb, Distillation))
        torch.save(
            {
                "student": {n: p.detach().cpu() for n, p in pl_module.named_parameters()},
                "teacher": {n: p.detach().cpu() for n, p in distillation.teacher.named_parameters()},
                "teacher_training": distillation.teacher.training,
                "step": trainer.global_step,
            },
            Path(self.folder) / f"rank{trainer.global_rank}.pt",
        )


def test_two_rank_distillation_with_hints_stays_in_sync(tmp_path):
    torch.manual_seed(1)
    teacher = create_model("lenet5")
    teacher_before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    torch.manual_seed(0)
    model = ImageClassifier(model="lenet5_small")
    cb = Distillation(teacher=teacher, hints=[{"student": "net.conv2", "teacher": "conv2"}], verbose=False)
    trainer = L.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, SavePerRank(str(tmp_path))],
        default_root_dir=tmp_path,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, SyntheticDataModule(num_train=64, batch_size=8))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["step"] == 3
    assert any("distillation_adapters" in n for n in ranks[0]["student"])
    for name, w in ranks[0]["student"].items():
        torch.testing.assert_close(w, ranks[1]["student"][name], msg=name)
    for rank in ranks:
        assert not rank["teacher_training"]
        for name, w in rank["teacher"].items():
            assert torch.equal(w, teacher_before[name]), name
