import pytest
from mlflow.tracking import MlflowClient

from raypress.errors import RayPressError
from raypress.tracking import Tracker, tracked


def test_run_finished_with_params_metrics_artifacts(mlflow_uri):
    t = Tracker(None, "exp", "m-sparsity-0.6-evopress")
    with tracked(t):
        t.log_params({"model": "m", "target": 0.6})
        t.log_metrics({"best_fitness": 0.5}, step=0)
        t.log_metrics({"best_fitness": 0.25}, step=1)
        t.log_json({"a.b": 1}, "best_config.json")
    c = MlflowClient(mlflow_uri)
    run = c.get_run(t.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["target"] == "0.6"
    assert run.info.run_name == "m-sparsity-0.6-evopress"
    hist = c.get_metric_history(t.run_id, "best_fitness")
    assert [(m.step, m.value) for m in hist] == [(0, 0.5), (1, 0.25)]
    assert "best_config.json" in [a.path for a in c.list_artifacts(t.run_id)]


def test_failure_marks_run_failed_with_reason(mlflow_uri):
    t = Tracker(None, "exp", "boom")
    with pytest.raises(ValueError):
        with tracked(t):
            raise ValueError("database exploded")
    run = MlflowClient(mlflow_uri).get_run(t.run_id)
    assert run.info.status == "FAILED"
    assert "database exploded" in run.data.tags["raypress.error"]


def test_unwritable_store_is_one_clear_line(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ro / 'x' / 'mlflow.db'}")
    with pytest.raises(RayPressError, match="not writable"):
        Tracker(None, "exp", "r")


def test_a_store_locked_longer_than_sqlites_wait_loses_no_metric(mlflow_uri, monitor_lock=7.0):
    """Another process holds the SQLite store's write lock for 7 s (sqlite3 itself waits 5): the
    writes are retried, every metric arrives, the run ends FINISHED."""
    import sqlite3
    import threading
    import time

    t = Tracker(None, "exp", "busy store")
    t.log_metrics({"gen_best_kl": 0.5}, step=0)
    path = mlflow_uri[len("sqlite:///"):]
    locked = threading.Event()

    def hold():
        con = sqlite3.connect(path, timeout=30, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(monitor_lock)
        con.execute("COMMIT")
        con.close()

    th = threading.Thread(target=hold)
    th.start()
    locked.wait()
    t0 = time.time()
    with tracked(t):
        t.log_metrics({"gen_best_kl": 0.25}, step=1)
        t.set_tags({"raypress.searcher": "evopress"})
    waited = time.time() - t0
    th.join()
    c = MlflowClient(mlflow_uri)
    run = c.get_run(t.run_id)
    assert waited > 5.0 and run.info.status == "FINISHED"  # it really waited past sqlite's own 5 s
    assert [(m.step, m.value) for m in c.get_metric_history(t.run_id, "gen_best_kl")] == [(0, 0.5), (1, 0.25)]
    assert run.data.tags["raypress.searcher"] == "evopress"


def test_metrics_kept_while_the_store_stays_locked_are_sent_by_the_next_write(mlflow_uri, monkeypatch, caplog):
    import sqlite3

    t = Tracker(None, "exp", "locked store")
    monkeypatch.setattr(Tracker, "RETRY_S", (0.1,))
    real = t.client.log_batch
    calls = {"n": 0}

    def flaky(*a, **kw):  # the store answers "locked" for the first 3 writes (retries included)
        calls["n"] += 1
        if calls["n"] <= 3:
            raise sqlite3.OperationalError("database is locked")
        return real(*a, **kw)

    monkeypatch.setattr(t.client, "log_batch", flaky)
    t.log_metrics({"gen_best_kl": 0.5}, step=0)  # 2 tries, both locked: kept, one warning
    assert "busy for over a minute: 1 metric values kept" in caplog.text
    with tracked(t):
        t.log_metrics({"gen_best_kl": 0.25}, step=1)  # third try locked, fourth sends both
    hist = MlflowClient(mlflow_uri).get_metric_history(t.run_id, "gen_best_kl")
    assert sorted((m.step, m.value) for m in hist) == [(0, 0.5), (1, 0.25)]
