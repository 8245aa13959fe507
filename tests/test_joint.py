"""Joint sparsity + quantization (family `joint`): (sparsity, bits) levels costed in stored bits per weight,
built in one SparseGPT pass with quantization inside, searched under an exact size budget, exported."""
import json

import numpy as np
import pytest
import torch
from _tiny import tiny_llama

from raypress.compress import get_method
from raypress.compress.joint import bits_per_weight, check_pairs, default_pairs
from raypress.compress.quant import GPTQ
from raypress.compress.sparsity import SparseGPT
from raypress.errors import RayPressError
from raypress.space import SearchSpace

GS = 32


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(48, 128, generator=g)
    X = torch.randn(1024, 128, generator=g) * torch.linspace(0.2, 3.0, 128)
    return W, 2 * X.t() @ X / X.shape[0], X


def test_bits_per_weight_counts_values_mask_and_scales():
    assert bits_per_weight(0.0, 16, 128) == 16
    assert bits_per_weight(0.0, 4, 128) == 4.25  # + one fp16 scale and zero per 128 weights
    assert bits_per_weight(0.5, 4, 128) == 0.5 * 4 + 1 + 0.25  # + a 1-bit mask of the kept positions
    assert bits_per_weight(0.5, 16, 128) == 9.0  # not quantized: no scales
    vals = [bits_per_weight(s, b, 128) for s, b in default_pairs()]
    assert all(abs(v * 8 - round(v * 8)) < 1e-12 for v in vals)  # a 1/8-bit grid: equal cost steps abound


def test_ladder_is_sorted_by_size_and_bad_ladders_are_one_line_errors():
    pairs = check_pairs([[0.5, 4], [0, 16], [0, 4]], 128)
    assert pairs == [(0.0, 16), (0.0, 4), (0.5, 4)]
    for bad, says in [([0.5, 4], "pairs"), ([[1.0, 4]], "sparsity must be in [0, 1)"),
                      ([[0.5, 9]], "bits must be an integer in 1..8, or 16"), ([[0.5, 4], [0.5, 4.0]], "twice"),
                      ([], "at least one level")]:
        with pytest.raises(RayPressError, match=None) as e:
            check_pairs(bad, 128)
        assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["sparsegpt-gptq", "magnitude-rtn"])
def test_every_level_has_its_sparsity_and_at_most_2_pow_bits_values_per_group(layer, name):
    W, H, _ = layer
    m = get_method(name, group_size=GS)
    for (s, b), Q in zip(m.pairs, m.build_levels(W, H, m.level_values())):
        assert Q.shape == W.shape
        zeros = (Q == 0).float().mean().item()
        assert zeros >= s - 0.005  # the mask; rounding to the grid's 0 may add a few more
        if b == 16:
            assert zeros == pytest.approx(s, abs=0.005)
        if b == 16 and s == 0:
            assert torch.equal(Q, W)
            continue
        if b < 16:
            for g in range(0, W.shape[1], GS):
                for r in range(0, W.shape[0], 7):
                    grp = Q[r, g:g + GS]
                    assert len(torch.unique(grp)) <= 2**b  # the grid (zero included)


def test_sparsegpt_gptq_reduces_to_gptq_and_to_sparsegpt_and_beats_magnitude_rtn(layer):
    W, H, X = layer
    joint = get_method("sparsegpt-gptq", levels=[[0, 4], [0.5, 16], [0.5, 4], [0.75, 3]], group_size=GS)
    out = dict(zip(joint.pairs, joint.build_levels(W, H, joint.level_values())))
    gptq = GPTQ(bits=[4], group_size=GS).build(W, H, 4)
    assert torch.allclose(out[(0.0, 4)], gptq, atol=1e-5)  # no sparsity: GPTQ
    sgpt = SparseGPT(levels=[0.5]).build(W, H, 0.5)
    assert ((out[(0.5, 16)] == 0) == (sgpt == 0)).float().mean() > 0.99  # no quantization: SparseGPT
    assert torch.allclose(out[(0.5, 16)], sgpt, atol=1e-3)
    naive = get_method("magnitude-rtn", levels=list(map(list, joint.pairs)), group_size=GS)
    base = dict(zip(naive.pairs, naive.build_levels(W, H, naive.level_values())))

    def err(Q):
        return ((Q - W) @ X.t()).square().mean().item()

    for p in [(0.5, 4), (0.75, 3)]:  # the OBS update repairs what pruning and rounding break
        assert err(out[p]) < 0.8 * err(base[p]), p


