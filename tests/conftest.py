import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Real sample data lives beside the checkout (../shared/data); SEGLOSS_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("SEGLOSS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def shared_dataset(name: str) -> Path:
    """Path of a shared sample data set, or skip the test cleanly when it is absent."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"shared sample data {name!r} not found at {path}")
    return path


@pytest.fixture
def shared_data():
    return shared_dataset
