"""Training-step overhead of the ``Pruning`` callback over plain Lightning (and ModelPruning for reference).

Setup: MNIST training images, normalised once and held in memory as ``B`` batches of 128 (default 50),
served by a non-shuffling DataLoader over a TensorDataset, so one epoch is ``B`` optimizer steps. Each run
is a fresh ``ImageClassifier`` (same seed) trained for N optimizer steps (default 300 = 6 epochs) with
SGD(lr 0.01, momentum 0.9), no validation, on ``--threads`` torch threads (default 1, for stability).

Variants, run back to back in the same process, alternating plain / ours / ModelPruning ``--repeats``
times (default 3) after one discarded warm-up round:

- **plain**: no callback.
- **ours**: ``Pruning(sparsity=0.9, schedule=Gradual(start_step=0, end_step=N - 50, frequency=50))``:
  a magnitude pruning event every 50 steps (masks, weight/momentum zeroing), plus the per-step gradient
  masking (``on_before_optimizer_step``) and weight re-zeroing (``on_train_batch_end``) once masks exist.
- **ModelPruning** (reference): global L1, ``amount = 1 - 0.1 ** (1 / (N / B - 1))`` at every epoch end
  except the last (so also every 50 steps and 90% at the end), ``use_lottery_ticket_hypothesis=False``;
  it keeps ``weight_orig`` + ``weight_mask`` and a forward pre-hook computing ``weight_orig * mask``.

Timing (chosen for fairness to every variant): wall time from the start of step 0 (``on_train_batch_start``
of a marker callback placed *first*, before the pruning callback's own hook) to the end of the last epoch
(``on_train_epoch_end`` of a marker placed *last*, after ModelPruning's epoch-end pruning), divided by N.
It therefore includes every pruning event of both callbacks and excludes Trainer setup / teardown
(``on_train_end``, where ModelPruning makes its pruning permanent). The reported number per variant is the
median over repeats of that mean step time; the ratio is median(ours) / median(plain). "event ms" is the
mean extra time of ours' steps that carry a pruning event (their duration minus the median step of the
same run); per-step durations are measured from the first marker's ``on_train_batch_start`` to the last
marker's ``on_train_batch_end``.

Numbers in docs/benchmarks.md were produced by::

    .venv/bin/python benchmarks/pruning_overhead.py

Quick smoke test: ``--steps 100 --repeats 1``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from typing import Any

import _common as C

TARGETS = {"lenet5": 1.05, "lenet_300_100": 1.10}
VARIANTS = ("plain", "ours", "modelpruning")
SPARSITY, EVERY = 0.9, 50
LR = 0.01  # 0.05 without a schedule diverges on LeNet-5 (NaN weights would distort the timings)


def run(model_name: str, variant: str, steps: int, loader, args) -> dict[str, Any]:
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelPruning

    from lit_compress.pruning import Gradual, Pruning

    L.seed_everything(args.seed, verbose=False)
    model = C.classifier(model_name, C.sgd(LR, 0.9))
    batches = len(loader)
    callbacks: list[Any] = []
    if variant == "ours":
        end = ((steps - 1) // EVERY) * EVERY
        callbacks.append(
            Pruning(
                sparsity=SPARSITY,
                schedule=Gradual(start_step=0, end_step=end, frequency=EVERY),
                verbose=False,
            )
        )
    elif variant == "modelpruning":
        events = steps // batches - 1
        per_event = 1.0 - (1.0 - SPARSITY) ** (1.0 / events)
        callbacks.append(
            ModelPruning(
                pruning_fn="l1_unstructured",
                parameters_to_prune=[(m, "weight") for m in model.modules() if isinstance(m, C.PRUNABLE)],
                amount=lambda epoch: per_event if epoch < events else 0.0,
                use_lottery_ticket_hypothesis=False,
                make_pruning_permanent=True,
            )
        )
    first, last = C.step_markers()
    trainer = C.make_trainer([first, *callbacks, last], max_steps=steps, max_epochs=-1)
    trainer.fit(model, train_dataloaders=loader)
    if trainer.global_step != steps:
        raise RuntimeError(f"ran {trainer.global_step} steps, expected {steps}")
    if not all(p.isfinite().all() for p in model.parameters()):
        raise RuntimeError(f"{model_name} {variant}: training diverged (non-finite weights)")
    durations = [e - s for s, e in zip(first.step_start, last.step_end)]
    median_step = statistics.median(durations)
    event_steps = set(callbacks[0].schedule.prune_steps()) if variant == "ours" else set()
    extra = [durations[i] - median_step for i in sorted(event_steps) if i < len(durations)]
    return {
        "mean_step_ms": 1000.0 * (last.t1 - first.t0) / steps,
        "median_step_ms": 1000.0 * median_step,
        "event_ms": 1000.0 * statistics.mean(extra) if extra else float("nan"),
        "sparsity": C.weight_sparsity(model.net),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "lenet_300_100"], choices=list(TARGETS))
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (N)")
    parser.add_argument("--batches", type=int, default=50, help="in-memory batches of 128 (one epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds plain/ours/ModelPruning")
    args = C.add_common_args(parser, threads=1).parse_args(argv)
    if args.steps % args.batches or args.steps // args.batches < 2:
        parser.error("--steps must be a multiple of --batches, at least 2 epochs")
    C.setup_env(args)
    loader = C.in_memory_loader(args.batches)

    rows = []
    for model_name in args.models:
        results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for round_ in range(args.repeats + 1):  # round 0 is a warm-up, discarded
            for variant in VARIANTS:
                r = run(model_name, variant, args.steps, loader, args)
                print(f"[bench] {model_name} round {round_} {variant}: {r}", file=sys.stderr, flush=True)
                if round_:
                    results[variant].append(r)
        med = {v: statistics.median(r["mean_step_ms"] for r in results[v]) for v in VARIANTS}
        for variant in VARIANTS:
            runs = results[variant]
            ratio = med[variant] / med["plain"]
            per_round = [r["mean_step_ms"] / p["mean_step_ms"] for r, p in zip(runs, results["plain"])]
            target = f"<= {TARGETS[model_name]:.2f}x" if variant == "ours" else ""
            event = statistics.median(r["event_ms"] for r in runs) if variant == "ours" else None
            rows.append(
                [
                    model_name,
                    variant,
                    f"{med[variant]:.2f}",
                    f"{statistics.median(r['median_step_ms'] for r in runs):.2f}",
                    "" if event is None else f"{event:.1f}",
                    f"{runs[-1]['sparsity']:.1%}",
                    f"{ratio:.3f}x",
                    f"{min(per_round):.3f}-{max(per_round):.3f}",
                    target,
                ]
            )

    header = "\n".join(
        [
            "### Training-step overhead of Pruning (MNIST, in-memory batches of 128)",
            "",
            f"Settings: {args.steps} optimizer steps per run ({args.batches} batches per epoch), "
            f"SGD(lr={LR}, momentum=0.9), {args.repeats} alternating rounds plain/ours/ModelPruning after "
            f"1 warm-up round, seed {args.seed}, torch.set_num_threads({args.threads}). "
            f"ours = Pruning(sparsity={SPARSITY}, magnitude, layerwise, "
            f"Gradual(0, {((args.steps - 1) // EVERY) * EVERY}, {EVERY})); ModelPruning "
            f"= global L1 at every epoch end but the last (every {args.batches} steps) to {SPARSITY:.0%}. "
            "mean step = (end of last epoch - start of step 0) / steps, pruning events included; median over "
            "rounds. median step = median single-step time (no pruning event). ratio = mean step / plain's.",
            f"- machine: {C.machine_note(args)}",
            "",
            "",
        ]
    )
    table = C.markdown_table(
        [
            "model",
            "variant",
            "mean step ms",
            "median step ms",
            "event ms",
            "final sparsity",
            "ratio vs plain",
            "per-round ratios",
            "target",
        ],
        rows,
    )
    print(header + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
