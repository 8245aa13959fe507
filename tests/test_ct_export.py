"""export --format compressed-tensors: a fused-unit 4/8-bit search written as packed integer weights,
one config group per bitwidth; transformers loads it (compressed-tensors installed) and its held-out
perplexity is the search's; the tensor bytes are the packed-size arithmetic's."""
import json

import pytest

from _tiny import tiny_llama
from raypress.config import load_config
from raypress.errors import RayPressError


def _search(tmp_path, wikitext_path, *extra):
    from raypress.runner import run_search

    return run_search(load_config(None, [
        f"model={tiny_llama()}", f"data.source=text:{wikitext_path}", "data.seq_len=64", "data.n_calib=32",
        "data.n_eval=8", "searcher.generations=2", "searcher.offspring=4", "searcher.stages=[[128, 1]]",
        f"output={tmp_path / 'runs'}", f"database.cache_dir={tmp_path / 'db'}", "family=quant", "method=gptq",
        "levels=[4, 8]", "target=5.11111111", "units=fused", "database.group_size=32", *extra]))


def test_compressed_tensors_round_trip(tmp_path, ray_session, mlflow_uri, wikitext_path):
    from transformers import AutoModelForCausalLM

    from raypress.ct_export import packed_bytes
    from raypress.rundir import eval_folder, export_run

    r = _search(tmp_path, wikitext_path, "database.symmetric=true")
    sizes = {}
    out = export_run(r.experiment_dir, tmp_path / "ct", fmt="compressed-tensors", report=sizes)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    groups = {g["weights"]["num_bits"]: g["targets"] for g in qc["config_groups"].values()}
    assert set(groups) <= {4, 8} and "lm_head" in qc["ignore"]
    assert all(g["weights"]["symmetric"] and g["weights"]["group_size"] == 32 for g in qc["config_groups"].values())
    bits = {layer: b for b, layers in groups.items() for layer in layers}
    for blk in range(2):  # fused units: q/k/v and gate/up share a bitwidth (vLLM fuses them)
        assert len({bits[f"model.layers.{blk}.self_attn.{p}_proj"] for p in "qkv"}) == 1
        assert bits[f"model.layers.{blk}.mlp.gate_proj"] == bits[f"model.layers.{blk}.mlp.up_proj"]
    # the average bitwidth is the budget's, and the packed bytes are its arithmetic
    model = AutoModelForCausalLM.from_pretrained(str(out))
    shapes = {n: tuple(int(x) for x in m.weight_shape) for n, m in model.named_modules() if n in bits}  # still packed
    n = sum(o * i for o, i in shapes.values())
    assert sum(bits[l] * o * i for l, (o, i) in shapes.items()) / n == pytest.approx(5.11111111, abs=1e-6)
    want = sum(packed_bytes(o, i, bits[l], 32, True) for l, (o, i) in shapes.items())
    assert sizes["quantized_bytes_predicted"] == want
    assert abs(sizes["tensor_bytes"] - want - sizes["dense_bytes"]) <= 0.02 * (want + sizes["dense_bytes"])
    ppl = eval_folder(out, f"text:{wikitext_path}", 64, 8, 32, 0)
    assert ppl == pytest.approx(r.ppl_best, rel=5e-3)  # the served weights are the searched ones


def test_compressed_tensors_refuses_what_it_cannot_write(tmp_path, ray_session, mlflow_uri, wikitext_path):
    from raypress.rundir import export_run

    r = _search(tmp_path, wikitext_path, "searcher.name=uniform")
    with pytest.raises(RayPressError, match="needs a symmetric grid"):
        export_run(r.experiment_dir, tmp_path / "ct", fmt="compressed-tensors")
    assert not (tmp_path / "ct").exists()  # nothing half-written


def test_export_is_logged_on_the_search_run(tmp_path, ray_session, mlflow_uri, wikitext_path):
    from mlflow.tracking import MlflowClient

    from raypress.rundir import export_run

    r = _search(tmp_path, wikitext_path, "database.symmetric=true", "searcher.name=dp")
    out = export_run(r.experiment_dir, tmp_path / "ct", fmt="compressed-tensors")
    run = MlflowClient(r.tracking_uri).get_run(r.run_id)
    assert run.data.tags["raypress.export.compressed-tensors"] == str(out.resolve())
    assert run.data.metrics["export_bytes_compressed_tensors"] == sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert run.info.status == "FINISHED"
