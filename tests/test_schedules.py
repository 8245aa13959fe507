"""One-shot schedules: exact feasibility, OWL / Hessian direction, DP optimality."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from raypress.errors import RayPressError
from raypress.search import schedules as S
from raypress.search.schedules import LayerStats
from raypress.space import SearchSpace

LEVELS = [round(0.1 * i, 1) for i in range(10)]  # 0.0 .. 0.9
# SmolLM2-135M: hidden 576, 3 kv heads x 64 = 192, intermediate 1536 (unequal layer sizes)
SMOL = [("self_attn.q_proj", 576, 576), ("self_attn.k_proj", 192, 576), ("self_attn.v_proj", 192, 576),
        ("self_attn.o_proj", 576, 576), ("mlp.gate_proj", 1536, 576), ("mlp.up_proj", 1536, 576),
        ("mlp.down_proj", 576, 1536)]


def smol_space(n_blocks: int, target: float, shapes=SMOL) -> SearchSpace:
    layers, n = [], []
    for b in range(n_blocks):
        for name, o, i in shapes:
            layers.append(f"model.layers.{b}.{name}")
            n.append(o * i)
    return SearchSpace(layers=layers, n_params=n, level_values=[list(LEVELS) for _ in layers], target=target)


def shape_of(space, layer, shapes=SMOL):
    name = layer.split(".", 3)[3]
    return next((o, i) for nm, o, i in shapes if nm == name)


def fake_stats(space, shapes=SMOL, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in space.layers:
        o, i = shape_of(space, layer, shapes)
        w = torch.randn(o, i, generator=g)
        norms = torch.rand(i, generator=g) + 0.5
        h = torch.diag(torch.rand(i, generator=g) + 0.5)  # cheap PSD Hessian
        out[layer] = LayerStats(w, norms, h)
    return out


def random_errors(space, seed=0):
    rng = np.random.default_rng(seed)
    return {l: np.cumsum(rng.random(len(space.level_values[i]))) * rng.lognormal()
            for i, l in enumerate(space.layers)}


def assert_exact(space, cfg, target):
    assert set(cfg) == set(space.layers)
    assert all(0 <= cfg[l] < len(space.level_values[i]) for i, l in enumerate(space.layers))
    assert space.is_feasible(cfg)
    b = space.budget_model
    assert sum(b.costs[i][cfg[l]] for i, l in enumerate(space.layers)) == b.budget
    assert space.mean_value(cfg) == pytest.approx(target, abs=1e-12)


@pytest.fixture(scope="module")
def stats3():
    return fake_stats(smol_space(3, 0.5))


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [0.5, 0.6, 0.7])
@pytest.mark.parametrize("name", ["uniform", "owl", "hessian", "dp"])
def test_every_schedule_is_exactly_feasible(name, target, stats3):
    space = smol_space(3, target)
    ctx = {"stats": stats3, "errors": random_errors(space), "seed": 1, "unused": object()}
    cfg = S.run_schedule(name, space, **ctx)
    assert_exact(space, cfg, target)


@pytest.mark.parametrize("target", [0.5, 0.6, 0.7])
def test_full_size_smollm2_dp_and_projection_are_exact(target):
    space = smol_space(30, target)  # 210 layers, SmolLM2-135M sizes
    assert_exact(space, S.dp_schedule(space, random_errors(space, seed=3)), target)
    rng = np.random.default_rng(0)
    desired = {l: float(rng.uniform(target - 0.2, target + 0.2)) for l in space.layers}
    assert_exact(space, S.project(space, desired), target)
    assert_exact(space, S.uniform(space), target)


def test_reduced_budget_uses_the_gcd():
    space = smol_space(30, 0.6)
    b = space.budget_model
    assert b.unit == 192 * 576 * 100
    assert (b.budget - b.offset) // b.unit == 6 * 32 * 30 and b.total_units == 9 * 32 * 30
    assert b.offset == 0


def test_unreachable_target_raises_with_the_verdict():
    space = SearchSpace(layers=["a.0.x"], n_params=[10], level_values=[list(LEVELS)], target=0.55)
    v = space.verdict()
    assert not v.ok and v.nearest == ("0.5", "0.6")
    with pytest.raises(RayPressError, match="nearest reachable targets: 0.5 or 0.6"):
        S.dp_schedule(space, {"a.0.x": np.arange(10.0)})


# ---------------------------------------------------------------------------------------------
SMALL = [("self_attn.q_proj", 32, 32), ("self_attn.k_proj", 16, 32), ("self_attn.v_proj", 16, 32),
         ("self_attn.o_proj", 32, 32), ("mlp.gate_proj", 64, 32), ("mlp.up_proj", 64, 32),
         ("mlp.down_proj", 32, 64)]


def test_owl_gives_lower_sparsity_to_the_block_with_outliers():
    space = smol_space(4, 0.6, SMALL)
    stats = fake_stats(space, SMALL, seed=1)
    g = torch.Generator().manual_seed(5)
    for layer in space.layers:
        if layer.startswith("model.layers.2."):
            w = stats[layer].weight
            mask = torch.rand(w.shape, generator=g) < 0.03
            stats[layer] = LayerStats(torch.where(mask, w * 40, w), stats[layer].norms)
    ratios = S.outlier_ratios(space, stats, M=5)
    assert max(ratios, key=ratios.get) == "model.layers.2"
    cfg = S.owl(space, stats, lam=0.08, M=5)
    assert_exact(space, cfg, 0.6)

    def block_mean(b):
        ls = [(i, l) for i, l in enumerate(space.layers) if l.startswith(f"model.layers.{b}.")]
        return sum(space.n_params[i] * space.level_values[i][cfg[l]] for i, l in ls) / sum(
            space.n_params[i] for i, _ in ls)

    means = {b: block_mean(b) for b in range(4)}
    assert means[2] < 0.6 and means[2] == min(means.values())
    assert all(means[b] > means[2] for b in (0, 1, 3))
    assert means[2] >= 0.6 - 0.08 - 0.1 - 1e-9  # within the OWL window (+ ladder snapping)


def test_owl_with_equal_ratios_is_uniform():
    space = smol_space(2, 0.5, SMALL)
    w = torch.ones(64, 64)
    stats = lambda layer: LayerStats(w[: shape_of(space, layer, SMALL)[0], : shape_of(space, layer, SMALL)[1]], None)
    assert S.owl(space, stats) == space.uniform()


def test_hessian_scheduler_protects_the_costly_layer():
    n = 8
    space = SearchSpace(layers=[f"model.layers.{i}.mlp.up_proj" for i in range(n)], n_params=[16 * 32] * n,
                        level_values=[list(LEVELS)] * n, target=0.5)
    g = torch.Generator().manual_seed(0)
    stats = {}
    for i, l in enumerate(space.layers):
        x = torch.randn(32, 256, generator=g)
        h = 2 / 256 * x @ x.T
        if i == 3:
            h = h * 1000  # pruning this layer is expensive
        stats[l] = LayerStats(torch.randn(16, 32, generator=g), None, h)
    cfg, info = S.hessian_schedule(space, stats, k=3, return_info=True)
    assert_exact(space, cfg, 0.5)
    costly = space.layers[3]
    assert info["errors"][costly] == max(info["errors"].values())
    vals = {l: space.level_values[i][cfg[l]] for i, l in enumerate(space.layers)}
    assert vals[costly] < 0.5 and vals[costly] == min(vals.values())
    assert all(0.4 - 1e-9 <= v <= 0.6 + 1e-9 for v in vals.values())  # default window target ± 0.1


def test_obs_error_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=g)
    x = torch.randn(6, 50, generator=g)
    h = 2 / 50 * x @ x.T
    e = S.obs_error(w, h, 0.5, percdamp=0.0)
    sal = (w**2 / torch.diagonal(torch.linalg.inv(h.double())).float()).flatten()
    assert e == pytest.approx(float(sal.sort().values[:12].sum()), rel=1e-4)
    assert S.obs_error(w, h, 0.0) == 0.0


def test_kmeans_1d_finds_clear_clusters():
    x = np.array([0.0, 10.0, 0.1, 5.0, 10.2, 5.1, 0.2])
    lab = S._kmeans_1d(x, 3)
    assert lab.tolist() == [0, 2, 0, 1, 2, 1, 0]
    assert S._kmeans_1d(np.ones(4), 3).tolist() == [0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------
def brute_force(space, errors):
    best, best_cfg = np.inf, None
    for combo in itertools.product(*[range(len(v)) for v in space.level_values]):
        cfg = dict(zip(space.layers, combo))
        if space.is_feasible(cfg):
            val = sum(errors[l][k] for l, k in cfg.items())
            if val < best:
                best, best_cfg = val, cfg
    return best, best_cfg


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("seed", [0, 1])
def test_dp_matches_brute_force(target, seed):
    layers = ["m.0.a", "m.0.b", "m.1.a", "m.1.b"]
    space = SearchSpace(layers=layers, n_params=[300, 100, 200, 100], level_values=[list(LEVELS)] * 4,
                        target=target)
    rng = np.random.default_rng(seed)
    errors = {l: rng.random(10) for l in layers}  # arbitrary, not even monotone
    best, _ = brute_force(space, errors)
    cfg, info = S.solve_budgeted(space, errors, return_info=True)
    assert info["method"] == "dp"
    assert info["objective"] == pytest.approx(best)
    assert S.dp_schedule(space, errors) == cfg
    # Lagrangian fallback: feasible, never better than the optimum
    cfg2, info2 = S.solve_budgeted(space, errors, max_cells=1, return_info=True)
    assert info2["method"].startswith("lagrangian")
    assert space.is_feasible(cfg2) and info2["objective"] >= best - 1e-12


def test_lagrangian_fallback_is_near_optimal_on_monotone_errors():
    space = smol_space(30, 0.6)
    errors = {l: (np.asarray(LEVELS) ** 2) * np.random.default_rng(i).lognormal()
              for i, l in enumerate(space.layers)}
    _, exact = S.solve_budgeted(space, errors, return_info=True)
    cfg, lag = S.solve_budgeted(space, errors, max_cells=10, return_info=True)
    assert lag["method"] == "lagrangian"  # exact without repair on this instance
    assert_exact(space, cfg, 0.6)
    assert lag["objective"] <= exact["objective"] * 1.01


class FakeDB:
    """Duck-typed LevelDatabase: magnitude-pruned variants."""

    def __init__(self, weights):
        self.layers = list(weights)
        self.level_values = {l: list(LEVELS) for l in self.layers}
        self.w = weights

    def variant(self, layer, level):
        w = self.w[layer].clone()
        k = int(round(LEVELS[level] * w.numel()))
        if k:
            idx = w.abs().flatten().argsort()[:k]
            w.view(-1)[idx] = 0
        return w.numpy()


def test_layer_errors_and_dp_schedule_from_database():
    g = torch.Generator().manual_seed(0)
    weights = {f"m.{i}.fc": torch.randn(8, 16, generator=g) for i in range(3)}
    xs = {l: torch.randn(16, 64, generator=g) * (1 + 3 * (i == 1)) for i, l in enumerate(weights)}
    hess = {l: 2 / 64 * x @ x.T for l, x in xs.items()}
    db = FakeDB(weights)
    errs = S.layer_errors(db, hess)
    for l in weights:
        assert errs[l][0] == pytest.approx(0.0, abs=1e-7)
        assert all(b >= a - 1e-6 for a, b in zip(errs[l], errs[l][1:]))  # more pruning, more error
        W, X = weights[l], xs[l]
        What = torch.as_tensor(db.variant(l, 5))
        direct = float(((W - What) @ X).pow(2).sum() / (W @ X).pow(2).sum())
        assert errs[l][5] == pytest.approx(direct, rel=1e-4)
    space = SearchSpace(layers=list(weights), n_params=[128] * 3, level_values=[list(LEVELS)] * 3, target=0.5)
    cfg = S.dp_schedule(space, db=db, hessians=hess)
    assert_exact(space, cfg, 0.5)
    assert cfg == S.dp_schedule(space, errs)


def test_run_schedule_errors_are_one_line_fixes():
    space = smol_space(1, 0.5)
    with pytest.raises(RayPressError, match="choose one of"):
        S.run_schedule("nope", space)
    with pytest.raises(RayPressError, match="stats"):
        S.run_schedule("owl", space)
    with pytest.raises(RayPressError, match="errors="):
        S.run_schedule("dp", space)
    quant = SearchSpace(layers=["m.0.a"], n_params=[4], level_values=[[2.0, 3.0, 4.0]], target=3.0)
    with pytest.raises(RayPressError, match="sparsity"):
        S.owl(quant, {"m.0.a": LayerStats(torch.ones(2, 2))})
    assert S.dp_schedule(quant, {"m.0.a": [3.0, 2.0, 1.0]}) == {"m.0.a": 1}


def test_statistics_schedules_accept_db_with_norms_and_hessians():
    """The runner's context can be {db, norms, hessians} instead of prebuilt LayerStats."""
    g = torch.Generator().manual_seed(1)
    weights = {f"model.layers.{b}.fc{j}": torch.randn(8, 16, generator=g) for b in range(3) for j in range(2)}
    norms = {l: torch.rand(16, generator=g) + 0.5 for l in weights}
    hess = {l: torch.eye(16) * (1 + 9 * l.startswith("model.layers.1.")) for l in weights}
    db = FakeDB(weights)
    space = SearchSpace(layers=list(weights), n_params=[128] * 6, level_values=[list(LEVELS)] * 6, target=0.5)
    ctx = {"db": db, "norms": norms, "hessians": hess, "seed": 0}
    for name in ("owl", "hessian", "dp"):
        assert_exact(space, S.run_schedule(name, space, **ctx), 0.5)
    cfg = S.run_schedule("hessian", space, **ctx)
    vals = [LEVELS[cfg[l]] for l in space.layers]
    assert max(vals[2:4]) < min(vals[:2] + vals[4:])  # block 1's Hessian makes pruning costly


