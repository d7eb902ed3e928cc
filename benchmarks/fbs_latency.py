"""Does FBS make inference faster? Batch-1 CPU latency of FBS-gated CifarNet vs its MAC reduction.

For each width (``--widths``, default 32 / 64 / 128) and density (``--densities``, default 0.375 / 0.5), a
CifarNet (Fashion-MNIST shape: ``in_chans=1, img_size=28, dropout=0.3``, ``hidden`` from ``--hidden``,
default 256) with random weights is gated by :func:`~lit_compress.gating.fbs.plan_fbs` / ``apply_fbs``
(every conv but the first, which reads the image) and timed beside the dense network by
:func:`lit_compress.zoo.latency.time_side_by_side`, the protocol behind the zoo cards' latency: one thread
(``--threads``), ``--rounds`` alternating rounds of ``--repeats`` calls, median; each network is timed in
NCHW and in channels-last memory format and keeps its faster median (the table names the layouts; the
dense NCHW column shows what the old, NCHW-only reference was). Both run on the first ``--images``
Fashion-MNIST test images (random inputs when the data is missing); the MAC ratio is the dense MACs over
the mean per-image MACs of batch-1 execution on them (:func:`~lit_compress.gating.fbs.macs_per_image`).
With random predictors the kept channels are arbitrary, which does not change the work. The shipped zoo
entry ``cifarnet-fashion-mnist.fbs`` is measured the same way (``zoo.load``, its test images), unless
``--no-zoo``.

FBS's batch-1 path computes in channels-last memory format even when its network is given NCHW
(``FBSConv2d.channels_last_one``, same values); ``--nchw`` adds columns with it off (FBS's batch-1 path in
NCHW, and only the NCHW layout tried for both networks), to show what the layout contributes.

The target of the issue: a batch-1 speed-up over the reference (at its best layout) of at least 0.7x the
MAC reduction at width 128.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fbs_latency.py --nchw

Quick smoke test: ``--widths 32 --densities 0.5 --rounds 1 --repeats 3 --no-zoo``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import _common as C
import torch
from torch import nn

from lit_compress.zoo.latency import NCHW, LayoutTimes

ZOO_ENTRY = "cifarnet-fashion-mnist.fbs"
DATASET = "fashion-mnist"
SHAPE = (1, 28, 28)


def cifarnet_kwargs(width: int, hidden: int) -> dict[str, Any]:
    return {"in_chans": 1, "img_size": 28, "width": width, "hidden": hidden, "dropout": 0.3}


def test_images(count: int, seed: int) -> tuple[torch.Tensor, str]:
    """The first ``count`` normalised Fashion-MNIST test images, or seeded random ones without the data."""
    from lit_compress.zoo.evaluate import image_batches

    try:
        return next(
            image_batches(DATASET, "test", batch_size=count)
        ), f"first {count} Fashion-MNIST test images"
    except (FileNotFoundError, OSError):
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(
            count, *SHAPE, generator=generator
        ), f"{count} random inputs (no Fashion-MNIST data)"


def gated_cifarnet(width: int, hidden: int, density: float, seed: int) -> nn.Module:
    from lit_compress.gating.fbs import apply_fbs, plan_fbs
    from lit_compress.models import create_model

    torch.manual_seed(seed)
    net = create_model("cifarnet", **cifarnet_kwargs(width, hidden)).eval()
    apply_fbs(net, plan_fbs(net, density=density), generator=torch.Generator().manual_seed(seed))
    return net.eval()


def kept(net: nn.Module) -> str:
    """``kept/channels`` of each gated conv, e.g. ``48/128, 96/256``."""
    from lit_compress.gating.fbs import fbs_layers, kept_channels

    return ", ".join(
        f"{kept_channels(m.density, m.out_channels)}/{m.out_channels}" for m in fbs_layers(net).values()
    )


def mac_ratio(net: nn.Module, images: torch.Tensor) -> float:
    from lit_compress.gating.fbs import macs_per_image

    with torch.inference_mode():
        per_image, dense = macs_per_image(net, images)
    return dense / float(per_image.mean())


def timed(
    net: nn.Module,
    architecture: str,
    kwargs: dict,
    shape: Sequence[int],
    images,
    args,
    nchw_only: bool = False,
) -> tuple[LayoutTimes, LayoutTimes]:
    """``(dense, FBS)`` batch-1 times per layout, by the zoo's latency protocol; ``nchw_only``: both in NCHW
    only, FBS's batch-1 path too (``FBSConv2d.channels_last_one`` off)."""
    from lit_compress.gating.fbs import FBSConv2d
    from lit_compress.zoo import latency

    models = {"dense": latency.reference_model(architecture, kwargs), "fbs": net}
    layouts = (latency.NCHW,) if nchw_only else latency.LAYOUTS
    previous = FBSConv2d.channels_last_one
    FBSConv2d.channels_last_one = not nchw_only
    try:
        times = latency.time_side_by_side(
            models,
            shape,
            batch_sizes=(1,),
            threads=args.threads,
            rounds=args.rounds,
            repeats=args.repeats,
            inputs=images,
            layouts=layouts,
        )
    finally:
        FBSConv2d.channels_last_one = previous
    return times["dense"][1], times["fbs"][1]


