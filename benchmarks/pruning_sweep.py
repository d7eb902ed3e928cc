"""Test error vs sparsity for pruning criteria on LeNet-300-100 (MNIST): one-shot prune, then fine-tune.

Every run starts from the dense zoo entry ``lenet_300_100-mnist.dense``
(``ImageClassifier(model="lenet_300_100", init_from="zoo:lenet_300_100-mnist.dense")``) and adds
``Pruning(sparsity=s, criterion=c, schedule="one_shot", scope="layerwise")``: every Linear weight is pruned
to s before optimizer step 0 (data-dependent criteria score on training batches drawn by the callback:
SNIP 1 batch of 128, OBD the empirical-Fisher diagonal over 8 batches of per-example gradients, the
callback's defaults). The run then fine-tunes for F epochs with SGD(lr 0.01, momentum 0.9), constant LR,
batch 128, the MNIST training split minus 5,000 held-out images, no augmentation (validation loop skipped).

"before FT" is measured right after the prune, inside the same run: a probe callback placed after
``Pruning`` evaluates the network in ``on_train_batch_start`` of step 0, i.e. after the callback's step-0
prune and before the first optimizer step (so it sees exactly the pruned dense weights; no second run, no
lr=0 trick). "after FT" is the final network. Both are measured on the official 10k MNIST test set with
``lit_compress.zoo.evaluate.evaluate_on``. The plot (``docs/pruning_sweep.png``) shows test error (log
scale) vs sparsity, one colour per criterion, solid after fine-tuning, dashed before.

Numbers and plot in docs/benchmarks.md were produced by::

    .venv/bin/python benchmarks/pruning_sweep.py

(defaults: F=2 epochs, sparsities 0.5 0.8 0.9 0.95 0.98, criteria magnitude random snip obd, seed 0, 1
thread). Quick smoke test: ``--epochs 1 --limit-train 2000 --plot /tmp/sweep.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import _common as C

ZOO_ENTRY = "lenet_300_100-mnist.dense"
CRITERIA = ("magnitude", "random", "snip", "obd")
LR, MOMENTUM, BATCH = 0.01, 0.9, 128


def _probe():
    from lightning.pytorch import Callback

    class AfterPrune(Callback):
        """Test error of the network at step 0, after every earlier callback's step-0 hook (the prune)."""

        def __init__(self) -> None:
            self.result: tuple[float, int, float] | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == 0 and self.result is None:
                error, errors = C.test_error(pl_module.net)
                self.result = (error, errors, C.weight_sparsity(pl_module.net))

    return AfterPrune()


def run(criterion: str, sparsity: float, args) -> dict[str, Any]:
    import lightning.pytorch as L

    from lit_compress.pruning import Pruning

    L.seed_everything(args.seed, verbose=False)
    dm = C.mnist(batch_size=BATCH, val_size=5000, limit_train=args.limit_train)
    model = C.classifier("lenet_300_100", C.sgd(LR, MOMENTUM), init_from=f"zoo:{ZOO_ENTRY}")
    pruning = Pruning(
        sparsity=sparsity, criterion=criterion, schedule="one_shot", scope="layerwise", verbose=False
    )
    probe = _probe()
    trainer = C.make_trainer([pruning, probe], max_epochs=args.epochs)
    with C.stopwatch() as t:
        trainer.fit(model, datamodule=dm)
    if probe.result is None:
        raise RuntimeError("the probe never saw step 0")
    before, before_n, before_sparsity = probe.result
    after, after_n = C.test_error(model.net)
    return {
        "criterion": criterion,
        "sparsity": sparsity,
        "achieved_before": before_sparsity,
        "achieved_after": C.weight_sparsity(model.net),
        "before": before,
        "before_n": before_n,
        "after": after,
        "after_n": after_n,
        "time_s": t["s"],
    }


