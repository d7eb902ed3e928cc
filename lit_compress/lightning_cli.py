"""``LitCompressCLI``: the LightningCLI behind ``lit-compress fit|validate|test|predict``."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.cli import LightningCLI


class LitCompressCLI(LightningCLI):
    """LightningCLI whose model and datamodule are chosen by ``class_path`` in the config.

    Additions:

    - ``--test_after_fit true``: after ``fit``, test the best checkpoint (or the final weights when no
      checkpoint was kept) on the datamodule's test set, so one command trains and reports test error.
    - A :class:`~lit_compress.zoo.ZooExport` callback without ``recipe`` records the ``--config`` file
      the run was launched with (the card then carries that file's path and sha256).
    - Errors raised while building the model, data or callbacks from the config (bad values) end the
      command with the message and exit code 2, like other configuration errors, not a traceback.
    - ``ModelCheckpoint(save_last=true)`` with a ``monitor`` or ``save_top_k: 0`` keeps ``last.ckpt`` current
      every epoch, so ``--ckpt_path <dir>/last.ckpt`` resumes from the latest epoch. Since Lightning 2.6 such
      a callback rewrites ``last.ckpt`` only when a new top-k checkpoint is saved (a run whose metric stopped
      improving would resume from its best epoch, silently repeating training; with ``save_top_k: 0`` it is
      written once, at the end); the CLI hands the ``last.ckpt`` duty
      to a monitor-free companion ``ModelCheckpoint`` writing the same file after every validation.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run trainer.test on the best checkpoint (or the final weights).",
        )

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError) as err:
            self.parser.error(f"invalid configuration: {err}")

    def before_fit(self) -> None:
        _keep_last_checkpoint_current(self.trainer)
        configs = self.config[self.subcommand].get("config") or []
        if len(configs) != 1:
            return  # no single recipe file to record (none, or several merged)
        recipe = str(Path(str(configs[0])).resolve())
        for callback in self.trainer.callbacks:
            if type(callback).__name__ == "ZooExport" and getattr(callback, "recipe", "") is None:
                callback.recipe = recipe

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        checkpoint = getattr(self.trainer, "checkpoint_callback", None)
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        # weights_only: the run's checkpoints hold tensors and plain containers only; never unpickle objects.
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=True)


def _keep_last_checkpoint_current(trainer) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in list(trainer.checkpoint_callbacks):
        # Lightning 2.6 writes last.ckpt only in a step that saved a top-k checkpoint: with a monitor that is
        # "improved", with save_top_k=0 never (only once at the end of training).
        every_epoch = callback.monitor is None and callback.save_top_k != 0
        if type(callback) is ModelCheckpoint and callback.save_last is True and not every_epoch:
            callback.save_last = False
            companion = ModelCheckpoint(
                dirpath=callback.dirpath,
                filename=ModelCheckpoint.CHECKPOINT_NAME_LAST,
                save_top_k=1,
                enable_version_counter=False,
            )
            trainer.callbacks.append(companion)
