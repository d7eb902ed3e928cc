"""The ``lit-compress`` command: LightningCLI (fit / validate / test / predict) plus ``zoo`` subcommands.

Every recipe is a YAML file::

    lit-compress fit --config configs/lenet5-mnist-dense.yaml
    lit-compress zoo list
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

DESCRIPTION = (
    "lit_compress: compress any LightningModule with callbacks configured in YAML. "
    "Subcommands: fit / validate / test / predict (LightningCLI) and `lit-compress zoo --help` "
    "(list, show, eval, verify and export compressed checkpoints)."
)


class LitCompressCLI(LightningCLI):
    """LightningCLI whose model and datamodule are chosen by ``class_path`` in the config.

    Adds ``--test_after_fit true``: after ``fit``, test the best checkpoint (or the last weights when no
    checkpoint was kept) on the datamodule's test set, so one command trains and reports test error.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="After fit, run trainer.test on the best checkpoint (or the final weights).",
        )

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        checkpoint = getattr(self.trainer, "checkpoint_callback", None)
        best = getattr(checkpoint, "best_model_path", "") if checkpoint is not None else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=False)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "zoo":
        from lit_compress.zoo.cli import main as zoo_main

        return zoo_main(args[1:])
    LitCompressCLI(
        args=None if argv is None else args,
        parser_kwargs={"description": DESCRIPTION},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
