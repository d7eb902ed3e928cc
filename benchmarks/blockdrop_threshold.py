"""How much does a trained BlockDrop policy trade when its keep threshold moves? Test accuracy vs blocks used.

A BlockDrop zoo entry keeps block ``k`` for an image when the policy's probability ``p_k >= 0.5`` (greedy
decisions, :func:`lit_compress.gating.blockdrop.greedy_decisions`). This script forces the decisions
``p_k >= t`` for a range of thresholds ``t`` (through the network's ``state.forced``, the same path the
Lightning loop uses for sampled policies), and prints, for each, the test accuracy, blocks used (mean +-
std over the 10,000 Fashion-MNIST test images) and the mean MACs per image against the static backbone
(policy included, :meth:`BlockDropNetwork.costs`). It needs no training: a cheap answer to "would a
stricter threshold reach fewer blocks at the same accuracy?". Nothing is selected on the test set here;
the zoo cards keep the greedy 0.5.

``--split val`` measures on the 5,000 validation images the recipes hold out of the training set (the
``FashionMNISTDataModule`` defaults): that is the split to choose a ``BlockDrop(frozen_threshold=...)`` on,
never the test set.

    .venv/bin/python benchmarks/blockdrop_threshold.py
    .venv/bin/python benchmarks/blockdrop_threshold.py --split val --thresholds 0.5 0.52 0.55

Quick smoke test: ``--entries resnet32-fashion-mnist.blockdrop --thresholds 0.5 --limit 500``.
"""

from __future__ import annotations

import argparse

import _common as C
import torch

ENTRIES = ["resnet32-fashion-mnist.blockdrop", "resnet32-fashion-mnist.blockdrop-g10"]
THRESHOLDS = [0.4, 0.5, 0.55, 0.6, 0.65, 0.7]


def split_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images and labels of the Fashion-MNIST ``test`` set or the recipes' ``val`` split."""
    from lit_compress.data import FashionMNISTDataModule, load_split, normalize

    if split == "test":
        images, labels = load_split("fashion-mnist", "test")
        return normalize(images, "fashion-mnist"), labels
    dm = FashionMNISTDataModule(download=False)  # val_size and split_seed as in every recipe
    dm.setup("validate")
    batches = list(dm.val_dataloader())
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def sweep(
    name: str, thresholds: list[float], limit: int | None, split: str = "test", batch_size: int = 1000
) -> list[list]:
    from lit_compress import zoo

    model = zoo.load(name).eval()
    x, labels = split_tensors(split)
    if limit is not None:
        x, labels = x[:limit], labels[:limit]
    rows = []
    with torch.inference_mode():
        costs = model.costs(x[:1])
        probs = torch.cat(
            [torch.sigmoid(model.policy(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
        )
        for t in thresholds:
            decisions = probs >= t
            correct = 0
            try:
                for i in range(0, len(x), batch_size):
                    model.state.forced = decisions[i : i + batch_size]
                    correct += (
                        (model(x[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum().item()
                    )
            finally:
                model.state.forced = None
            blocks = decisions.float().sum(dim=1)
            macs = costs.per_image(decisions).double().mean().item()
            rows.append(
                [
                    name,
                    f"{t:g}",
                    f"{100.0 * correct / len(x):.2f}%",
                    f"{blocks.mean():.2f} +- {blocks.std():.2f} of {decisions.shape[1]}",
                    f"{macs / 1e6:.2f}M ({costs.backbone_dense / macs:.2f}x fewer)",
                ]
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", nargs="+", default=ENTRIES, help="BlockDrop zoo entries")
    parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    parser.add_argument("--limit", type=int, default=None, help="first N images only (smoke test)")
    parser.add_argument(
        "--split", choices=["test", "val"], default="test", help="test set or validation split"
    )
    args = C.add_common_args(parser, threads=2).parse_args(argv)
    bad = [t for t in args.thresholds if not 0.0 < t < 1.0]
    if bad:
        parser.error(f"thresholds are probabilities in (0, 1), got {bad}")
    C.setup_env(args)
    rows = [row for name in args.entries for row in sweep(name, args.thresholds, args.limit, args.split)]
    title = "\n".join(
        [
            f"### BlockDrop: {args.split} accuracy vs blocks used as the policy's keep threshold moves",
            "",
            f"Decisions p_k >= threshold forced for every {args.split} image (the cards use 0.5); MACs per "
            "image are the mean of batch-1 execution, policy included, vs the static backbone.",
            f"- machine: {C.machine_note(args)}",
        ]
    )
    headers = ["entry", "threshold", f"{args.split} accuracy", "blocks used", "MACs per image"]
    print(C.markdown_table(headers, rows, title=title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
