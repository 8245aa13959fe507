"""raypress.costs: plan's time estimates scale one measured block by work (weights x levels for a
Hessian-free build, weights x input width for SparseGPT/GPTQ, 2·P·tokens over measured FLOP/s for
resident evaluators, block bytes for streamed ones), and say where each number came from."""
import pytest

from raypress import costs
from raypress.config import load_config
from raypress.plan import meta_model
from raypress.adapters import get_adapter


def _arch(model="random:smollm2-135m"):
    m = meta_model(model)
    return costs.arch_of(m, get_adapter(m))


def _rows(arch):
    """What bench/scale.py records, for an 8-block model: 1 s per block at 3 levels, 100 TFLOP/s."""
    row = {"key": "H200|magnitude|resident|llama-576x8", "gpu": "H200", "method": "magnitude", "hessian": False,
           "mode": "resident", "arch": {**arch, "blocks": 8}, "levels": 3, "build_s": 8.0,
           "build_s_per_work": 8.0 / (8 * arch["block_linear_params"] * 3), "evals_per_s": 10.0,
           "tokens_per_s": 1e14 / (2 * arch["matmul_params"]), "flops_per_s": 1e14,
           "stream_bytes_per_s": 1e10}
    sgpt = {**row, "key": "H200|sparsegpt|resident|llama-576x8", "method": "sparsegpt", "hessian": True,
            "build_s": 80.0, "build_s_per_work": 80.0 / (8 * arch["block_linear_x_in"] * 3),
            "evals_per_s": None, "tokens_per_s": None}
    return [row, sgpt]


def test_estimates_scale_by_work_and_name_their_basis():
    arch = _arch()
    rows = _rows(arch)
    cfg = load_config(None, ["method=magnitude", "levels=[0.0, 0.2, 0.4, 0.6, 0.8]", "target=0.4",
                             "searcher.generations=10", "searcher.offspring=8", "searcher.stages=[[1024, 2], [4096, 1]]"])
    one = costs.estimate(cfg, arch, evaluators=1, gpus=1, gpu_gib=141, rows=rows)
    # magnitude: 1 s per block per 3 levels -> 5 levels x every block
    assert one["est_build_s"] == pytest.approx(arch["blocks"] * 5 / 3)
    evals, tokens = costs.search_work(cfg)
    assert (evals, tokens) == (10 * (8 + 2), 10 * (8 * 1024 + 2 * 4096))
    assert one["est_search_s"] == pytest.approx(2 * arch["matmul_params"] * tokens / 1e14)
    four = costs.estimate(cfg, arch, evaluators=4, gpus=4, gpu_gib=141, rows=rows)
    assert four["est_search_s"] == pytest.approx(one["est_search_s"] / 4)  # evaluators split the candidates
    a100 = costs.estimate(cfg, arch, evaluators=1, gpus=1, gpu_gib=40, rows=rows)
    assert a100["est_search_s"] == pytest.approx(one["est_search_s"] * 790 / 312)  # by bf16 peak
    assert any("magnitude measured on H200" in b for b in one["basis"])
    assert any("scaled to A100" in b for b in a100["basis"])

    sg = load_config(None, ["method=sparsegpt", "levels=[0.0, 0.5, 0.7]", "target=0.5"])
    est = costs.estimate(sg, arch, evaluators=1, gpus=1, gpu_gib=141, rows=rows)
    assert est["est_build_s"] == pytest.approx(80.0 / 8 * arch["blocks"])  # same levels, same shapes
    wide = dict(arch, block_linear_x_in=2 * arch["block_linear_x_in"])
    assert costs.estimate(sg, wide, evaluators=1, gpus=1, gpu_gib=141, rows=rows)["est_build_s"] == \
        pytest.approx(2 * est["est_build_s"])  # a Hessian build scales with the input width


def test_no_measurement_says_so():
    cfg = load_config(None, ["method=magnitude"])
    est = costs.estimate(cfg, _arch(), evaluators=1, gpus=1, gpu_gib=141, rows=[])
    assert est["est_build_s"] is None and est["est_search_s"] is None
    assert "run bench/scale.py" in est["basis"][0]
    streamed = load_config(None, ["method=magnitude", "evaluator.mode=streamed"])
    rows = _rows(_arch())
    est = costs.estimate(streamed, _arch(), evaluators=1, gpus=1, gpu_gib=141, rows=rows)
    assert est["est_search_s"] is None  # a resident (compute-bound) measurement never stands for streaming
    assert "no measurement for evaluator.mode=streamed" in est["basis"][-1]
    rows[0]["mode"] = "streamed"
    est = costs.estimate(streamed, _arch(), evaluators=1, gpus=1, gpu_gib=141, rows=rows)
    a = _arch()
    evals, _ = costs.search_work(streamed)
    assert est["est_search_s"] == pytest.approx(evals * a["blocks"] * a["block_params"] * 2 / 1e10)


def test_the_statistics_pass_is_estimated_for_families_whose_schedules_take_it():
    """OWL / Hessian / DP start with one pass over the dense model (~20 s per OPT-66B block on an
    H100): estimated from its own measurement, scaled like a Hessian build (weights x input width,
    bf16 peak), and never mistaken for a database build; a family without such a schedule (width)
    gets no estimate."""
    arch = _arch()
    stats = {"key": "H100|statistics|llama-576x8", "kind": "statistics", "gpu": "H100", "arch": {**arch, "blocks": 8},
             "stats_s": 16.0, "stats_s_per_work": 16.0 / (8 * arch["block_linear_x_in"]), "calib_tokens": 65536}
    rows = _rows(arch) + [stats]
    sparsity = load_config(None, ["method=magnitude", "levels=[0.0, 0.5, 0.7]", "target=0.5"])
    est = costs.estimate(sparsity, arch, evaluators=1, gpus=1, gpu_gib=80, rows=rows)
    assert est["est_stats_s"] == pytest.approx(2.0 * arch["blocks"])
    assert est["est_build_s"] == costs.estimate(sparsity, arch, evaluators=1, gpus=1, gpu_gib=80,
                                                rows=_rows(arch))["est_build_s"]
    assert any("statistics pass" in b and "65,536 calibration tokens" in b for b in est["basis"])
    a100 = costs.estimate(sparsity, arch, evaluators=1, gpus=1, gpu_gib=40, rows=rows)
    assert a100["est_stats_s"] == pytest.approx(est["est_stats_s"] * 790 / 312)
    wide = dict(arch, block_linear_x_in=3 * arch["block_linear_x_in"])
    assert costs.estimate(sparsity, wide, evaluators=1, gpus=1, gpu_gib=80, rows=rows)["est_stats_s"] == \
        pytest.approx(3 * est["est_stats_s"])
    width = load_config(None, ["family=width", "method=lstsq", "target=0.25"])
    assert costs.estimate(width, arch, evaluators=1, gpus=1, gpu_gib=80, rows=rows)["est_stats_s"] is None
