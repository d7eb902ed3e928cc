"""The built wheel, installed into a fresh virtual environment, ships a working zoo and CLI.

The wheel is built offline (``python -m build --wheel --no-isolation``, which needs hatchling in the running
environment: ``pip install -e '.[dev]'``). The fresh venv gets lit_compress from the wheel only; its
dependencies (torch, lightning, ...) come from the running environment through a ``.pth`` line naming that
environment's site-packages. A folder added by a ``.pth`` line is put on ``sys.path`` without processing its
own ``.pth`` files, so the source checkout's editable install does not leak into the fresh venv.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRY = "lenet_300_100-mnist.dense"
SHIPPED = sorted(p.parent.name for p in (REPO_ROOT / "zoo").glob("*/card.json"))
CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


def _run(args: list, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 180):
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if importlib.util.find_spec("hatchling") is None:
        pytest.skip("hatchling is not installed in this environment (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("dist")
    proc = _run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out],
        env={**os.environ, "PIP_NO_INDEX": "1"},
        cwd=REPO_ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = out.glob("lit_compress-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> dict[str, str]:
    """Environment for the fresh venv's processes: no zoo override, nothing from the checkout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LIT_COMPRESS_ZOO", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1", "PIP_NO_INDEX": "1"})
    return env


@pytest.fixture(scope="module")
def venv(wheel, fresh_env, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fresh") / "venv"
    proc = _run([sys.executable, "-m", "venv", root], env=fresh_env)
    assert proc.returncode == 0, proc.stderr
    python = root / "bin" / "python"
    # pip sees only the fresh venv here: the .pth line below is written after the install.
    proc = _run([python, "-m", "pip", "install", "--no-index", "--no-deps", wheel], env=fresh_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env=fresh_env)
    site_packages = Path(proc.stdout.strip())
    assert site_packages.is_dir() and root.resolve() in site_packages.resolve().parents
    paths = sysconfig.get_paths()
    host = dict.fromkeys([paths["purelib"], paths["platlib"]])  # the running environment's dependencies
    (site_packages / "_host_dependencies.pth").write_text("".join(f"{p}\n" for p in host))
    return root


def test_wheel_contents(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        card_name = f"lit_compress/_zoo_entries/{ENTRY}/card.json"
        assert card_name in names
        for entry in SHIPPED:
            card = json.loads(zf.read(f"lit_compress/_zoo_entries/{entry}/card.json"))
            assert card["name"] == entry
            for f in card["files"]:
                data = zf.read(f"lit_compress/_zoo_entries/{entry}/{f['path']}")
                assert len(data) == f["bytes"] and _sha256(data) == f["sha256"]
        assert f"lit_compress/_zoo_entries/{ENTRY}/model.safetensors" in names
        assert CONFIGS
        for config in CONFIGS:
            assert zf.read(f"lit_compress/_configs/{config.name}") == config.read_bytes()
        assert "lit_compress/__init__.py" in names and "lit_compress/cli.py" in names
        assert not [n for n in names if n.split("/")[0] in ("tests", "zoo", "configs", "runs", "benchmarks")]
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "lit-compress = lit_compress.cli:main" in zf.read(entry_points).decode()


def test_fresh_venv_uses_the_installed_copy(venv, fresh_env, tmp_path):
    code = (
        "import json, sys, lit_compress, lightning, torch\n"
        "from lit_compress.zoo import zoo_dir\n"
        "print(json.dumps({'file': lit_compress.__file__, 'zoo': str(zoo_dir()), 'path': sys.path,"
        " 'prefix': sys.prefix}))\n"
    )
    proc = _run([venv / "bin" / "python", "-c", code], env=fresh_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    root = venv.resolve()
    assert Path(info["prefix"]).resolve() == root
    assert root in Path(info["file"]).resolve().parents, info["file"]
    assert Path(info["zoo"]).resolve() == Path(info["file"]).resolve().parent / "_zoo_entries"
    assert str(REPO_ROOT) not in info["path"]  # the editable install's .pth was not processed


def test_fresh_venv_zoo_cli(venv, fresh_env, tmp_path, shared_data_dir):
    env = {**fresh_env, "LIT_COMPRESS_DATA": str(shared_data_dir)}
    cli = venv / "bin" / "lit-compress"
    proc = _run([cli, "zoo", "list"], env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = [line.split()[0] for line in proc.stdout.strip().splitlines()[2:]]
    assert listed == SHIPPED and ENTRY in listed

    # Re-measured from the installed copy: the LeNet entries cover every weight codec (safetensors, sparse,
    # deep-compression, bit-packed binary) and int8 / structured / low-rank architectures.
    # tests/integration/test_zoo_real.py verifies every entry from the checkout; doing all of them twice
    # would add minutes (the width-128 CifarNets alone take about two).
    proc = _run([cli, "zoo", "verify", "*lenet*"], env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lenets = [entry for entry in SHIPPED if "lenet" in entry]
    assert len(lenets) >= 10
    for entry in lenets:
        assert f"OK   {entry}" in proc.stdout
    assert f"{len(lenets)} verified, 0 failed" in proc.stdout


def test_fresh_venv_zoo_load_is_fast(venv, fresh_env, tmp_path):
    code = (
        "import json, time, torch\n"
        "from lit_compress import zoo\n"
        "start = time.perf_counter()\n"
        f"m = zoo.load({ENTRY!r})\n"
        "seconds = time.perf_counter() - start\n"
        "with torch.no_grad():\n"
        "    out = m(torch.zeros(3, 1, 28, 28))\n"
        "print(json.dumps({'seconds': seconds, 'training': any(x.training for x in m.modules()),"
        " 'shape': list(out.shape), 'params': sum(p.numel() for p in m.parameters()),"
        " 'module': type(m).__module__}))\n"
    )
    proc = _run([venv / "bin" / "python", "-c", code], env=fresh_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["seconds"] < 1.0, info
    assert info["training"] is False
    assert info["shape"] == [3, 10] and info["params"] == 266610
    assert info["module"].startswith("lit_compress.models")
