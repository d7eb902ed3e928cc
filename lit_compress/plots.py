"""PNG plots of zoo cards and training runs: what ``lit-compress report`` draws.

Four kinds of picture, each from plain data that the project already writes (nothing is re-measured here):

1. **Per-layer sparsity** bars, from a card's ``compression.layers`` or a run's ``compression_report.json``;
   and for a run directory the logged curves of its ``metrics.csv`` (CSVLogger): ``pruning/*`` sparsity,
   kept fractions and gate densities, block counts, bit widths, compression ratio and validation error.
2. **Per-layer bit widths** of quantized entries, read from the shipped weight file's own header
   (``bitpacked``, ``deep-compression``, ``safetensors``), so the plot shows what is stored, not what a
   recipe asked for; cards with per-layer ``bits`` or only a card-wide ``compression.bits`` work too.
3. **Error vs compression** across the zoo: test error against the size ratio and the MAC reduction, one
   marker per entry, entries of the same ``arch-dataset`` joined, one row per dataset, log-x.
4. **Dynamic networks**: BlockDrop's histogram of blocks used per image and per-block usage, FBS's
   per-layer channel density and MACs per image, from the card's ``compression.gating`` statistics.

Every ``plot_*`` function writes one PNG (150 dpi) and returns a :class:`Plot` whose ``data`` holds the
arrays it drew, so callers (and tests) can check the picture against the card. matplotlib is imported
lazily, and figures are drawn on an explicit Agg canvas (no pyplot, no global backend switch), so importing
this module is cheap and safe inside notebooks and servers.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Plot",
    "Target",
    "blockdrop_usage",
    "fbs_density",
    "layer_bits",
    "layer_sparsity",
    "load_target",
    "plot_blockdrop_usage",
    "plot_fbs_density",
    "plot_layer_bits",
    "plot_layer_sparsity",
    "plot_run_curves",
    "plot_zoo_summary",
    "read_run_metrics",
    "report",
    "report_zoo",
    "zoo_summary_points",
]

DPI = 150
INSTALL_HINT = "pip install 'lit-compress[bench]'"
_STYLE = {
    "font.size": 10,
    "axes.titlesize": 12,
    "axes.labelsize": 10.5,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 8.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
}
_SAFETENSORS_BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U8": 8,
    "BOOL": 8,
}
_TORCH_DTYPE_BITS = {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 16}


@dataclass
class Plot:
    """A written PNG and the data drawn in it (numpy arrays / lists, keyed by what they are)."""

    path: Path
    kind: str
    data: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- matplotlib


def _matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            f"lit_compress.plots needs matplotlib, which is not importable ({err}). "
            f"Install it with: {INSTALL_HINT}"
        ) from err
    return matplotlib, Figure, FigureCanvasAgg


@contextlib.contextmanager
def _figure(path: Path, **kwargs: Any) -> Iterator[Any]:
    """A constrained-layout Figure on an Agg canvas, saved to ``path`` at :data:`DPI` on exit."""
    matplotlib, Figure, FigureCanvasAgg = _matplotlib()
    with matplotlib.rc_context(_STYLE):
        fig = Figure(layout="constrained", **kwargs)
        FigureCanvasAgg(fig)
        yield fig
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI, facecolor="white")


def _out_path(out: str | Path, default_name: str) -> Path:
    """``out`` is a ``.png`` file or a folder (then ``default_name`` inside it)."""
    out = Path(out)
    return out if out.suffix.lower() == ".png" else out / default_name


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def _rotate_ticks(ax: Any, labels: Sequence[str]) -> None:
    ax.set_xticks(np.arange(len(labels)))
    long = len(labels) > 5 or max((len(s) for s in labels), default=0) > 10
    ax.set_xticklabels(labels, rotation=35 if long else 0, ha="right" if long else "center")


# ---------------------------------------------------------------------------------------------- inputs


def _as_dict(card: Any) -> dict[str, Any]:
    if hasattr(card, "to_dict"):
        return card.to_dict()
    if isinstance(card, Mapping):
        return dict(card)
    raise TypeError(
        f"expected a zoo Card or a card-like dict, got {type(card).__name__}; "
        "load one with lit_compress.zoo.card(name) or json.load(open('card.json'))"
    )


def _name(card: Mapping[str, Any]) -> str:
    return str(card.get("name") or "card")


def _compression(card: Mapping[str, Any]) -> dict[str, Any]:
    comp = card.get("compression")
    return comp if isinstance(comp, dict) else {}


def _gating(card: Mapping[str, Any]) -> dict[str, Any]:
    gating = _compression(card).get("gating")
    return gating if isinstance(gating, dict) else {}


@dataclass
class Target:
    """What a ``report`` argument names: a card (dict + its entry folder, if any) or a run directory."""

    kind: str  # "card" or "run"
    name: str
    card: dict[str, Any] | None = None
    entry_dir: Path | None = None
    run_dir: Path | None = None


def load_target(spec: str | Path, zoo: str | Path | None = None) -> Target:
    """Resolve a zoo entry name, a ``card.json`` path, an entry folder or a run directory.

    A card read from a path is not seal-checked (synthetic or hand-made card-like files plot too); a zoo
    name goes through the registry, which validates the card and suggests close names when unknown.
    """
    path = Path(spec)
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ValueError(
                f"report target {str(spec)!r} is a file but not a .json card; expected a zoo entry name, "
                "a path to card.json or a run directory (runs/<name>)"
            )
        try:
            card = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); expected a zoo card") from err
        if not isinstance(card, dict):
            raise ValueError(f"{path}: expected a JSON object (a zoo card), got {type(card).__name__}")
        return Target("card", _name(card) if card.get("name") else path.parent.name, card, path.parent)
    if path.is_dir():
        if (path / "card.json").is_file():
            return load_target(path / "card.json")
        if _metrics_files(path) or _newest(path, "compression_report.json"):
            return Target("run", path.resolve().name, run_dir=path)
        raise ValueError(
            f"{path} is a folder with neither card.json nor logs/version_*/metrics.csv; expected a zoo "
            "entry folder or a training run directory written by `lit-compress fit`"
        )
    if "/" in str(spec) or str(spec).endswith(".json"):
        raise FileNotFoundError(
            f"report target {str(spec)!r} does not exist; give a zoo entry name (see `lit-compress zoo "
            "list`), a path to a card.json or a run directory"
        )
    from lit_compress.zoo.registry import card as zoo_card
    from lit_compress.zoo.registry import entry_dir

    loaded = zoo_card(str(spec), zoo)
    return Target("card", loaded.name, loaded.to_dict(), entry_dir(loaded.name, zoo))


# ---------------------------------------------------------------------------------------------- sparsity


def layer_sparsity(card: Any) -> dict[str, Any]:
    """Per-layer ``layers``, ``sparsity`` (fraction), ``params``, ``nonzero`` and the ``overall`` sparsity
    (parameter-weighted) from ``compression.layers``."""
    card = _as_dict(card)
    layers = _compression(card).get("layers") or {}
    rows = [(n, r) for n, r in layers.items() if isinstance(r, dict) and "sparsity" in r]
    if not rows:
        raise ValueError(
            f"card {_name(card)!r} has no per-layer sparsity (compression.layers is "
            f"{'empty' if not layers else 'without sparsity fields'}); per-layer bars need "
            "compression.layers = {fqn: {'params', 'nonzero', 'sparsity'}}, as cards exported by "
            "lit_compress have"
        )
    names = [n for n, _ in rows]
    sparsity = np.array([float(r["sparsity"]) for _, r in rows])
    params = np.array([float(r.get("params", np.nan)) for _, r in rows])
    nonzero = np.array([float(r.get("nonzero", np.nan)) for _, r in rows])
    if np.isfinite(params).all() and np.isfinite(nonzero).all() and params.sum() > 0:
        overall = 1.0 - nonzero.sum() / params.sum()
    else:
        overall = float(np.mean(sparsity))
    return {"layers": names, "sparsity": sparsity, "params": params, "nonzero": nonzero, "overall": overall}


def plot_layer_sparsity(card: Any, out: str | Path, title: str | None = None) -> Plot:
    """Bars of each layer's sparsity (% of its weights that are zero) with the overall level dashed."""
    data = layer_sparsity(card)
    name = _name(_as_dict(card))
    path = _out_path(out, f"{name}-sparsity.png")
    pct = 100 * data["sparsity"]
    n = len(pct)
    with _figure(path, figsize=(max(6.0, 0.85 * n + 2.5), 4.6)) as fig:
        ax = fig.add_subplot()
        bars = ax.bar(np.arange(n), pct, color="#4C72B0", width=0.7, zorder=2)
        ax.axhline(
            100 * data["overall"],
            color="#C44E52",
            ls="--",
            lw=1.3,
            zorder=3,
            label=f"overall {100 * data['overall']:.1f}% (weighted by parameters)",
        )
        for bar, p, k, total in zip(bars, pct, data["nonzero"], data["params"]):
            kept = f"\n{_human(k)}/{_human(total)} kept" if np.isfinite(total) else ""
            ax.annotate(
                f"{p:.1f}%{kept}",
                (bar.get_x() + bar.get_width() / 2, p),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8,
            )
        _rotate_ticks(ax, data["layers"])
        ax.set_ylim(0, 112)
        ax.set_ylabel("sparsity (% of weights = 0)")
        ax.set_xlabel("layer")
        ax.set_title(title or f"{name}: per-layer sparsity")
        ax.legend(loc="upper left", frameon=False)
    return Plot(path, "sparsity", data)


