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
