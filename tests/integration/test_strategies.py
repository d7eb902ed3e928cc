"""Every lit_compress callback under the strategies it claims, and a clear refusal under those it cannot run.

- 2-process DDP on the CPU (``strategy="ddp_spawn"``, gloo): each rank writes its callbacks' ``state_dict()``
  and the model's ``state_dict()`` at the end of fit (safetensors + JSON, never pickle) and the test compares
  rank 0 with rank 1 exactly. A ddp_spawn fit costs ~30 s on a loaded 2-core machine (two fresh interpreters
  import torch and Lightning), so the callbacks run in three composed fits (one per network family) shared by
  the parametrised tests through a module-scoped cache; each callback still has its own test id.
- Callbacks that replace or remove layers inside the workers refuse spawning strategies on purpose (the main
  process would keep its original network): the refusal message is asserted without launching anything.
  They run under plain ``strategy="ddp"`` in their own test files (a subprocess script or one in-process
  rank: plain DDP re-runs the launching script, which under pytest would be the pytest session).
- FSDP / DeepSpeed / ModelParallel are refused by the one central check (``lit_compress._strategy``) that
  runs before every callback's ``setup``, in both Lightning namespaces.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as L
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import lit_compress.pl as lcpl
from lit_compress._flavour import registered_implementations
from lit_compress._strategy import (
    SHARDED_STRATEGIES,
    check_strategy,
    implementation_name,
    sharded_strategy,
    spawns_workers,
)
from lit_compress.data import SyntheticDataModule
from lit_compress.deep_compression.sharing_callback import WeightSharing
from lit_compress.distillation import Distillation
from lit_compress.factorization.callback import DepthwiseSeparable, LowRank
from lit_compress.gating.blockdrop_callback import BlockDrop
from lit_compress.gating.fbs_callback import FBS
from lit_compress.measure.callback import CompressionSummary
from lit_compress.models import ImageClassifier, create_model
from lit_compress.pruning import OneShot
from lit_compress.pruning.callback import Pruning
from lit_compress.pruning.depth_callback import DepthPruning
from lit_compress.pruning.structured.callback import StructuredPruning
from lit_compress.quantization.callback import Quantization
from lit_compress.quantization.int8_callback import Int8QAT
from lit_compress.zoo.from_lightning import ZooExport

# -- state files: safetensors for tensors, JSON for the rest -------------------------------------------------


def flatten_state(value: Any, prefix: str, tensors: dict[str, Tensor]) -> Any:
    """JSON-able copy of ``value`` with every tensor moved into ``tensors`` under its path (``a/b/0``)."""
    if isinstance(value, Tensor):
        tensors[prefix] = value.detach().cpu().contiguous().clone()
        return {"tensor": prefix}
    if isinstance(value, nn.Module):
        return flatten_state(value.state_dict(), prefix, tensors)
    if isinstance(value, dict):
        return {str(k): flatten_state(v, f"{prefix}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [flatten_state(v, f"{prefix}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"unexpected {type(value).__name__} at {prefix!r} in a callback state_dict")


class SaveRankState(L.Callback):
    """At the end of fit, each rank writes its lit_compress callbacks' state and the model's state_dict."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_fit_end(self, trainer, pl_module):
        tensors: dict[str, Tensor] = {}
        meta = {
            "step": trainer.global_step,
            "model": flatten_state(pl_module.state_dict(), "model", tensors),
            "callbacks": {},
        }
        for cb in trainer.callbacks:
            name = implementation_name(cb)
            if name in registered_implementations() and hasattr(cb, "state_dict"):
                meta["callbacks"][name] = flatten_state(cb.state_dict(), f"callbacks/{name}", tensors)
        rank = trainer.global_rank
        save_file(tensors, str(Path(self.folder) / f"rank{rank}.safetensors"))
        (Path(self.folder) / f"rank{rank}.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


def load_rank(folder: Path, rank: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    meta = json.loads((folder / f"rank{rank}.json").read_text())
    return meta, load_file(str(folder / f"rank{rank}.safetensors"))


def assert_ranks_identical(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    (meta0, t0), (meta1, t1) = load_rank(folder, 0), load_rank(folder, 1)
    assert meta0 == meta1
    assert t0.keys() == t1.keys()
    different = [k for k in t0 if t0[k].dtype != t1[k].dtype or not torch.equal(t0[k], t1[k])]
    assert not different, f"rank 0 and rank 1 differ in {different[:10]}"
    return meta0, t0


def test_flatten_state_keeps_every_value_and_refuses_unknown_objects():
    tensors: dict[str, Tensor] = {}
    state = {"masks": {"a.weight": torch.tensor([True, False])}, "steps": [1, 2], "g": b"\x01\xff", "x": None}
    flat = flatten_state(state, "cb", tensors)
    assert flat == {
        "masks": {"a.weight": {"tensor": "cb/masks/a.weight"}},
        "steps": [1, 2],
        "g": {"bytes": "01ff"},
        "x": None,
    }
    assert torch.equal(tensors["cb/masks/a.weight"], torch.tensor([True, False]))
    with pytest.raises(TypeError, match="unexpected object at 'cb/o'"):
        flatten_state({"o": object()}, "cb", {})


# -- the composed ddp_spawn fits -----------------------------------------------------------------------------

TINY_RESNET = {"depth": 8, "in_chans": 1, "width": 4}
SMALL = (1, 8, 8)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


class ZooExportWithStubTestSet(ZooExport):
    """ZooExport whose card "measures" a stub instead of the 10,000 real test images (~12 s on a loaded
    machine). The spawned ranks do not see pytest's monkeypatch, so the stub is installed in the worker."""

    def on_fit_end(self, trainer, pl_module):
        import importlib

        from lit_compress.zoo.card import Metrics

        stub = lambda *a, **k: Metrics(top1=0.5, errors=5000, num_examples=10000)  # noqa: E731
        importlib.import_module("lit_compress.zoo.export").evaluate_on = stub
        super().on_fit_end(trainer, pl_module)


def lenet_run(root: Path) -> tuple[nn.Module, list, SyntheticDataModule, dict]:
    """LeNet-5: unstructured and structured pruning, weight sharing, distillation with a hint, measurement
    and a zoo export, each on its own layers so they do not interfere."""
    torch.manual_seed(1)
    teacher = create_model("lenet5")
    torch.manual_seed(0)
    model = ImageClassifier(model="lenet5", optimizer=sgd)
    callbacks = [
        Pruning(sparsity=0.5, include=["net.conv*"], schedule=OneShot(step=1), verbose=False),
        StructuredPruning(amount=0.5, include=["fc1"], schedule=OneShot(step=1), verbose=False),
        WeightSharing(bits=3, include=["net.fc2"], verbose=False),
        Distillation(teacher=teacher, hints=[{"student": "net.conv2", "teacher": "conv2"}], verbose=False),
        CompressionSummary(input_shape=[1, 28, 28], verbose=False),
        ZooExportWithStubTestSet(name="lenet5-mnist.ddp-test", dataset="mnist", zoo=str(root / "zoo")),
    ]
    return model, callbacks, SyntheticDataModule(num_train=64, batch_size=8, shuffle=False), {"max_steps": 4}


def resnet_run(root: Path) -> tuple[nn.Module, list, SyntheticDataModule, dict]:
    """Tiny CIFAR ResNet: BlockDrop (a curriculum epoch, then a joint epoch), feature boosting and suppression
    on each block's second conv and 4-bit DoReFa quantization of each block's first conv.

    Validation runs after each epoch on purpose: DDP broadcasts BatchNorm buffers from rank 0 at the start
    of each forward, so after the last *training* step each rank holds the running statistics of its own
    last batch; the validation forward that closes a real fit makes them identical again."""
    torch.manual_seed(0)
    model = ImageClassifier(model="resnet", model_kwargs=dict(TINY_RESNET), optimizer=sgd)
    callbacks = [
        BlockDrop(policy="cnn", policy_width=4, curriculum_epochs=1, verbose=False),
        FBS(density=0.5, include=["net.layer*.conv2"], verbose=False),
        Quantization(method="dorefa", bits=4, include=["net.layer*.conv1"], verbose=False),
    ]
    data = SyntheticDataModule(num_train=32, num_val=16, input_shape=SMALL, batch_size=8, shuffle=False)
    return model, callbacks, data, {"max_epochs": 2, "limit_val_batches": 1}


RUNS: dict[str, Callable] = {"lenet5": lenet_run, "resnet": resnet_run}

#: callback -> the composed run it trains in.
SPAWN_TESTED = {
    "Pruning": "lenet5",
    "StructuredPruning": "lenet5",
    "WeightSharing": "lenet5",
    "Distillation": "lenet5",
    "CompressionSummary": "lenet5",
    "ZooExport": "lenet5",
    "BlockDrop": "resnet",
    "FBS": "resnet",
    "Quantization": "resnet",
}


class SpawnRuns:
    """Runs each composed fit once per module, on first use, and keeps its folder and callbacks."""

    def __init__(self, root: Path):
        self.root = root
        self.done: dict[str, tuple[Path, list]] = {}

    def get(self, run: str) -> tuple[Path, list]:
        if run not in self.done:
            folder = self.root / run
            folder.mkdir()
            model, callbacks, data, limits = RUNS[run](folder)
            limits = {"limit_val_batches": 0, "num_sanity_val_steps": 0, **limits}
            trainer = L.Trainer(
                strategy="ddp_spawn",
                accelerator="cpu",
                devices=2,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[*callbacks, SaveRankState(str(folder))],
                default_root_dir=folder,
                **limits,
            )
            trainer.fit(model, data)
            self.done[run] = (folder, callbacks)
        return self.done[run]


@pytest.fixture(scope="module")
def spawn_runs(tmp_path_factory) -> SpawnRuns:
    return SpawnRuns(tmp_path_factory.mktemp("spawn"))


def test_every_callback_is_covered():
    """A new callback must be added here: to a ddp_spawn run, or to the spawn refusals below."""
    assert set(SPAWN_TESTED) | set(SPAWN_REFUSED) == set(registered_implementations())


def _check_work_done(name: str, meta: dict, tensors: dict[str, Tensor], callbacks: list) -> None:
    """What each callback must have done, so that 'identical' is not 'identically empty'."""
    cb = meta["callbacks"][name]
    if name == "Pruning":
        masks = {k: tensors[v["tensor"]] for k, v in cb["masks"].items()}
        assert set(masks) == {"net.conv1.weight", "net.conv2.weight"}
        for key, mask in masks.items():
            assert 1 - mask.float().mean().item() == pytest.approx(0.5, abs=0.02), key
            assert torch.count_nonzero(tensors[f"model/{key}"][~mask]) == 0, key
    elif name == "StructuredPruning":
        kept = tensors[cb["kept"]["fc1"]["tensor"]]  # indices of the kept output channels
        assert cb["sizes"] == {"fc1": 500} and kept.numel() == 250
        pruned = torch.ones(500, dtype=torch.bool)
        pruned[kept] = False
        assert torch.count_nonzero(tensors["model/net.fc1.weight"][pruned]) == 0
        assert torch.count_nonzero(tensors["model/net.fc2.weight"][:, pruned]) == 0
    elif name == "WeightSharing":
        assert cb["clustered"] and cb["num_clusters"] == {"net.fc2.weight": 8}
        assert tensors["model/net.fc2.weight"].unique().numel() <= 8 + 1  # 8 shared values (+ pruned zeros)
    elif name == "Distillation":
        # Each rank's teacher is still the one the main process holds: frozen, never trained.
        main = next(c for c in callbacks if isinstance(c, Distillation))
        assert cb["teacher_fingerprint"] == main.state_dict()["teacher_fingerprint"]
    elif name == "BlockDrop":
        assert cb["blocks"] == ["layer1.0", "layer2.0", "layer3.0"] and cb["epoch"] == 1
        assert any(k.startswith("callbacks/BlockDrop/") for k in tensors)
    elif name == "FBS":
        assert cb["layers"] == ["layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"]
        assert "model/net.layer1.0.conv2.predictor.weight" in tensors
    elif name == "Quantization":
        assert cb["layers"] == ["net.layer1.0.conv1", "net.layer2.0.conv1", "net.layer3.0.conv1"]
    else:  # pragma: no cover - a callback added to SPAWN_TESTED without a check here
        raise AssertionError(f"no check for {name}")


@pytest.mark.parametrize("name", sorted(SPAWN_TESTED))
def test_two_ddp_spawn_ranks_end_identical(spawn_runs, name):
    folder, callbacks = spawn_runs.get(SPAWN_TESTED[name])
    meta, tensors = assert_ranks_identical(folder)
    if name == "ZooExport":
        (card,) = (folder / "zoo").glob("*/card.json")  # written by rank zero only
        card = json.loads(card.read_text())
        assert card["name"] == "lenet5-mnist.ddp-test" and card["training"]["steps"] == 4
        assert "pruning" in " ".join(card["compression"]["methods"]).lower()
        return
    if name == "CompressionSummary":
        report = json.loads((folder / "compression_report.json").read_text())
        assert report["params_total"] > 0
        return
    assert meta["step"] == 4
    _check_work_done(name, meta, tensors, callbacks)


# -- spawning strategies refused on purpose ------------------------------------------------------------------


def _lenet() -> ImageClassifier:
    return ImageClassifier(model="lenet5")


def _resnet() -> ImageClassifier:
    return ImageClassifier(model="resnet", model_kwargs=dict(TINY_RESNET))


#: callback -> (constructor, module factory, refusal message pattern).
SPAWN_REFUSED: dict[str, tuple[Callable, Callable, str]] = {
    "LowRank": (lambda: LowRank(rank=4, verbose=False), _lenet, r"spawning strategy.*strategy='ddp'"),
    "DepthwiseSeparable": (
        lambda: DepthwiseSeparable(verbose=False),
        _lenet,
        r"spawning strategy.*strategy='ddp'",
    ),
    "DepthPruning": (lambda: DepthPruning(verbose=False), _resnet, r"spawning strategy.*strategy='ddp'"),
    "Int8QAT": (
        lambda: Int8QAT(example_input_shape=[1, 28, 28], verbose=False),
        _lenet,
        r"Int8QAT replaces the network.*spawning strategy.*strict=False.*strategy='ddp'",
    ),
}


@pytest.mark.parametrize("name", sorted(SPAWN_REFUSED))
def test_callbacks_that_replace_layers_refuse_ddp_spawn(name):
    make, module, message = SPAWN_REFUSED[name]
    spawn = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False)
    assert spawns_workers(spawn)
    with pytest.raises(ValueError, match=message):
        make().setup(spawn, module(), "fit")


PLAIN_DDP_SCRIPT = """
import sys

import lightning.pytorch as L
import torch

from lit_compress.data import SyntheticDataModule
from lit_compress.models import ImageClassifier
from lit_compress.quantization.int8_callback import Int8QAT
from tests.integration.test_strategies import SaveRankState

if __name__ == "__main__":
    torch.manual_seed(0)
    model = ImageClassifier(model="lenet5", optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    int8 = Int8QAT(example_input_shape=[1, 28, 28], freeze_observer_step=2, verbose=False)
    trainer = L.Trainer(
        strategy="ddp", accelerator="cpu", devices=2, max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[int8, SaveRankState(sys.argv[1])], default_root_dir=sys.argv[1],
        limit_val_batches=0, num_sanity_val_steps=0,
    )
    trainer.fit(model, SyntheticDataModule(num_train=64, batch_size=8))
"""


def test_int8qat_runs_under_plain_ddp_the_alternative_its_refusal_names(tmp_path):
    """Plain DDP re-runs the launching script in each rank, so it runs as a subprocess (under pytest the
    script would be the pytest session). The observers are frozen after two steps: their ranges are buffers,
    broadcast from rank 0 at each forward, so from then on every rank holds the same ranges."""
    import os
    import subprocess
    import sys

    script = tmp_path / "int8_ddp.py"
    script.write_text(PLAIN_DDP_SCRIPT)
    # Distributed variables left by in-process DDP tests would make the script believe it is a launched rank.
    launched = {"LOCAL_RANK", "RANK", "GLOBAL_RANK", "NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"}
    clean = {
        k: v for k, v in os.environ.items() if k not in launched and not k.startswith(("MASTER_", "PL_"))
    }
    env = {**clean, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    meta, tensors = assert_ranks_identical(tmp_path)
    assert meta["step"] == 3
    assert meta["callbacks"]["Int8QAT"]["observers_frozen"] is True
    assert any(k.endswith("weight_fake_quant.scale") for k in tensors)  # the QAT network was trained


def test_structured_pruning_removing_immediately_refuses_ddp_spawn():
    spawn = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False)
    with pytest.raises(ValueError, match=r"spawning strategy.*remove='at_end'"):
        StructuredPruning(amount=0.5, remove="immediately", verbose=False).setup(spawn, _lenet(), "fit")


def test_int8qat_refusal_also_in_the_pytorch_lightning_namespace():
    pl = pytest.importorskip("pytorch_lightning")
    spawn = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False)
    assert spawns_workers(spawn)  # recognised by class name: pytorch_lightning's launcher is another class
    with pytest.raises(ValueError, match="Int8QAT replaces the network"):
        lcpl.Int8QAT(example_input_shape=[1, 28, 28], verbose=False).setup(spawn, _lenet(), "fit")


def test_plain_ddp_and_single_device_are_not_refused():
    for strategy, devices in (("ddp", 2), ("auto", 1)):
        trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=devices, logger=False)
        assert not spawns_workers(trainer) and sharded_strategy(trainer) is None
        for impl in registered_implementations().values():
            check_strategy(trainer, SimpleNamespace())  # nothing registered by that name
            check_strategy(trainer, object.__new__(impl))
    check_strategy(None, object())  # unit tests call setup(None, ...): no strategy, no refusal


