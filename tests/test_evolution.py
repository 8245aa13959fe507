"""EvoPressSearcher / RandomSearcher driven by hand with a synthetic fitness (no Ray cluster)."""
import json
import pickle
import zlib

import numpy as np
import pytest
from ray.tune.search import Searcher

from raypress.errors import RayPressError
from raypress.search.evolution import EvoPressSearcher
from raypress.search.random import RandomSearcher
from raypress.space import SearchSpace

LEVELS = [round(0.1 * i, 1) for i in range(10)]
SIZES = {"q": 3, "k": 1, "v": 1, "o": 3, "gate": 8, "up": 8, "down": 8}  # SmolLM2 ratios
META = ("_rp_tokens", "_rp_generation", "_rp_stage", "_rp_seed")


def make_space(blocks=4, target=0.5):
    layers = [f"model.layers.{b}.{k}" for b in range(blocks) for k in SIZES]
    return SearchSpace.from_values(LEVELS, target, layers=layers, n_params=[1000 * SIZES[l.rsplit(".", 1)[1]] for l in layers])


SPACE = make_space()
# layer-dependent sensitivities: optimum compresses insensitive layers more (non-uniform)
W = np.exp(np.random.default_rng(123).normal(0.0, 0.8, len(SPACE.layers)))
SHARE = np.asarray(SPACE.n_params) / sum(SPACE.n_params)


def true_fitness(cfg) -> float:
    v = np.asarray([LEVELS[cfg[l]] for l in SPACE.layers])
    return float((W * SHARE * v**2).sum())


def noisy_fitness(cfg) -> float:
    """True fitness + noise shrinking with tokens: a stage-common offset (same tokens for every
    candidate of a stage) plus a per-candidate term; deterministic in (config, tokens, gen, stage)."""
    lv = bytes(cfg[l] for l in SPACE.layers)
    g, s, t = cfg["_rp_generation"], cfg["_rp_stage"], cfg["_rp_tokens"]
    common = np.random.default_rng([cfg["_rp_seed"], g, s]).normal()
    own = np.random.default_rng([zlib.crc32(lv), g, s, t]).normal()
    return true_fitness(cfg) + 0.05 / np.sqrt(t) * (common + own)


def drive(searcher, fitness=noisy_fitness, batch=3, shuffle_seed=0, max_steps=100_000, stop_after=None):
    """Run a searcher like Tune would: up to `batch` trials in flight, results in shuffled order.
    Returns the list of (trial_id, config) suggestions. stop_after: stop after that many completions
    with nothing in flight."""
    rng = np.random.default_rng(shuffle_seed)
    suggested, live, done, tid = [], [], 0, 0
    for _ in range(max_steps):
        while len(live) < batch:
            cfg = searcher.suggest(f"t{tid}")
            if cfg is None or cfg == Searcher.FINISHED:
                break
            suggested.append((f"t{tid}", cfg))
            live.append((f"t{tid}", cfg))
            tid += 1
        if not live:
            break
        k = int(rng.integers(len(live)))
        t, cfg = live.pop(k)
        searcher.on_trial_complete(t, result={"fitness": fitness(cfg), "tokens": cfg["_rp_tokens"]})
        done += 1
        if stop_after is not None and done >= stop_after and not live:
            break
    return suggested


def evo(**kw):
    args = dict(generations=6, offspring=6, stages=((64, 3), (256, 1)), max_mutations=3, seed=0)
    args.update(kw)
    return EvoPressSearcher(SPACE, **args)


def strip(cfg):
    return {k: v for k, v in cfg.items() if not k.startswith("_rp_")}


