"""Per-layer pruning sensitivity of the dense MNIST zoo nets, and what a sensitivity plan buys one-shot.

For each zoo entry (default ``lenet_300_100-mnist.dense`` and ``lenet5-mnist.dense``):

1. ``sensitivity_analysis``: every Conv/Linear weight alone pruned by magnitude to each sparsity (layerwise
   masks, as ``Pruning`` chooses them), error measured on the 5,000 images held out of the MNIST training
   split (``MNISTDataModule(val_size=5000, split_seed=0)``: never the test set). Printed as a table and,
   when matplotlib is importable, plotted to ``docs/sensitivity_<arch>.png``.
2. For each budget B (fraction of all Conv/Linear weights pruned): the two sensitivity plans,
   ``plan_from_sensitivity(table, B)`` (minimum sum of the single-layer error increases: cheapest error
   per pruned weight first) and ``allocation="equal_increase"`` (every layer pruned up to the same error
   increase), against the two allocations without measurements: the same sparsity B in every layer
   (``scope="layerwise"``) and one magnitude ranking over all layers (``scope="global"``). Each network
   is pruned one-shot by magnitude from the dense weights, without fine-tuning, and measured on the
   validation images and on the official 10k test set (``lit_compress.zoo.evaluate.evaluate_on``). The
   sparsities achieved are counted on the weights.

No training: this isolates the allocation of sparsity across layers (fine-tuning would recover most of the
gap at these budgets; see ``pruning_sweep.py``). Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sensitivity.py

Smoke test: ``--entries lenet_300_100-mnist.dense --sparsities 0.5 0.9 --budgets 0.8 --val-size 1000``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import _common as C
import torch
from torch import nn

ENTRIES = ("lenet_300_100-mnist.dense", "lenet5-mnist.dense")
SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
BUDGETS = (0.8, 0.9, 0.95)


def one_shot(net: nn.Module, plan: dict[str, float] | None, budget: float) -> nn.Module:
    """Magnitude-pruned copy: per-layer sparsities from ``plan`` (module name -> s) or, with None, one
    global ranking at ``budget``."""
    from lit_compress.pruning.masks import apply_masks, global_masks, layerwise_masks

    pruned = copy.deepcopy(net)
    params = dict(C.prunable_weights(pruned))
    scores = {name: p.detach().abs() for name, p in params.items()}
    if plan is None:
        masks = global_masks(scores, budget)
    else:
        masks = layerwise_masks(scores, {name: plan[name.rsplit(".", 1)[0]] for name in params})
    apply_masks(params, masks)
    return pruned


def analyse(entry: str, args, val_error) -> tuple[list[list[str]], str]:
    from lit_compress import zoo
    from lit_compress.pruning.sensitivity import (
        format_table,
        plan_from_sensitivity,
        plot_sensitivity,
        sensitivity_analysis,
    )

    net = zoo.load(entry).eval()
    with C.stopwatch() as t:
        table = sensitivity_analysis(net, val_error, sparsities=args.sparsities)
    arch = entry.split("-", 1)[0]
    text = [
        f"#### {entry}: validation error % with one layer magnitude-pruned at a time "
        f"(unpruned {100 * table.baseline:.2f}%, {t['s']:.1f} s for {len(table) * len(args.sparsities)} "
        "evaluations)\n",
        format_table(table, percent=True),
    ]
    if args.plot_dir is not None:
        try:
            path = plot_sensitivity(
                table, args.plot_dir / f"sensitivity_{arch}.png", title=f"{entry}: one layer pruned at a time"
            )
            text.append(f"\nplot: {path.relative_to(C.REPO) if path.is_relative_to(C.REPO) else path}")
        except ImportError:
            text.append("\n(matplotlib is not importable: no plot)")
    rows = []
    for budget in args.budgets:
        plans = {
            "sensitivity: min total increase": plan_from_sensitivity(table, budget),
            "sensitivity: equal increase": plan_from_sensitivity(table, budget, allocation="equal_increase"),
            "uniform (layerwise)": dict.fromkeys(table, budget),
            "global magnitude": None,
        }
        for method, plan in plans.items():
            pruned = one_shot(net, plan, budget)
            test, test_n = C.test_error(pruned)
            per_layer = {
                n.rsplit(".", 1)[0]: float((w == 0).float().mean()) for n, w in C.prunable_weights(pruned)
            }
            rows.append(
                [
                    arch,
                    f"{budget:.0%}",
                    method,
                    " / ".join(f"{100 * s:.1f}" for s in per_layer.values()),
                    f"{C.weight_sparsity(pruned):.2%}",
                    f"{100 * val_error(pruned):.2f}",
                    f"{test:.2f} ({test_n})",
                ]
            )
    return rows, "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", nargs="+", default=list(ENTRIES))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--val-size", type=int, default=5000, help="images held out of the training split")
    parser.add_argument("--plot-dir", type=Path, default=C.REPO / "docs", help="where the PNGs go")
    args = C.add_common_args(parser).parse_args(argv)
    C.setup_env(args)
    torch.manual_seed(args.seed)

    from lit_compress.pruning.sensitivity import classification_error

    dm = C.mnist(batch_size=1000, val_size=args.val_size)
    val_error = classification_error(dm.val_dataloader())
    rows, sections = [], []
    for entry in args.entries:
        print(f"[bench] {entry} ...", file=sys.stderr, flush=True)
        entry_rows, text = analyse(entry, args, val_error)
        rows += entry_rows
        sections.append(text)
    print("### Per-layer sensitivity and sensitivity-planned one-shot pruning (MNIST, no fine-tuning)\n")
    print(
        f"Settings: magnitude criterion; validation = {args.val_size:,} images held out of the MNIST "
        "training split (split_seed 0); test = official 10k test set; one-shot from the dense zoo weights, "
        f"no fine-tuning.\n- machine: {C.machine_note(args)}\n"
    )
    for text in sections:
        print(text + "\n")
    print(
        C.markdown_table(
            [
                "net",
                "budget",
                "allocation",
                "per-layer sparsity %",
                "achieved",
                "val error %",
                "test error % (errors)",
            ],
            rows,
            title="#### One-shot magnitude pruning at a global budget: how the sparsity is spread",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