def test_a_size_budget_is_searchable_with_exact_level_switches():
    """SmolLM2's 210 linear shapes with the default ladder: 2,000 budget-preserving switches from the
    uniform mix never fail and never leave the budget, at 20%, 25% and 35% of the fp16 size."""
    layers, n = [], []
    for i in range(30):
        for name, size in [("q", 576 * 576), ("k", 576 * 192), ("v", 576 * 192), ("o", 576 * 576),
                           ("gate", 576 * 1536), ("up", 576 * 1536), ("down", 1536 * 576)]:
            layers.append(f"{i}.{name}")
            n.append(size)
    vals = [bits_per_weight(s, b, 128) for s, b in check_pairs(None, 128)]
    for target in (3.2, 4.0, 5.6):
        space = SearchSpace.from_values(vals, target, layers=layers, n_params=n)
        assert space.verdict().ok
        arr = space.config_to_array(space.uniform())
        rng = np.random.default_rng(0)
        for _ in range(2000):
            space.switch_(arr, rng, max_step=4)
        assert space.is_feasible(arr) and space.mean_value(space.array_to_config(arr)) == pytest.approx(target)
        assert len(set(arr.tolist())) > 5  # it moved along the ladder, not between two levels


def test_joint_search_end_to_end_then_export(tmp_path, ray_session, wikitext_path):
    """A tiny EvoPress search at 3.75 bits per weight (no single level costs that): the best config costs exactly the budget, DP runs
    on the same database, and the export holds each layer's pair (zeros and grid) as raypress.json says."""
    from raypress.config import load_config
    from raypress.export import load_exported
    from raypress.rundir import export_run
    from raypress.runner import run_search

    def cfg(searcher):
        return load_config(None, [
            f"model={tiny_llama()}", "family=joint", "method=sparsegpt-gptq", f"database.group_size={GS}",
            f"data.source=text:{wikitext_path}", "data.seq_len=64", "data.n_calib=32", "data.n_eval=8",
            "searcher.stages=[[128, 4], [256, 1]]", "searcher.generations=3", "searcher.offspring=6",
            f"searcher.name={searcher}", "target=3.75", f"database.cache_dir={tmp_path / 'db'}",
            f"output={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])

    r = run_search(cfg("evopress"))
    assert r.mean_value == pytest.approx(3.75, abs=1e-9)
    dp = run_search(cfg("dp"))
    assert dp.mean_value == pytest.approx(3.75, abs=1e-9)
    run_dir = next(d for d in (tmp_path / "runs").iterdir() if d.name.startswith("3.75-evopress"))
    out = export_run(run_dir, tmp_path / "export")
    info = json.loads((out / "raypress.json").read_text())
    model, _ = load_exported(out)
    weights = dict(model.named_parameters())
    assert set(info["joint"]) == set(r.best_config)
    seen = set()
    for layer, pair in info["joint"].items():
        Q = weights[layer + ".weight"].detach().float()
        s, b = pair["sparsity"], pair["bits"]
        seen.add((s, b))
        zeros = (Q == 0).float().mean().item()
        assert zeros >= s - 0.01 and (b < 16 or zeros == pytest.approx(s, abs=0.01)), (layer, pair)
        if b < 16:
            assert len(torch.unique(Q[0, :GS])) <= 2**b, (layer, pair)
    assert len(seen) > 1  # a non-uniform mix


def test_target_bytes_is_a_share_of_fp16_or_bytes_and_names_itself_in_refusals():
    """`target_bytes` (and string entries of searcher.budgets) become stored bits per weight of the
    compressed layers: a share of their fp16 size, or bytes over their weight count (SmolLM2's linear
    layers: 106,168,320 weights); a budget the ladder cannot reach says what it was converted to."""
    from raypress.config import load_config
    from raypress.families import get_family
    from raypress.models import get_adapter, meta_model
    from raypress.search import check

    yaml = "search_spaces/smollm2_joint.yaml"
    assert load_config(yaml, ["target_bytes=25%"]).target == 4.0
    cfg = load_config(yaml, ["target_bytes=53084160", "searcher.name=pareto", "searcher.budgets=[20%, 35%, 4.5]"])
    assert cfg.target == pytest.approx(4.0) and cfg.searcher.budgets == [3.2, 5.6, 4.5]
    for bad, msg in (("lots", "is not a size"), ("0%", "not a share of the fp16 size"), ("120%", "not a share")):
        with pytest.raises(RayPressError, match=msg):
            load_config(yaml, [f"target_bytes={bad}"])
    with pytest.raises(RayPressError, match="'target_bytes' is not used by family sparsity"):
        load_config("search_spaces/smollm2_sparsity.yaml", ["target_bytes=25%"])
    cfg = load_config(yaml, ["target_bytes=20MB"])  # 1.507 bits: below the ladder's 2-bit floor
    family = get_family("joint")
    space = family.space(cfg, get_adapter(meta_model(cfg.model)))
    with pytest.raises(RayPressError) as e:
        check(cfg, family, space)
    assert str(e.value) == f"target_bytes 20MB is 1.50704 stored bits per weight: {space.verdict().message}"
