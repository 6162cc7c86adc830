"""Fixtures shared by the whole test suite."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real development data (MVTec AD layout); skips the test when it is absent.

    Taken from $GRAD_EDGE_DATA, else <repo>/../shared/data. The images are never part of the repo.
    """
    root = Path(os.environ.get("GRAD_EDGE_DATA") or REPO_ROOT.parent / "shared" / "data")
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}: set GRAD_EDGE_DATA to the data root (MVTec AD layout)")
    return root


@pytest.fixture(scope="session")
def tiny_model():
    """The real GRAD network (real backbone weights) at the `tiny` config, in eval mode."""
    import torch

    from grad.config import get_config
    from grad.model import GRAD

    torch.manual_seed(0)
    return GRAD(get_config("tiny")).eval()
