"""units: fused — layers a serving engine fuses (q/k/v, gate/up) share one level: the space is over
units, evaluators and exports apply each unit's level to all its layers, schedules add up errors."""
import json

import pytest

from _tiny import tiny_llama
from raypress.config import load_config
from raypress.errors import RayPressError
from raypress.families import units


def test_grouping_follows_the_engine_names():
    layers = [f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    g = units.group(layers, "fused")
    assert g == {"model.layers.0.self_attn.qkv_proj": layers[:3], "model.layers.0.self_attn.o_proj": [layers[3]],
                 "model.layers.0.mlp.gate_up_proj": layers[4:6], "model.layers.0.mlp.down_proj": [layers[6]]}
    assert units.group(layers[1:], "fused")["model.layers.0.self_attn.k_proj"] == [layers[1]]  # incomplete: no fusion
    assert units.is_trivial(units.group(layers, "linear"))
    cfg = {"model.layers.0.self_attn.qkv_proj": 2, "model.layers.0.mlp.down_proj": 0, "_rp_tokens": 64}
    assert units.expand(cfg, g) == {layers[0]: 2, layers[1]: 2, layers[2]: 2, layers[6]: 0, "_rp_tokens": 64}
    with pytest.raises(RayPressError, match="units must be one of linear, fused"):
        units.check("qkv")


def test_fused_quant_search_exports_one_level_per_fused_group(tmp_path, ray_session, mlflow_uri, wikitext_path):
    from raypress.rundir import eval_folder, export_run
    from raypress.runner import run_search

    cfg = load_config(None, [
        f"model={tiny_llama()}", f"data.source=text:{wikitext_path}", "data.seq_len=64", "data.n_calib=32",
        "data.n_eval=8", "searcher.generations=2", "searcher.offspring=4", "searcher.stages=[[128, 1]]",
        f"output={tmp_path / 'runs'}", f"database.cache_dir={tmp_path / 'db'}", "family=quant", "method=rtn",
        "levels=[4, 8]", "target=5.11111111", "units=fused", "searcher.init=[uniform, dp]"])
    r = run_search(cfg)
    assert all(k.endswith(("qkv_proj", "gate_up_proj", "o_proj", "down_proj")) for k in r.best_config)
    assert r.mean_value == pytest.approx(5.11111111, abs=1e-6)
    out = export_run(r.experiment_dir, tmp_path / "export")
    info = json.loads((out / "raypress.json").read_text())
    bits = {layer: v["value"] for layer, v in info["layers"].items()}
    for b in range(2):
        q, k, v = (bits[f"model.layers.{b}.self_attn.{n}_proj"] for n in "qkv")
        assert q == k == v
        assert bits[f"model.layers.{b}.mlp.gate_proj"] == bits[f"model.layers.{b}.mlp.up_proj"]
    ppl = eval_folder(out, cfg.data.source, cfg.data.seq_len, cfg.data.n_eval, cfg.data.n_calib, cfg.data.seed)
    assert ppl == pytest.approx(r.ppl_best, rel=1e-4)
