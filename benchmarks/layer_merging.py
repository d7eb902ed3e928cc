"""What does layer merging buy at inference? CPU latency of each network before and after ``merge_layers``.

:func:`lit_compress.merging.merge_layers` folds every eval-mode BatchNorm (and other per-channel affine
layers) into the preceding Conv / Linear, merges consecutive Linear layers when that is smaller, and drops
inference no-ops (Dropout, Identity). The merged network computes the same outputs up to float rounding (the
largest difference on a random batch, relative to the largest output, is printed). Both networks are timed
side by side (alternating rounds, median, ``--threads`` torch threads, default 1) at batch 1 and 256 with
random weights and BatchNorm statistics (latency does not depend on their values).

Networks: CIFAR-style ResNet-14 (shortcut "A") and ResNet-56 (shortcut "B") on 1x28x28, CifarNet on 3x32x32,
BinaryLeNet-5 and a BinaryConnect-shaped MLP (3 x 1024 Linear + BatchNorm) on 1x28x28 (float, before any
binarisation: their BatchNorms follow every layer), and timm's ResNet-18 on 3x64x64.

Numbers in docs are produced by::

    .venv/bin/python benchmarks/layer_merging.py

Quick smoke test: ``--nets resnet14-A --rounds 1``.
"""

from __future__ import annotations

import argparse
import statistics

import _common as C
import torch
from torch import nn

NETS = {
    "resnet14-A": ("resnet14", {"in_chans": 1}, (1, 28, 28)),
    "resnet56-B": ("resnet56", {"in_chans": 1, "shortcut": "B"}, (1, 28, 28)),
    "cifarnet": ("cifarnet", {}, (3, 32, 32)),
    "binary_lenet5": ("binary_lenet5", {}, (1, 28, 28)),
    "binary_mlp-3x1024": ("binary_mlp", {"hidden": [1024, 1024, 1024], "dropout": 0.2}, (1, 28, 28)),
    "timm-resnet18": ("timm:resnet18", {"num_classes": 10}, (3, 64, 64)),
}


def randomize_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Trained-looking running statistics, so the equivalence check means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--rounds", type=int, default=5, help="alternating dense/merged timing rounds")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per round and batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    args = C.add_common_args(parser, threads=1).parse_args(argv)
    C.setup_env(args)
    from lit_compress.measure import measure_latency
    from lit_compress.merging import merge_layers
    from lit_compress.models import create_model

    rows = []
    for key in args.nets:
        name, kwargs, shape = NETS[key]
        torch.manual_seed(args.seed)
        dense = randomize_batchnorm(create_model(name, **kwargs), args.seed)
        merged, report = merge_layers(dense, torch.randn(2, *shape))
        folds = sum(s.kind != "drop" for s in report.steps)
        times: dict[str, dict[int, list[float]]] = {"dense": {}, "merged": {}}
        for _ in range(args.rounds):
            for label, net in (("dense", dense), ("merged", merged)):
                result = measure_latency(
                    net, shape, args.batch_sizes, repeats=args.repeats, threads=args.threads
                )
                for b, r in result.items():
                    times[label].setdefault(b, []).append(r.median_ms)
        for b in args.batch_sizes:
            d, m = statistics.median(times["dense"][b]), statistics.median(times["merged"][b])
            rows.append(
                [
                    key,
                    b,
                    f"{report.params_before:,}",
                    f"{report.params_after:,}",
                    folds,
                    f"{d:.3f}",
                    f"{m:.3f}",
                    f"{d / m:.2f}x",
                    f"{report.max_abs_error / max(report.output_scale, 1e-30):.1e}",
                ]
            )
    title = "\n".join(
        [
            "### Layer merging: CPU latency before / after merge_layers (BN folding, Linear merging, no-ops)",
            "",
            f"Settings: random weights and BatchNorm statistics, eval mode; {args.rounds} alternating timing "
            f"rounds of {args.repeats} calls, median; torch.set_num_threads({args.threads}).",
            f"- machine: {C.machine_note(args)}",
        ]
    )
    headers = [
        "net",
        "batch",
        "params",
        "merged params",
        "merges",
        "dense ms",
        "merged ms",
        "speed-up",
        "max rel. diff",
    ]
    print(C.markdown_table(headers, rows, title=title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