# -- sharding strategies: one central refusal ---------------------------------------------------------------


def _stub_strategy(name: str) -> object:
    """An object whose class is named like a Lightning strategy (deepspeed is not installed here)."""
    return type(name, (), {})()


def _fsdp() -> object:
    from lightning.pytorch.strategies import FSDPStrategy

    return FSDPStrategy()  # constructed, never launched (a Trainer refuses FSDP on the CPU)


def _model_parallel() -> object:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy()


def _user_subclass_of_fsdp() -> object:
    from pytorch_lightning.strategies import FSDPStrategy

    return type("MyFSDP", (FSDPStrategy,), {})()


STRATEGIES = {
    "FSDPStrategy": _fsdp,
    "ModelParallelStrategy": _model_parallel,
    "DeepSpeedStrategy": lambda: _stub_strategy("DeepSpeedStrategy"),
    "MyFSDP": _user_subclass_of_fsdp,
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("name", sorted(registered_implementations()))
def test_sharding_strategies_are_refused_before_any_callback_setup(name, strategy):
    """Both namespaces' flavours run the check first: the callback's own setup never sees the model."""
    trainer = SimpleNamespace(strategy=STRATEGIES[strategy]())
    expected = "FSDPStrategy" if strategy == "MyFSDP" else strategy
    assert sharded_strategy(trainer) == expected
    for flavour in (getattr(lit_compress_lightning(), name), getattr(lcpl, name)):
        callback = object.__new__(flavour)  # no constructor arguments needed: setup refuses first
        with pytest.raises(ValueError) as err:
            callback.setup(trainer, None, "fit")
        message = str(err.value)
        assert message.startswith(f"{name} cannot run under {type(trainer.strategy).__name__}: ")
        assert SHARDED_STRATEGIES[expected] in message
        assert "strategy='ddp'" in message and "ddp_spawn" in message


def lit_compress_lightning() -> Any:
    """Namespace of the ``lightning.pytorch`` flavours, by implementation name."""
    from lit_compress.deep_compression import sharing_callback
    from lit_compress.distillation import callback as distillation
    from lit_compress.factorization import callback as factorization
    from lit_compress.gating import blockdrop_callback, fbs_callback
    from lit_compress.measure import callback as measure
    from lit_compress.pruning import callback as pruning
    from lit_compress.pruning import depth_callback
    from lit_compress.pruning.structured import callback as structured
    from lit_compress.quantization import callback as quantization
    from lit_compress.quantization import int8_callback
    from lit_compress.zoo import from_lightning

    modules = (
        sharing_callback,
        distillation,
        factorization,
        blockdrop_callback,
        fbs_callback,
        measure,
        pruning,
        depth_callback,
        structured,
        quantization,
        int8_callback,
        from_lightning,
    )
    found = {}
    for module in modules:
        for name in registered_implementations():
            flavour = getattr(module, name, None)
            if isinstance(flavour, type) and issubclass(flavour, L.Callback):
                found[name] = flavour
    return SimpleNamespace(**found)


def test_flavours_keep_their_setup_after_the_check(tmp_path):
    """The wrapped setup still runs the implementation's own (here CompressionSummary's model_attr check)."""
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, default_root_dir=tmp_path)
    for flavour in (CompressionSummary, lcpl.CompressionSummary):
        with pytest.raises(ValueError, match=r"has no nn\.Module attribute 'nope'"):
            flavour(model_attr="nope").setup(trainer, _lenet(), "fit")
        flavour().setup(trainer, _lenet(), "fit")
    ZooExport(name="lenet5-mnist.dense").setup(trainer, _lenet(), "fit")  # no setup of its own: base no-op


