"""Optuna searchers: every suggestion exactly feasible, TPE learns, state round trip, Tune wiring."""
from __future__ import annotations

import json

import numpy as np
import pytest

from raypress.errors import RayPressError
from raypress.search import schedules as S
from raypress.search.optuna import BudgetDecoder, FeasibleSpace, RayPressOptunaSearch, make_optuna_searcher
from raypress.space import SearchSpace

LEVELS = [round(0.1 * i, 1) for i in range(10)]
SMOL = [("self_attn.q_proj", 576, 576), ("self_attn.k_proj", 192, 576), ("self_attn.v_proj", 192, 576),
        ("self_attn.o_proj", 576, 576), ("mlp.gate_proj", 1536, 576), ("mlp.up_proj", 1536, 576),
        ("mlp.down_proj", 576, 1536)]
RP_KEYS = {"_rp_tokens", "_rp_generation", "_rp_stage", "_rp_seed"}


def smol_space(n_blocks: int, target: float) -> SearchSpace:
    layers = [f"model.layers.{b}.{name}" for b in range(n_blocks) for name, _, _ in SMOL]
    n = [o * i for _ in range(n_blocks) for _, o, i in SMOL]
    return SearchSpace(layers=layers, n_params=n, level_values=[list(LEVELS) for _ in layers], target=target)


def objective(space, seed=1):
    """Synthetic fitness: Σ sensitivity_l · n_l · value_l² (non-uniform optimum)."""
    rng = np.random.default_rng(seed)
    sens = rng.lognormal(0.0, 1.0, len(space.layers))
    n = np.asarray(space.n_params, dtype=float)
    vals = np.asarray(space.level_values, dtype=float)

    def f(cfg):
        k = np.asarray([cfg[l] for l in space.layers])
        return float((sens * n * vals[np.arange(len(k)), k] ** 2).sum() / n.sum())

    return f


def run(searcher, space, f, n, start=0):
    fits, cfgs = [], []
    for i in range(start, start + n):
        c = searcher.suggest(f"t{i}")
        cfg = {l: c[l] for l in space.layers}
        cfgs.append(c)
        fits.append(f(cfg))
        searcher.on_trial_complete(f"t{i}", {"fitness": fits[-1], "tokens": c["_rp_tokens"]})
    return np.asarray(fits), cfgs


def assert_feasible_suggestion(space, c, n_tokens=512, seed=0):
    assert set(c) == set(space.layers) | RP_KEYS
    assert c["_rp_tokens"] == n_tokens and c["_rp_generation"] == 0 and c["_rp_stage"] == 0
    assert c["_rp_seed"] == seed
    cfg = {l: c[l] for l in space.layers}
    assert all(isinstance(v, int) and 0 <= v < len(LEVELS) for v in cfg.values())
    assert space.is_feasible(cfg)


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "nsga2"])
def test_500_suggestions_are_exactly_feasible(sampler):
    if sampler == "cmaes":
        pytest.importorskip("cmaes")
    space = smol_space(4, 0.6)  # 28 layers, SmolLM2 sizes
    s = make_optuna_searcher(space, sampler=sampler, seed=0, n_tokens=512)
    assert isinstance(s, RayPressOptunaSearch)
    f = objective(space)
    fits, cfgs = run(s, space, f, 500)
    for c in cfgs:
        assert_feasible_suggestion(space, c)
    assert len({tuple(c[l] for l in space.layers) for c in cfgs}) > 400  # it explores
    assert s.best_fitness == pytest.approx(fits.min())
    assert f(s.best_config) == pytest.approx(fits.min())
    assert s.evaluations == 500 and s.tokens == 500 * 512


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_sequential_encoding_is_exactly_feasible(target):
    space = smol_space(3, target)
    s = make_optuna_searcher(space, sampler="tpe", seed=2, n_tokens=512, encoding="sequential")
    _, cfgs = run(s, space, objective(space), 60)
    for c in cfgs:
        assert_feasible_suggestion(space, c, seed=2)
    with pytest.raises(RayPressError, match="shift"):
        make_optuna_searcher(space, sampler="cmaes", encoding="sequential", n_tokens=512)


@pytest.mark.parametrize("target", [0.5, 0.6, 0.7])
def test_decoder_is_exact_and_the_identity_on_feasible_configs(target):
    space = smol_space(30, target)  # full SmolLM2-135M: 210 layers
    dec = BudgetDecoder(space, order_seed=3)
    rng = np.random.default_rng(0)
    for _ in range(50):
        nominal = {l: int(rng.integers(0, 10)) for l in space.layers}
        assert space.is_feasible(dec.decode(nominal))
    for seed in range(5):  # non-uniform feasible configs decode to themselves
        errs = {l: np.cumsum(rng.random(10)) * rng.lognormal() for l in space.layers}
        cfg = S.dp_schedule(space, errs)
        assert dec.decode(cfg) == cfg
    assert dec.decode(space.uniform()) == space.uniform()


def test_decoder_shift_moves_all_layers_toward_the_budget():
    space = smol_space(2, 0.5)
    dec = BudgetDecoder(space)
    out = dec.decode({l: 9 for l in space.layers})  # everything at 0.9: shifted down uniformly
    assert space.is_feasible(out)
    assert max(out.values()) - min(out.values()) <= 2


