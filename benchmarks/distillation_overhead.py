"""Training-step overhead of ``Distillation`` over plain Lightning, against the cost of one teacher forward.

Setup: MNIST training images held in memory as ``B`` batches of 128 (default 50, non-shuffled), each run a
fresh ``ImageClassifier`` (same seed) trained for N optimizer steps (default 200) with SGD(lr 0.01,
momentum 0.9), no validation, ``--threads`` torch threads (default 1). Pairs (student <- teacher, random
teacher weights: timing does not depend on them): ``mlp_2x800 <- mlp_2x1200`` (Hinton's MNIST pair) and
``lenet5_small <- lenet5``.

Variants alternate plain / distilled for ``--repeats`` rounds (default 3) after a discarded warm-up round.
Step time = (end of the last epoch - start of step 0) / N, from marker callbacks placed first and last.
The teacher forward is timed alone on the same batches (``no_grad``, eval mode, median over batches).
``overhead`` = distilled step - plain step; the target is overhead <= 1.10 x teacher forward (the teacher
forward plus at most 10% for the loss, hooks and logging).

Numbers in docs/benchmarks.md were produced by::

    .venv/bin/python benchmarks/distillation_overhead.py

Quick smoke test: ``--steps 50 --batches 25 --repeats 1``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import _common as C

PAIRS = {"mlp_2x800": "mlp_2x1200", "lenet5_small": "lenet5"}
VARIANTS = ("plain", "distilled")
TARGET = 1.10


def run(student: str, variant: str, steps: int, loader, args) -> float:
    import lightning.pytorch as L

    from lit_compress.distillation import Distillation

    L.seed_everything(args.seed, verbose=False)
    model = C.classifier(student, C.sgd(0.01, 0.9))
    callbacks: list[Any] = []
    if variant == "distilled":
        teacher = {"model": PAIRS[student]}
        callbacks.append(Distillation(teacher=teacher, temperature=4.0, alpha=0.9, verbose=False))
    first, last = C.step_markers()
    trainer = C.make_trainer([first, *callbacks, last], max_steps=steps, max_epochs=-1)
    trainer.fit(model, train_dataloaders=loader)
    if trainer.global_step != steps:
        raise RuntimeError(f"ran {trainer.global_step} steps, expected {steps}")
    return 1000.0 * (last.t1 - first.t0) / steps


def teacher_forward_ms(teacher_name: str, loader) -> float:
    import torch

    from lit_compress.distillation import load_teacher

    teacher = load_teacher({"model": teacher_name})
    times = []
    with torch.no_grad():
        for i, (x, _) in enumerate(loader):
            start = time.perf_counter()
            teacher(x)
            if i:  # first call warms up
                times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--students", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run (N)")
    parser.add_argument("--batches", type=int, default=50, help="in-memory batches of 128 (one epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds plain/distilled")
    args = C.add_common_args(parser, threads=1).parse_args(argv)
    C.setup_env(args)
    loader = C.in_memory_loader(args.batches)

    rows = []
    for student in args.students:
        results: dict[str, list[float]] = {v: [] for v in VARIANTS}
        teacher_ms: list[float] = []
        for round_ in range(args.repeats + 1):  # round 0 is a warm-up, discarded
            for variant in VARIANTS:
                ms = run(student, variant, args.steps, loader, args)
                print(
                    f"[bench] {student} round {round_} {variant}: {ms:.2f} ms/step",
                    file=sys.stderr,
                    flush=True,
                )
                if round_:
                    results[variant].append(ms)
            if round_:
                teacher_ms.append(teacher_forward_ms(PAIRS[student], loader))
        plain, distilled = (statistics.median(results[v]) for v in VARIANTS)
        teacher = statistics.median(teacher_ms)
        overhead = distilled - plain
        rows.append(
            [
                f"{student} <- {PAIRS[student]}",
                f"{plain:.2f}",
                f"{distilled:.2f}",
                f"{distilled / plain:.3f}x",
                f"{teacher:.2f}",
                f"{overhead:.2f}",
                f"{overhead / teacher:.2f}",
                f"<= {TARGET:.2f}",
            ]
        )
    title = "\n".join(
        [
            "### Training-step overhead of Distillation (MNIST, in-memory batches of 128)",
            "",
            f"Settings: {args.steps} optimizer steps per run, SGD(lr=0.01, momentum=0.9), {args.repeats} "
            f"alternating rounds after 1 warm-up round, seed {args.seed}, "
            f"torch.set_num_threads({args.threads}); "
            "Distillation(T=4, alpha=0.9, kl). Medians over rounds.",
            f"- machine: {C.machine_note(args)}",
        ]
    )
    headers = [
        "student <- teacher",
        "plain ms/step",
        "distilled ms/step",
        "ratio",
        "teacher fwd ms",
        "overhead ms",
        "overhead / teacher fwd",
        "target",
    ]
    print(C.markdown_table(headers, rows, title=title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