def test_schedules_on_a_real_tiny_model_and_database(tmp_path):
    """calibrate.collect_stats + a SparseGPT LevelDatabase -> every schedule, as the runner wires it."""
    from _tiny import load_tiny

    from raypress.calibrate import collect_stats
    from raypress.compress import get_method
    from raypress.database import build_database
    from raypress.models import get_adapter
    from _tiny import tiny_llama

    model, _ = load_tiny("llama")
    ad = get_adapter(model)
    calib = np.random.default_rng(0).integers(0, 500, size=(4, 32))
    db = build_database(tiny_llama(), model, ad, get_method("sparsegpt"), calib, cache_root=tmp_path, progress=False)
    st = collect_stats(model, ad, calib, ("hessian", "norms"), progress=False)
    space = SearchSpace.for_database(db, 0.6)
    ctx = {"db": db, "hessians": st["hessian"], "norms": st["norms"], "seed": 0,
           "stats": S.layer_stats_from_model(ad, input_norms=st["norms"], hessians=st["hessian"])}
    for name in ("uniform", "owl", "hessian", "dp"):
        assert_exact(space, S.run_schedule(name, space, **ctx), 0.6)
    errs = S.layer_errors(db, st["hessian"])
    assert all(e[0] < 1e-3 and e[-1] > e[1] for e in errs.values())
    # the DP schedule is the best config for its own objective
    dp = S.dp_schedule(space, errs)
    total = lambda cfg: sum(errs[l][k] for l, k in cfg.items())
    assert total(dp) <= total(space.uniform()) + 1e-12
    assert total(dp) <= total(S.run_schedule("owl", space, **ctx)) + 1e-12


def test_inverse_diagonal_in_column_blocks_is_the_inverse_diagonal():
    """diag(H⁻¹) built a few columns of L⁻¹ at a time (an OPT-66B fc2 Hessian is 36864 wide) equals
    the full inverse's diagonal, for block sizes that do and do not divide the width."""
    import torch

    from raypress.hessian import damp_, inverse_diagonal

    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 300, dtype=torch.float64, generator=g)
    H = x @ x.T / 300
    damp_(H, 0.01)
    ref = torch.diagonal(torch.linalg.inv(H))
    for chunk in (1, 7, 64, 150, 4096):
        assert torch.allclose(inverse_diagonal(H, chunk=chunk), ref, rtol=1e-10), chunk