# ----------------------------------------------------------------------------- protocol
def test_suggestions_feasible_and_stage_sizes():
    s = evo()
    sug = drive(s)
    assert s.suggest("late") == Searcher.FINISHED
    assert s.finished and len(s.history) == 6
    by = {}
    for _, cfg in sug:
        assert SPACE.is_feasible(cfg)
        assert all(k in cfg for k in META) and cfg["_rp_seed"] == 0
        assert cfg["_rp_tokens"] == (64, 256)[cfg["_rp_stage"]]
        by.setdefault((cfg["_rp_generation"], cfg["_rp_stage"]), []).append(strip(cfg))
    parent = SPACE.uniform()
    for g in range(6):
        st0, st1 = by[(g, 0)], by[(g, 1)]
        assert len(st0) == 7 and len(st1) == 3  # offspring + parent, then stage-0 survivors
        keys0 = {tuple(c.values()) for c in st0}
        assert len(keys0) == 7  # distinct offspring, distinct from the parent
        assert tuple(parent.values()) in keys0  # elitism: the parent is re-measured
        assert {tuple(c.values()) for c in st1} <= keys0
        parent = strip(by[(g + 1, 0)][0]) if g + 1 < 6 else s.best_config
        assert tuple(parent.values()) in {tuple(c.values()) for c in st1}
    h = s.history[-1]
    assert h["evaluations"] == 6 * 10 and h["tokens"] == 6 * (7 * 64 + 3 * 256)
    assert set(h) >= {"generation", "best_fitness", "median_fitness", "evaluations", "tokens", "wall_time"}
    assert [x["generation"] for x in s.history] == list(range(6))
    assert s.best_fitness == h["best_fitness"] and SPACE.is_feasible(s.best_config)


def test_suggest_returns_none_while_stage_waits():
    s = evo(offspring=2, stages=((64, 2), (256, 1)), generations=1)
    got = [s.suggest(f"t{i}") for i in range(3)]
    assert all(isinstance(c, dict) for c in got)
    assert s.suggest("t3") is None  # stage 0 is fully handed out, waiting for results
    for i, c in enumerate(got):
        s.on_trial_complete(f"t{i}", {"fitness": true_fitness(c)})
    a, b = s.suggest("t4"), s.suggest("t5")
    assert a["_rp_stage"] == 1 and b["_rp_stage"] == 1 and s.suggest("t6") is None
    s.on_trial_complete("t4", {"fitness": 1.0})
    s.on_trial_complete("t5", {"fitness": 0.5})
    assert s.suggest("t7") == Searcher.FINISHED
    assert s.best_config == strip(b) and s.best_fitness == 0.5
    s.on_trial_complete("unknown", {"fitness": 0.0})  # ignored


def test_error_requeues_candidate_without_losing_generation():
    s = evo(generations=2)
    c0 = s.suggest("a")
    s.on_trial_complete("a", error=True)
    again = s.suggest("b")
    assert again == c0  # same candidate, same tokens/stage/generation
    s.on_trial_complete("b", result=None)  # e.g. a pending trial removed by Tune
    assert s.suggest("c") == c0
    s.on_trial_complete("c", result={"other": 1})  # no metric -> failed too
    assert s.suggest("d") == c0 and s.evaluations == 0 and s.failures == 3
    s.on_trial_complete("d", result={"fitness": noisy_fitness(c0), "tokens": 64})
    drive(s)
    assert s.finished and s.history[-1]["evaluations"] == 2 * 10 and s.history[-1]["failures"] == 3


def test_candidate_failing_too_often_scores_worst():
    s = evo(generations=1, max_retries=1)
    first = s.suggest("x")
    s.on_trial_complete("x", error=True)
    assert s.suggest("y") == first
    s.on_trial_complete("y", error=True)  # second failure > max_retries: worst, stage goes on
    drive(s)
    assert s.finished and s.best_config != strip(first)


def test_deterministic_given_seed():
    a, b, c = evo(), evo(), evo(seed=1)
    sa, sb, sc = drive(a), drive(b), drive(c)
    assert [x[1] for x in sa] == [x[1] for x in sb]
    assert a.best_config == b.best_config and a.best_fitness == b.best_fitness
    assert [x[1] for x in sa] != [x[1] for x in sc]