# ---------------------------------------------------------------------------------------------- bit widths


def _file_tensor_bits(path: Path, fmt: str) -> list[tuple[str, int, list[int]]] | None:
    """``(tensor, bits per stored weight, shape)`` from a weight file's header; None for other formats."""
    data = path.read_bytes()
    if fmt == "bitpacked":
        from lit_compress.quantization.bitpacked_codec import read_index

        return [(t["name"], int(t["bits"]), list(t["shape"])) for t in read_index(data, str(path))["tensors"]]
    if fmt == "deep-compression":
        from lit_compress.deep_compression.codec import read_header

        rows = []
        for t in read_header(data, str(path))["t"]:
            if t["e"] == "s":  # codebook index: ceil(log2 k) bits per kept weight before Huffman coding
                rows.append((t["n"], max(1, math.ceil(math.log2(t["k"]))), list(t["s"])))
            else:
                rows.append((t["n"], _TORCH_DTYPE_BITS.get(t["d"], 32), list(t["s"])))
        return rows
    if fmt in ("safetensors", "sparse-safetensors"):
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        return [
            (k, _SAFETENSORS_BITS.get(v["dtype"], 32), list(v["shape"]))
            for k, v in header.items()
            if k != "__metadata__"
        ]
    return None


def layer_bits(card: Any, entry_dir: str | Path | None = None) -> dict[str, Any]:
    """Bits per stored weight of each layer: ``layers``, ``bits``, ``source`` (where they were read).

    In order: per-layer ``bits`` in ``compression.layers``; the header of the entry's weight file (when
    ``entry_dir`` holds it): 1 for binary layers, ``ceil(log2 k)`` for a ``k``-entry shared codebook, the
    dtype width for raw tensors; else the card-wide ``compression.bits`` for every listed layer.
    """
    card = _as_dict(card)
    comp = _compression(card)
    layers = {n: r for n, r in (comp.get("layers") or {}).items() if isinstance(r, dict)}
    card_bits = comp.get("bits")
    if any("bits" in r for r in layers.values()):
        names = list(layers)
        bits = [int(layers[n].get("bits", card_bits if card_bits is not None else 32)) for n in names]
        return {"layers": names, "bits": np.array(bits), "source": "card compression.layers[*].bits"}
    if entry_dir is not None:
        for entry in card.get("files") or []:
            path = Path(entry_dir) / str(entry.get("path", ""))
            if not path.is_file():
                continue
            rows = _file_tensor_bits(path, str(entry.get("format", "")))
            weights = [
                (n[: -len(".weight")], b) for n, b, s in rows or [] if n.endswith(".weight") and len(s) >= 2
            ]
            if weights:
                return {
                    "layers": [n for n, _ in weights],
                    "bits": np.array([b for _, b in weights]),
                    "source": f"header of {entry['path']} ({entry.get('format')})",
                }
    if layers and card_bits is not None:
        names = list(layers)
        return {
            "layers": names,
            "bits": np.full(len(names), int(card_bits)),
            "source": "card compression.bits",
        }
    raise ValueError(
        f"card {_name(card)!r} has no per-layer bit widths: compression.layers is "
        f"{'empty' if not layers else 'without bits'}"
        + ("" if entry_dir is not None else " and no entry folder was given to read the weight file from")
        + "; give the zoo entry's name or its card.json inside the entry folder"
    )


