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


# --- PostgreSQL, the plant's database: one throwaway server for the session -------------------


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server (initdb + pg_ctl in a temporary folder, as the postgres
    user when we are root, on a port of its own), stopped and removed after the session.
    Skips, saying why, only where the PostgreSQL binaries (Debian: `postgresql`) are absent."""
    from edge.defect_log.throwaway_postgres import PostgresUnavailable, ThrowawayPostgres

    try:
        server = ThrowawayPostgres()
    except PostgresUnavailable as exc:
        why = f"PostgreSQL tests need a local PostgreSQL install: {exc}"
        if os.environ.get("CI"):
            pytest.fail(why)             # .ci/run installs it: missing there is a broken CI
        pytest.skip(why)
    yield server
    server.close()


@pytest.fixture
def postgres_url(postgres_server, tmp_path, monkeypatch) -> str:
    """A fresh database on the session's server, as a URL. The writers' local files (journal,
    spool: edge.defect_log.local_files) go under this test's tmp_path, child processes too."""
    import uuid

    postgres_server.start()           # in case a test that stopped it failed midway
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}")