@pytest.mark.parametrize("name", ["FBS", "BlockDrop"])
def test_gating_callbacks_warn_that_their_state_stays_in_spawned_workers(name):
    import lightning.pytorch as L

    from lit_compress._strategy import check_strategy
    from lit_compress.gating import BlockDrop
    from lit_compress.gating.fbs_callback import FBS

    callback = FBS(density=0.5) if name == "FBS" else BlockDrop()
    trainer = L.Trainer(strategy="ddp_spawn", devices=2, accelerator="cpu", logger=False)
    with pytest.warns(UserWarning, match=rf"{name} under a spawning strategy.*live in the worker processes"):
        check_strategy(trainer, callback)
    single = L.Trainer(accelerator="cpu", devices=1, logger=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_strategy(single, callback)  # no warning on a single device


@pytest.mark.parametrize("name", ["LowRank", "DepthPruning"])
def test_pytorch_lightning_flavours_refuse_ddp_spawn_too(name):
    """The spawn check goes by the launcher's class name, so a pytorch_lightning trainer is recognised too
    (an isinstance check against lightning.pytorch's launcher missed it)."""
    import pytorch_lightning as pl

    module = _resnet() if name == "DepthPruning" else _lenet()
    callback = (
        lcpl.DepthPruning(verbose=False) if name == "DepthPruning" else lcpl.LowRank(rank=4, verbose=False)
    )
    spawn = pl.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False)
    with pytest.raises(ValueError, match=r"spawning strategy.*strategy='ddp'"):
        callback.setup(spawn, module, "fit")
