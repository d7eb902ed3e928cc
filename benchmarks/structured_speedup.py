"""Does structured pruning make networks faster? CPU latency ratio vs MAC ratio after physical removal.

For each network (random weights: latency does not depend on their values), the prunable channel groups
(:func:`lit_compress.pruning.structured.channel_groups`) keep the same fraction ``r`` of their channels,
chosen by L1 filter norm (Li et al. 2017), counts rounded to multiples of ``--round-to`` (default 8:
oneDNN's CPU convolutions are markedly slower on odd channel counts, e.g. 12 channels slower than 16);
``r`` is found by bisection so that the dense / pruned MAC ratio
hits ``--mac-ratio`` (default 2.0). The channels are then physically removed
(:func:`~lit_compress.pruning.structured.remove_channels`) and the dense and pruned networks are timed
side by side (alternating rounds, median, ``--threads`` torch threads, default 1) at batch 1 and 256.

Networks: LeNet-5 (28x28x1), CIFAR-style ResNet-56 and ResNet-14 with zero-padding shortcuts on 28x28x1
(Fashion-MNIST shape; only the block-internal channels are prunable there, as in Li et al.), and the same
with 1x1 shortcuts ("B", residual stages pruned together).

The target of the issue: a 2x MAC cut gives >= 1.7x measured speed-up. Bytes are those of the
safetensors state_dict.

Numbers in docs/benchmarks.md were produced by::

    .venv/bin/python benchmarks/structured_speedup.py

Quick smoke test: ``--nets lenet5 --rounds 1``.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import _common as C
import torch
from torch import nn

NETS = {
    "lenet5": ("lenet5", {}),
    "resnet56-A": ("resnet56", {"in_chans": 1}),
    "resnet56-B": ("resnet56", {"in_chans": 1, "shortcut": "B"}),
    "resnet14-A": ("resnet14", {"in_chans": 1}),
}
SHAPE = (1, 28, 28)


def l1_keep(model: nn.Module, groups, fraction: float, round_to: int = 1) -> dict[str, torch.Tensor]:
    keep = {}
    for group in groups:
        if not group.prunable:
            continue
        scores = torch.zeros(group.size)
        for ref in group.producers:
            w = model.get_submodule(ref.module).weight.detach()
            scores += w.abs().flatten(1).sum(1)
        count = max(1, round(fraction * group.size))
        if round_to > 1:  # CPU conv kernels are much faster on channel counts that are multiples of 8
            count = min(group.size, max(round_to, round_to * round(count / round_to)))
        keep[group.name] = scores.topk(count).indices.sort().values
    return keep


def pruned(model: nn.Module, fraction: float, round_to: int) -> nn.Module:
    from lit_compress.pruning.structured import channel_groups, remove_channels

    net = copy.deepcopy(model)
    groups = channel_groups(net, torch.zeros(1, *SHAPE))
    remove_channels(net, groups, l1_keep(net, groups, fraction, round_to))
    return net


def macs(model: nn.Module) -> float:
    from lit_compress.measure import count_macs

    return count_macs(model, input_shape=list(SHAPE)).dense


def for_mac_ratio(model: nn.Module, target: float, round_to: int) -> tuple[nn.Module, float]:
    dense = macs(model)
    lo, hi = 0.02, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        if dense / macs(pruned(model, mid, round_to)) >= target:
            lo = mid
        else:
            hi = mid
    return pruned(model, lo, round_to), lo


def state_bytes(model: nn.Module) -> int:
    from safetensors.torch import save

    return len(save({k: v.contiguous() for k, v in model.state_dict().items()}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    parser.add_argument("--mac-ratio", type=float, default=2.0)
    parser.add_argument("--round-to", type=int, default=8, help="kept channel counts rounded to a multiple")
    parser.add_argument("--rounds", type=int, default=5, help="alternating dense/pruned timing rounds")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256])
    args = C.add_common_args(parser, threads=1).parse_args(argv)
    C.setup_env(args)
    from lit_compress.measure import measure_latency
    from lit_compress.models import create_model

    rows = []
    for key in args.nets:
        name, kwargs = NETS[key]
        torch.manual_seed(args.seed)
        dense = create_model(name, **kwargs).eval()
        small, fraction = for_mac_ratio(dense, args.mac_ratio, args.round_to)
        small.eval()
        times: dict[str, dict[int, list[float]]] = {"dense": {}, "pruned": {}}
        for _ in range(args.rounds):
            for label, net in (("dense", dense), ("pruned", small)):
                result = measure_latency(
                    net, SHAPE, args.batch_sizes, repeats=10 if key != "lenet5" else 30, threads=args.threads
                )
                for b, r in result.items():
                    times[label].setdefault(b, []).append(r.median_ms)
        mac_ratio = macs(dense) / macs(small)
        for b in args.batch_sizes:
            d, p = statistics.median(times["dense"][b]), statistics.median(times["pruned"][b])
            rows.append(
                [
                    key,
                    f"{fraction:.3f}",
                    b,
                    f"{mac_ratio:.2f}x",
                    f"{d:.3f}",
                    f"{p:.3f}",
                    f"{d / p:.2f}x",
                    f"{(d / p) / mac_ratio:.2f}",
                    f"{state_bytes(dense) / state_bytes(small):.2f}x",
                ]
            )
    title = "\n".join(
        [
            f"### Structured pruning: CPU speed-up vs MAC reduction (target MAC ratio {args.mac_ratio}x)",
            "",
            f"Settings: L1 filter norm, the same kept fraction in every prunable group (bisection on the MAC "
            f"ratio), kept counts rounded to multiples of {args.round_to}, physical removal; "
            f"{args.rounds} alternating timing rounds, median; "
            f"torch.set_num_threads({args.threads}); input {list(SHAPE)}.",
            f"- machine: {C.machine_note(args)}",
        ]
    )
    headers = [
        "net",
        "kept fraction",
        "batch",
        "MAC ratio",
        "dense ms",
        "pruned ms",
        "speed-up",
        "speed-up / MAC ratio",
        "bytes ratio",
    ]
    print(C.markdown_table(headers, rows, title=title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
