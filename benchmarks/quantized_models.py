"""The zoo's quantized models (binary, k-bit, int8) against fp32: CPU latency, file bytes and bytes per layer.

For every zoo entry whose card reports fewer than 32 weight bits (or the ``--entries`` given):

- **latency**: the entry as deployed (``zoo.load`` + :func:`lit_compress.zoo.latency.inference_form`: layers
  with binary weights *and* binary inputs on the xnor + popcount kernel, int8 entries on PyTorch's int8 CPU
  kernels) beside its fp32 reference architecture (same constructor arguments, dense), timed side by side
  with :func:`lit_compress.zoo.latency.measure_card_latency` (alternating rounds, medians), batch 1 and 256,
  ``torch.set_num_threads(--threads)`` (default 1);
- **bytes**: the entry's weight file against ``4 x parameters`` (fp32);
- **bytes per layer** (``bitpacked`` entries): each module's tensors as the codec stores them (encoding,
  bits, bytes) against fp32, from the file's own validated header. This is where the first / last layers,
  biases and BatchNorm, which stay fp32, show up.

Numbers in docs/benchmarks.md were produced by::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quantized_models.py

Quick smoke test: ``--rounds 1 --repeats 3``.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import _common as C


def quantized_entries() -> list[str]:
    from lit_compress import zoo

    return [n for n in zoo.list_models() if zoo.card(n).compression.bits < 32]


def latency_rows(names: list[str], args) -> list[list[str]]:
    from lit_compress import zoo
    from lit_compress.quantization.binary_inference import binary_inference_plan
    from lit_compress.zoo.latency import measure_card_latency

    rows = []
    for name in names:
        card = zoo.card(name)
        model = zoo.load(name)
        binary = sum(v == "binary" for v in binary_inference_plan(model).values())
        results = measure_card_latency(
            model,
            card.architecture.name,
            dict(card.architecture.kwargs),
            card.dataset.input_shape,
            batch_sizes=args.batch_sizes,
            threads=args.threads,
            rounds=args.rounds,
            repeats=args.repeats,
        )
        for r in results:
            rows.append(
                [
                    name,
                    card.compression.bits,
                    binary,
                    r.batch_size,
                    f"{r.reference_ms:.3f}",
                    f"{r.ms:.3f}",
                    f"{r.speedup:.2f}x",
                    f"{card.bytes.fp32:,}",
                    f"{card.bytes.file:,}",
                    f"{card.bytes.fp32 / card.bytes.file:.1f}x",
                ]
            )
    return rows


def layer_rows(name: str) -> list[list[str]]:
    from lit_compress import zoo
    from lit_compress.quantization.bitpacked_codec import read_index

    card = zoo.card(name)
    (weights,) = [f for f in card.files if f.format == "bitpacked"] or [None]
    if weights is None:
        return []
    index = read_index((zoo.zoo_dir() / name / weights.path).read_bytes(), source=name)
    modules: dict[str, list[dict]] = defaultdict(list)
    for entry in index["tensors"]:
        modules[entry["name"].rpartition(".")[0]].append(entry)
    rows = []
    for module, entries in modules.items():
        stored = sum(length for e in entries for _, length in e["parts"].values())
        numel = sum(_numel(e["shape"]) for e in entries if e["dtype"].startswith("float"))
        coded = [
            f"{e['name'].rpartition('.')[2]} {e['encoding']} {e['bits']}b"
            for e in entries
            if e["encoding"] != "raw"
        ]
        raw = [e["name"].rpartition(".")[2] for e in entries if e["encoding"] == "raw"]
        kinds = "; ".join(coded + ([f"raw: {', '.join(raw)}"] if raw else []))
        fp32 = 4 * numel
        ratio = f"{fp32 / stored:.1f}x" if stored and fp32 else "-"
        rows.append([name, module, kinds, f"{fp32:,}", f"{stored:,}", ratio])
    return rows


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", nargs="+", default=None, help="zoo entries (default: all quantized)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (median kept)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per round")
    args = C.add_common_args(parser, threads=1).parse_args(argv)
    C.setup_env(args)
    names = args.entries or quantized_entries()

    title = "\n".join(
        [
            "### Quantized zoo entries vs their fp32 architecture: CPU latency and bytes",
            "",
            f"Settings: batch sizes {args.batch_sizes}, {args.rounds} alternating rounds x {args.repeats} "
            f"calls, median; torch.set_num_threads({args.threads}). 'binary layers' = layers run on the "
            "xnor + popcount kernel.",
            f"- machine: {C.machine_note(args)}",
        ]
    )
    headers = [
        "entry",
        "bits",
        "binary layers",
        "batch",
        "fp32 ms",
        "ours ms",
        "speed-up",
        "fp32 bytes",
        "file bytes",
        "smaller",
    ]
    print(C.markdown_table(headers, latency_rows(names, args), title=title))
    rows = [row for name in names for row in layer_rows(name)]
    if rows:
        print()
        headers = ["entry", "module", "tensors (encoding, bits)", "fp32 bytes", "stored bytes", "smaller"]
        title = "### Bytes per layer of the bit-packed entries (payload; the file adds one JSON header)"
        print(C.markdown_table(headers, rows, title=title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
