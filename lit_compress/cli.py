"""The ``lit-compress`` command: LightningCLI (fit / validate / test / predict), ``zoo``, ``report`` and
``onnx``.

Every recipe is a YAML file::

    lit-compress fit --config configs/lenet5-mnist-dense.yaml
    lit-compress zoo list
    lit-compress report lenet5-mnist.pruned-12x --out docs/img
    lit-compress report --zoo-summary --out docs/img
    lit-compress onnx lenet5-mnist.structured-l1 --out lenet5.onnx

Lightning is imported only for the LightningCLI subcommands, and matplotlib only for ``report``, so
``lit-compress zoo ...`` starts fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DESCRIPTION = (
    "lit_compress: compress any LightningModule with callbacks configured in YAML. "
    "Subcommands: fit / validate / test / predict (LightningCLI), `lit-compress zoo --help` "
    "(list, show, eval, verify and export compressed checkpoints) and `lit-compress report --help` "
    "(PNG plots of zoo entries, training runs and the whole zoo) and `lit-compress onnx --help` (export a "
    "zoo entry or checkpoint to ONNX, checked with onnxruntime)."
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "zoo":
        from lit_compress.zoo.cli import main as zoo_main

        return zoo_main(args[1:])
    if args and args[0] == "report":
        return report_main(args[1:])
    if args and args[0] == "onnx":
        from lit_compress.onnx_export import main as onnx_main

        return onnx_main(args[1:])
    from lit_compress.lightning_cli import LitCompressCLI

    LitCompressCLI(
        args=None if argv is None else args,
        parser_kwargs={"description": DESCRIPTION},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    return 0


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lit-compress report",
        allow_abbrev=False,
        description="Write PNG plots: per-layer sparsity and bit widths, BlockDrop / FBS gating statistics "
        "of a zoo entry, the logged compression curves of a training run, or error vs compression across "
        "the whole zoo (--zoo-summary). Needs matplotlib: pip install 'lit-compress[bench]'.",
    )
    p.add_argument(
        "target",
        nargs="?",
        help="a zoo entry name, a path to a card.json (or its entry folder), or a run directory runs/<name>",
    )
    p.add_argument("--out", required=True, help="folder the PNGs are written to (created if missing)")
    p.add_argument(
        "--zoo-summary",
        action="store_true",
        help="plot test error vs size ratio and vs MAC reduction for every zoo entry",
    )
    p.add_argument("--pattern", default="*", help="with --zoo-summary: only entries matching this pattern")
    p.add_argument("--zoo", default=None, help="zoo folder (default: $LIT_COMPRESS_ZOO, the shipped zoo)")
    return p


def report_main(argv: Sequence[str] | None = None) -> int:
    """``lit-compress report``: prints each PNG written; exit 2 with a one-line message on bad input."""
    parser = _report_parser()
    args = parser.parse_args(argv)
    if args.zoo_summary == (args.target is not None):
        parser.error(
            "give either a target (zoo entry name, card.json or run directory) or --zoo-summary, not "
            f"{'both' if args.zoo_summary else 'neither'}"
        )
    from lit_compress.zoo.errors import ZooError

    try:
        from lit_compress import plots

        if args.zoo_summary:
            written = [plots.report_zoo(args.out, args.pattern, args.zoo)]
        else:
            written = plots.report(args.target, args.out, args.zoo)
    except (ZooError, FileNotFoundError, ValueError, TypeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for plot in written:
        print(plot.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
