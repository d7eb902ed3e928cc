"""fp32 ``nn.Linear`` vs ``BinaryLinear`` (xnor + popcount) for the layers of a BNN MLP, on the CPU.

Models: the MLP ``784-W-W-W-10`` of BinaryConnect / BNN for each ``--widths`` W (default 2048 and 1024),
seeded random binary weights (every row ``+-alpha_c``). Its layers are timed one at a time, batch sizes
``--batch-sizes`` (default 1 and 256), ``torch.set_num_threads(--threads)`` (default 1), seeded random inputs:

- ``W x W`` (the hidden layers, the ones a BNN binarises) and ``784 x W`` (in_features not a multiple of
  64, so the padding path is timed too);
- **whole MLP**: fp32 (Linear + ReLU) beside the same MLP with its two ``W x W`` layers as ``BinaryLinear``
  (first and last layers stay fp32, as in BNN papers and as the ``bitpacked`` codec stores them).

Candidates: fp32 ``nn.Linear``, ``BinaryLinear(backend="native")`` (the C kernel compiled with the system
compiler; column shows ``n/a`` when it did not build) and ``BinaryLinear(backend="torch")`` (pure PyTorch).
Timing: ``lit_compress.pruning.sparse_inference.interleaved_latency_us`` (candidates alternated in blocks,
``--repeats`` rounds, median per call, ``torch.inference_mode``). ratio = candidate / fp32 (< 1: faster).
Every binary output is checked bit-for-bit against the float computation
``(sign(x) @ sign(W).T) * alpha + bias`` ("exact" column).

Also printed: the popcount variants of the pure-PyTorch path on one ``W x W`` layer's XOR words (SWAR on
int64 per word, lookup table on uint8 views, the fused in-place SWAR the module uses), and the
``bitpacked`` codec's bytes per layer of the MLP (``bytes_report``).

Numbers in the report were produced by::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/binary_inference.py

Quick smoke test: ``--repeats 1 --widths 256 --batch-sizes 1 4``.
"""

from __future__ import annotations

import argparse
import sys

import _common as C
import torch
from torch import nn


def _binary_linear(in_f: int, out_f: int, gen: torch.Generator) -> nn.Linear:
    layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        signs = torch.where(torch.randn(out_f, in_f, generator=gen) >= 0, 1.0, -1.0)
        layer.weight.copy_(signs * (torch.rand(out_f, 1, generator=gen) * 0.1 + 0.01))
        layer.bias.copy_(torch.randn(out_f, generator=gen) * 0.1)
    return layer.eval()


def _mlp(width: int, gen: torch.Generator) -> list[nn.Linear]:
    return [
        _binary_linear(784, width, gen),
        _binary_linear(width, width, gen),
        _binary_linear(width, width, gen),
        _binary_linear(width, 10, gen),
    ]


def _exact(module: nn.Module, layer: nn.Linear, x: torch.Tensor) -> bool:
    pm1 = torch.where(x >= 0, 1.0, -1.0)
    w = torch.where(layer.weight >= 0, 1.0, -1.0)
    with torch.inference_mode():
        expected = (pm1 @ w.T) * layer.weight.abs().amax(dim=1) + layer.bias
        return bool(torch.equal(module(x), expected))


def _fmt(us: float | None) -> str:
    return "n/a" if us is None else f"{us:.1f}"


def _ratio(us: float | None, base: float) -> str:
    return "n/a" if us is None else f"{us / base:.2f}x"


def _layer_rows(width: int, layers: list[nn.Linear], args, native: bool, gen: torch.Generator) -> list:
    from lit_compress.pruning.sparse_inference import interleaved_latency_us
    from lit_compress.quantization.binary_kernel import BinaryLinear

    rows = []
    for layer in (layers[1], layers[0]):
        shape = f"{layer.in_features}x{layer.out_features}"
        backends = ["native", "torch"] if native else ["torch"]
        mods = {b: BinaryLinear.from_linear(layer, backend=b) for b in backends}
        for batch in args.batch_sizes:
            x = torch.randn(batch, layer.in_features, generator=gen)
            exact = all(_exact(m, layer, x) for m in mods.values())
            times = interleaved_latency_us(
                [layer, *mods.values()], x, repeats=args.repeats, threads=args.threads
            )
            fp32, by_backend = times[0], dict(zip(backends, times[1:]))
            nat, tor = by_backend.get("native"), by_backend["torch"]
            rows.append(
                [
                    f"784-{width}-{width}-{width}-10",
                    shape,
                    batch,
                    _fmt(fp32),
                    _fmt(nat),
                    _ratio(nat, fp32),
                    _fmt(tor),
                    _ratio(tor, fp32),
                    "yes" if exact else "NO",
                ]
            )
            print(f"[bench] {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _model_rows(width: int, layers: list[nn.Linear], args, native: bool, gen: torch.Generator) -> list:
    from lit_compress.pruning.sparse_inference import interleaved_latency_us
    from lit_compress.quantization.binary_kernel import BinaryLinear

    fp32 = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2], nn.ReLU(), layers[3]).eval()
    backend = "native" if native else "torch"
    bnn = nn.Sequential(
        layers[0],
        BinaryLinear.from_linear(layers[1], backend=backend),
        BinaryLinear.from_linear(layers[2], backend=backend),
        layers[3],
    ).eval()
    rows = []
    for batch in args.batch_sizes:
        x = torch.randn(batch, 784, generator=gen)
        dense_us, bnn_us = interleaved_latency_us([fp32, bnn], x, repeats=args.repeats, threads=args.threads)
        rows.append(
            [
                f"784-{width}-{width}-{width}-10",
                backend,
                batch,
                _fmt(dense_us),
                _fmt(bnn_us),
                _ratio(bnn_us, dense_us),
            ]
        )
    return rows


