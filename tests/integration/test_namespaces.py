"""Every lit_compress callback in both Lightning namespaces: ``lightning.pytorch`` and ``pytorch_lightning``.

The two distributions ship distinct ``Callback`` / ``LightningModule`` / ``Trainer`` types. Each callback is
written once (``lit_compress._flavour``) and exists as two classes: ``lit_compress.<module>.<Name>`` (the
``lightning.pytorch`` flavour) and ``lit_compress.pl.<Name>`` (the ``pytorch_lightning`` flavour).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lit_compress.pl as lpl
from lit_compress import zoo as zoo_api
from lit_compress._flavour import registered_implementations
from lit_compress.models import create_model

IMPLEMENTATIONS = registered_implementations()  # complete: importing lit_compress.pl registers them all
NAMESPACES = {"lightning.pytorch": L, "pytorch_lightning": pl}
# Constructor arguments for callbacks that have required ones (add a line when adding such a callback).
CTOR_KWARGS = {
    "ZooExport": {"name": "lenet_300_100-mnist.pickle-test"},
    "Pruning": {"sparsity": 0.5},
    "Distillation": {"teacher": {"model": "lenet_300_100"}},
    "StructuredPruning": {"amount": 0.5},
    "Quantization": {"method": "binaryconnect"},
    "LowRank": {"energy": 0.9},
}


def lightning_flavour(name: str) -> type:
    impl = IMPLEMENTATIONS[name]
    return getattr(sys.modules[impl.__module__], name)


def pl_flavour(name: str) -> type:
    return getattr(lpl, name)


FLAVOURS = {"lightning.pytorch": lightning_flavour, "pytorch_lightning": pl_flavour}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("LIT_COMPRESS_ZOO", str(tmp_path / "guard-zoo"))  # never the shipped zoo
    monkeypatch.setattr(sys, "argv", ["lit-compress"])  # ZooExport reads --config from argv
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


def test_the_two_namespaces_are_distinct():
    # If they ever became one, the pl flavour would be redundant and these tests would prove nothing.
    assert pl.Callback is not L.Callback
    assert not issubclass(pl.Callback, L.Callback) and not issubclass(L.Callback, pl.Callback)
    assert {"CompressionSummary", "ZooExport"} <= set(IMPLEMENTATIONS)
    assert sorted(IMPLEMENTATIONS) == lpl.__all__


def test_every_callback_module_is_registered_by_lit_compress_pl():
    """A callback module that ``lit_compress.pl`` forgets to import has no ``pytorch_lightning`` flavour.

    Runs in a fresh interpreter: import ``lit_compress.pl`` first, then every module of the package.
    """
    code = (
        "import importlib, json, pkgutil\n"
        "import lit_compress, lit_compress.pl as pl\n"
        "from lit_compress._flavour import registered_implementations\n"
        "mods = [m.name for m in pkgutil.walk_packages(lit_compress.__path__, 'lit_compress.')]\n"
        "for m in mods: importlib.import_module(m)\n"
        "print(json.dumps({'modules': mods, 'registered': sorted(registered_implementations()),"
        " 'pl': sorted(pl.__all__)}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "lit_compress.measure.callback" in result["modules"]
    missing = sorted(set(result["registered"]) - set(result["pl"]))
    assert not missing, f"lit_compress.pl does not import the modules defining {missing}"


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_both_flavours_exist(name):
    impl = IMPLEMENTATIONS[name]
    light, legacy = lightning_flavour(name), pl_flavour(name)
    assert light is not legacy
    assert issubclass(light, impl) and issubclass(legacy, impl)

    assert issubclass(light, L.Callback)
    assert not issubclass(light, pl.Callback)
    assert issubclass(legacy, pl.Callback)
    assert not issubclass(legacy, L.Callback)

    # Names that pickle and jsonargparse's class_path resolve to the flavoured class itself.
    assert (light.__module__, light.__qualname__) == (impl.__module__, name)
    assert (legacy.__module__, legacy.__qualname__) == ("lit_compress.pl", name)
    assert importlib.import_module(light.__module__).__dict__[name] is light
    assert light.__doc__ == legacy.__doc__ == impl.__doc__ and impl.__doc__


@pytest.mark.parametrize("namespace", sorted(FLAVOURS))
@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_flavours_pickle(name, namespace):
    """``ddp_spawn`` pickles the trainer's callbacks: the class must be found again by its name."""
    cls = FLAVOURS[namespace](name)
    try:
        callback = cls(**CTOR_KWARGS.get(name, {}))
    except TypeError as err:
        pytest.fail(f"add constructor arguments for {name} to CTOR_KWARGS: {err}")
    clone = pickle.loads(pickle.dumps(callback))
    assert type(clone) is cls
    assert isinstance(clone, NAMESPACES[namespace].Callback)
    assert clone.state_key == callback.state_key
    assert sorted(vars(clone)) == sorted(vars(callback))
    for key, value in vars(callback).items():
        if isinstance(value, (str, int, float, bool, type(None), list, dict)):
            assert getattr(clone, key) == value, key


# -- real runs in each namespace ------------------------------------------------------------------------


