"""Batch-1 CPU latency of zoo entries exported to ONNX: onnxruntime vs the PyTorch model, one thread each.

Each entry is exported with :func:`lit_compress.onnx_export.export_onnx` (checked against PyTorch) into a
temporary folder, then PyTorch (``torch.set_num_threads(1)``, ``inference_mode``) and onnxruntime
(``intra_op_num_threads=1``, default graph optimisations, CPU provider) are timed side by side on the same
random input: ``--rounds`` alternating rounds of ``--number`` calls each after a warm-up, median of the
rounds' per-call times, so that load from other processes hits both runtimes alike.

Numbers in docs/onnx.md were produced by::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/onnx_latency.py

(``--int8`` adds the int8 QAT entry, whose template takes ~10 s to build.)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_ENTRIES = ("lenet5-mnist.dense", "lenet5-mnist.structured-l1")


def _per_call_us(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number * 1e6


def time_entry(name: str, folder: Path, rounds: int, number: int) -> dict:
    import onnxruntime as ort

    from lit_compress import zoo
    from lit_compress.onnx_export import export_onnx

    model, card = zoo.load(name, return_card=True)
    shape = tuple(card.dataset.input_shape)
    report = export_onnx(model, folder / f"{name}.onnx", input_shape=shape)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(folder / f"{name}.onnx"), options, providers=["CPUExecutionProvider"])
    x = torch.randn(1, *shape)
    feed = {session.get_inputs()[0].name: x.numpy()}

    def run_torch() -> None:
        with torch.inference_mode():
            model(x)

    def run_ort() -> None:
        session.run(None, feed)

    for fn in (run_torch, run_ort):  # warm-up: allocator, packed weights, ORT's first-run planning
        _per_call_us(fn, number)
    torch_us, ort_us = [], []
    for _ in range(rounds):
        torch_us.append(_per_call_us(run_torch, number))
        ort_us.append(_per_call_us(run_ort, number))
    t, o = statistics.median(torch_us), statistics.median(ort_us)
    return {
        "entry": name,
        "form": report.form,
        "onnx_kb": report.bytes / 1024,
        "params": sum(p.numel() for p in model.parameters()),
        "torch_us": t,
        "ort_us": o,
        "speedup": t / o,
        "max_abs_diff": report.max_abs_diff,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", nargs="+", default=list(DEFAULT_ENTRIES), help="zoo entry names")
    p.add_argument("--int8", action="store_true", help="also time lenet5-mnist.int8-qat")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--number", type=int, default=200, help="calls per round")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    entries = list(args.entries) + (["lenet5-mnist.int8-qat"] if args.int8 else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in entries:
            rows.append(time_entry(name, Path(tmp), args.rounds, args.number))
    print(
        f"batch 1, 1 thread, median of {args.rounds} rounds x {args.number} calls; {platform.machine()}, "
        f"{os.cpu_count()} cores visible, torch {torch.__version__}, onnxruntime "
        f"{__import__('onnxruntime').__version__}"
    )
    print(
        "| entry | ONNX form | params | .onnx KiB | PyTorch us | onnxruntime us | speed-up | max abs diff |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['entry']} | {r['form']} | {r['params']:,} | {r['onnx_kb']:.0f} | {r['torch_us']:.0f} | "
            f"{r['ort_us']:.0f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.2g} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