def test_interval_fallback_still_feasible():
    space = smol_space(2, 0.6)
    fs = FeasibleSpace(space, n_tokens=8, max_bits=0)  # no bitsets: bounds only, repair if needed
    assert fs.decoder.reach is None
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(50):
        t = study.ask()
        c = fs(t)
        assert space.is_feasible({l: c[l] for l in space.layers})
        study.tell(t, 0.0)


def test_tpe_improves_over_its_random_start():
    space = smol_space(2, 0.6)
    f = objective(space, seed=4)
    s = make_optuna_searcher(space, sampler="tpe", seed=0, n_tokens=512)
    fits, _ = run(s, space, f, 120)
    first = fits[:10]  # TPE's n_startup_trials random samples
    assert fits[10:].min() < first.min() - 0.02
    assert np.median(fits[-20:]) < np.median(first)
    assert f(space.uniform()) > fits.min()
    hist = s.pop_new_history()
    assert len(hist) == 120 and hist[-1]["evaluations"] == 120 and hist[-1]["best_fitness"] == fits.min()
    assert s.pop_new_history() == []


def test_tpe_window_caps_the_above_set_and_survives_a_resume():
    from optuna.samplers import TPESampler

    from raypress.search.tpe import WindowedTPESampler

    space = smol_space(2, 0.6)
    f = objective(space, seed=4)
    s = make_optuna_searcher(space, sampler="tpe", seed=0, sampler_kwargs={"max_above": 8}, n_tokens=512)
    sampler = s._ot_study.sampler
    assert isinstance(sampler, WindowedTPESampler)
    seen = []
    inner = TPESampler._build_parzen_estimator

    def spy(self, study, space_, trials, handle_below):
        seen.append((handle_below, len(trials), trials[-1].number if trials else -1))
        return inner(self, study, space_, trials, handle_below)

    TPESampler._build_parzen_estimator = spy
    try:
        run(s, space, f, 40)
    finally:
        TPESampler._build_parzen_estimator = inner
    above = [(n, last) for below, n, last in seen if not below]
    assert above and max(n for n, _ in above) == 8  # capped, and the cap is reached
    assert above[-1][1] >= 30  # the window holds the newest trials, not the oldest
    b = make_optuna_searcher(space, sampler="tpe", seed=0, n_tokens=512,
                             state=json.loads(json.dumps(s.get_state())))  # the windowed sampler passes the allow-list
    assert isinstance(b.study.sampler, WindowedTPESampler) and b.study.sampler._max_above == 8


def test_initial_config_is_evaluated_first():
    space = smol_space(2, 0.5)
    s = make_optuna_searcher(space, sampler="tpe", seed=0, initial=space.uniform(), n_tokens=512)
    c = s.suggest("a")
    assert {l: c[l] for l in space.layers} == space.uniform()


@pytest.mark.parametrize("sampler", ["tpe", "cmaes"])
def test_state_round_trip_continues_identically(sampler):
    if sampler == "cmaes":
        pytest.importorskip("cmaes")
    space = smol_space(2, 0.5)
    f = objective(space)
    a = make_optuna_searcher(space, sampler=sampler, seed=3, n_tokens=512)
    run(a, space, f, 20)
    a.get_state()  # the runner saves after every trial: later states reuse these trials' rows
    run(a, space, f, 20, start=20)
    state = json.loads(json.dumps(a.get_state()))  # JSON-serialisable
    a._state_rows.clear()
    assert json.loads(json.dumps(a.get_state())) == state  # reused rows == rows built afresh
    if sampler == "cmaes":  # only the newest trial with an optimizer snapshot keeps it
        assert sum(any(k.startswith("cma:optimizer") for k in t["system_attrs"]) for t in state["trials"]) == 1
    b = make_optuna_searcher(space, sampler=sampler, seed=3, n_tokens=512, state=state)
    assert b.best_fitness == a.best_fitness and b.best_config == a.best_config and b.history == a.history
    fa, ca = run(a, space, f, 15, start=40)
    fb, cb = run(b, space, f, 15, start=40)
    assert ca == cb


def test_bad_inputs_raise_one_line_errors():
    space = smol_space(1, 0.5)
    with pytest.raises(RayPressError, match="choose one of"):
        make_optuna_searcher(space, sampler="nope", n_tokens=512)
    bad = SearchSpace(layers=["a.0.x"], n_params=[7], level_values=[list(LEVELS)], target=0.55)
    with pytest.raises(RayPressError):
        make_optuna_searcher(bad, n_tokens=512)


def test_through_ray_tune_with_the_runs_param_space(ray_session, tmp_path):
    from ray import tune

    from raypress.trial import tune_space

    space = smol_space(1, 0.6)
    layers = list(space.layers)
    f = objective(space)

    def trainable(config):
        cfg = {l: config[l] for l in layers}
        assert space.is_feasible(cfg) and config["_rp_tokens"] == 64
        return {"fitness": f(cfg), "tokens": config["_rp_tokens"]}

    s = make_optuna_searcher(space, sampler="tpe", seed=0, n_tokens=64)
    res = tune.Tuner(
        trainable,
        param_space=tune_space(space),  # what the runner hands Tune: the searcher checks it is its space
        tune_config=tune.TuneConfig(search_alg=s, num_samples=6, metric="fitness", mode="min"),
        run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
    ).fit()
    assert res.num_errors == 0 and len(res) == 6
    assert s.evaluations == 6
    assert res.get_best_result().metrics["fitness"] == pytest.approx(s.best_fitness)
