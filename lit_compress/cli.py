"""The ``lit-compress`` command: LightningCLI (fit / validate / test / predict) plus ``zoo`` subcommands.

Every recipe is a YAML file::

    lit-compress fit --config configs/lenet5-mnist-dense.yaml
    lit-compress zoo list

Lightning is imported only for the LightningCLI subcommands, so ``lit-compress zoo ...`` starts fast.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

DESCRIPTION = (
    "lit_compress: compress any LightningModule with callbacks configured in YAML. "
    "Subcommands: fit / validate / test / predict (LightningCLI) and `lit-compress zoo --help` "
    "(list, show, eval, verify and export compressed checkpoints)."
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "zoo":
        from lit_compress.zoo.cli import main as zoo_main

        return zoo_main(args[1:])
    from lit_compress.lightning_cli import LitCompressCLI

    LitCompressCLI(
        args=None if argv is None else args,
        parser_kwargs={"description": DESCRIPTION},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
