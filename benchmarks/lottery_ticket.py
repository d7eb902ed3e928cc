"""Lottery-ticket effect on LeNet-300-100 (MNIST): rewinding to initialisation vs random re-initialisation.

Frankle & Carbin (2019): iterative magnitude pruning whose survivors are reset to their *original*
initialisation after each round ("winning tickets") trains to lower error than the same sparse structure
with a *fresh random* initialisation. Each row trains LeNet-300-100 from the same seeded initialisation with
``Pruning(criterion="magnitude", scope="layerwise")`` and one schedule:

- ``rewind``   ``LotteryTicket(rounds=R, steps_per_round=K, rewind_step=0)``: survivors reset to init;
- ``reinit``   the same with ``reinit=True``: survivors re-drawn from the layer's initialiser (the control);
- ``continue`` ``Iterative(rounds=R, steps_per_round=K, start_step=K)``: Han et al.'s prune-and-keep-training
  (no reset), for reference.

All prune at steps K, 2K, ..., RK with geometric growth to the final sparsity and train K more steps after
the last prune (max_steps = (R + 1) K). Adam (lr 1.2e-3, Frankle & Carbin's LeNet setting), batch 128, no
augmentation, MNIST training split minus 5,000 held-out images; test error on the official 10k test set.

Numbers in docs/benchmarks.md were produced by::

    .venv/bin/python benchmarks/lottery_ticket.py

(defaults: R=3 rounds, K=3 epochs, sparsities 0.8 0.95 0.98, seed 0, 1 thread).
Quick smoke test: ``--limit-train 2000 --sparsities 0.9``.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

import _common as C
import torch

METHODS = ("rewind", "reinit", "continue")


def run(method: str, sparsity: float, args) -> dict:
    import lightning.pytorch as L

    from lit_compress.pruning import Iterative, LotteryTicket, Pruning

    L.seed_everything(args.seed, verbose=False)
    dm = C.mnist(val_size=5000, limit_train=args.limit_train)
    k = C.steps_per_epoch(dm) * args.round_epochs
    if method == "continue":
        schedule = Iterative(rounds=args.rounds, steps_per_round=k, start_step=k)
    else:
        schedule = LotteryTicket(rounds=args.rounds, steps_per_round=k, reinit=method == "reinit")
    model = C.classifier("lenet_300_100", partial(torch.optim.Adam, lr=1.2e-3))
    pruning = Pruning(sparsity=sparsity, criterion="magnitude", schedule=schedule, verbose=False)
    trainer = C.make_trainer([pruning], max_steps=(args.rounds + 1) * k)
    with C.stopwatch() as t:
        trainer.fit(model, datamodule=dm)
    error, errors = C.test_error(model.net)
    return {
        "method": method,
        "sparsity": sparsity,
        "achieved": C.weight_sparsity(model.net),
        "error": error,
        "errors": errors,
        "seconds": t["s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = C.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-epochs", type=int, default=3, help="epochs of training per round (K)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.95, 0.98])
    parser.add_argument("--limit-train", type=int, default=None)
    args = parser.parse_args(argv)
    C.setup_env(args)
    rows = []
    for sparsity in args.sparsities:
        for method in METHODS:
            r = run(method, sparsity, args)
            rows.append(
                [
                    f"{r['sparsity']:.0%}",
                    r["method"],
                    f"{r['achieved']:.2%}",
                    f"{r['error']:.2f}",
                    r["errors"],
                    f"{r['seconds']:.0f}",
                ]
            )
            print(f"  done: {rows[-1]}", file=sys.stderr, flush=True)
    print(
        C.markdown_table(
            [
                "target sparsity",
                "method",
                "achieved weight sparsity",
                "test error %",
                "errors / 10k",
                "train s",
            ],
            rows,
            title=f"Lottery ticket, LeNet-300-100 MNIST: {args.rounds} rounds x "
            f"{args.round_epochs} epoch(s), Adam 1.2e-3, "
            f"seed {args.seed} ({C.machine_note(args)})",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
