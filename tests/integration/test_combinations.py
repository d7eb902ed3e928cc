"""Compression methods combined in one ``fit``, each from its recipe in ``configs/`` (run through LightningCLI
on real data, shortened), and the phase rule of :mod:`lit_compress._ordering`: listing the callbacks in the
opposite order gives a bit-identical run (checked where setup order could matter: a module swap next to a
parameter selection, a module swap next to a ``training_step`` wrapper and a loss term)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lit_compress.lightning_cli import LitCompressCLI
from lit_compress.quantization.modules import is_quantized

REPO = Path(__file__).resolve().parents[2]
STEPS = 8


def shortened(recipe: str, root: Path, *, reverse: bool = False, export: bool = True) -> dict:
    """The recipe as a config for a few-step run under ``root``: schedules squeezed into ``STEPS`` optimizer
    steps, two validation / test batches, no checkpoint files, compression callbacks reversed on demand."""
    config = yaml.safe_load((REPO / "configs" / recipe).read_text())
    trainer = config["trainer"]
    trainer.update(
        max_epochs=None,
        max_steps=STEPS,
        limit_train_batches=STEPS,
        limit_val_batches=2,
        limit_test_batches=2,
        val_check_interval=STEPS,
        default_root_dir=str(root),
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    callbacks = []
    for cb in trainer["callbacks"]:
        path, args = cb["class_path"], cb.get("init_args") or {}
        if path.endswith("ModelCheckpoint"):
            continue
        if path.endswith("ZooExport") and not export:
            continue
        if path.endswith("ZooExport"):  # into a zoo of its own: never the shipped one
            args.update(zoo=str(root / "zoo"), latency=False)
        schedule = args.get("schedule")
        if isinstance(schedule, dict) and "init_args" in schedule:  # Pruning: prune at steps 2, 4
            schedule["init_args"].update(start_step=2, end_step=4, frequency=2)
        if isinstance(args.get("density"), dict):  # FBS: anneal over steps 0-4
            args["density"]["init_args"].update(start_step=0, end_step=4)
        if "start_step" in args:  # WeightSharing: cluster at step 6
            args["start_step"] = 6
        callbacks.append(cb)
    compress = [
        cb
        for cb in callbacks
        if cb["class_path"].startswith("lit_compress.") and "measure" not in cb["class_path"]
    ]
    others = [cb for cb in callbacks if cb not in compress]
    trainer["callbacks"] = (compress[::-1] if reverse else compress) + others
    sched = config["model"]["init_args"].get("lr_scheduler")
    if sched and "T_max" in sched.get("init_args", {}):
        sched["init_args"]["T_max"] = STEPS
    return config


def run(recipe: str, tmp_path: Path, *, reverse: bool = False, export: bool = True) -> LitCompressCLI:
    root = tmp_path / ("reversed" if reverse else "listed")
    root.mkdir()
    path = root / recipe
    config = shortened(recipe, root, reverse=reverse, export=export)
    if not export:  # no zoo entry, so no test pass either (ResNet-32 over 10,000 test images is slow here)
        config["test_after_fit"] = False
    path.write_text(yaml.safe_dump(config))
    return LitCompressCLI(
        args=["fit", "--config", str(path)],
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def callback(cli: LitCompressCLI, name: str):
    (found,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == name]
    return found


def root_zoo(cli: LitCompressCLI) -> str:
    return str(Path(cli.trainer.default_root_dir) / "zoo")


def assert_same_run(a: LitCompressCLI, b: LitCompressCLI) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"listing order changed the result: {different[:5]}"


@pytest.fixture(autouse=True)
def _real_data(shared_data_dir, monkeypatch):
    monkeypatch.setenv("LIT_COMPRESS_DATA", str(shared_data_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_prune_and_distil(tmp_path):
    cli = run("combo-prune-distil-lenet5-mnist.yaml", tmp_path)
    pruning, distillation = callback(cli, "Pruning"), callback(cli, "Distillation")
    params = dict(cli.model.named_parameters())
    for name, mask in pruning.masks.items():
        assert (params[name] == 0).sum() >= (~mask).sum() > 0.94 * mask.numel()  # 95% layerwise
    teacher = distillation.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p is not q for p in teacher.parameters() for q in cli.model.parameters())


def test_prune_and_binaryconnect_keep_zeros_and_clip_latent_weights(tmp_path):
    cli = run("combo-prune-binaryconnect-lenet5-mnist.yaml", tmp_path)
    net, pruning = cli.model.net, callback(cli, "Pruning")
    for layer in ("conv2", "fc1"):
        module = getattr(net, layer)
        assert is_quantized(module)
        mask = pruning.masks[f"net.{layer}.weight"]
        latent = module.weight.detach()
        assert (~mask).float().mean() == pytest.approx(0.75, abs=0.01)
        assert torch.all(latent[~mask] == 0)  # pruned latent weights stay exactly 0
        assert latent.abs().max() <= 1.0  # BinaryConnect clips the surviving latent weights
        effective = module.weight_quantizer(latent).detach()
        assert torch.equal(effective == 0, ~mask)  # binary forward: 0 where pruned, not sign(0) = +1
        assert set(effective[mask].abs().unique().tolist()) == {1.0}
    exported = callback(cli, "Quantization").export(cli.model)
    assert torch.equal(exported.fc1.weight == 0, ~pruning.masks["net.fc1.weight"])
    assert_same_run(cli, run("combo-prune-binaryconnect-lenet5-mnist.yaml", tmp_path, reverse=True))


def test_apprentice_distil_and_quantize(tmp_path):
    cli = run("apprentice-lenet5-mnist.yaml", tmp_path)
    net = cli.model.net
    assert [n for n, m in net.named_modules() if is_quantized(m)] == ["conv2", "fc1"]
    levels = net.conv2.weight_quantizer(net.conv2.weight.detach()).unique()
    assert len(levels) <= 4  # 2-bit weights
    teacher = callback(cli, "Distillation").teacher
    assert not any(is_quantized(m) for m in teacher.modules())  # the teacher stays full precision
    assert_same_run(cli, run("apprentice-lenet5-mnist.yaml", tmp_path, reverse=True))


def test_deep_compression_chain(tmp_path):
    cli = run("deep_compression-lenet5-mnist.yaml", tmp_path)
    sharing, pruning = callback(cli, "WeightSharing"), callback(cli, "Pruning")
    params = dict(cli.model.named_parameters())
    for name, mask in pruning.masks.items():
        weight = params[name].detach()
        assert torch.all(weight[~mask] == 0)
        bits = 8 if weight.dim() == 4 else 5
        assert len(weight[mask].unique()) <= 2**bits  # shared values of the surviving weights
    assert sharing.clustered and sharing.assignments
    from lit_compress import zoo

    (entry,) = zoo.list_models(zoo=root_zoo(cli))
    card = zoo.card(entry, zoo=root_zoo(cli))
    assert card.files and "deep-compression" in json.dumps(card.to_dict())
    reloaded = zoo.load(entry, zoo=root_zoo(cli))
    sd = cli.model.net.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in reloaded.state_dict().items())  # Huffman is lossless


def test_fbs_and_distil(tmp_path):
    cli = run("fbs-distil-cifarnet-fashion_mnist.yaml", tmp_path)
    from lit_compress.gating.fbs import fbs_layers

    layers = fbs_layers(cli.model.net)
    assert sorted(layers) == ["features.1.0", "features.3.0", "features.4.0"]
    assert all(layer.density == pytest.approx(0.4) for layer in layers.values())
    teacher = callback(cli, "Distillation").teacher
    assert not fbs_layers(teacher)  # gating went into the student only
    assert_same_run(cli, run("fbs-distil-cifarnet-fashion_mnist.yaml", tmp_path, reverse=True))


def test_shortened_configs_reverse_only_compression_callbacks():
    listed = shortened("fbs-distil-cifarnet-fashion_mnist.yaml", Path("/tmp/x"))
    flipped = shortened("fbs-distil-cifarnet-fashion_mnist.yaml", Path("/tmp/x"), reverse=True)
    names = [cb["class_path"].rsplit(".", 1)[-1] for cb in listed["trainer"]["callbacks"]]
    assert names == ["Distillation", "FBS", "CompressionSummary"]
    assert [cb["class_path"].rsplit(".", 1)[-1] for cb in flipped["trainer"]["callbacks"]] == [
        "FBS",
        "Distillation",
        "CompressionSummary",
    ]


def test_blockdrop_backbone_stage_and_distil(tmp_path):
    """The recipe of the BlockDrop long-kd entry: a frozen policy from a zoo entry, the dense backbone as a
    teacher. The teacher stays ungated, the policy does not move (not even its batch-norm statistics), the
    order of the callbacks does not matter."""
    cli = run("blockdrop-resnet32-fashion_mnist-long-kd.yaml", tmp_path, export=False)
    from lit_compress import zoo
    from lit_compress.gating.blockdrop import GatedBlockMixin

    blockdrop, teacher = callback(cli, "BlockDrop"), callback(cli, "Distillation").teacher
    assert not any(isinstance(m, GatedBlockMixin) for m in teacher.modules())
    start = zoo.load("resnet32-fashion-mnist.blockdrop-long-ft").policy.state_dict()
    assert all(torch.equal(v, start[k]) for k, v in blockdrop.policy.state_dict().items())
    assert blockdrop.policy_steps == 0 and cli.trainer.global_step == STEPS
    reversed_ = run("blockdrop-resnet32-fashion_mnist-long-kd.yaml", tmp_path, reverse=True, export=False)
    assert_same_run(cli, reversed_)
