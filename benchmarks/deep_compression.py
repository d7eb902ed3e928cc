"""Deep Compression, stage by stage: test error, bytes by stream, encode / decode time (Han et al. 2016).

For each net (LeNet-300-100, LeNet-5) the stages are read from the zoo, where each was produced by its
recipe in ``configs/``:

1. **dense**: ``<net>-mnist.dense`` (fp32 safetensors);
2. **pruned**: ``<net>-mnist.pruned-12x`` (magnitude pruning, Han et al. 2015), stored in the
   ``sparse-safetensors`` codec (bitmask + fp32 values);
3. **pruned + k-means, no retraining**: stage 2's weights clustered per layer (linear init, the bits of the
   deep-compression recipe), to show what the centroid fine-tuning recovers;
4. **trained quantization**: ``<net>-mnist.deep-compression``, whose single fit pruned, retrained, clustered
   and fine-tuned the centroids (its own recipe, not stage 2's weights), as stored with its fixed-width
   streams (the ``before Huffman`` column: ``ceil(entries * (w + b) / 8)`` + codebooks + raw tensors);
5. **+ Huffman**: the same entry's file in the ``deep-compression`` codec, decoded and evaluated again: the
   error must equal stage 4's (Huffman and the relative index are lossless; the decoded tensors are
   compared bit for bit with a fresh encode of the loaded model).

Then the per-layer breakdown in the layout of Deep Compression Tables 2 and 3 (weights kept, weight bits,
index bits, bytes before / after Huffman) and the encode / decode time of the file (median of
``--repeats``).

Numbers in the README / docs were produced by::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/deep_compression.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as C
import torch

PAPER = {  # Deep Compression, Table 1: (fp32 KB, compressed KB, ratio, error %)
    "lenet_300_100": (1070, 27, 40, 1.58),
    "lenet5": (1720, 44, 39, 0.74),
}
BITS = {"lenet_300_100": {"Linear": 5}, "lenet5": {"Conv2d": 8, "Linear": 5}}


def _file_bytes(name: str) -> int:
    from lit_compress import zoo

    return sum(f.bytes for f in zoo.card(name).files)


def _cluster_without_retraining(model, bits: dict[str, int]):
    from lit_compress.deep_compression.weight_sharing import kmeans_1d

    with torch.no_grad():
        for module in model.modules():
            k = bits.get(type(module).__name__)
            if k is None:
                continue
            w = module.weight
            kept = w != 0
            result = kmeans_1d(w[kept], 2**k, init="linear")
            w[kept] = result.centroids[result.labels].to(w.dtype)
    return model


def stage_rows(net: str, args) -> tuple[list[list[str]], list[list[str]]]:
    from lit_compress import zoo
    from lit_compress.deep_compression.codec import DeepCompressionCodec, stream_report

    dense_name, pruned_name, dc_name = (
        f"{net}-mnist.{tag}" for tag in ("dense", "pruned-12x", "deep-compression")
    )
    card = zoo.card(dc_name)
    fp32 = card.bytes.fp32
    rows = []

    def add(stage: str, model, nbytes: int, note: str = "") -> None:
        err, count = C.test_error(model)
        rows.append([net, stage, f"{err:.2f}%", count, f"{nbytes:,}", f"{fp32 / nbytes:.1f}x", note])

    add("1 dense", zoo.load(dense_name), _file_bytes(dense_name), "fp32 safetensors")
    pruned = zoo.load(pruned_name)
    add("2 pruned", pruned, _file_bytes(pruned_name), "sparse-safetensors: bitmask + fp32 values")
    clustered = _cluster_without_retraining(pruned, BITS[net])
    clustered_report = stream_report({k: v for k, v in clustered.state_dict().items()})
    add(
        "3 pruned + k-means, no retraining",
        clustered,
        clustered_report["totals"]["file_bytes"],
        "deep-compression codec of stage 2's clustered weights",
    )
    model = zoo.load(dc_name)
    data = (zoo.zoo_dir() / dc_name / card.files[0].path).read_bytes()
    report = stream_report(data)
    totals = report["totals"]
    packed = totals["weights_packed_bytes"] + totals["indices_packed_bytes"]
    fixed_width = packed + totals["codebook_bytes"] + totals["raw_bytes"] + totals["header_bytes"]
    add("4 trained quantization", model, fixed_width, "fixed-width w + b bit streams (before Huffman)")
    codec = DeepCompressionCodec()
    state = {k: v for k, v in model.state_dict().items()}
    encode_s, decode_s = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        encoded = codec.encode(state, {})
        encode_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        decoded = codec.decode(data, dc_name)
        decode_s.append(time.perf_counter() - start)
    exact = all(torch.equal(decoded[k], v) for k, v in state.items()) and len(encoded) > 0
    add("5 + Huffman (the zoo file)", model, len(data), f"decoded bit-exactly: {'yes' if exact else 'NO'}")
    paper_kb, paper_ckb, paper_ratio, paper_err = PAPER[net]
    rows.append(
        [
            net,
            "Han et al. 2016 (Table 1)",
            f"{paper_err:.2f}%",
            "-",
            f"{paper_ckb} KB",
            f"{paper_ratio}x",
            f"{paper_kb} KB -> {paper_ckb} KB",
        ]
    )
    timing = [
        net,
        f"{statistics.median(encode_s) * 1000:.1f}",
        f"{statistics.median(decode_s) * 1000:.1f}",
        f"{totals['weights_bytes']:,}",
        f"{totals['indices_bytes']:,}",
        f"{totals['codebook_bytes']:,}",
        f"{totals['raw_bytes']:,}",
        f"{totals['header_bytes']:,}",
        f"{len(data):,}",
    ]
    layers = []
    for r in report["tensors"]:
        if r["encoding"] != "shared":
            continue
        layers.append(
            [
                net,
                r["name"],
                f"{r['numel']:,}",
                f"{r['kept_pct']:.1f}%",
                r["codebook_size"],
                r["weight_bits"],
                r["index_bits"],
                r["fillers"],
                f"{r['weights_packed_bytes'] + r['indices_packed_bytes']:,}",
                f"{r['weights_bytes'] + r['indices_bytes']:,}",
                f"{r['weight_bits_huffman']:.2f}",
                f"{r['index_bits_huffman']:.2f}",
            ]
        )
    return rows, [timing], layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nets", nargs="+", default=list(PAPER), choices=list(PAPER))
    parser.add_argument("--repeats", type=int, default=5, help="encode / decode timings (median kept)")
    args = C.add_common_args(parser, threads=1).parse_args(argv)
    C.setup_env(args)
    stages, timings, layers = [], [], []
    for net in args.nets:
        s, t, layer = stage_rows(net, args)
        stages += s
        timings += t
        layers += layer
    print(
        C.markdown_table(
            ["net", "stage", "test error", "errors", "bytes", "vs fp32", "storage"],
            stages,
            title="### Deep Compression by stage (MNIST test set, 10,000 images)\n\n"
            f"- machine: {C.machine_note(args)}",
        )
    )
    print()
    print(
        C.markdown_table(
            [
                "net",
                "encode ms",
                "decode ms",
                "weights B",
                "indices B",
                "codebooks B",
                "raw B",
                "header B",
                "file B",
            ],
            timings,
            title="### Bytes by stream and codec time (median of "
            f"{args.repeats}; weights / indices after Huffman, code tables included; raw = biases)",
        )
    )
    print()
    print(
        C.markdown_table(
            [
                "net",
                "layer",
                "weights",
                "kept",
                "centroids",
                "w bits",
                "b bits",
                "fillers",
                "bytes before Huffman",
                "after Huffman",
                "w bits/weight",
                "b bits/weight",
            ],
            layers,
            title="### Per layer (the layout of Deep Compression Tables 2-3)",
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