def plot_layer_bits(card: Any, out: str | Path, entry_dir: str | Path | None = None) -> Plot:
    """Bars of bits per stored weight for each layer (log2 axis: 1, 2, 4, ... 32)."""
    data = layer_bits(card, entry_dir)
    name = _name(_as_dict(card))
    path = _out_path(out, f"{name}-bits.png")
    bits = data["bits"]
    n = len(bits)
    palette = {1: "#C44E52", 2: "#DD8452", 4: "#CCB974", 8: "#55A868", 16: "#64B5CD", 32: "#4C72B0"}
    colours = [palette.get(int(b), "#8172B3") for b in bits]
    with _figure(path, figsize=(max(6.0, 0.8 * n + 2.5), 4.4)) as fig:
        ax = fig.add_subplot()
        bars = ax.bar(np.arange(n), bits, color=colours, width=0.7, zorder=2)
        for bar, b in zip(bars, bits):
            ax.annotate(
                f"{int(b)} bit" + ("s" if b != 1 else ""),
                (bar.get_x() + bar.get_width() / 2, b),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8.5,
            )
        ax.set_yscale("log", base=2)
        ticks = [t for t in (1, 2, 4, 8, 16, 32, 64) if t <= max(64, bits.max())]
        ax.set_yticks(ticks)
        ax.set_yticklabels([str(t) for t in ticks])
        ax.set_ylim(0.7, max(48, bits.max() * 1.6))
        _rotate_ticks(ax, data["layers"])
        ax.set_ylabel("bits per stored weight")
        ax.set_xlabel("layer")
        ax.set_title(f"{name}: weight bit width per layer")
        fig.supxlabel(f"source: {data['source']}", fontsize=7.5, color="0.4", x=0.01, ha="left")
    return Plot(path, "bits", data)


def _is_quantized(card: Mapping[str, Any]) -> bool:
    comp = _compression(card)
    layer_bits_ = [r.get("bits") for r in (comp.get("layers") or {}).values() if isinstance(r, dict)]
    return (comp.get("bits") or 32) < 32 or any(b is not None and b < 32 for b in layer_bits_)


