"""Every lit_compress callback trains in both Lightning namespaces: from a ``lightning.pytorch.Trainer`` and a
``pytorch_lightning.Trainer`` built in Python, and from each namespace's LightningCLI reading a YAML config,
each on a module of that namespace. Each run checks that the callback acted (masks, swapped layers, gates,
a policy, a report), not only that fit returned."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as L
import pytest
import pytorch_lightning as pl
import yaml

import lit_compress.pl as lpl
from lit_compress._flavour import registered_implementations
from lit_compress.quantization.modules import is_quantized
from tests.integration._namespace_modules import TinyL, TinyPL

NAMESPACES = {"lightning.pytorch": (L, TinyL), "pytorch_lightning": (pl, TinyPL)}
LENET5 = {"model": "lenet5"}
CIFARNET = {"model": "cifarnet", "model_kwargs": {"in_chans": 1, "img_size": 28, "width": 8, "hidden": 16}}
RESNET = {"model": "resnet8", "model_kwargs": {"in_chans": 1, "width": 4}}
RESNET14 = {"model": "resnet14", "model_kwargs": {"in_chans": 1, "width": 4}}  # 2 blocks a stage
MLP = {"model": "lenet_300_100"}


def _net(module):
    return module.net


def _blocks(net) -> int:
    return sum(type(m).__name__ == "BasicBlock" for m in net.modules())


# name -> (constructor arguments, module arguments, check(callback, module) -> bool, steps)
CASES: dict[str, tuple[dict, dict, Callable, int]] = {
    "Pruning": ({"sparsity": 0.5, "verbose": False}, MLP, lambda cb, m: len(cb.masks) == 3, 2),
    "StructuredPruning": (
        {"amount": 0.5, "verbose": False},
        LENET5,
        lambda cb, m: _net(m).conv1.out_channels < 20 or cb.state_dict(),
        2,
    ),
    "Distillation": ({"teacher": dict(MLP)}, MLP, lambda cb, m: not cb.teacher.training, 2),
    "Quantization": (
        {"method": "binaryconnect", "verbose": False},
        MLP,
        lambda cb, m: is_quantized(_net(m).fc2),
        2,
    ),
    "Int8QAT": (
        {"example_input_shape": [1, 28, 28]},
        LENET5,
        lambda cb, m: type(_net(m)).__name__ != "LeNet5",
        2,
    ),
    "WeightSharing": (
        {"bits": 3, "start_step": 1},
        MLP,
        lambda cb, m: cb.clustered and len(_net(m).fc2.weight.unique()) <= 8,
        3,
    ),
    "LowRank": ({"rank": 8, "verbose": False}, MLP, lambda cb, m: type(_net(m).fc1).__name__ != "Linear", 2),
    "DepthwiseSeparable": (
        {"include": ["net.conv2"], "verbose": False},
        LENET5,
        lambda cb, m: type(_net(m).conv2).__name__ != "Conv2d",
        2,
    ),
    "DepthPruning": (
        {"criterion": "epsilon", "epsilon": 100.0, "verbose": False},
        RESNET14,
        lambda cb, m: len(cb.state_dict()["removed"]) == 3 and _blocks(_net(m)) == 3,  # one a stage left
        2,
    ),
    "BlockDrop": (
        {"policy": "cnn", "policy_width": 4, "curriculum_epochs": 1, "verbose": False},
        RESNET,
        lambda cb, m: cb.state_dict()["policy_steps"] > 0,
        2,
    ),
    "FBS": ({"density": 0.5}, CIFARNET, lambda cb, m: "predictor" in str(_net(m)), 2),
    "CompressionSummary": ({"verbose": False}, MLP, lambda cb, m: cb.last_report is not None, 2),
}
# ZooExport evaluates on the real test set: it runs in both namespaces in test_namespaces.py and test_cli.py.
SKIPPED = {"ZooExport"}


def test_every_callback_has_a_case():
    assert set(CASES) | SKIPPED == set(registered_implementations())


def _flavour(namespace: str, name: str) -> type:
    if namespace == "pytorch_lightning":
        return getattr(lpl, name)
    impl = registered_implementations()[name]
    return getattr(sys.modules[impl.__module__], name)


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _trainer_args(root: Path, steps: int) -> dict:
    return {
        "max_steps": steps,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "limit_val_batches": 1,
        "default_root_dir": str(root),
    }


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
@pytest.mark.parametrize("name", sorted(CASES))
def test_callback_trains_from_a_trainer_of_each_namespace(name, namespace, tmp_path):
    ns, module_cls = NAMESPACES[namespace]
    kwargs, module_kwargs, check, steps = CASES[name]
    callback = _flavour(namespace, name)(**kwargs)
    module = module_cls(**module_kwargs)
    trainer = ns.Trainer(callbacks=[callback], **_trainer_args(tmp_path, steps))
    assert isinstance(trainer, ns.Trainer) and isinstance(callback, ns.Callback)
    trainer.fit(module)
    assert trainer.global_step == steps
    assert check(callback, module), f"{name} did not act in a {namespace} run"


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
@pytest.mark.parametrize("name", sorted(CASES))
def test_callback_trains_from_the_lightning_cli_of_each_namespace(name, namespace, tmp_path):
    ns, module_cls = NAMESPACES[namespace]
    kwargs, module_kwargs, check, steps = CASES[name]
    flavour = _flavour(namespace, name)
    config = {
        "trainer": {
            **_trainer_args(tmp_path, steps),
            "callbacks": [
                {"class_path": f"{flavour.__module__}.{flavour.__qualname__}", "init_args": kwargs}
            ],
        },
        "model": {
            "class_path": f"{module_cls.__module__}.{module_cls.__qualname__}",
            "init_args": module_kwargs,
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli_module = importlib.import_module(f"{namespace}.cli")
    cli = cli_module.LightningCLI(args=["--config", str(path)], run=False, save_config_callback=None)
    (callback,) = [cb for cb in cli.trainer.callbacks if type(cb) is flavour]
    assert isinstance(cli.trainer, ns.Trainer) and isinstance(cli.model, module_cls)
    cli.trainer.fit(cli.model)
    assert cli.trainer.global_step == steps
    assert check(callback, cli.model), f"{name} did not act in a {namespace} LightningCLI run"
