"""searcher.name=pareto: an EvoPress search per budget in one run, pareto.json, export --budget."""
import json
from pathlib import Path

import pytest
from _tiny import tiny_llama

from raypress.config import load_config
from raypress.errors import RayPressError
from raypress.pareto_report import non_dominated
from raypress.rundir import parse_size

GS = 32


def _cfg(tmp_path, wikitext_path, name, *extra):
    return load_config(None, [
        f"model={tiny_llama()}", "family=joint", "method=magnitude-rtn", f"database.group_size={GS}",
        f"data.source=text:{wikitext_path}", "data.seq_len=64", "data.n_calib=32", "data.n_eval=8",
        "searcher.stages=[[128, 2], [256, 1]]", "searcher.generations=3", "searcher.offspring=4", "target=4.5",
        f"database.cache_dir={tmp_path / 'db'}", f"output={tmp_path / name}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra])


def test_non_dominated_and_sizes():
    pts = [{"value": 3, "ppl": 10}, {"value": 4, "ppl": 12}, {"value": 5, "ppl": 8}, {"value": 5, "ppl": 8.5}]
    assert non_dominated(pts) == [True, False, True, False]
    assert parse_size("60MB") == 60_000_000 and parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("1234") == 1234
    with pytest.raises(RayPressError, match="not a size"):
        parse_size("lots")


def test_budgets_are_checked_before_anything_runs(tmp_path, wikitext_path):
    from raypress.models import get_adapter, meta_model
    from raypress.runner import preflight
    from raypress.search.pareto import resolve_budgets

    cfg = _cfg(tmp_path, wikitext_path, "runs", "searcher.name=pareto")
    adapter = get_adapter(meta_model(cfg.model))
    _, space = preflight(cfg, adapter)
    budgets = resolve_budgets(cfg, space)  # default: up to 8, ascending, reachable, ending at the target
    assert 2 <= len(budgets) <= 8 and budgets == sorted(budgets) and budgets[-1] == 4.5
    with pytest.raises(RayPressError, match="searcher.budgets: target 1 is outside"):
        preflight(_cfg(tmp_path, wikitext_path, "runs", "searcher.name=pareto", "searcher.budgets=[1, 4.5]"), adapter)
    with pytest.raises(RayPressError, match="read by the pareto searcher only"):
        _cfg(tmp_path, wikitext_path, "runs", "searcher.budgets=[3, 4.5]")
    assert not (tmp_path / "runs").exists()


def test_front_points_are_the_per_budget_searches_and_export_picks_by_bytes(tmp_path, ray_session, wikitext_path):
    """Each budget's point is exactly the config `raypress search --set target=B` finds (same seed, same
    tokens); pareto.json marks the non-dominated points; export --budget takes the best that fits."""
    from raypress.export import load_exported
    from raypress.rundir import export_run
    from raypress.runner import run_search

    r = run_search(_cfg(tmp_path, wikitext_path, "front", "searcher.name=pareto", "searcher.budgets=[3.0, 4.5]"))
    assert r.evaluations == 2 * 3 * (5 + 2)
    doc = json.loads((tmp_path / "front" / next((tmp_path / "front").iterdir()).name / "pareto.json").read_text())
    pts = doc["points"]
    assert [p["budget"] for p in pts] == [3.0, 4.5] and [p["value"] for p in pts] == [3.0, 4.5]
    assert [p["front"] for p in pts] == non_dominated(pts)
    # MLflow has the front as a table (one row per budget) and the plot
    from mlflow import MlflowClient

    client = MlflowClient(r.tracking_uri)
    names = {a.path for a in client.list_artifacts(r.run_id)}
    assert {"pareto.json", "pareto_table.json", "pareto_front.png"} <= names, names
    table = json.loads(Path(client.download_artifacts(r.run_id, "pareto_table.json", str(tmp_path))).read_text())
    cols = table["columns"]
    rows = [dict(zip(cols, row)) for row in table["data"]]
    assert [(x["budget"], x["bytes"]) for x in rows] == [(p["budget"], p["bytes"]) for p in pts]
    assert [x["ppl"] for x in rows] == pytest.approx([p["ppl"] for p in pts], rel=1e-9)
    alone = run_search(_cfg(tmp_path, wikitext_path, "alone", "target=3.0"))
    assert {l: int(k) for l, k in alone.best_config.items()} == pts[0]["config"]
    assert r.best_config == {l: k for l, k in pts[1]["config"].items()}  # the target's point is the result
    run_dir = next((tmp_path / "front").iterdir())
    with pytest.raises(RayPressError, match="no point of the front fits"):
        export_run(run_dir, tmp_path / "x", budget=str(pts[0]["bytes"] - 1))
    out = export_run(run_dir, tmp_path / "small", budget=str(pts[0]["bytes"]))
    info = json.loads((out / "raypress.json").read_text())
    assert info["front_point"]["budget"] == 3.0 and info["mean_value"] == pytest.approx(3.0)
    load_exported(out)

    # stopped after 5 trials (SIGINT, as Ctrl-C) and resumed: the same evaluations, the same front
    import os
    import signal

    from ray import tune

    from raypress.interrupt import Interrupted

    class StopAfter(tune.Callback):
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            if self.done == 5:
                os.kill(os.getpid(), signal.SIGINT)

    cfg = _cfg(tmp_path, wikitext_path, "stopped", "searcher.name=pareto", "searcher.budgets=[3.0, 4.5]")
    with pytest.raises(Interrupted):
        run_search(cfg, callbacks=[StopAfter()])
    stopped = next((tmp_path / "stopped").iterdir())
    assert not (stopped / "pareto.json").exists()
    resumed = run_search(cfg, resume=stopped)
    assert resumed.evaluations == r.evaluations
    again = json.loads((stopped / "pareto.json").read_text())["points"]
    assert [p["config"] for p in again] == [p["config"] for p in pts]


def test_each_budget_starts_from_its_own_schedule():
    """searcher.init with pareto: the runner hands a function of the budget's space, so every budget
    starts from its own schedule (not only the target's)."""
    import numpy as np

    from raypress.search.pareto import build
    from raypress.space import SearchSpace

    sizes = [300, 100, 100, 300, 800, 800, 400] * 2
    space = SearchSpace.from_values([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], 0.4,
                                    layers=[f"l{i}" for i in range(len(sizes))], n_params=sizes)
    cfg = load_config(None, ["searcher.name=pareto", "searcher.budgets=[0.2, 0.4]", "searcher.stages=[[128, 2], [256, 1]]",
                             "data.seq_len=64", "data.n_calib=8"])
    starts = {}

    def initial(sp):
        starts[sp.target] = sp.random_feasible(np.random.default_rng(int(sp.target * 10)))
        return starts[sp.target]

    s = build("pareto", cfg, space, initial)
    assert [float(sub.space.target) for sub in s.subs] == [0.2, 0.4]
    for sub in s.subs:
        assert sub.space.array_to_config(sub.parent) == starts[sub.space.target] != sub.space.uniform()
    # several starts (searcher.init: [uniform, dp]): every budget gets all of them at its own budget
    s2 = build("pareto", cfg, space, lambda sp: [sp.uniform(), starts[sp.target]])
    for sub in s2.subs:
        assert sub.space.array_to_config(sub.parent) == sub.space.uniform()
        assert [sub.space.array_to_config(a) for a in sub._starts] == [starts[sub.space.target]]
