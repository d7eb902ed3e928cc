"""lit_compress ``Pruning`` beside Lightning's ``ModelPruning``: same model, data, epochs, seed and target.

Both methods train from scratch (``seed_everything(seed)`` before building the model, so both start from the
same initialisation and see the same batch order) for E epochs with SGD(lr 0.05, momentum 0.9, Nesterov),
cosine LR over the E epochs (stepped per epoch), batch 128, MNIST training split minus a 5,000-image
held-out set (``val_size=5000``; the validation loop itself is skipped), no augmentation. Every Conv2d/Linear
weight is pruned (biases are not); the reported test error is on the official 10k test set
(``lit_compress.zoo.evaluate.evaluate_on``), sparsity and nonzero counts are measured on the final model.

- **ModelPruning**: ``pruning_fn="l1_unstructured"``, ``use_global_unstructured=True``, parameters = every
  Conv2d/Linear weight, ``amount(epoch) = p = 1 - (1 - s) ** (1 / K)`` for epochs 0..K-1 (each epoch end
  removes the fraction p of the weights still alive, so K events reach s), ``make_pruning_permanent=True``.
  ``use_lottery_ticket_hypothesis=False``: its default (True) would reset the surviving weights to their
  initial values after every pruning event, which is a different algorithm (lottery-ticket rewinding).
- **Pruning (ours)**: ``Pruning(sparsity=s, criterion="magnitude", scope=layerwise|global,
  schedule=Gradual(start_step=0, end_step=K * steps_per_epoch, frequency=f))``: Zhu & Gupta's cubic ramp
  over the same first K epochs (the final target is reached at optimizer step K * steps_per_epoch, the same
  moment as ModelPruning's last epoch-end event), f = the divisor of steps_per_epoch closest to
  steps_per_epoch / 10 (about 10 mask updates per epoch). The remaining E - K epochs fine-tune the sparse net.
  ``ours-global-late`` starts the same ramp at the end of epoch 0 (``start_step=steps_per_epoch``), where
  ModelPruning prunes first, so magnitudes are those of a trained network rather than of the initialisation.

Numbers in docs/benchmarks.md were produced by::

    .venv/bin/python benchmarks/pruning_vs_modelpruning.py

(defaults: LeNet-300-100 E=12, K=6; LeNet-5 E=8, K=4; sparsities 0.9 and 0.95; seed 0; 1 thread).
Quick smoke test: ``--epochs 2 --prune-epochs 1 --limit-train 2000``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import _common as C

# model -> (epochs E, pruning epochs K)
DEFAULT_SCHEDULE = {"lenet_300_100": (12, 6), "lenet5": (8, 4)}
METHODS = ("modelpruning", "ours-layerwise", "ours-global", "ours-global-late")
METHOD_LABEL = {
    "modelpruning": "ModelPruning (global L1, epoch ends)",
    "ours-layerwise": "Pruning layerwise (gradual)",
    "ours-global": "Pruning global (gradual)",
    "ours-global-late": "Pruning global (gradual from epoch 1)",
}
LR, MOMENTUM, BATCH = 0.05, 0.9, 128


def gradual_frequency(steps_per_epoch: int, events_per_epoch: int = 10) -> int:
    """The divisor of ``steps_per_epoch`` closest to ``steps_per_epoch / events_per_epoch``."""
    want = steps_per_epoch / events_per_epoch
    divisors = [d for d in range(1, steps_per_epoch + 1) if steps_per_epoch % d == 0]
    return min(divisors, key=lambda d: (abs(d - want), d))


def modelpruning_callback(model, sparsity: float, prune_epochs: int):
    from lightning.pytorch.callbacks import ModelPruning

    per_epoch = 1.0 - (1.0 - sparsity) ** (1.0 / prune_epochs)
    params = [(m, "weight") for m in model.modules() if isinstance(m, C.PRUNABLE)]
    return ModelPruning(
        pruning_fn="l1_unstructured",
        parameters_to_prune=params,
        use_global_unstructured=True,
        amount=lambda epoch: per_epoch if epoch < prune_epochs else 0.0,
        make_pruning_permanent=True,
        use_lottery_ticket_hypothesis=False,
        verbose=0,
    )


def our_callback(sparsity: float, scope: str, start_step: int, end_step: int, frequency: int):
    from lit_compress.pruning import Gradual, Pruning

    return Pruning(
        sparsity=sparsity,
        criterion="magnitude",
        scope=scope,
        schedule=Gradual(start_step=start_step, end_step=end_step, frequency=frequency),
        verbose=False,
    )


def run(
    model_name: str, method: str, sparsity: float, epochs: int, prune_epochs: int, args
) -> dict[str, Any]:
    import lightning.pytorch as L

    L.seed_everything(args.seed, verbose=False)
    dm = C.mnist(batch_size=BATCH, val_size=5000, limit_train=args.limit_train)
    spe = C.steps_per_epoch(dm)
    model = C.classifier(model_name, C.sgd(LR, MOMENTUM, nesterov=True), C.cosine(epochs))
    if method == "modelpruning":
        callback = modelpruning_callback(model, sparsity, prune_epochs)
    else:
        # "late": start the ramp where ModelPruning first prunes (end of epoch 0), on trained weights.
        start = spe if method.endswith("-late") else 0
        scope = method.split("-")[1]
        callback = our_callback(sparsity, scope, start, prune_epochs * spe, gradual_frequency(spe))
    trainer = C.make_trainer([callback], max_epochs=epochs)
    with C.stopwatch() as t:
        trainer.fit(model, datamodule=dm)
    error, errors = C.test_error(model.net)
    nonzero, total = C.nonzero_params(model.net)
    return {
        "model": model_name,
        "target": sparsity,
        "method": method,
        "sparsity": C.weight_sparsity(model.net),
        "nonzero": nonzero,
        "total": total,
        "error": error,
        "errors": errors,
        "time_s": t["s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_SCHEDULE), choices=list(DEFAULT_SCHEDULE))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=None, help="E for every model (default: per model)")
    parser.add_argument("--prune-epochs", type=int, default=None, help="K for every model (default: E / 2)")
    parser.add_argument("--limit-train", type=int, default=None, help="use only this many training images")
    args = C.add_common_args(parser).parse_args(argv)
    C.setup_env(args)

    rows = []
    settings = []
    for model_name in args.models:
        epochs, prune_epochs = DEFAULT_SCHEDULE[model_name]
        if args.epochs is not None:
            epochs = args.epochs
            prune_epochs = max(1, epochs // 2)
        if args.prune_epochs is not None:
            prune_epochs = args.prune_epochs
        if not 1 <= prune_epochs < epochs:
            parser.error(f"need 1 <= K < E, got K={prune_epochs}, E={epochs}")
        spe = C.steps_per_epoch(C.mnist(batch_size=BATCH, val_size=5000, limit_train=args.limit_train))
        freq = gradual_frequency(spe)
        settings.append(
            f"- {model_name}: E={epochs} epochs, K={prune_epochs} pruning epochs, {spe} steps/epoch; "
            f"ModelPruning p = 1-(1-s)^(1/{prune_epochs}) per epoch end (epochs 0..{prune_epochs - 1}); "
            f"ours Gradual(start_step=0 (late: {spe}), end_step={prune_epochs * spe}, frequency={freq})"
        )
        for sparsity in args.sparsities:
            for method in args.methods:
                print(f"[bench] {model_name} s={sparsity} {method} ...", file=sys.stderr, flush=True)
                r = run(model_name, method, sparsity, epochs, prune_epochs, args)
                print(f"[bench]   -> {r}", file=sys.stderr, flush=True)
                rows.append(
                    [
                        model_name,
                        f"{sparsity:.0%}",
                        METHOD_LABEL[method],
                        f"{r['sparsity']:.2%}",
                        f"{r['nonzero']:,} / {r['total']:,}",
                        f"{r['error']:.2f}",
                        f"{r['time_s']:.1f}",
                    ]
                )

    train = "all 55,000" if args.limit_train is None else f"first {args.limit_train:,}"
    header = "\n".join(
        [
            "### Pruning vs Lightning ModelPruning (MNIST, train from scratch)",
            "",
            f"Settings: SGD(lr={LR}, momentum={MOMENTUM}, nesterov) + cosine LR over E epochs, "
            f"batch {BATCH}, {train} training images (val_size=5000 held out), no augmentation, "
            f"seed {args.seed}, {args.threads} thread(s). Pruned: every Conv2d/Linear weight. "
            "Achieved sparsity: zero fraction of those weights in the final model; nonzero params: all "
            "parameters incl. biases; test error: official 10k MNIST test set.",
            *settings,
            f"- machine: {C.machine_note(args)}",
            "",
            "",
        ]
    )
    table = C.markdown_table(
        [
            "model",
            "target sparsity",
            "method",
            "achieved sparsity",
            "nonzero params",
            "test error %",
            "train wall time s",
        ],
        rows,
    )
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
