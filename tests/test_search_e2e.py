"""End to end on real parts: tiny Llama, SparseGPT database, Ray Tune + EvoPress, MLflow store."""
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from _actors import pool_members
from _tiny import tiny_llama
from raypress.config import load_config
from raypress.runner import run_search


def _cfg(tmp_path, wikitext_path, *extra):
    return load_config(None, [
        f"model={tiny_llama()}", f"data.source=text:{wikitext_path}", "data.seq_len=64", "data.n_calib=32",
        "data.n_eval=8", "searcher.generations=3", "searcher.offspring=4", "searcher.stages=[[128, 2], [256, 1]]",
        f"output={tmp_path / 'runs'}", f"database.cache_dir={tmp_path / 'db'}", "target=0.5", *extra,
    ])


def test_search_end_to_end_logs_complete_mlflow_run(tmp_path, ray_session, mlflow_uri, wikitext_path):
    cfg = _cfg(tmp_path, wikitext_path)
    r = run_search(cfg)
    # exact budget, and the searched config is never worse than uniform on the search objective
    assert r.mean_value == pytest.approx(0.5, abs=1e-12)
    assert r.evaluations == 3 * (5 + 2)
    assert r.ppl_dense <= r.ppl_uniform and np.isfinite(r.ppl_best)
    c = MlflowClient(mlflow_uri)
    run = c.get_run(r.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "0.5 evopress llama sparsegpt"  # what differs between runs first
    assert Path(r.experiment_dir).name.startswith("0.5-evopress-llama-sparsegpt-")
    # what resume and export need, nothing else (Tune's trial folders and state live in a temp dir)
    assert sorted(p.name for p in Path(r.experiment_dir).iterdir()) == ["raypress_state.json", "result.json"]
    assert {run.data.tags[f"raypress.{k}"] for k in ("searcher", "family", "method")} == {"evopress", "sparsity", "sparsegpt"}
    assert run.data.metrics["target"] == 0.5
    p = run.data.params
    assert p["target"] == "0.5" and p["searcher.name"] == "evopress" and p["method"] == "sparsegpt"
    best = c.get_metric_history(r.run_id, "gen_best_kl")
    assert [m.step for m in best] == [0, 1, 2]
    # the monitor: references before generation 0, the elite after the last generation (monitor_every 5)
    assert [m.step for m in c.get_metric_history(r.run_id, "elite_kl_monitor")] == [2]
    assert [m.step for m in c.get_metric_history(r.run_id, "uniform_kl_monitor")] == [0]
    assert {"evaluations_per_s", "ppl_uniform", "ppl_best", "ppl_dense"} <= set(run.data.metrics)
    arts = {a.path for a in c.list_artifacts(r.run_id)}
    assert {"best_config.json", "level_heatmap.png", "fitness_curve.png", "history.json"} <= arts


def test_one_shot_schedule_and_random_searcher(tmp_path, ray_session, mlflow_uri, wikitext_path, monkeypatch):
    """OWL's statistics pass is kept in the cache ($RAYPRESS_CACHE/stats) for the next job."""
    monkeypatch.setenv("RAYPRESS_CACHE", str(tmp_path / "cache"))
    r = run_search(_cfg(tmp_path, wikitext_path, "searcher.name=owl"))
    assert r.evaluations == 0 and r.mean_value == pytest.approx(0.5, abs=1e-12)
    assert len(list((tmp_path / "cache" / "stats").glob("*.json"))) == 1
    r = run_search(_cfg(tmp_path, wikitext_path, "searcher.name=random", "searcher.samples=6"))
    assert r.evaluations == 6 and r.mean_value == pytest.approx(0.5, abs=1e-12)


def test_compare_logs_children_under_one_parent_with_matched_budgets(tmp_path, ray_session, mlflow_uri,
                                                                     wikitext_path, capsys):
    """Two targets x three searchers: children under one parent, random gets the evolution's budget,
    each target's searchers share one evaluator (the schedule runs first, the table keeps the order
    asked) and measure uniform once on it, and a new target gets a new evaluator."""
    from raypress.compare import compare, matched_budget

    cfg = _cfg(tmp_path, wikitext_path, "searcher.generations=1")
    evals, per_eval = matched_budget(cfg)
    assert evals == 1 * (5 + 2) and per_eval % 64 == 0
    members = set(pool_members())
    rows = compare(cfg, ["evopress", "random", "uniform"], [0.4, 0.5])
    assert [(r["target"], r["searcher"]) for r in rows] == [
        (t, s) for t in (0.4, 0.5) for s in ("evopress", "random", "uniform")]
    assert len(set(pool_members()) - members) == 2  # one evaluator per target
    for evo, rnd, uni in (rows[:3], rows[3:]):
        assert evo["evaluations"] == rnd["evaluations"] == evals
        assert evo["ppl_uniform"] == rnd["ppl_uniform"] == uni["ppl"] == uni["ppl_uniform"]
    assert rows[0]["ppl_uniform"] != rows[3]["ppl_uniform"]
    c = MlflowClient(mlflow_uri)
    runs = c.search_runs([c.get_experiment_by_name("raypress").experiment_id])
    parents = [r for r in runs if r.info.run_name.startswith("compare ")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 6 and all(r.info.status == "FINISHED" for r in children)
    arts = {a.path for a in c.list_artifacts(parents[0].info.run_id)}
    assert {"comparison.json", "comparison.txt", "fitness_curves_0.4.png", "fitness_curves_0.5.png"} <= arts
    assert "evopress" in capsys.readouterr().out


FAMILY_SETS = {
    "sparsity": [],
    "depth": ["family=depth", "method=drop", "target=0.25"],
    "quant": ["family=quant", "method=rtn", "target=4", "levels=[2, 4, 8]"],
    "width": ["family=width", "method=lstsq", "target=0.25"],
}


@pytest.mark.parametrize("family", list(FAMILY_SETS))
def test_export_of_a_finished_search_round_trips(tmp_path, ray_session, mlflow_uri, wikitext_path, family):
    """Every family through the same runner and export: the export's held-out perplexity is the search's."""
    from raypress.rundir import eval_folder, export_run

    extra = FAMILY_SETS[family] + ["searcher.generations=1"]
    cfg = _cfg(tmp_path, wikitext_path, *extra)
    r = run_search(cfg)
    out = export_run(r.experiment_dir, tmp_path / "export")
    ppl = eval_folder(out, cfg.data.source, cfg.data.seq_len, cfg.data.n_eval, cfg.data.n_calib, cfg.data.seed)
    assert ppl == pytest.approx(r.ppl_best, rel=1e-4)


def test_export_is_written_in_the_source_dtype_readable_by_the_group(tmp_path, ray_session, mlflow_uri,
                                                                      wikitext_path):
    """A bfloat16 checkpoint exports as bfloat16 (not the float32 the search computes in: half the
    bytes), with the usual umask permissions (not 0600), and still evaluates as the search did."""
    import os

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raypress.rundir import eval_folder, export_run

    src = tmp_path / "bf16-llama"
    AutoModelForCausalLM.from_pretrained(tiny_llama(), dtype=torch.bfloat16).save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_llama()).save_pretrained(src)
    cfg = _cfg(tmp_path, wikitext_path, f"model={src}", "searcher.generations=1")
    r = run_search(cfg)
    old = os.umask(0o022)
    try:
        out = export_run(r.experiment_dir, tmp_path / "export")
    finally:
        os.umask(old)
    files = list(out.glob("*.safetensors"))
    with safe_open(str(files[0]), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    fp32_bytes = 4 * sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(src).parameters())
    assert sum(p.stat().st_size for p in files) < 0.55 * fp32_bytes
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    ppl = eval_folder(out, cfg.data.source, cfg.data.seq_len, cfg.data.n_eval, cfg.data.n_calib, cfg.data.seed)
    assert ppl == pytest.approx(r.ppl_best, rel=0.02)  # bf16 rounding of the searched weights
