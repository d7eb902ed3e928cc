import os
from pathlib import Path

import pytest

# timm's hub look-ups retry for ~45 s without a network; tests never need the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PL_DISABLE_FORK", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real MNIST / Fashion-MNIST IDX files beside the checkout (skips when absent)."""
    if not (SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real datasets not found at {SHARED_DATA}")
    return SHARED_DATA


_DISTRIBUTED_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "GLOBAL_RANK",
)


@pytest.fixture(autouse=True)
def _restore_distributed_env():
    """Lightning's DDP strategies write MASTER_ADDR / WORLD_SIZE / LOCAL_RANK ... into os.environ. Left
    behind, they make a later test's DDP launcher believe it is an already-started rank (and wait for a peer
    that never comes), so every test gets the distributed variables it started with back."""
    import os

    before = {key: os.environ.get(key) for key in _DISTRIBUTED_ENV}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
