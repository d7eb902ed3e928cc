"""Sparse (CSR) vs dense inference latency of pruned LeNet-300-100 on the CPU, per model and per layer.

Models: LeNet-300-100 from a seeded random init, magnitude-pruned per layer (each Linear loses its
smallest-|w| weights, via ``layerwise_masks`` + ``apply_masks``) to each ``--sparsities`` level (default
90 / 95 / 98%), plus the zoo entry ``lenet_300_100-mnist.pruned-12x`` when it loads. Batch sizes 1 and 256
(``--batch-sizes``), ``torch.set_num_threads(--threads)`` (default 1), seeded random inputs.

Timing: ``lit_compress.pruning.sparse_inference.interleaved_latency_us``: the candidates are timed in
alternating blocks (each block >= 0.2 ms of calls, after a warm-up), ``--repeats`` rounds (default 15),
the median per call reported, under ``torch.inference_mode``. Interleaving gives every candidate the same
background load.

- **whole model**: the dense model, ``all CSR`` (every Linear a ``SparseLinear``:
  ``to_sparse_inference(min_sparsity=0, measure=False)``) and ``auto`` (``to_sparse_inference`` with
  ``measure=True`` at that batch size: CSR only for layers where it timed faster), interleaved; ratio =
  candidate / dense (< 1: faster). The all-CSR output is checked against the dense one (max |diff|).
- **per layer**: each Linear dense vs ``SparseLinear.from_dense`` on a random input of its own shape.
- **crossover**: ``crossover(in, out, batch)`` for each LeNet-300-100 layer shape: the lowest sparsity of
  the grid (``--grid``) from which CSR is faster at that and every higher grid point; random weights with
  uniformly placed zeros.
- ``--conv`` adds the measurement behind not shipping a sparse Conv2d: im2col (``F.unfold``) + CSR
  ``addmm`` vs ``F.conv2d`` for the LeNet-5 and two CIFAR-ResNet conv shapes.

Numbers in the report were produced by::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sparse_inference.py --repeats 5

Quick smoke test: ``--repeats 1 --batch-sizes 1 --sparsities 0.95 --grid 0.5 0.95``.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import _common as C
import torch
import torch.nn.functional as F
from torch import nn

ZOO_ENTRY = "lenet_300_100-mnist.pruned-12x"
LAYERS = ("fc1", "fc2", "fc3")


def _pruned_lenet(sparsity: float, seed: int) -> nn.Module:
    from lit_compress.models import create_model
    from lit_compress.pruning import apply_masks, layerwise_masks

    torch.manual_seed(seed)
    net = create_model("lenet_300_100").eval()
    params = {f"{n}.weight": m.weight for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    scores = {n: p.detach().abs() for n, p in params.items()}
    apply_masks(params, layerwise_masks(scores, dict.fromkeys(params, sparsity)))
    return net


def _models(args) -> list[tuple[str, nn.Module]]:
    models = [(f"random init, {s:.0%} per layer", _pruned_lenet(s, args.seed)) for s in args.sparsities]
    if not args.no_zoo:
        try:
            from lit_compress import zoo

            models.append((ZOO_ENTRY, zoo.load(ZOO_ENTRY).eval()))
        except Exception as exc:  # the table says why the entry is missing instead of failing the run
            print(f"[bench] zoo entry {ZOO_ENTRY} not available: {exc}", file=sys.stderr)
    return models


def _zeros(w: torch.Tensor) -> float:
    return float((w == 0).float().mean())


def _model_rows(name: str, net: nn.Module, batch: int, args) -> tuple[list, list]:
    from lit_compress.pruning.sparse_inference import (
        SparseLinear,
        interleaved_latency_us,
        to_sparse_inference,
    )

    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    all_csr, _ = to_sparse_inference(net, min_sparsity=0.0, measure=False)
    auto, report = to_sparse_inference(net, batch_size=batch, threads=args.threads, repeats=args.repeats)
    with torch.inference_mode():
        diff = float((all_csr(x) - net(x)).abs().max())
        same = bool(torch.equal(all_csr(x).argmax(1), net(x).argmax(1)))
    dense_us, csr_us, auto_us = interleaved_latency_us(
        [net, all_csr, auto], x, repeats=args.repeats, threads=args.threads
    )
    chosen = ",".join(n for n, r in report.items() if r["chosen"] == "csr") or "none"
    sparsity = 1.0 - sum(int((m.weight != 0).sum()) for m in _linears(net)) / sum(
        m.weight.numel() for m in _linears(net)
    )
    model_row = [
        name,
        f"{sparsity:.1%}",
        batch,
        f"{dense_us:.1f}",
        f"{csr_us:.1f}",
        f"{csr_us / dense_us:.2f}x",
        f"{auto_us:.1f}",
        f"{auto_us / dense_us:.2f}x",
        chosen,
        f"{diff:.1e}",
        "yes" if same else "NO",
    ]
    layer_rows = []
    for layer_name in LAYERS:
        layer = getattr(net, layer_name)
        xl = torch.randn(batch, layer.in_features, generator=gen)
        d, s = interleaved_latency_us(
            [layer, SparseLinear.from_dense(layer)], xl, repeats=args.repeats, threads=args.threads
        )
        layer_rows.append(
            [
                name,
                layer_name,
                f"{layer.in_features}->{layer.out_features}",
                f"{_zeros(layer.weight):.1%}",
                batch,
                f"{d:.1f}",
                f"{s:.1f}",
                f"{s / d:.2f}x",
            ]
        )
    return model_row, layer_rows


def _linears(net: nn.Module) -> list[nn.Linear]:
    return [m for m in net.modules() if isinstance(m, nn.Linear)]


def _crossover_rows(args) -> list:
    from lit_compress.pruning.sparse_inference import crossover

    shapes = [(784, 300), (300, 100), (100, 10)]
    rows = []
    for in_f, out_f in shapes:
        for batch in args.batch_sizes:
            found = crossover(
                in_f, out_f, batch, sparsities=args.grid, threads=args.threads, repeats=args.repeats
            )
            rows.append([f"{in_f}->{out_f}", batch, "never" if found is None else f"{found:.1%}"])
            print(f"[bench] crossover {in_f}->{out_f} batch {batch}: {found}", file=sys.stderr, flush=True)
    return rows


def _im2col_csr_conv(conv: nn.Conv2d):
    """im2col + CSR addmm for a groups=1, zero-padded Conv2d (benchmark-only prototype)."""
    weight = conv.weight.detach().reshape(conv.out_channels, -1).to_sparse_csr()
    weight = torch.sparse_csr_tensor(
        weight.crow_indices().int(), weight.col_indices().int(), weight.values(), weight.shape
    )
    bias = conv.bias.detach()[:, None]
    k, pad = conv.kernel_size, conv.padding

    def forward(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        cols = F.unfold(x, k, padding=pad)  # [N, C*k*k, L]
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [C*k*k, N*L]
        out = torch.addmm(bias, weight, cols)  # [O, N*L]
        ho, wo = h + 2 * pad[0] - k[0] + 1, w + 2 * pad[1] - k[1] + 1
        return out.reshape(conv.out_channels, n, ho, wo).permute(1, 0, 2, 3).contiguous()

    return forward


def _conv_rows(args) -> list:
    from lit_compress.pruning.sparse_inference import interleaved_latency_us

    shapes = [
        ("LeNet-5 conv1", 1, 20, 5, 28, 0),
        ("LeNet-5 conv2", 20, 50, 5, 12, 0),
        ("ResNet-CIFAR 16->16 @32x32", 16, 16, 3, 32, 1),
        ("ResNet-CIFAR 64->64 @8x8", 64, 64, 3, 8, 1),
    ]
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for label, cin, cout, k, side, pad in shapes:
        for sparsity in args.sparsities:
            conv = nn.Conv2d(cin, cout, k, padding=pad).eval()
            with torch.no_grad():
                flat = conv.weight.view(-1)
                flat[torch.randperm(flat.numel(), generator=gen)[: round(sparsity * flat.numel())]] = 0.0
            sparse = _im2col_csr_conv(conv)
            for batch in (1, 64):
                x = torch.randn(batch, cin, side, side, generator=gen)
                with torch.inference_mode():
                    torch.testing.assert_close(sparse(x), conv(x), rtol=1e-4, atol=1e-4)
                d, s = interleaved_latency_us([conv, sparse], x, repeats=args.repeats, threads=args.threads)
                rows.append([label, f"{sparsity:.0%}", batch, f"{d:.0f}", f"{s:.0f}", f"{s / d:.2f}x"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds per measurement")
    parser.add_argument(
        "--grid",
        nargs="+",
        type=float,
        default=[0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99],
        help="sparsities tried by the crossover search",
    )
    parser.add_argument("--no-zoo", action="store_true", help=f"skip the zoo entry {ZOO_ENTRY}")
    parser.add_argument("--conv", action="store_true", help="also time an im2col + CSR Conv2d prototype")
    args = C.add_common_args(parser, threads=1).parse_args(argv)
    if any(not 0.0 <= s < 1.0 for s in args.sparsities):
        parser.error("--sparsities must be in [0, 1)")
    C.setup_env(args)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")

    model_rows, layer_rows = [], []
    for name, net in _models(args):
        for batch in args.batch_sizes:
            m_row, l_rows = _model_rows(name, net, batch, args)
            print(f"[bench] {m_row}", file=sys.stderr, flush=True)
            model_rows.append(m_row)
            layer_rows.extend(l_rows)
    crossover_rows = _crossover_rows(args)

    print(
        "\n".join(
            [
                "### Sparse (CSR) vs dense inference, LeNet-300-100 (CPU)",
                "",
                f"Settings: {args.repeats} interleaved timing rounds, median per forward in microseconds, "
                f"seed {args.seed}, torch.set_num_threads({args.threads}); random inputs. "
                "ratio = CSR (or auto) time / dense time (< 1: faster). "
                "auto = to_sparse_inference(measure=True) at that batch size.",
                f"- machine: {C.machine_note(args)}",
                "",
            ]
        )
    )
    print(
        C.markdown_table(
            [
                "model",
                "weight sparsity",
                "batch",
                "dense us",
                "all-CSR us",
                "CSR/dense",
                "auto us",
                "auto/dense",
                "auto CSR layers",
                "max |diff|",
                "same argmax",
            ],
            model_rows,
            title="#### Whole model",
        )
    )
    print()
    print(
        C.markdown_table(
            ["model", "layer", "shape", "sparsity", "batch", "dense us", "CSR us", "CSR/dense"],
            layer_rows,
            title="#### Per layer",
        )
    )
    print()
    grid = ", ".join(f"{g:g}" for g in sorted(args.grid))
    print(
        C.markdown_table(
            ["layer shape", "batch", "crossover sparsity"],
            crossover_rows,
            title=f"#### Crossover: lowest sparsity from which CSR stays faster (grid {grid})",
        )
    )
    if args.conv:
        print()
        print(
            C.markdown_table(
                ["conv", "sparsity", "batch", "dense us", "im2col+CSR us", "CSR/dense"],
                _conv_rows(args),
                title="#### Conv2d prototype (not shipped): im2col + CSR addmm vs F.conv2d",
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