# ---------------------------------------------------------------------------------------------- zoo summary


def _group(card: Mapping[str, Any]) -> str:
    """The ``arch-dataset`` part of an entry name (before the tag)."""
    return _name(card).split(".", 1)[0]


def _dataset(card: Mapping[str, Any]) -> str:
    ds = card.get("dataset")
    return str(ds.get("name")) if isinstance(ds, dict) and ds.get("name") else _group(card).rsplit("-", 1)[-1]


def _ratio_ticks(ax: Any, lo: float, hi: float) -> None:
    """Readable ticks on a log ratio axis: 1x 2x 5x 10x ... instead of 2x10^0."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    candidates = [m * 10.0**e for e in range(-2, 5) for m in (1, 2, 5)]
    ticks = [t for t in candidates if lo <= t <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _label_points(ax: Any, points: list[tuple[float, float, str]], fontsize: float = 7.0) -> None:
    """Annotate points with small labels, trying a few offsets so labels do not overlap each other."""
    scale = ax.figure.dpi / 72.0
    placed: list[tuple[float, float, float, float]] = []
    offsets = [
        (5, 3, "left"),
        (5, -10, "left"),
        (-5, 3, "right"),
        (-5, -10, "right"),
        (5, 12, "left"),
        (-5, 12, "right"),
        (5, -19, "left"),
        (-5, -19, "right"),
    ]
    for x, y, text in sorted(points, key=lambda p: (p[0], -p[1])):
        px, py = ax.transData.transform((x, y))
        w, h = 0.55 * fontsize * len(text) * scale, fontsize * 1.2 * scale
        choice = offsets[0]
        for dx, dy, ha in offsets:
            x0 = px + dx * scale - (w if ha == "right" else 0)
            box = (x0, py + dy * scale, x0 + w, py + dy * scale + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                choice = (dx, dy, ha)
                placed.append(box)
                break
        else:
            x0 = px + offsets[0][0] * scale
            placed.append((x0, py + 3 * scale, x0 + w, py + 3 * scale + h))
        dx, dy, ha = choice
        ax.annotate(
            text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, color="0.25", ha=ha
        )


def zoo_summary_points(cards: Iterable[Any]) -> dict[str, Any]:
    """Per entry: ``names, groups, datasets, error`` (% on the card's test set), ``size_ratio``,
    ``mac_reduction`` and the ``reference`` each ratio is taken against.

    Ratios are against the group's uncompressed reference (an entry of the same ``arch-dataset`` with no
    compression methods, e.g. ``lenet5-mnist.dense``): a physically pruned or factorised net's own fp32
    size is already small, so ``own fp32 / file`` would call it 1x. Without such a reference the entry's
    own ``bytes.fp32 / bytes.file`` and ``macs.dense / macs.effective`` are used.
    """
    cards = [_as_dict(c) for c in cards]
    if not cards:
        raise ValueError(
            "no zoo cards to summarise; check the pattern / zoo folder (`lit-compress zoo list`)"
        )
    refs: dict[str, dict[str, Any]] = {}
    for c in cards:
        if not _compression(c).get("methods"):
            best = refs.get(_group(c))
            if best is None or c["bytes"]["fp32"] > best["bytes"]["fp32"]:
                refs[_group(c)] = c
    out: dict[str, list] = {
        k: []
        for k in (
            "names",
            "groups",
            "datasets",
            "error",
            "size_ratio",
            "mac_reduction",
            "reference",
            "methods",
        )
    }
    for c in cards:
        ref = refs.get(_group(c), c)
        metrics = c["metrics"]
        out["names"].append(_name(c))
        out["groups"].append(_group(c))
        out["datasets"].append(_dataset(c))
        out["error"].append(100.0 * metrics["errors"] / metrics["num_examples"])
        out["size_ratio"].append(ref["bytes"]["fp32"] / max(c["bytes"]["file"], 1))
        out["mac_reduction"].append(ref["macs"]["dense"] / max(c["macs"]["effective"], 1))
        out["reference"].append(_name(ref))
        out["methods"].append(list(_compression(c).get("methods") or []))
    return {k: (np.array(v) if k in ("error", "size_ratio", "mac_reduction") else v) for k, v in out.items()}


def plot_zoo_summary(cards: Iterable[Any], out: str | Path) -> Plot:
    """Test error vs size ratio and vs MAC reduction, one row per dataset, one colour per arch-dataset."""
    _, _, _ = _matplotlib()
    from matplotlib import colormaps

    data = zoo_summary_points(cards)
    path = _out_path(out, "zoo-summary.png")
    datasets = sorted(set(data["datasets"]))
    groups = sorted(set(data["groups"]))
    cmap = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    colour = {g: cmap(i % cmap.N) for i, g in enumerate(groups)}
    markers = "osD^vP*Xh<>"
    marker = {g: markers[i % len(markers)] for i, g in enumerate(groups)}
    columns = (
        ("size_ratio", "size ratio (dense fp32 bytes / file bytes)"),
        ("mac_reduction", "MAC reduction (dense MACs / effective MACs per image)"),
    )
    with _figure(path, figsize=(13, 4.6 * len(datasets) + 0.6)) as fig:
        axes = fig.subplots(len(datasets), 2, squeeze=False, sharey="row")
        labels: list[tuple[Any, list[tuple[float, float, str]]]] = []
        for row, ds in enumerate(datasets):
            idx = [i for i, d in enumerate(data["datasets"]) if d == ds]
            for col, (key, label) in enumerate(columns):
                ax = axes[row][col]
                for g in sorted({data["groups"][i] for i in idx}):
                    members = sorted((i for i in idx if data["groups"][i] == g), key=lambda i: data[key][i])
                    xs, ys = data[key][members], data["error"][members]
                    ax.plot(xs, ys, "-", color=colour[g], alpha=0.45, lw=1.2, zorder=2)
                    ax.scatter(
                        xs,
                        ys,
                        color=colour[g],
                        marker=marker[g],
                        s=55,
                        zorder=3,
                        edgecolor="white",
                        linewidth=0.6,
                        label=g,
                    )
                ax.set_xscale("log")
                ax.axvline(1.0, color="0.6", lw=0.8, ls=":", zorder=1)
                ax.set_xlabel(f"{label}, log scale")
                if col == 0:
                    ax.set_ylabel(f"{ds}: test error (%)")
                ax.set_title(f"{ds}: error vs {'size' if key == 'size_ratio' else 'compute'}")
                lo, hi = data[key][idx].min(), data[key][idx].max()
                ax.set_xlim(min(lo, 1.0) / 1.5, hi * 2.5)
                _ratio_ticks(ax, min(lo, 1.0) / 1.5, hi * 2.5)
                labels.append(
                    (ax, [(data[key][i], data["error"][i], data["names"][i].split(".", 1)[-1]) for i in idx])
                )
            axes[row][1].legend(
                loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, title="arch-dataset"
            )
        fig.suptitle(
            f"lit_compress zoo: test error vs compression ({len(data['names'])} entries)", fontsize=13
        )
        fig.draw_without_rendering()  # final layout and transforms, once, before the labels are placed
        for ax, points in labels:
            _label_points(ax, points)
    return Plot(path, "zoo-summary", data)


# ---------------------------------------------------------------------------------------------- gating


def blockdrop_usage(card: Any) -> dict[str, Any]:
    """BlockDrop decision statistics from ``compression.gating.statistics``: ``blocks_used`` (0..K),
    ``images`` (count per number of blocks used), ``fraction``, per-block ``block_names``/``block_usage``,
    ``blocks_mean``, ``blocks_std`` and the MAC numbers when present."""
    card = _as_dict(card)
    gating = _gating(card)
    stats = gating.get("statistics") if isinstance(gating.get("statistics"), dict) else None
    if gating.get("method") not in (None, "blockdrop") or not stats or "blocks_histogram" not in stats:
        raise ValueError(
            f"card {_name(card)!r} has no BlockDrop statistics: expected compression.gating = "
            "{'method': 'blockdrop', 'statistics': {'blocks_histogram': [...], 'block_usage': {...}, ...}} "
            f"(as lit_compress.gating.blockdrop.summarize_decisions writes), got gating method "
            f"{gating.get('method')!r} with statistics keys {sorted(stats) if stats else None}"
        )
    hist = np.asarray(stats["blocks_histogram"], dtype=float)
    total = hist.sum()
    if total <= 0:
        raise ValueError(
            f"card {_name(card)!r}: BlockDrop blocks_histogram counts no image ({hist.tolist()})"
        )
    usage = stats.get("block_usage") or {}
    out = {
        "blocks_used": np.arange(len(hist)),
        "images": hist,
        "fraction": hist / total,
        "block_names": list(usage),
        "block_usage": np.array([float(v) for v in usage.values()]),
        "blocks_mean": float(stats.get("blocks_mean", (np.arange(len(hist)) * hist).sum() / total)),
        "blocks_std": float(stats.get("blocks_std", float("nan"))),
        "distinct_policies": stats.get("distinct_policies"),
        "mac_reduction": stats.get("mac_reduction"),
        "macs_mean": stats.get("macs_mean"),
        "macs_std": stats.get("macs_std"),
    }
    return out


def plot_blockdrop_usage(card: Any, out: str | Path) -> Plot:
    """Histogram of blocks executed per image and each gated block's usage (% of images running it)."""
    data = blockdrop_usage(card)
    name = _name(_as_dict(card))
    path = _out_path(out, f"{name}-blockdrop-usage.png")
    with _figure(path, figsize=(12, 4.5)) as fig:
        left, right = fig.subplots(1, 2, width_ratios=[1, 1.2])
        left.bar(data["blocks_used"], 100 * data["fraction"], color="#4C72B0", width=0.75, zorder=2)
        left.axvline(
            data["blocks_mean"],
            color="#C44E52",
            ls="--",
            lw=1.3,
            label=f"mean {data['blocks_mean']:.2f} +- {data['blocks_std']:.2f} blocks",
        )
        left.set_xticks(data["blocks_used"])
        left.set_xlabel("residual blocks executed per image")
        left.set_ylabel("images (%)")
        left.set_title(f"blocks used ({int(data['images'].sum()):,} images)")
        left.legend(loc="upper left", frameon=False)
        if len(data["block_names"]):
            right.bar(
                np.arange(len(data["block_names"])),
                100 * data["block_usage"],
                color="#55A868",
                width=0.7,
                zorder=2,
            )
            _rotate_ticks(right, data["block_names"])
            right.set_ylim(0, 108)
        right.set_xlabel("gated block")
        right.set_ylabel("images executing the block (%)")
        right.set_title("per-block usage")
        extra = []
        if data["mac_reduction"] is not None:
            extra.append(f"{data['mac_reduction']:.2f}x fewer MACs than the static backbone")
        if data["distinct_policies"] is not None:
            extra.append(f"{data['distinct_policies']} distinct policies")
        fig.suptitle(f"{name}: BlockDrop block usage" + (f" ({', '.join(extra)})" if extra else ""))
    return Plot(path, "blockdrop-usage", data)


