"""Driver for tests/integration/test_faults.py: runs that are killed with SIGKILL and resumed.

``python _fault_run.py ROOT`` imports torch / Lightning / lit_compress once (the slow part on a loaded
machine) and then forks one child process per run, so every run is a real, separate process:

1. for every method (``pruning``, ``quantization``, ``fbs``, ``blockdrop``), concurrently:
   - ``ROOT/<method>/full``: the uninterrupted run -> ``state.pt`` (state A);
   - ``ROOT/<method>/killed``: the same run, which after the checkpoint at optimizer step ``KILL_AFTER``
     trains one more step (progress that no checkpoint holds) and then writes ``hang.pid`` (its pid) and
     waits. The *test* kills it with ``os.kill(pid, SIGKILL)``; the driver records how it died in
     ``died.json``;
2. for every method, concurrently: ``ROOT/<method>/killed`` resumed with ``ckpt_path=<dir>/last.ckpt`` in
   a fresh child -> ``state.pt`` (state B).

Why the kill lands where it does: Lightning restarts a plain DataLoader from its first batch when a run
resumes mid-epoch, so a resumed run is only step-for-step identical to the uninterrupted one when the
checkpoint it resumes from was written at an epoch boundary. Checkpoints are therefore written every
``STEPS_PER_EPOCH`` optimizer steps (``every_n_train_steps``, ``save_last=True``), i.e. on the last batch of
each epoch, and the kill comes one step *after* such a checkpoint, mid-epoch, mid-schedule: the step done
since the checkpoint is lost, as in a real crash, and redone by the resumed run. A run waits for its kill
instead of sleeping a little per step, so the test does not race the training.

``state.pt`` holds the module's ``state_dict``, the compression callback's ``state_dict`` and the loop
position; the test compares them exactly.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import lightning.pytorch as L
import torch

from lit_compress.data import SyntheticDataModule
from lit_compress.gating.blockdrop_callback import BlockDrop
from lit_compress.gating.fbs_callback import FBS
from lit_compress.models import ImageClassifier
from lit_compress.pruning.callback import Pruning
from lit_compress.quantization.callback import Quantization
from lit_compress.schedules import Linear

METHODS = ("pruning", "quantization", "fbs", "blockdrop")
STEPS_PER_EPOCH = 4  # 64 training images, batches of 16
MAX_EPOCHS = 4  # 16 optimizer steps
KILL_AFTER = 8  # the checkpoint the killed run resumes from (end of epoch 1); killed during step 9
HANG_LIMIT_S = 120.0  # a run nobody kills goes on after this (and the test then fails)


def model_for(method: str) -> ImageClassifier:
    torch.manual_seed(0)
    sgd = _sgd
    if method in ("pruning", "quantization"):
        return ImageClassifier(model="mlp", model_kwargs={"hidden": [32, 16], "img_size": 8}, optimizer=sgd)
    if method == "fbs":
        kwargs = {"in_chans": 1, "img_size": 8, "width": 4, "hidden": 16}
        return ImageClassifier(model="cifarnet", model_kwargs=kwargs, optimizer=sgd)
    return ImageClassifier(
        model="resnet", model_kwargs={"depth": 8, "in_chans": 1, "width": 4}, optimizer=sgd
    )


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def callback_for(method: str):
    """The compression callback under test; each has state that a resume must restore exactly."""
    if method == "pruning":  # masks, last event step and history; prune events at 0, 2, ..., 12
        return Pruning(
            sparsity=0.8,
            schedule="gradual",
            schedule_args={"start_step": 0, "end_step": 12, "frequency": 2},
            verbose=False,
        )
    if method == "quantization":  # the callback-owned generator of stochastic binarisation
        return Quantization(method="binaryconnect", stochastic=True, seed=3, verbose=False)
    if method == "fbs":  # density annealed 1.0 -> 0.5 over steps 0..12
        return FBS(density=Linear(1.0, 0.5, 0, 12), l1=1e-2, verbose=False)
    # policy, its Adam state, curriculum stage (2 epochs), then joint fine-tuning
    return BlockDrop(policy="cnn", policy_width=4, curriculum_epochs=2, verbose=False)


def data() -> SyntheticDataModule:
    return SyntheticDataModule(
        num_train=64, num_val=16, num_test=16, input_shape=(1, 8, 8), batch_size=16, shuffle=False
    )


class HangAfter(L.Callback):
    """Once optimizer step ``step`` is done, write ``<dir>/hang.pid`` and wait to be killed."""

    def __init__(self, step: int, directory: Path):
        self.step, self.directory = step, directory

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        _write_atomic(self.directory / "hang.pid", str(os.getpid()).encode())
        deadline = time.monotonic() + HANG_LIMIT_S
        while time.monotonic() < deadline:
            time.sleep(0.05)


def run(method: str, directory: Path, ckpt_path: str | None = None, hang_after: int | None = None) -> None:
    start = time.perf_counter()
    L.seed_everything(0, workers=True, verbose=False)
    cb = callback_for(method)
    checkpoint = L.callbacks.ModelCheckpoint(
        dirpath=directory / "ckpt", every_n_train_steps=STEPS_PER_EPOCH, save_last=True, save_top_k=-1
    )
    extra = [] if hang_after is None else [HangAfter(hang_after, directory)]
    trainer = L.Trainer(
        max_epochs=MAX_EPOCHS,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        callbacks=[cb, checkpoint, *extra],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=directory,
        num_sanity_val_steps=0,
    )
    model = model_for(method)
    trainer.fit(model, data(), ckpt_path=ckpt_path)
    state = {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "callback": cb.state_dict(),
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
    }
    buffer = directory / ".state.pt.tmp"
    torch.save(state, buffer)
    os.replace(buffer, directory / "state.pt")
    print(
        f"{method} {directory.name} {'resumed ' if ckpt_path else ''}run: {time.perf_counter() - start:.1f} s"
    )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _fork(target, *args, **kwargs) -> int:
    pid = os.fork()
    if pid == 0:  # child: run, then leave without the parent's atexit handlers
        code = 0
        try:
            target(*args, **kwargs)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)
    return pid


def _describe(status: int) -> dict:
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status), "exit_code": None}
    return {"signal": None, "exit_code": os.WEXITSTATUS(status)}


def main(root: Path) -> int:
    full, killed = {}, {}
    for method in METHODS:
        for kind in ("full", "killed"):
            (root / method / kind).mkdir(parents=True, exist_ok=True)
        full[method] = _fork(run, method, root / method / "full")
        killed[method] = _fork(run, method, root / method / "killed", hang_after=KILL_AFTER + 1)
    failed = False
    for method in METHODS:
        _, status = os.waitpid(full[method], 0)
        failed |= _describe(status) != {"signal": None, "exit_code": 0}
        _, status = os.waitpid(killed[method], 0)
        _write_atomic(root / method / "killed" / "died.json", json.dumps(_describe(status)).encode())
    # Resume each killed run in a fresh process, from the last checkpoint it wrote before it died.
    resumed = {}
    for method in METHODS:
        directory = root / method / "killed"
        last = directory / "ckpt" / "last.ckpt"
        if last.is_file() and not (directory / "state.pt").exists():
            resumed[method] = _fork(run, method, directory, ckpt_path=str(last))
    for pid in resumed.values():
        _, status = os.waitpid(pid, 0)
        failed |= _describe(status) != {"signal": None, "exit_code": 0}
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
