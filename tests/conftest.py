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