def fbs_density(card: Any) -> dict[str, Any]:
    """FBS statistics from ``compression.gating``: per-layer ``layers``, ``kept``, ``channels``,
    ``density`` (kept / channels per image), the ``target`` density, and per-image MACs (``macs_mean``,
    ``macs_std``, ``macs_min``, ``macs_max``, ``macs_dense``, ``mac_reduction``)."""
    card = _as_dict(card)
    gating = _gating(card)
    layers = gating.get("layers") if isinstance(gating.get("layers"), dict) else None
    if gating.get("method") != "fbs" or not layers:
        raise ValueError(
            f"card {_name(card)!r} has no FBS gating data: expected compression.gating = "
            "{'method': 'fbs', 'layers': {fqn: {'kept', 'channels'}}, 'statistics': {...}}, got method "
            f"{gating.get('method')!r} with {len(layers or {})} layers"
        )
    names = list(layers)
    kept = np.array([float(layers[n]["kept"]) for n in names])
    channels = np.array([float(layers[n]["channels"]) for n in names])
    stats = gating.get("statistics") or {}
    per_image = gating.get("macs_per_image") or {}

    def stat(key: str, alt: str) -> float | None:
        value = stats.get(key, per_image.get(alt))
        return None if value is None else float(value)

    return {
        "layers": names,
        "kept": kept,
        "channels": channels,
        "density": kept / channels,
        "target": None if gating.get("density") is None else float(gating["density"]),
        "macs_mean": stat("macs_mean", "mean"),
        "macs_std": stat("macs_std", "std"),
        "macs_min": stat("macs_min", "min"),
        "macs_max": stat("macs_max", "max"),
        "macs_dense": stat("macs_dense", "dense"),
        "mac_reduction": stat("mac_reduction", "reduction"),
        "images": stats.get("images", per_image.get("images")),
    }


