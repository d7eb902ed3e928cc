"""``lit-compress zoo {list,show,eval,verify,retime,export,readme}``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lit_compress.zoo.errors import ZooError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lit-compress zoo", description="Browse, load-check and re-measure the zoo."
    )
    p.add_argument("--zoo", default=None, help="zoo folder (default: $LIT_COMPRESS_ZOO, the shipped zoo)")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="table of entries")
    ls.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. '*mnist*'")
    show = sub.add_parser("show", help="print an entry's card")
    show.add_argument("name")
    ev = sub.add_parser("eval", help="re-measure one entry on its test set; exit 1 if it differs")
    ev.add_argument("name")
    ev.add_argument("--data-dir", default=None)
    ver = sub.add_parser("verify", help="re-measure every entry; exit 1 on any difference")
    ver.add_argument("pattern", nargs="?", default="*")
    ver.add_argument("--data-dir", default=None)
    ver.add_argument("--error-tolerance", type=int, default=0, help="allowed difference in test error count")
    ver.add_argument(
        "--latency",
        action="store_true",
        help="also re-time entries whose card claims a CPU speed-up and fail if it no longer holds "
        "(wall-clock: run it on a quiet machine)",
    )
    rt = sub.add_parser(
        "retime",
        help="re-measure the latency on matching cards under the current protocol and rewrite only that "
        "(wall-clock: run it on a quiet machine)",
    )
    rt.add_argument("pattern", help="shell-style pattern of the entries, e.g. 'cifarnet-*'")
    rt.add_argument("--data-dir", default=None)
    rt.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (median kept)")
    rt.add_argument("--repeats", type=int, default=20, help="timed calls per round")
    rt.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    ex = sub.add_parser("export", help="turn a Lightning checkpoint of an ImageClassifier into a zoo entry")
    ex.add_argument("--checkpoint", required=True, help=".ckpt written by `lit-compress fit`")
    ex.add_argument("--config", required=True, help="the recipe YAML that produced the checkpoint")
    ex.add_argument("--name", required=True, help="entry name 'arch-dataset.tag'")
    ex.add_argument("--dataset", required=True, help="mnist or fashion-mnist")
    ex.add_argument("--paper", default="")
    ex.add_argument("--notes", default="")
    ex.add_argument("--overwrite", action="store_true")
    ex.add_argument("--codec", default="safetensors", help="weight format: safetensors or sparse-safetensors")
    ex.add_argument("--data-dir", default=None)
    rd = sub.add_parser("readme", help="regenerate the zoo table in README.md from the cards")
    rd.add_argument("--readme", default="README.md")
    rd.add_argument("--check", action="store_true", help="exit 1 if README's table differs from the cards")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ZooError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _list(args) -> int:
    from lit_compress.zoo.registry import all_cards
    from lit_compress.zoo.table import text_table

    cards = all_cards(args.pattern, args.zoo)
    print(text_table(cards) if cards else f"no zoo entries match {args.pattern!r}")
    return 0


def _show(args) -> int:
    from lit_compress.zoo.registry import card

    print(card(args.name, args.zoo).to_json(), end="")
    return 0


def _eval(args) -> int:
    from lit_compress.zoo.registry import card
    from lit_compress.zoo.verify import verify_entry

    card(args.name, args.zoo)  # an unknown name is a usage error (exit 2, with close names)
    result = verify_entry(args.name, args.zoo, args.data_dir)
    print(
        json.dumps(
            {
                "name": result.name,
                "measured": result.measured,
                "matches_card": result.ok,
                "differences": result.problems,
                "seconds": round(result.seconds, 2),
            },
            indent=2,
        )
    )
    return 0 if result.ok else 1


def _verify(args) -> int:
    from lit_compress.zoo.verify import verify

    start = time.perf_counter()
    results = verify(args.pattern, args.zoo, args.data_dir, args.error_tolerance, args.latency)
    for r in results:
        status = "OK  " if r.ok else "FAIL"
        print(f"{status} {r.name}  ({r.seconds:.1f} s)")
        for problem in r.problems:
            print(f"       {problem}")
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} verified, {failed} failed in {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


def _retime(args) -> int:
    from lit_compress.zoo.retime import retime

    for name in ("rounds", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    busy = _busy_note()
    if busy:
        print(f"warning: {busy}; the cards would record timings from a loaded machine", file=sys.stderr)
    results = retime(
        args.pattern,
        args.zoo,
        args.data_dir,
        rounds=args.rounds,
        repeats=args.repeats,
        write=not args.dry_run,
    )
    for r in results:
        if not r.new:
            print(f"skip {r.name}  (its card has no latency)")
            continue
        print(f"{'wrote' if r.written else 'would write'} {r.name}")
        for old, new in zip(r.old, r.new):
            print(
                f"       batch {new.batch_size}: {old.speedup:.2f}x vs {old.reference} -> "
                f"{new.speedup:.2f}x vs {new.reference} ({new.ms:.3f} ms vs {new.reference_ms:.3f} ms)"
            )
    return 0


def _busy_note() -> str | None:
    """A note when other work occupies the CPU cores (1-minute load average at least the core count minus
    one), or None (also where the load average is unavailable)."""
    import os

    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    if load < max(cores - 1, 1):
        return None
    return f"load average {load:.2f} on {cores} CPU cores: other processes compete with the timing"


def _export(args) -> int:
    from lit_compress.zoo.from_lightning import export_checkpoint

    card = export_checkpoint(
        args.checkpoint,
        config=args.config,
        name=args.name,
        dataset=args.dataset,
        paper=args.paper,
        notes=args.notes,
        codec=args.codec,
        zoo=args.zoo,
        data_dir=args.data_dir,
        overwrite=args.overwrite,
    )
    print(
        f"wrote zoo entry {card.name}: top-1 {card.metrics.top1:.2%} ({card.metrics.errors} errors), "
        f"{card.params.nonzero:,} nonzero params"
    )
    return 0


def _readme(args) -> int:
    from lit_compress.zoo.registry import all_cards
    from lit_compress.zoo.storage import atomic_write_text
    from lit_compress.zoo.table import readme_is_current, render_readme

    readme = Path(args.readme)
    cards = all_cards("*", args.zoo)
    if args.check:
        if readme_is_current(readme, cards):
            print(f"{readme}: zoo table is current ({len(cards)} entries)")
            return 0
        print(f"{readme}: zoo table differs from the cards; run `lit-compress zoo readme`", file=sys.stderr)
        return 1
    atomic_write_text(readme, render_readme(readme.read_text(encoding="utf-8"), cards))
    print(f"{readme}: zoo table regenerated ({len(cards)} entries)")
    return 0


_COMMANDS = {
    "list": _list,
    "show": _show,
    "eval": _eval,
    "verify": _verify,
    "retime": _retime,
    "export": _export,
    "readme": _readme,
}