def _popcount_rows(width: int, args, gen: torch.Generator) -> list:
    from lit_compress.pruning.sparse_inference import interleaved_latency_us
    from lit_compress.quantization.binary_kernel import (
        _gemm_torch,
        pack_rows,
        popcount_lut,
        popcount_swar,
    )

    n = width
    w = pack_rows(torch.rand(width, n, generator=gen) > 0.5)
    x = pack_rows(torch.rand(1, n, generator=gen) > 0.5)

    def swar(xw):
        return n - 2 * popcount_swar(xw[:, None, :] ^ w[None]).sum(-1)

    def lut(xw):
        return n - 2 * popcount_lut(xw[:, None, :] ^ w[None]).sum(-1)

    def fused(xw):
        return _gemm_torch(xw, w, n)

    if not (torch.equal(swar(x), lut(x)) and torch.equal(swar(x), fused(x))):
        raise RuntimeError("popcount variants disagree")
    times = interleaved_latency_us([swar, lut, fused], x, repeats=args.repeats, threads=args.threads)
    return [[f"{width}x{width}", 1, f"{times[0]:.1f}", f"{times[1]:.1f}", f"{times[2]:.1f}"]]


def _bytes_rows(width: int, layers: list[nn.Linear]) -> list:
    from lit_compress.quantization.bitpacked_codec import bytes_report

    state = {}
    for i, layer in enumerate(layers):
        state[f"fc{i + 1}.weight"] = layer.weight.detach()
        state[f"fc{i + 1}.bias"] = layer.bias.detach()
    for i in (0, 3):  # first and last layers real-valued, as trained in a BNN
        state[f"fc{i + 1}.weight"] = state[f"fc{i + 1}.weight"] + 1e-3 * torch.randn_like(
            state[f"fc{i + 1}.weight"]
        )
    rows = [
        [
            f"784-{width}-{width}-{width}-10",
            r["name"],
            r["encoding"],
            r["bits"],
            r["bytes"],
            r["fp32_bytes"],
            f"{r['fp32_bytes'] / max(r['bytes'], 1):.1f}x",
        ]
        for r in bytes_report(state)
        if r["name"].endswith("weight")
    ]
    total, fp32 = sum(r["bytes"] for r in bytes_report(state)), 4 * sum(t.numel() for t in state.values())
    rows.append(
        [f"784-{width}-{width}-{width}-10", "all tensors", "", "", total, fp32, f"{fp32 / total:.1f}x"]
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--widths", nargs="+", type=int, default=[2048, 1024])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timing rounds per measurement")
    parser.add_argument("--no-native", action="store_true", help="time the pure-PyTorch backend only")
    args = C.add_common_args(parser, threads=1).parse_args(argv)
    C.setup_env(args)
    from lit_compress.quantization.binary_kernel import native_available

    native = not args.no_native and native_available()
    gen = torch.Generator().manual_seed(args.seed)
    layer_rows, model_rows, pop_rows, byte_rows = [], [], [], []
    for width in args.widths:
        layers = _mlp(width, gen)
        layer_rows += _layer_rows(width, layers, args, native, gen)
        model_rows += _model_rows(width, layers, args, native, gen)
        pop_rows += _popcount_rows(width, args, gen)
        byte_rows += _bytes_rows(width, layers)

    print(
        "\n".join(
            [
                "### Binary (xnor + popcount) vs fp32 inference, BNN MLP layers (CPU)",
                "",
                f"Settings: {args.repeats} interleaved timing rounds, median per forward in microseconds, "
                f"seed {args.seed}, torch.set_num_threads({args.threads}); random inputs and binary weights. "
                "ratio = BinaryLinear time / fp32 nn.Linear time (< 1: faster). native = C kernel "
                f"({'built' if native else 'not built: n/a'}), torch = pure PyTorch.",
                f"- machine: {C.machine_note(args)}",
                "",
            ]
        )
    )
    print(
        C.markdown_table(
            [
                "model",
                "layer in x out",
                "batch",
                "fp32 us",
                "native us",
                "native/fp32",
                "torch us",
                "torch/fp32",
                "exact",
            ],
            layer_rows,
            title="#### Per layer",
        )
    )
    print()
    print(
        C.markdown_table(
            ["model", "backend", "batch", "fp32 MLP us", "binary-hidden MLP us", "ratio"],
            model_rows,
            title="#### Whole MLP: fp32 vs hidden W x W layers as BinaryLinear (first/last layers fp32)",
        )
    )
    print()
    print(
        C.markdown_table(
            ["layer", "batch", "SWAR per word us", "LUT (uint8 view) us", "fused in-place SWAR us"],
            pop_rows,
            title="#### Pure-PyTorch popcount variants (xor + popcount + row sum, one W x W layer)",
        )
    )
    print()
    print(
        C.markdown_table(
            ["model", "tensor", "encoding", "bits", "bytes", "fp32 bytes", "fp32/bytes"],
            byte_rows,
            title="#### Storage, bitpacked codec (bytes_report; hidden weights binary, first/last fp32)",
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