def plot_fbs_density(card: Any, out: str | Path) -> Plot:
    """Per-layer channel density (channels computed per image) and MACs per image against dense."""
    data = fbs_density(card)
    name = _name(_as_dict(card))
    path = _out_path(out, f"{name}-fbs-density.png")
    with _figure(path, figsize=(12, 4.5)) as fig:
        left, right = fig.subplots(1, 2, width_ratios=[1.4, 1])
        x = np.arange(len(data["layers"]))
        bars = left.bar(x, 100 * data["density"], color="#4C72B0", width=0.65, zorder=2)
        for bar, k, c in zip(bars, data["kept"], data["channels"]):
            left.annotate(
                f"{int(k)}/{int(c)}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=8.5,
            )
        if data["target"] is not None:
            left.axhline(
                100 * data["target"],
                color="#C44E52",
                ls="--",
                lw=1.3,
                label=f"target density {100 * data['target']:.0f}%",
            )
            left.legend(loc="upper right", frameon=False)
        _rotate_ticks(left, data["layers"])
        left.set_ylim(0, 108)
        left.set_xlabel("FBS-gated conv layer")
        left.set_ylabel("output channels computed per image (%)")
        left.set_title("channel density (kept / channels)")
        if data["macs_mean"] is not None and data["macs_dense"] is not None:
            mean, dense = data["macs_mean"] / 1e6, data["macs_dense"] / 1e6
            std = (data["macs_std"] or 0.0) / 1e6
            right.bar([0, 1], [dense, mean], color=["0.65", "#55A868"], width=0.6, zorder=2)
            if std > 0:
                right.errorbar([1], [mean], yerr=[std], color="0.2", capsize=6, lw=1.5, zorder=3)
            spread = data["macs_min"] is not None and data["macs_max"] is not None
            if spread and data["macs_max"] > data["macs_min"]:
                right.vlines(
                    1.22,
                    data["macs_min"] / 1e6,
                    data["macs_max"] / 1e6,
                    color="0.2",
                    lw=2,
                    label="min - max over images",
                )
                right.legend(loc="upper right", frameon=False)
            for xi, v in ((0, dense), (1, mean)):
                right.annotate(
                    f"{v:.2f}M",
                    (xi, v),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=9,
                )
            right.set_xticks([0, 1])
            right.set_xticklabels(["dense", "FBS (mean +- std)"])
            right.set_ylim(0, dense * 1.2)
            images = f", {data['images']:,} images" if data["images"] else ""
            right.set_title(f"MACs per image ({dense / mean:.2f}x fewer{images})")
        else:
            right.text(
                0.5,
                0.5,
                "no per-image MAC statistics on this card",
                ha="center",
                va="center",
                transform=right.transAxes,
                color="0.4",
            )
            right.set_title("MACs per image")
        right.set_ylabel("MACs per image (millions)")
        fig.suptitle(f"{name}: FBS dynamic channel pruning")
    return Plot(path, "fbs-density", data)


