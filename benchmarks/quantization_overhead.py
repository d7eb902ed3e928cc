"""Training-step time of each quantizer (``Quantization`` presets and ``Int8QAT``) against fp32 training.

Setup: MNIST training images held in memory as ``B`` batches of 128 (default 40, non-shuffled); each run
trains a fresh ``ImageClassifier`` (same seed) for N optimizer steps (default 150) with Adam(lr 1e-3), no
validation, ``--threads`` torch threads (default 1). Nets:

- ``binary_lenet5`` (conv 32-64, fc 512, BatchNorm, hard-tanh): the binary LeNet-5 of the zoo;
- ``binary_mlp`` 784-1024-1024-1024-10 (BatchNorm, hard-tanh): the BinaryConnect MLP of the zoo.

Variants (first and last layers kept real where the method's paper does, as the zoo recipes do):
``fp32``; ``binaryconnect`` (deterministic) and ``binaryconnect-stoch``; ``bnn``; ``xnor``;
``dorefa w2a2`` and ``dorefa w8a8`` (k-bit weights and inputs); ``int8 qat`` (torch.ao fake-quant with
BN folding where a conv-BN pair exists; the MLP's Linear-BN pairs are left unfolded).

Variants alternate in each of ``--repeats`` rounds (default 3) after a discarded warm-up round; step time is
(end of the last step - start of step 0) / N from marker callbacks placed first and last; medians over
rounds. ``ratio`` = variant / fp32 step time.

Numbers in docs/benchmarks.md were produced by::

    .venv/bin/python benchmarks/quantization_overhead.py

Quick smoke test: ``--steps 20 --batches 10 --repeats 1``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from typing import Any

import _common as C

NETS: dict[str, dict[str, Any]] = {
    "binary_lenet5": {"widths": [32, 64, 512], "activation": "hardtanh"},
    "binary_mlp": {"hidden": [1024, 1024, 1024], "activation": "hardtanh"},
}
VARIANTS = (
    "fp32",
    "binaryconnect",
    "binaryconnect-stoch",
    "bnn",
    "xnor",
    "dorefa w2a2",
    "dorefa w8a8",
    "int8 qat",
)


def callbacks_for(variant: str) -> list[Any]:
    from lit_compress.quantization import Int8QAT, Quantization

    quiet = {"verbose": False}
    return {
        "fp32": lambda: [],
        "binaryconnect": lambda: [Quantization(method="binaryconnect", **quiet)],
        "binaryconnect-stoch": lambda: [Quantization(method="binaryconnect", stochastic=True, **quiet)],
        "bnn": lambda: [Quantization(method="bnn", **quiet)],
        "xnor": lambda: [Quantization(method="xnor", **quiet)],
        "dorefa w2a2": lambda: [Quantization(method="dorefa", bits=2, activation_bits=2, **quiet)],
        "dorefa w8a8": lambda: [Quantization(method="dorefa", bits=8, activation_bits=8, **quiet)],
        "int8 qat": lambda: [Int8QAT(example_input_shape=[1, 1, 28, 28], allow_unfolded_bn=True, **quiet)],
    }[variant]()


def run(net: str, variant: str, steps: int, loader, args) -> float:
    import lightning.pytorch as L
    import torch

    L.seed_everything(args.seed, verbose=False)
    model = C.classifier(net, partial(torch.optim.Adam, lr=1e-3), model_kwargs=NETS[net])
    first, last = C.step_markers()
    trainer = C.make_trainer([first, *callbacks_for(variant), last], max_steps=steps, max_epochs=-1)
    trainer.fit(model, train_dataloaders=loader)
    if trainer.global_step != steps:
        raise RuntimeError(f"ran {trainer.global_step} steps, expected {steps}")
    return 1000.0 * (last.t1 - first.t0) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (N)")
    parser.add_argument("--batches", type=int, default=40, help="in-memory batches of 128 (one epoch)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all variants")
    args = C.add_common_args(parser, threads=1).parse_args(argv)
    C.setup_env(args)
    loader = C.in_memory_loader(args.batches)
    variants = ["fp32", *[v for v in args.variants if v != "fp32"]]

    rows = []
    for net in args.nets:
        results: dict[str, list[float]] = {v: [] for v in variants}
        for round_ in range(args.repeats + 1):  # round 0 is a warm-up, discarded
            for variant in variants:
                ms = run(net, variant, args.steps, loader, args)
                print(
                    f"[bench] {net} round {round_} {variant}: {ms:.2f} ms/step", file=sys.stderr, flush=True
                )
                if round_:
                    results[variant].append(ms)
        base = statistics.median(results["fp32"])
        for variant in variants:
            ms = statistics.median(results[variant])
            spread = f"{min(results[variant]):.2f}-{max(results[variant]):.2f}"
            rows.append([net, variant, f"{ms:.2f}", spread, f"{ms / base:.2f}x"])
    title = "\n".join(
        [
            "### Training-step time of each quantizer vs fp32 (MNIST, in-memory batches of 128)",
            "",
            f"Settings: {args.steps} optimizer steps per run, Adam(lr=1e-3), {args.repeats} rounds over all "
            f"variants after 1 warm-up round, seed {args.seed}, torch.set_num_threads({args.threads}). "
            "Medians over rounds (min-max beside).",
            f"- machine: {C.machine_note(args)}",
        ]
    )
    headers = ["net", "variant", "ms/step", "min-max", "ratio vs fp32"]
    print(C.markdown_table(headers, rows, title=title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