def row(
    label: str, density: str, net: nn.Module, architecture: str, kwargs: dict, shape, images, args
) -> list:
    ratio = mac_ratio(net, images)
    dense, fbs = timed(net, architecture, kwargs, shape, images, args)
    speedup = dense.best_ms / fbs.best_ms
    cells = [label, density, kept(net), f"{ratio:.2f}x", f"{dense.ms[NCHW]:.3f}"]
    cells += [f"{dense.best_ms:.3f} ({dense.layout})", f"{fbs.best_ms:.3f} ({fbs.layout})"]
    cells += [f"{speedup:.2f}x", f"{speedup / ratio:.2f}"]
    if args.nchw:
        dense_nchw, fbs_nchw = timed(net, architecture, kwargs, shape, images, args, nchw_only=True)
        cells += [f"{fbs_nchw.best_ms:.3f}", f"{dense_nchw.best_ms / fbs_nchw.best_ms / ratio:.2f}"]
    return cells


def zoo_row(args) -> list | None:
    from lit_compress import zoo
    from lit_compress.zoo.evaluate import timing_images

    try:
        model, card = zoo.load(ZOO_ENTRY, return_card=True)
    except Exception as err:  # a missing or unloadable entry must not hide the other rows
        print(f"(zoo entry {ZOO_ENTRY} not measured: {type(err).__name__}: {err})")
        return None
    images = timing_images(model, card.dataset.name, count=args.images)
    arch = card.architecture
    density = f"{card.compression.gating['density']:g}" if card.compression.gating else "?"
    return row(
        ZOO_ENTRY, density, model.eval(), arch.name, arch.kwargs, card.dataset.input_shape, images, args
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.375, 0.5])
    parser.add_argument("--hidden", type=int, default=256, help="width of the classifier's hidden layer")
    parser.add_argument("--rounds", type=int, default=5, help="alternating dense/FBS timing rounds")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per round")
    parser.add_argument("--images", type=int, default=512, help="test images cycled through at batch 1")
    parser.add_argument(
        "--nchw",
        action="store_true",
        help="also time FBS with channels_last_one off, both networks NCHW only",
    )
    parser.add_argument("--no-zoo", action="store_true", help=f"skip the zoo entry {ZOO_ENTRY}")
    args = C.add_common_args(parser, threads=1).parse_args(argv)
    C.setup_env(args)

    images, source = test_images(args.images, args.seed)
    rows = []
    for width in args.widths:
        for density in args.densities:
            net = gated_cifarnet(width, args.hidden, density, args.seed)
            label = f"cifarnet width {width} (random weights)"
            kwargs = cifarnet_kwargs(width, args.hidden)
            rows.append(row(label, f"{density:g}", net, "cifarnet", kwargs, SHAPE, images, args))
    if not args.no_zoo and (zoo := zoo_row(args)) is not None:
        rows.append(zoo)
    title = "\n".join(
        [
            "### FBS: batch-1 CPU speed-up vs MAC reduction (CifarNet, Fashion-MNIST shape)",
            "",
            f"Settings: lit_compress.zoo.latency.time_side_by_side, batch 1, {args.rounds} alternating "
            f"rounds of {args.repeats} calls, median, each network in NCHW and channels-last (the faster "
            f"kept); torch.set_num_threads({args.threads}); inputs: {source}. MAC ratio: dense / mean "
            "per-image MACs of batch-1 execution on them. Speed-up: dense (best layout) / FBS (best layout).",
            f"- machine: {C.machine_note(args)}",
        ]
    )
    headers = ["network", "density", "kept channels", "MAC ratio", "dense ms (NCHW)", "dense ms (best)"]
    headers += ["FBS ms (best)", "speed-up", "speed-up / MAC ratio"]
    if args.nchw:
        headers += ["FBS ms (all NCHW)", "speed-up / MAC ratio (all NCHW)"]
    print(C.markdown_table(headers, rows, title=title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