# ----------------------------------------------------------------------------- quality
def test_evolution_beats_uniform_and_random():
    stages = ((64, 3), (256, 1))
    e = EvoPressSearcher(SPACE, generations=40, offspring=8, stages=stages, max_mutations=3, seed=0)
    drive(e)
    n_evals = e.history[-1]["evaluations"]
    assert n_evals == 40 * (9 + 3)
    r = RandomSearcher(SPACE, n_samples=n_evals, n_tokens=256, seed=0)
    drive(r)
    assert r.finished and r.evaluations == n_evals
    f_uniform, f_random, f_evo = true_fitness(SPACE.uniform()), true_fitness(r.best_config), true_fitness(e.best_config)
    assert SPACE.is_feasible(e.best_config) and SPACE.is_feasible(r.best_config)
    assert f_evo < f_random and f_evo < f_uniform
    assert f_evo < 0.9 * f_uniform, (f_uniform, f_random, f_evo)
    # the best fitness trend goes down over generations
    assert e.history[-1]["best_fitness"] < e.history[0]["best_fitness"]


# ----------------------------------------------------------------------------- warm start / props
def test_initial_warm_start_and_search_properties():
    start = SPACE.random_feasible(np.random.default_rng(9))
    s = evo(initial=start, generations=1)
    first = s.suggest("a")
    assert strip(first) == start  # the parent (candidate 0) is the warm start
    assert s.set_search_properties("fitness", "min", {}) is True
    assert s.metric == "fitness" and s.mode == "min"
    bad = dict(start)
    bad[SPACE.layers[0]] = (bad[SPACE.layers[0]] + 1) % 10
    s2 = evo(initial=bad)  # off budget -> repaired
    assert SPACE.is_feasible(s2.best_config)
    with pytest.raises(RayPressError):
        evo(initial={"nope": 1})
    with pytest.raises(RayPressError):
        evo(stages=())
    with pytest.raises(RayPressError):
        evo(generations=0)


def test_random_search_scores_its_warm_start_first_and_resumes_with_it():
    """searcher.init for random search: sample 0 is the start (repaired onto the budget if needed), so
    the result is never behind it; the start survives a state round trip."""
    good = min((SPACE.random_feasible(np.random.default_rng(i)) for i in range(200)), key=true_fitness)
    r = RandomSearcher(SPACE, n_samples=6, n_tokens=256, seed=0, start=good)
    first = r.suggest("a")
    assert strip(first) == good
    r.on_trial_complete("a", {"fitness": true_fitness(good)})
    drive(r, fitness=true_fitness)
    assert r.finished and r.evaluations == 6 and true_fitness(r.best_config) <= true_fitness(good)
    plain = RandomSearcher(SPACE, n_samples=6, n_tokens=256, seed=0)
    drive(plain, fitness=true_fitness)
    assert true_fitness(plain.best_config) > true_fitness(good)  # the 6 samples alone do not find it
    half = RandomSearcher(SPACE, n_samples=6, n_tokens=256, seed=0, start=good)
    restored = RandomSearcher(SPACE, n_samples=6, n_tokens=256, seed=0)
    restored.set_state(json.loads(json.dumps(half.get_state())))
    assert strip(restored.suggest("b")) == good
    bad = dict(good)
    bad[SPACE.layers[0]] = (bad[SPACE.layers[0]] + 1) % 10
    assert SPACE.is_feasible(RandomSearcher(SPACE, n_samples=2, start=bad).sample(0))