# ---------------------------------------------------------------------------------------------- runs


def _metrics_files(run_dir: Path) -> list[Path]:
    def version(p: Path) -> tuple[int, str]:
        tail = p.parent.name.rsplit("_", 1)[-1]
        return (int(tail) if tail.isdigit() else -1, str(p))

    return sorted(run_dir.rglob("metrics.csv"), key=version)


def _newest(run_dir: Path, filename: str) -> Path | None:
    found = sorted(run_dir.rglob(filename), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def read_run_metrics(run_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{column: (steps, values)}`` from every ``metrics.csv`` under ``run_dir`` (versions in order, so a
    resumed run continues its curves); empty cells are skipped."""
    run_dir = Path(run_dir)
    files = _metrics_files(run_dir)
    if not files:
        raise FileNotFoundError(
            f"no metrics.csv under {run_dir}; expected a run directory written by `lit-compress fit` with a "
            "CSVLogger (runs/<name>/logs/version_*/metrics.csv)"
        )
    series: dict[str, tuple[list[float], list[float]]] = {}
    for f in files:
        with f.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                step = row.get("step")
                if not step:
                    continue
                for key, value in row.items():
                    if key in ("step", "epoch") or value in (None, ""):
                        continue
                    try:
                        v = float(value)
                    except ValueError:
                        continue
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(float(step))
                    values.append(v)
    return {k: (np.array(s), np.array(v)) for k, (s, v) in series.items()}


_RUN_PANELS: tuple[tuple[str, str, Any], ...] = (
    ("sparsity", "sparsity (%)", lambda k: k.startswith("pruning/")),
    (
        "kept fraction / density",
        "fraction kept (%)",
        lambda k: k in ("fbs/density", "structured_pruning/kept_fraction") or k.endswith("/density"),
    ),
    (
        "blocks",
        "residual blocks",
        lambda k: (
            k
            in (
                "depth_pruning/blocks",
                "blockdrop/train_blocks_step",
                "blockdrop/val_blocks_mean",
                "blockdrop/learned_blocks_step",
            )
        ),
    ),
    ("bit width", "bits per weight", lambda k: "bits" in k.split("/")[-1] and "blocks" not in k),
    ("compression", "ratio (x)", lambda k: k in ("compression/ratio", "compression/mac_reduction")),
    ("validation error", "error (%)", lambda k: k == "val/acc"),
)
_PERCENT = ("sparsity", "kept fraction / density")


def plot_run_curves(run_dir: str | Path, out: str | Path) -> Plot:
    """The compression curves a run logged, over optimizer steps: one panel per family that has data."""
    run_dir = Path(run_dir)
    metrics = read_run_metrics(run_dir)
    name = run_dir.resolve().name
    path = _out_path(out, f"{name}-curves.png")
    panels, final = [], []
    for title, ylabel, match in _RUN_PANELS:
        cols = sorted(k for k in metrics if match(k))
        if title == "compression" and cols and all(len(set(metrics[c][0])) == 1 for c in cols):
            # logged once (end of fit / test): a number in the title says more than a lone dot
            final = [f"{c.split('/', 1)[-1].replace('_', ' ')} {metrics[c][1][-1]:.3g}x" for c in cols]
            continue
        if cols:
            panels.append((title, ylabel, cols))
    if not panels:
        raise ValueError(
            f"{run_dir}: metrics.csv logs none of the compression curves this plot draws (pruning/*, "
            f"fbs/density, structured_pruning/kept_fraction, blocks, bits, compression/*, val/acc); "
            f"columns found: {sorted(metrics)}"
        )
    plotted: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    with _figure(path, figsize=(5.2 * ncols, 3.9 * nrows)) as fig:
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, (title, ylabel, cols) in zip(axes, panels):
            for col in cols:
                steps, values = metrics[col]
                if col == "val/acc":
                    values = 100.0 * (1.0 - values)
                elif title in _PERCENT:
                    values = 100.0 * values
                plotted[col] = (steps, values)
                label = col.split("/", 1)[-1].removesuffix(".weight") if col != "val/acc" else "1 - val/acc"
                style = "o" if len(steps) <= 3 else "-"
                ax.plot(steps, values, style, lw=1.6 if col.endswith("global") else 1.1, ms=5, label=label)
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.legend(frameon=False, fontsize=7.5)
        for ax in axes[len(panels) :]:
            ax.set_visible(False)
        fig.suptitle(
            f"run {name}: logged compression curves" + (f" (final {', '.join(final)})" if final else "")
        )
    return Plot(path, "curves", {"series": plotted, "panels": [p[0] for p in panels], "final": final})


def _run_report_layers(run_dir: Path) -> dict[str, Any] | None:
    """A card-like dict with ``compression.layers`` from the run's newest ``compression_report.json``."""
    report_path = _newest(run_dir, "compression_report.json")
    if report_path is None:
        return None
    report_data = json.loads(report_path.read_text(encoding="utf-8"))
    layers = {
        row["name"]: {"params": row["params"], "nonzero": row["nonzero"], "sparsity": row["sparsity"]}
        for row in report_data.get("layers", [])
        if row.get("params") and any(t in str(row.get("type", "")) for t in ("Conv", "Linear"))
    }
    if not layers:
        return None
    return {"name": run_dir.resolve().name, "compression": {"layers": layers}}


def _run_blockdrop_card(run_dir: Path) -> dict[str, Any] | None:
    """BlockDrop statistics kept in the callback state of the run's newest ``last.ckpt`` (test, else val)."""
    ckpt = _newest(run_dir, "last.ckpt")
    if ckpt is None:
        return None
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception:  # an unreadable / foreign checkpoint: the other plots still come out
        return None
    for key, value in (state.get("callbacks") or {}).items():
        if str(key).startswith("BlockDrop") and isinstance(value, dict):
            stats = value.get("statistics") or {}
            chosen = stats.get("test") or stats.get("val")
            if chosen:
                return {
                    "name": run_dir.resolve().name,
                    "compression": {"gating": {"method": "blockdrop", "statistics": chosen}},
                }
    return None


# ---------------------------------------------------------------------------------------------- reports


def report(target: str | Path, out_dir: str | Path, zoo: str | Path | None = None) -> list[Plot]:
    """Every plot that applies to ``target`` (zoo name, card.json, entry folder or run directory)."""
    resolved = load_target(target, zoo)
    out_dir = Path(out_dir)
    plots: list[Plot] = []
    if resolved.kind == "run":
        run_dir, name = resolved.run_dir or Path(target), resolved.name
        if _metrics_files(run_dir):
            with contextlib.suppress(ValueError):
                plots.append(plot_run_curves(run_dir, out_dir / f"{name}-curves.png"))
        layers_card = _run_report_layers(run_dir)
        if layers_card is not None:
            plots.append(
                plot_layer_sparsity(
                    layers_card,
                    out_dir / f"{name}-sparsity.png",
                    title=f"run {name}: per-layer sparsity (compression_report.json)",
                )
            )
        bd_card = _run_blockdrop_card(run_dir)
        if bd_card is not None:
            plots.append(plot_blockdrop_usage(bd_card, out_dir / f"{name}-blockdrop-usage.png"))
        if not plots:
            raise ValueError(
                f"{run_dir}: nothing to plot (no compression curves, layer report or gating state)"
            )
        return plots
    card, name = resolved.card or {}, resolved.name
    comp = _compression(card)
    if any(isinstance(r, dict) and "sparsity" in r for r in (comp.get("layers") or {}).values()):
        plots.append(plot_layer_sparsity(card, out_dir / f"{name}-sparsity.png"))
    if _is_quantized(card):
        plots.append(plot_layer_bits(card, out_dir / f"{name}-bits.png", resolved.entry_dir))
    method = _gating(card).get("method")
    if method == "fbs":
        plots.append(plot_fbs_density(card, out_dir / f"{name}-fbs-density.png"))
    elif method == "blockdrop":
        plots.append(plot_blockdrop_usage(card, out_dir / f"{name}-blockdrop-usage.png"))
    if not plots:
        raise ValueError(
            f"card {name!r} has nothing to plot: no compression.layers, no bits below 32, no gating "
            "statistics; try `lit-compress report --zoo-summary` for the whole zoo"
        )
    return plots


def report_zoo(out_dir: str | Path, pattern: str = "*", zoo: str | Path | None = None) -> Plot:
    """The zoo-wide error-vs-compression picture (``zoo-summary.png`` in ``out_dir``)."""
    from lit_compress.zoo.registry import all_cards

    cards = all_cards(pattern, zoo)
    if not cards:
        raise ValueError(f"no zoo entries match {pattern!r}; see `lit-compress zoo list`")
    return plot_zoo_summary(cards, Path(out_dir) / "zoo-summary.png")
