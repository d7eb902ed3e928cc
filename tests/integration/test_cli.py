"""The ``lit-compress`` command end to end: fit, --print_config, recipe parsing, errors, and the zoo commands.

Most runs go through :func:`lit_compress.cli.main` in-process (the console script is ``sys.exit(main())``);
one fit and one error case run the installed console script as a subprocess. Every run writes under
``tmp_path`` only (``LIT_COMPRESS_ZOO`` points there too, so no test can touch the shipped zoo).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lit_compress import zoo as zoo_api
from lit_compress.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
SHIPPED_ZOO = REPO_ROOT / "zoo"
SHIPPED = sorted(p.parent.name for p in SHIPPED_ZOO.glob("*/card.json"))
CONSOLE_SCRIPT = Path(sys.executable).parent / "lit-compress"
LENET_300_100_PARAMS = 266610  # 784*300+300 + 300*100+100 + 100*10+10
DATA_CLASS_DATASET = {
    "lit_compress.data.MNISTDataModule": "mnist",
    "lit_compress.data.FashionMNISTDataModule": "fashion-mnist",
}


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Keep every run's side effects inside the test: zoo writes, seed env vars, determinism flag."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", [str(CONSOLE_SCRIPT)])  # pytest's own options must not leak in
    monkeypatch.setenv("LIT_COMPRESS_ZOO", str(tmp_path / "guard-zoo"))
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG"):
        monkeypatch.delenv(var, raising=False)  # restored after the test
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)


# -- helpers ------------------------------------------------------------------------------------------------


def tiny_config(root: Path, extra_callbacks: list[dict[str, Any]] | None = None, max_steps: int = 4) -> dict:
    """LeNet-300-100 on 64 synthetic images (batch 16): ``max_steps=4`` is one epoch, validation included."""
    return {
        "seed_everything": 0,
        "test_after_fit": True,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": max_steps,
            "default_root_dir": str(root),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(root), "name": "logs"},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"monitor": "val/acc", "mode": "max"},
                },
                {"class_path": "lit_compress.measure.CompressionSummary"},
                *(extra_callbacks or []),
            ],
        },
        "model": {
            "class_path": "lit_compress.models.ImageClassifier",
            "init_args": {"model": "lenet_300_100"},
        },
        "data": {
            "class_path": "lit_compress.data.SyntheticDataModule",
            "init_args": {"num_train": 64, "num_val": 32, "num_test": 48, "batch_size": 16},
        },
    }


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """``lit-compress ARGS`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def print_config(capsys, *args: str) -> str:
    code, out, err = run_main(capsys, "fit", *args, "--print_config")
    assert code == 0, err
    assert out.strip(), "--print_config printed nothing"
    return out


def run_console(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None, timeout: float = 180):
    assert CONSOLE_SCRIPT.is_file(), f"console script not installed at {CONSOLE_SCRIPT}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metric_rows(metrics_csv: Path) -> list[dict[str, str]]:
    with metrics_csv.open(newline="") as f:
        return list(csv.DictReader(f))


def values(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def check_fit_outputs(root: Path, max_steps: int = 4, num_test: int = 48) -> Path:
    """Assert a tiny run under ``root`` left checkpoint, report, config and test metrics; return the ckpt."""
    version = root / "logs" / "version_0"
    ckpts = sorted(version.glob("checkpoints/*.ckpt"))
    assert len(ckpts) == 1, f"expected one checkpoint, found {ckpts} under {root}"
    ckpt = torch.load(ckpts[0], map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == max_steps
    assert ckpt["state_dict"]["net.fc1.weight"].shape == (300, 784)
    assert ckpt["hyper_parameters"]["model"] == "lenet_300_100"

    report = json.loads((version / "checkpoints" / "compression_report.json").read_text())
    assert report["model"] == "LeNet300100"
    assert report["input_shape"] == [1, 28, 28]
    assert report["params_total"] == LENET_300_100_PARAMS
    assert report["params_nonzero"] == LENET_300_100_PARAMS
    assert report["macs_dense"] == 784 * 300 + 300 * 100 + 100 * 10

    saved = yaml.safe_load((version / "config.yaml").read_text())
    assert saved["model"]["init_args"]["model"] == "lenet_300_100"
    assert saved["data"]["class_path"] == "lit_compress.data.SyntheticDataModule"
    assert saved["trainer"]["max_steps"] == max_steps
    assert saved["test_after_fit"] is True

    rows = metric_rows(version / "metrics.csv")
    assert values(rows, "val/acc"), "validation never ran"
    assert values(rows, "compression/params_total")[0] == LENET_300_100_PARAMS
    (errors,) = values(rows, "test/errors")  # test_after_fit ran exactly once
    (acc,) = values(rows, "test/acc")
    assert errors == int(errors) and 0 <= errors <= num_test
    assert errors == round((1 - acc) * num_test)
    return ckpts[0]


# -- fit --------------------------------------------------------------------------------------------------


def test_fit_in_process(tmp_path, capsys):
    root = tmp_path / "run"
    config = write_yaml(tmp_path / "tiny-recipe.yaml", tiny_config(root))
    code, _, err = run_main(capsys, "fit", "--config", str(config))
    assert code == 0, err
    check_fit_outputs(root)


def test_fit_console_script(tmp_path):
    root = tmp_path / "run"
    config = write_yaml(tmp_path / "tiny-recipe.yaml", tiny_config(root))
    proc = run_console(["fit", "--config", str(config)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_fit_outputs(root)
    assert "test/errors" in proc.stdout  # Lightning's test table
    assert "266,610" in proc.stdout + proc.stderr  # CompressionSummary's table


def test_last_checkpoint_follows_the_latest_epoch_when_the_monitor_stops_improving(tmp_path, capsys):
    # monitor "step" in mode min: only the first epoch is ever "best". Lightning >= 2.6 alone would then
    # leave last.ckpt at that epoch; the CLI keeps it at the latest one, so resuming repeats nothing.
    root = tmp_path / "run"
    config = tiny_config(root, max_steps=8)
    ckpt_dir = root / "ckpts"
    config["trainer"]["callbacks"][0]["init_args"] = {
        "dirpath": str(ckpt_dir),
        "monitor": "step",
        "mode": "min",
        "save_last": True,
    }
    code, _, err = run_main(capsys, "fit", "--config", str(write_yaml(tmp_path / "r.yaml", config)))
    assert code == 0, err
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(next(ckpt_dir.glob("epoch=0*.ckpt")), map_location="cpu", weights_only=True)
    assert (best["global_step"], last["global_step"]) == (4, 8)
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["epoch=0-step=4.ckpt", "last.ckpt"]


@pytest.mark.parametrize("args", [{"monitor": "step", "mode": "min"}, {"save_top_k": 0}])
def test_last_checkpoint_survives_a_crash_in_the_next_epoch(tmp_path, args):
    # A run that dies in epoch 2 must leave last.ckpt at the end of epoch 1 (step 8). Without the CLI's
    # companion, Lightning 2.6 leaves it at epoch 0 (monitor no longer improving) or writes none at all
    # (save_top_k 0 saves last.ckpt only when training ends normally).
    import lightning.pytorch as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_compress.data import SyntheticDataModule
    from lit_compress.lightning_cli import _keep_last_checkpoint_current
    from lit_compress.models import ImageClassifier

    class Crash(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                raise RuntimeError("simulated crash")

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, **args)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, Crash()],
    )
    _keep_last_checkpoint_current(trainer)
    dm = SyntheticDataModule(num_train=64, num_val=32, num_test=16, batch_size=16)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(ImageClassifier(model="lenet_300_100"), datamodule=dm)
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 8


# -- --print_config ------------------------------------------------------------------------------------


def test_configs_folder_holds_the_recipes():
    names = {p.name for p in CONFIGS}
    assert {"lenet5-mnist-dense.yaml", "lenet_300_100-mnist-dense.yaml"} <= names
    for name in SHIPPED:  # every shipped entry's recipe is in the repo
        recipe = zoo_api.card(name, zoo=SHIPPED_ZOO).recipe.path
        assert (REPO_ROOT / recipe).is_file(), f"{name}: recipe {recipe} is missing"


@pytest.mark.parametrize("recipe", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_parses(recipe, capsys):
    printed = yaml.safe_load(print_config(capsys, "--config", str(recipe)))
    source = yaml.safe_load(recipe.read_text())
    assert printed["model"]["class_path"] == source["model"]["class_path"]
    assert printed["data"]["class_path"] == source["data"]["class_path"]
    assert [c["class_path"] for c in printed["trainer"]["callbacks"]] == [
        c["class_path"] for c in source["trainer"]["callbacks"]
    ]
    # A recipe that exports a zoo entry points at itself and names its own architecture and dataset.
    for cb in printed["trainer"]["callbacks"]:
        if cb["class_path"] not in (
            "lit_compress.zoo.ZooExport",
            "lit_compress.zoo.from_lightning.ZooExport",
        ):
            continue
        args = cb["init_args"]
        assert args.get("recipe") in (None, f"configs/{recipe.name}")  # None: taken from --config
        arch, rest = args["name"].split("-", 1)
        assert arch == printed["model"]["init_args"]["model"]
        dataset = args.get("dataset") or DATA_CLASS_DATASET.get(printed["data"]["class_path"])
        assert dataset, "ZooExport needs dataset= when the datamodule is not MNIST / Fashion-MNIST"
        assert rest.startswith(dataset + ".")


def _round_trip(tmp_path: Path, capsys, config: Path) -> Path:
    first = print_config(capsys, "--config", str(config))
    printed = tmp_path / "printed.yaml"
    printed.write_text(first)
    second = print_config(capsys, "--config", str(printed))
    assert second == first
    return printed


def test_print_config_round_trip_tiny(tmp_path, capsys):
    root = tmp_path / "run"
    printed = _round_trip(tmp_path, capsys, write_yaml(tmp_path / "tiny-recipe.yaml", tiny_config(root)))
    code, _, err = run_main(capsys, "fit", "--config", str(printed), "--trainer.max_steps", "1")
    assert code == 0, err
    rows = metric_rows(root / "logs" / "version_0" / "metrics.csv")
    assert len(values(rows, "test/errors")) == 1


def test_print_config_round_trip_lenet5_recipe(tmp_path, capsys, monkeypatch, shared_data_dir):
    """The real LeNet-5 recipe, printed and re-read, still trains, tests and exports its zoo entry."""
    recipe = REPO_ROOT / "configs" / "lenet5-mnist-dense.yaml"
    printed = _round_trip(tmp_path, capsys, recipe)
    # The recipe names itself as `configs/...` relative to the repo root and writes to runs/...:
    # run from tmp_path, where configs/ links to the repo's folder and relative outputs stay in tmp_path.
    (tmp_path / "configs").symlink_to(REPO_ROOT / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    zoo = tmp_path / "zoo"
    monkeypatch.setenv("LIT_COMPRESS_ZOO", str(zoo))
    monkeypatch.setenv("LIT_COMPRESS_DATA", str(shared_data_dir))
    root = tmp_path / "run"
    code, _, err = run_main(
        capsys,
        "fit",
        "--config",
        str(printed),
        "--trainer.max_steps=1",
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.limit_test_batches=0.1",  # 1 of 10 batches (an int 1 would parse as 1.0 = all)
        "--data.init_args.limit_train=32",
        "--data.init_args.val_size=16",
    )
    assert code == 0, err
    rows = metric_rows(root / "logs" / "version_0" / "metrics.csv")
    (errors,) = values(rows, "test/errors")
    assert 0 <= errors <= 1000  # one test batch of eval_batch_size 1000
    assert zoo_api.list_models(zoo=zoo) == ["lenet5-mnist.dense"]
    card = zoo_api.card("lenet5-mnist.dense", zoo=zoo)
    assert card.recipe.path == "configs/lenet5-mnist-dense.yaml"
    assert card.recipe.sha256 == sha256(recipe)
    assert card.training["steps"] == 1
    assert card.metrics.num_examples == 10000
    assert card.architecture.name == "lenet5"


# -- bad configs ------------------------------------------------------------------------------------------


def test_unknown_model_name_console_script(tmp_path):
    config = tiny_config(tmp_path / "run")
    config["model"]["init_args"]["model"] = "lenet"
    path = write_yaml(tmp_path / "bad.yaml", config)
    proc = run_console(["fit", "--config", str(path)], cwd=tmp_path)
    assert proc.returncode != 0
    assert "unknown model 'lenet'" in proc.stderr
    assert "Valid names" in proc.stderr and "lenet_300_100" in proc.stderr
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").rglob("*.ckpt"))


def test_bad_datamodule_value(tmp_path, capsys):
    config = write_yaml(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    args = ["fit", "--config", str(config), "--data", "lit_compress.data.MNISTDataModule"]
    code, _, err = run_main(capsys, *args, "--data.val_size", "-1")
    assert code == 2
    assert "invalid configuration" in err and "val_size must be an int >= 0, got -1" in err


@pytest.mark.parametrize(
    ("override", "mentions"),
    [
        (["--trainer.max_steps", "abc"], "trainer.max_steps"),
        (["--model.init_args.no_such_arg", "1"], "no_such_arg"),
        (["--data", "lit_compress.data.NoSuchDataModule"], "NoSuchDataModule"),
    ],
    ids=["bad-type", "unknown-arg", "unknown-class"],
)
def test_parse_errors_exit_2(tmp_path, capsys, override, mentions):
    config = write_yaml(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))
    code, _, err = run_main(capsys, "fit", "--config", str(config), *override)
    assert code == 2
    assert mentions in err


def test_misspelt_callback_class_path_fails(tmp_path, capsys):
    config = tiny_config(tmp_path / "run")
    config["trainer"]["callbacks"][1]["class_path"] = "lit_compress.measure.CompressionSumary"
    code, _, err = run_main(capsys, "fit", "--config", str(write_yaml(tmp_path / "bad.yaml", config)))
    assert code == 2
    assert "CompressionSumary" in err


# -- ZooExport and zoo export from a checkpoint -----------------------------------------------------------


def _net_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}


def test_zoo_export_via_cli(tmp_path, capsys, monkeypatch, shared_data_dir):
    monkeypatch.setenv("LIT_COMPRESS_DATA", str(shared_data_dir))
    zoo = tmp_path / "zoo"
    name = "lenet_300_100-mnist.cli-test"
    export_cb = {
        "class_path": "lit_compress.zoo.ZooExport",
        "init_args": {"name": name, "dataset": "mnist", "zoo": str(zoo), "description": "CLI test"},
    }
    root = tmp_path / "run"
    config = write_yaml(tmp_path / "tiny-export.yaml", tiny_config(root, [export_cb]))
    # ZooExport takes the recipe from the command line, as the console script would have it.
    monkeypatch.setattr(sys, "argv", ["lit-compress", "fit", "--config", str(config)])
    code, out, err = run_main(capsys, "fit", "--config", str(config))
    assert code == 0, err
    ckpt = check_fit_outputs(root)
    assert f"zoo entry {name}: top-1" in out

    assert zoo_api.list_models(zoo=zoo) == [name]
    card = zoo_api.card(name, zoo=zoo)
    assert card.dataset.name == "mnist" and card.metrics.num_examples == 10000
    assert card.params.dense == card.params.nonzero == LENET_300_100_PARAMS
    assert card.recipe.path == config.name and card.recipe.sha256 == sha256(config)
    assert card.training["weights"] == "best checkpoint" and card.training["steps"] == 4
    assert card.compression.description == "CLI test"

    model = zoo_api.load(name, zoo=zoo)
    assert not any(m.training for m in model.modules())
    best = _net_state(ckpt)
    loaded = model.state_dict()
    assert loaded.keys() == best.keys()
    assert all(torch.equal(loaded[k], best[k]) for k in best)  # the best checkpoint's weights, exactly
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)

    code, out, err = run_main(capsys, "zoo", "--zoo", str(zoo), "verify")
    assert code == 0, out + err
    assert f"OK   {name}" in out and "1 verified, 0 failed" in out

    # The same network exported afterwards from the checkpoint file gives the same measurements.
    name2 = "lenet_300_100-mnist.cli-test-ckpt"
    export_args = ["--checkpoint", str(ckpt), "--config", str(config), "--name", name2, "--dataset", "mnist"]
    code, out, err = run_main(capsys, "zoo", "--zoo", str(zoo), "export", *export_args)
    assert code == 0, err
    assert f"wrote zoo entry {name2}" in out
    card2 = zoo_api.card(name2, zoo=zoo)
    assert card2.metrics == card.metrics
    assert card2.params == card.params and card2.macs == card.macs
    assert card2.recipe.sha256 == card.recipe.sha256
    model2 = zoo_api.load(name2, zoo=zoo)
    assert all(torch.equal(model2.state_dict()[k], best[k]) for k in best)
    assert zoo_api.list_models(zoo=zoo) == sorted([name, name2])

    code, _, err = run_main(capsys, "zoo", "--zoo", str(zoo), "export", *export_args)
    assert code == 2 and "already exists" in err  # no silent overwrite

    code, out, err = run_main(capsys, "zoo", "--zoo", str(zoo), "verify")
    assert code == 0, out + err
    assert "2 verified, 0 failed" in out


# -- the shipped zoo --------------------------------------------------------------------------------------


@pytest.fixture
def shipped_zoo(monkeypatch):
    monkeypatch.delenv("LIT_COMPRESS_ZOO", raising=False)
    if not SHIPPED:
        pytest.skip(f"no zoo entries in {SHIPPED_ZOO}")
    assert zoo_api.zoo_dir().resolve() == SHIPPED_ZOO.resolve()
    return SHIPPED_ZOO


def _card_json(name: str) -> dict:
    return json.loads((SHIPPED_ZOO / name / "card.json").read_text())


def test_zoo_list_shipped(shipped_zoo, capsys):
    assert "lenet_300_100-mnist.dense" in SHIPPED
    code, out, err = run_main(capsys, "zoo", "list")
    assert code == 0, err
    header, rule, *rows = out.strip().splitlines()
    assert header.split()[:2] == ["name", "top-1"] and set(rule) <= {"-", " "}
    assert [r.split()[0] for r in rows] == SHIPPED
    for row, name in zip(rows, SHIPPED):
        card = _card_json(name)
        assert f"{card['metrics']['top1']:.2%}" in row
        assert f"{card['metrics']['errors']} / {card['metrics']['num_examples']}" in row
        # Ratios are against the uncompressed architecture (a structure-spec entry's own count differs:
        # smaller when channels or blocks were removed, larger when FBS added saliency predictors).
        reference = card["params"]["dense"]
        if card.get("structure"):
            from lit_compress.models import create_model

            arch = card["architecture"]
            reference = sum(p.numel() for p in create_model(arch["name"], **arch["kwargs"]).parameters())
        assert f"{card['params']['nonzero']:,} / {reference:,}" in row

    code, out, _ = run_main(capsys, "zoo", "list", "lenet_300_100-*")
    assert code == 0 and "lenet_300_100-mnist.dense" in out and "lenet5-" not in out
    code, out, _ = run_main(capsys, "zoo", "list", "no-such-*")
    assert code == 0 and "no zoo entries match 'no-such-*'" in out


@pytest.mark.parametrize("name", SHIPPED)
def test_zoo_show_shipped(shipped_zoo, capsys, name):
    code, out, err = run_main(capsys, "zoo", "show", name)
    assert code == 0, err
    assert json.loads(out) == _card_json(name)


# The CLI path once per weight format / structure kind (small nets); every shipped entry is re-measured by
# tests/integration/test_zoo_real.py, so evaluating all of them here again would only double the time.
CLI_EVAL = [
    "lenet_300_100-mnist.dense",  # safetensors
    "lenet_300_100-mnist.pruned-12x",  # sparse-safetensors
    "binary_mlp-mnist.bnn-3x2048",  # bit-packed
    "lenet_300_100-mnist.deep-compression",  # deep-compression codec
    "lenet5-mnist.structured-l1",  # structure spec
    "lenet5-mnist.int8-qat",  # int8 structure
]


def test_cli_eval_entries_are_shipped():
    assert set(CLI_EVAL) <= set(SHIPPED)


@pytest.mark.parametrize("name", CLI_EVAL)
def test_zoo_eval_shipped(shipped_zoo, capsys, monkeypatch, shared_data_dir, name):
    monkeypatch.setenv("LIT_COMPRESS_DATA", str(shared_data_dir))
    code, out, err = run_main(capsys, "zoo", "eval", name)
    assert code == 0, err
    result = json.loads(out)
    card = _card_json(name)
    assert result["name"] == name
    assert result["differences"] == [] and result["matches_card"] is True
    assert result["measured"]["errors"] == card["metrics"]["errors"]
    assert result["measured"]["params_nonzero"] == card["params"]["nonzero"]


@pytest.mark.parametrize(
    "command",
    [
        "show",
        "eval",
    ],
)
def test_zoo_unknown_name(shipped_zoo, capsys, command):
    code, out, err = run_main(capsys, "zoo", command, "lenet_300_100-mnist.dens")
    assert code == 2, out
    assert "Did you mean 'lenet_300_100-mnist.dense'" in err