def test_several_starts_compete_in_the_first_generation_and_the_best_becomes_the_parent():
    """searcher.init: [a, b]: generation 0 scores both starts beside a's offspring (6 + 2 configs
    in stage 0) and multi-step selection keeps the better start; later generations breed from it
    alone. A worse start listed first does not hold the search back."""
    rng = np.random.default_rng(5)
    starts = sorted((SPACE.random_feasible(rng) for _ in range(40)), key=true_fitness)
    good, bad = starts[0], starts[-1]
    assert true_fitness(good) < 0.6 * true_fitness(bad)
    s = evo(initial=[bad, good], generations=2, offspring=6, max_mutations=1)
    sug = drive(s, fitness=lambda c: true_fitness(c), batch=1)
    gen0 = [strip(c) for _, c in sug if c["_rp_generation"] == 0 and c["_rp_stage"] == 0]
    assert len(gen0) == 8 and gen0[0] == bad and gen0[1] == good
    gen1 = [strip(c) for _, c in sug if c["_rp_generation"] == 1 and c["_rp_stage"] == 0]
    assert len(gen1) == 7 and gen1[0] != bad  # the parent of generation 1 came from the good start's side
    assert true_fitness(gen1[0]) <= true_fitness(good)
    assert true_fitness(s.best_config) <= true_fitness(good)
    from types import SimpleNamespace

    from raypress.search.registry import evolution_budget  # the plan's and progress lines' count

    assert len(sug) == s.evaluations == evolution_budget(SimpleNamespace(
        offspring=6, stages=[(64, 3), (256, 1)], generations=2, init=["uniform", "dp"]))
    one = evo(initial=[good, dict(good)], generations=1)  # a start listed twice is scored once
    assert len([c for _, c in drive(one, batch=1) if c["_rp_stage"] == 0]) == 7


def test_pop_new_history():
    s = evo(generations=3)
    drive(s, stop_after=10)  # one generation = 7 + 3
    new = s.pop_new_history()
    assert [h["generation"] for h in new] == [0] and s.pop_new_history() == []
    drive(s)
    assert [h["generation"] for h in s.pop_new_history()] == [1, 2]


# ----------------------------------------------------------------------------- save / restore
def _cmp_history(a, b, ignore=("wall_time",)):
    strip_t = lambda hs: [{k: v for k, v in h.items() if k not in ignore} for h in hs]
    assert strip_t(a) == strip_t(b)


@pytest.mark.parametrize("stop_after", [4, 10, 23])
def test_save_restore_identical_continuation(tmp_path, stop_after):
    ref = evo()
    ref_sug = [c for _, c in drive(ref, batch=1)]

    s = evo()
    first = [c for _, c in drive(s, batch=1, stop_after=stop_after)]
    assert first == ref_sug[: len(first)]
    path = tmp_path / "state.json"
    s.save(path)
    json.loads(path.read_text())  # plain JSON
    r = evo(seed=123, generations=2)  # settings and rng come from the state
    r.restore(path)
    rest = [c for _, c in drive(r, batch=1)]
    assert first + rest == ref_sug
    assert r.best_config == ref.best_config and r.best_fitness == ref.best_fitness
    _cmp_history(r.history, ref.history)


def test_restore_with_trials_in_flight_requeues_them(tmp_path):
    ref = evo()
    drive(ref, batch=1)
    s = evo()
    drive(s, batch=1, stop_after=3)
    lost = [s.suggest("lost1"), s.suggest("lost2")]  # in flight when the state is saved
    state = s.get_state()
    r = evo()
    r.set_state(json.loads(json.dumps(state)))
    assert [r.suggest("n1"), r.suggest("n2")] == lost  # handed out again first
    r.on_trial_complete("n1", {"fitness": noisy_fitness(lost[0])})
    r.on_trial_complete("n2", {"fitness": noisy_fitness(lost[1])})
    drive(r, batch=1)
    assert r.best_config == ref.best_config and r.best_fitness == ref.best_fitness
    _cmp_history(r.history, ref.history)


def test_state_checks_space_and_pickles(tmp_path):
    s = evo()
    drive(s, stop_after=5)
    pickle.loads(pickle.dumps(s))
    other = EvoPressSearcher(make_space(target=0.4), generations=2)
    with pytest.raises(RayPressError, match="different search space"):
        other.set_state(s.get_state())
    with pytest.raises(RayPressError, match="random"):
        RandomSearcher(SPACE, n_samples=3).set_state(s.get_state())
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RayPressError, match="cannot read"):
        s.restore(tmp_path / "bad.json")