def plot(results: list[dict[str, Any]], dense_error: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    criteria = list(dict.fromkeys(r["criterion"] for r in results))
    for colour, criterion in zip(colours, criteria):
        rows = sorted((r for r in results if r["criterion"] == criterion), key=lambda r: r["sparsity"])
        xs = [100 * r["sparsity"] for r in rows]
        ax.plot(xs, [r["after"] for r in rows], "-o", color=colour, label=f"{criterion}, after FT")
        ax.plot(
            xs, [r["before"] for r in rows], "--x", color=colour, alpha=0.8, label=f"{criterion}, before FT"
        )
    ax.axhline(dense_error, color="grey", lw=1, ls=":", label=f"dense zoo entry ({dense_error:.2f}%)")
    ax.set_yscale("log")

    # x spaced by log compression ratio 1 / (1 - s), so 90/95/98% do not crowd together.
    def forward(x):
        return -np.log10(np.clip(1 - np.asarray(x, dtype=float) / 100, 1e-9, None))

    def inverse(y):
        return 100 * (1 - 10.0 ** (-np.asarray(y, dtype=float)))

    ax.set_xscale("function", functions=(forward, inverse))
    ticks = sorted({100 * r["sparsity"] for r in results})
    lo, hi = forward(ticks[0]), forward(ticks[-1])
    pad = 0.05 * max(hi - lo, 0.1)  # margins in the scaled space: data-space margins could pass 100%
    ax.set_xlim(inverse(lo - pad), inverse(hi + pad))
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("sparsity of Linear weights, % (axis: log of compression ratio 1/(1-s))")
    ax.set_ylabel("test error %, official 10k MNIST test set")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8, 0.9, 0.95, 0.98])
    parser.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs F")
    parser.add_argument("--limit-train", type=int, default=None, help="use only this many training images")
    parser.add_argument("--plot", type=Path, default=C.REPO / "docs" / "pruning_sweep.png")
    args = C.add_common_args(parser).parse_args(argv)
    C.setup_env(args)

    from lit_compress import zoo

    dense_error, dense_errors = C.test_error(zoo.load(ZOO_ENTRY))
    results = []
    for criterion in args.criteria:
        for sparsity in args.sparsities:
            print(f"[bench] {criterion} s={sparsity} ...", file=sys.stderr, flush=True)
            r = run(criterion, sparsity, args)
            print(f"[bench]   -> {r}", file=sys.stderr, flush=True)
            results.append(r)

    train = "all 55,000" if args.limit_train is None else f"first {args.limit_train:,}"
    settings = (
        f"LeNet-300-100 from zoo:{ZOO_ENTRY} (dense test error {dense_error:.2f}%, {dense_errors} errors); "
        f"one-shot layerwise prune at step 0, then F={args.epochs} fine-tuning epochs, SGD(lr={LR}, "
        f"momentum={MOMENTUM}), constant LR, batch {BATCH}, {train} training images (val_size=5000 held "
        f"out), no augmentation, seed {args.seed}, {args.threads} thread(s). Test error on the official "
        "10k MNIST test set; before FT = right after the step-0 prune, after FT = final net."
    )
    rows = [
        [
            r["criterion"],
            f"{r['sparsity']:.0%}",
            f"{r['achieved_after']:.2%}",
            f"{r['before']:.2f}",
            f"{r['after']:.2f}",
            f"{r['time_s']:.1f}",
        ]
        for r in results
    ]
    table = C.markdown_table(
        [
            "criterion",
            "sparsity",
            "achieved",
            "test error % before FT",
            "test error % after FT",
            "run time s",
        ],
        rows,
    )
    # Compact matrix: criterion x sparsity, "before -> after".
    sparsities = list(dict.fromkeys(r["sparsity"] for r in results))
    matrix = [
        [c]
        + [
            next(
                f"{r['before']:.2f} -> {r['after']:.2f}"
                for r in results
                if r["criterion"] == c and r["sparsity"] == s
            )
            for s in sparsities
        ]
        for c in dict.fromkeys(r["criterion"] for r in results)
    ]
    matrix_table = C.markdown_table(["criterion \\ sparsity", *(f"{s:.0%}" for s in sparsities)], matrix)
    print("### Error vs sparsity by criterion (LeNet-300-100, MNIST)\n")
    print(f"Settings: {settings}\n- machine: {C.machine_note(args)}\n")
    print(table)
    print("\nTest error %, before fine-tuning -> after fine-tuning:\n")
    print(matrix_table)
    plot(
        results,
        dense_error,
        args.plot,
        f"LeNet-300-100 one-shot layerwise pruning, F={args.epochs} FT epochs",
    )
    print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
