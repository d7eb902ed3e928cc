"""timm coverage matrix: which compression methods work on which timm families, end to end.

Runs the cells of ``tests/integration/test_timm_matrix.py`` (shared code:
``tests/integration/_timm_cells.py``): for each (family, method) an
``ImageClassifier(model="timm:<name>")`` on random 1x28x28 tensors is fitted for two optimizer steps
(batch 2, CPU) with the method's callback, the method's effect is checked, the network is exported
through ``ZooExport`` to a temporary zoo, reloaded with ``zoo.load`` and compared with the trained network.
Each cell is reported as ``works``, ``refused: <reason>`` (lit_compress declines with a clear error, as
documented in the cells module) or ``fails: <error>``.

Prints a markdown table, writes ``docs/timm_matrix.md`` and (for the full matrix) the table between the
``timm-matrix`` markers of ``README.md``::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/timm_matrix.py

Quick smoke test: ``--families mobilenetv3_small_050 --methods pruning fbs --no-write``. Exit status 1 when
a cell fails that is not a listed known bug.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.REPO))  # the cells live in the test package

from tests.integration import _timm_cells as cells

DOC = C.REPO / "docs" / "timm_matrix.md"
README = C.REPO / "README.md"
README_START, README_END = "<!-- timm-matrix:start -->", "<!-- timm-matrix:end -->"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    C.add_common_args(parser)
    parser.add_argument("--families", nargs="+", default=list(cells.FAMILIES), choices=list(cells.FAMILIES))
    parser.add_argument("--methods", nargs="+", default=list(cells.METHODS), choices=list(cells.METHODS))
    parser.add_argument("--out", type=Path, default=DOC, help="markdown file to write")
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser.parse_args(argv)


def run(families: list[str], methods: list[str]) -> dict[tuple[str, str], cells.Outcome]:
    outcomes = {}
    for family in families:
        for method in methods:
            # Silenced: ZooExport's and the callbacks' own lines.
            with (
                tempfile.TemporaryDirectory(prefix="timm-matrix-") as tmp,
                contextlib.redirect_stdout(io.StringIO()),
            ):
                outcome = cells.classify(family, method, tmp)
            outcomes[family, method] = outcome
            print(f"  {family} / {method}: {outcome.status} ({outcome.seconds:.1f} s)", file=sys.stderr)
    return outcomes


def _cell_text(outcome: cells.Outcome) -> str:
    if outcome.status == "works":
        return "works"
    return f"{outcome.status}: {outcome.detail}".replace("|", "\\|")


def table(outcomes: dict[tuple[str, str], cells.Outcome], families: list[str], methods: list[str]) -> str:
    lines = [
        "| family (timm kwargs) | " + " | ".join(methods) + " |",
        "| --- |" + " --- |" * len(methods),
    ]
    for family in families:
        name, kwargs = cells.FAMILIES[family]
        extra = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        label = f"`{name}`" + (f" ({extra})" if extra else "")
        row = [_cell_text(outcomes[family, m]) for m in methods]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def details(outcomes: dict[tuple[str, str], cells.Outcome]) -> str:
    lines = ["| cell | checked | seconds |", "| --- | --- | --- |"]
    for (family, method), outcome in outcomes.items():
        text = outcome.detail if outcome.status == "works" else _cell_text(outcome)
        lines.append(f"| {family} / {method} | {text.replace('|', '/')} | {outcome.seconds:.1f} |")
    return "\n".join(lines)


def findings(outcomes: dict[tuple[str, str], cells.Outcome]) -> list[str]:
    """Observations computed from the run (not typed by hand)."""
    notes = []
    for (family, method), outcome in outcomes.items():
        card = outcome.result.card if outcome.result is not None else None
        if method == "fbs" and card is not None and card.macs.effective >= card.macs.dense:
            notes.append(
                f"FBS on `{family}` (default targets, d={cells.FBS_DENSITY}): the card's mean MACs per image "
                f"({card.macs.effective:,}) exceed the dense network's ({card.macs.dense:,}). At 28x28 the "
                "squeeze-excitation convs and the head conv run on 1x1 maps, where a gate's saliency "
                "predictor (in x out MACs) costs as much as the conv it gates, so gating them adds work. "
                "Excluding such convs (`exclude: ['net.*.se.*', 'net.conv_head']`) avoids it; FBS now warns "
                "about such convs once and names them as a ready exclude list."
            )
    return notes


def document(outcomes, families, methods, machine: str) -> str:
    refused = {key: cells.REFUSED[key] for key in outcomes if key in cells.REFUSED}
    bugs = {key: cells.KNOWN_BUGS[key] for key in outcomes if key in cells.KNOWN_BUGS}
    counts = {s: sum(o.status == s for o in outcomes.values()) for s in ("works", "refused", "fails")}
    parts = [
        "# timm coverage matrix",
        "",
        "Every compression method of `lit_compress` on a handful of timm families, end to end: two optimizer "
        "steps on random 1x28x28 tensors (batch 2, CPU) with the method's callback, a check that the method "
        "took effect (against a hand computation where cheap), export through `ZooExport` to a temporary "
        "zoo, `zoo.load` (sha256-checked, rebuilt from the card) and its output compared with the trained "
        "network's (bit-exact; 1e-4 after physical channel removal). Generated by "
        "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/timm_matrix.py`; the same cells are the tests in "
        "`tests/integration/test_timm_matrix.py`. Do not edit by hand.",
        "",
        f"Methods: `pruning` = `Pruning(sparsity={cells.PRUNE_SPARSITY})` one-shot magnitude; `structured` = "
        f"`StructuredPruning(amount={cells.STRUCTURED_AMOUNT})` L1 channels, removed at export; `dorefa` = "
        f"`Quantization(method='dorefa', bits={cells.DOREFA_BITS}, activation_bits="
        f"{cells.DOREFA_ACTIVATION_BITS})`; `binaryconnect` = `Quantization(method='binaryconnect')`; "
        f"`distillation` = `Distillation` (KL, T={cells.DISTILL_T}, alpha={cells.DISTILL_ALPHA}) from a "
        f"differently initialised network of the same family; `fbs` = `FBS(density={cells.FBS_DENSITY})`. "
        "All with their default targets.",
        "",
        f"Result: {counts['works']} work, {counts['refused']} refused, {counts['fails']} fail.",
        "",
        table(outcomes, families, methods),
        "",
        "## Refusals",
        "",
    ]
    if refused:
        for (family, method), r in refused.items():
            parts.append(f"- **{family} / {method}** ({r.error.__name__}): {r.detail or r.reason}")
    else:
        parts.append("None in this run.")
    parts += ["", "## Known bugs", ""]
    if bugs:
        for (family, method), b in bugs.items():
            parts.append(f"- **{family} / {method}**: {b.failure} Proposed fix: {b.fix}")
    else:
        parts.append("None: no cell hit a bug in lit_compress.")
    found = findings(outcomes)
    parts += ["", "## Findings", ""]
    parts += [f"- {n}" for n in found] if found else ["None."]
    parts += ["", "## Setup notes", ""]
    parts += [f"- {n}" for n in cells.SETUP_NOTES]
    parts += ["", "## What each cell checked", "", details(outcomes), "", f"Machine: {machine}.", ""]
    return "\n".join(parts)


def update_readme(matrix: str) -> None:
    """Put ``matrix`` between the README's timm-matrix markers."""
    text = README.read_text()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    README.write_text(text[:start] + "\n" + matrix + "\n" + text[end:])
    print(f"updated the matrix in {README}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    C.setup_env(args)
    import timm

    outcomes = run(args.families, args.methods)
    machine = f"{C.machine_note(args)}, timm {timm.__version__}"
    print(table(outcomes, args.families, args.methods))
    for note in findings(outcomes):
        print(f"\n- {note}")
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(document(outcomes, args.families, args.methods, machine))
        print(f"\nwrote {args.out}", file=sys.stderr)
        if args.families == list(cells.FAMILIES) and args.methods == list(cells.METHODS):
            update_readme(table(outcomes, args.families, args.methods))
    unexpected = [k for k, o in outcomes.items() if o.status == "fails" and k not in cells.KNOWN_BUGS]
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