# ----------------------------------------------------------------------------- random searcher
def test_random_searcher_protocol_and_restore(tmp_path):
    ref = RandomSearcher(SPACE, n_samples=12, n_tokens=256, seed=3, history_every=5)
    ref_sug = [c for _, c in drive(ref, batch=1)]
    assert len(ref_sug) == 12 and ref.suggest("x") == Searcher.FINISHED
    for c in ref_sug:
        assert SPACE.is_feasible(c) and c["_rp_tokens"] == 256 and c["_rp_stage"] == 0 and c["_rp_seed"] == 3
    assert len({tuple(strip(c).values()) for c in ref_sug}) == 12
    assert [h["evaluations"] for h in ref.history] == [5, 10, 12]
    assert ref.best_fitness == min(noisy_fitness(c) for c in ref_sug)
    assert ref.set_search_properties("fitness", "min", {}) is True

    s = RandomSearcher(SPACE, n_samples=12, n_tokens=256, seed=3, history_every=5)
    first = [c for _, c in drive(s, batch=1, stop_after=7)]
    c = s.suggest("fail")
    s.on_trial_complete("fail", error=True)
    assert s.suggest("again") == c  # re-queued
    s.save(tmp_path / "r.json")
    r = RandomSearcher(SPACE, n_samples=1)
    r.restore(tmp_path / "r.json")
    rest = [c for _, c in drive(r, batch=1)]
    assert first + rest == ref_sug
    assert r.best_config == ref.best_config and r.best_fitness == ref.best_fitness
    _cmp_history(r.history, ref.history, ignore=("wall_time", "failures"))


# ----------------------------------------------------------------------------- monitoring
def test_monitor_scores_the_elite_on_one_fixed_batch():
    s = evo(monitor_every=2, generations=5)
    sug = [c for _, c in drive(s, batch=3)]
    mon = [c for c in sug if c["_rp_generation"] == 2**31 - 1]
    # the start config (uniform) first, then the elite after generations 2, 4 and the last (5)
    assert len(mon) == 1 + 3 and all(c["_rp_tokens"] == 256 and c["_rp_stage"] == 0 for c in mon)
    assert strip(mon[0]) == SPACE.uniform() and strip(mon[-1]) == s.best_config
    assert s.monitor["start"] == s.monitor["uniform"] == pytest.approx(noisy_fitness(mon[0]))
    monitored = [h for h in s.history if "elite_kl_monitor" in h]
    assert [h["generation"] for h in monitored] == [1, 3, 4]
    assert [h["generation"] for h in s.history] == list(range(5))  # one entry per generation, in order
    # the monitor batch is the same for every score: the curve is comparable over time
    assert monitored[-1]["elite_kl_monitor"] == pytest.approx(noisy_fitness(mon[-1]))
    assert monitored[-1]["best_kl_monitor"] == min(h["elite_kl_monitor"] for h in monitored)
    # monitor scores are bookkeeping, not selection: the evolution's evaluation count is unchanged
    plain = evo(generations=5)
    drive(plain, batch=3)
    assert s.evaluations == plain.evaluations and s.monitor_evaluations == 4
    assert s.best_config == plain.best_config


def test_monitor_with_a_warm_start_scores_uniform_too(tmp_path):
    start = SPACE.mutate(SPACE.uniform(), np.random.default_rng(2), n_switches=3)
    s = evo(monitor_every=3, generations=3, initial=start)
    first = [c for _, c in drive(s, batch=1, stop_after=2)]
    assert [strip(c) for c in first] == [start, SPACE.uniform()]
    s.save(tmp_path / "st.json")  # a restore in the middle of monitoring continues it
    r = evo(monitor_every=3, generations=3, initial=start)
    r.restore(tmp_path / "st.json")
    drive(r, batch=1)
    assert r.monitor["start"] == pytest.approx(noisy_fitness(first[0]))
    assert r.monitor["uniform"] == pytest.approx(noisy_fitness(first[1])) != r.monitor["start"]
    assert [h["generation"] for h in r.history if "elite_kl_monitor" in h] == [2]