def make_module(ns: ModuleType, lenet: bool = False, n: int = 8) -> nn.Module:
    """A tiny LightningModule of namespace ``ns`` with its own data: 2 batches of 4 per epoch."""
    shape = (1, 28, 28) if lenet else (1, 8, 8)

    class Tiny(ns.LightningModule):
        def __init__(self, model: str = "lenet_300_100", model_kwargs: dict | None = None):
            super().__init__()
            self.save_hyperparameters()
            if lenet:
                self.net = create_model(model, **(model_kwargs or {}))
            else:
                self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            gen = torch.Generator().manual_seed(0)
            data = TensorDataset(
                torch.randn(n, *shape, generator=gen), torch.randint(0, 10, (n,), generator=gen)
            )
            return DataLoader(data, batch_size=4)

    return Tiny(model_kwargs={}) if lenet else Tiny()


def make_trainer(ns: ModuleType, root: Path, callbacks: list, **kwargs) -> object:
    options = {
        "max_steps": 2,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(root),
        **kwargs,
    }
    return ns.Trainer(callbacks=callbacks, **options)


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_compression_summary_runs_in_each_namespace(namespace, tmp_path):
    ns = NAMESPACES[namespace]
    summary = FLAVOURS[namespace]("CompressionSummary")(verbose=False)
    module = make_module(ns)
    assert isinstance(module, ns.LightningModule)
    trainer = make_trainer(ns, tmp_path, [summary])
    trainer.fit(module)
    assert trainer.global_step == 2
    path = tmp_path / "compression_report.json"
    assert summary.last_report_path == path and path.is_file()
    report = json.loads(path.read_text())
    assert report["input_shape"] == [1, 8, 8]  # taken from the first training batch
    assert report["params_total"] == report["params_nonzero"] == 64 * 10 + 10
    assert report["macs_dense"] == 640
    assert summary.last_report.params_total == 650


def test_zoo_export_pytorch_lightning_flavour(tmp_path, monkeypatch, shared_data_dir):
    monkeypatch.setenv("LIT_COMPRESS_DATA", str(shared_data_dir))
    zoo = tmp_path / "zoo"
    name = "lenet_300_100-mnist.pl-flavour"
    export = lpl.ZooExport(name=name, dataset="mnist", zoo=str(zoo), description="pytorch_lightning")
    module = make_module(pl, lenet=True)
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = make_trainer(pl, tmp_path, [checkpoint, export], enable_checkpointing=True)
    assert isinstance(trainer, pl.Trainer) and not isinstance(trainer, L.Trainer)
    trainer.fit(module)

    assert zoo_api.list_models(zoo=zoo) == [name]
    card = zoo_api.card(name, zoo=zoo)
    assert export.card == card
    assert card.architecture.name == "lenet_300_100" and card.architecture.kwargs == {}
    assert card.training["weights"] == "best checkpoint" and card.training["steps"] == 2
    assert card.metrics.num_examples == 10000
    assert card.params.dense == 266610
    model = zoo_api.load(name, zoo=zoo)
    assert not any(m.training for m in model.modules())
    trained = module.net.state_dict()
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in trained)
    assert zoo_api.verify_entry(name, zoo=zoo).ok


# -- why both flavours exist: each namespace rejects the other's callbacks ------------------------------


def _callback_config(tmp_path: Path, namespace: str, callback_path: str) -> Path:
    config = {
        "trainer": {
            "max_steps": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [{"class_path": callback_path, "init_args": {"verbose": False}}],
        },
        "model": {"class_path": f"{namespace}.demos.boring_classes.BoringModel"},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("cli_namespace", sorted(NAMESPACES))
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_lightning_cli_accepts_only_its_own_flavour(tmp_path, capsys, cli_namespace, flavour):
    cls = FLAVOURS[flavour]("CompressionSummary")
    config = _callback_config(tmp_path, cli_namespace, f"{cls.__module__}.{cls.__qualname__}")
    cli_module = importlib.import_module(f"{cli_namespace}.cli")
    if flavour == cli_namespace:
        cli = cli_module.LightningCLI(args=["--config", str(config)], run=False)
        assert any(type(c) is cls for c in cli.trainer.callbacks)
    else:
        with pytest.raises(SystemExit) as exc:
            cli_module.LightningCLI(args=["--config", str(config)], run=False)
        assert exc.value.code == 2
        assert 'Parser key "trainer.callbacks"' in capsys.readouterr().err


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_trainer_rejects_a_single_callback_of_the_other_flavour(namespace, tmp_path):
    """A lone callback is accepted only if it is an instance of the trainer's own ``Callback``."""
    ns = NAMESPACES[namespace]
    other = "pytorch_lightning" if namespace == "lightning.pytorch" else "lightning.pytorch"
    own = FLAVOURS[namespace]("CompressionSummary")(verbose=False)
    trainer = make_trainer(ns, tmp_path, own)
    assert own in trainer.callbacks
    foreign = FLAVOURS[other]("CompressionSummary")(verbose=False)
    with pytest.raises(TypeError, match="not iterable"):
        make_trainer(ns, tmp_path, foreign)
