"""SearchSpace: exact budgets, level switches, uniform, repair, validation (no Ray needed)."""
from types import SimpleNamespace

import numpy as np
import pytest

from raypress.errors import RayPressError
from raypress.space import SearchSpace

LEVELS = [round(0.1 * i, 1) for i in range(10)]  # 0.0 .. 0.9
SMOL = {"self_attn.q_proj": 331776, "self_attn.k_proj": 110592, "self_attn.v_proj": 110592,
        "self_attn.o_proj": 331776, "mlp.gate_proj": 884736, "mlp.up_proj": 884736, "mlp.down_proj": 884736}


def smol_space(target=0.6, blocks=30) -> SearchSpace:
    layers = [f"model.layers.{b}.{k}" for b in range(blocks) for k in SMOL]
    return SearchSpace.from_values(LEVELS, target, layers=layers, n_params=[SMOL[l.split(".", 3)[3]] for l in layers])


@pytest.fixture(scope="module")
def smol():
    return smol_space()


# ----------------------------------------------------------------------------- costs / budget
def test_costs_and_budget_are_exact_integers(smol):
    assert smol.budget == 600 * sum(smol.n_params)
    assert smol.costs[0] == [331776 * round(v * 1000) for v in LEVELS]
    u = smol.uniform()
    assert set(u.values()) == {6}
    assert smol.cost(u) == smol.budget and smol.is_feasible(u)
    smol.check(u)
    assert smol.mean_value(u) == pytest.approx(0.6)


def test_uniform_other_ladders():
    # quant: ascending bits (descending compression); unequal sizes
    q = SearchSpace.from_values([2.0, 3.0, 4.0, 5.0, 6.0, 8.0], 4.0, layers=list("abcd"), n_params=[10, 30, 20, 40])
    assert q.uniform() == {l: 2 for l in "abcd"}
    # depth: 0/1 units, a whole number dropped -> a mix
    d = SearchSpace(layers=[f"u{i}" for i in range(8)], n_params=[1] * 8, level_values=[[0.0, 1.0]] * 8, target=0.25)
    u = d.uniform()
    assert d.is_feasible(u) and sum(u.values()) == 2
    # target between ladder values but reachable as a mix: each layer next to the target
    s = smol_space(0.55, blocks=4)
    u = s.uniform()
    assert s.is_feasible(u) and set(u.values()) <= {5, 6}
    assert s.mean_value(u) == pytest.approx(0.55)


@pytest.mark.parametrize("target,words", [(0.55, "not reachable"), (0.123, "not reachable"), (0.95, "outside")])
def test_uniform_unreachable_target_errors(target, words):
    s = SearchSpace.from_values(LEVELS, target, layers=["a", "b", "c"])  # 3 equal layers
    with pytest.raises(RayPressError) as e:
        s.uniform()
    msg = str(e.value)
    assert words in msg and f"{target:g}" in msg and "[0, 0.1," in msg and "\n" not in msg
    assert not s.reachable()
    with pytest.raises(RayPressError):
        s.random_feasible(np.random.default_rng(0))


# ----------------------------------------------------------------------------- mutation
def test_ten_thousand_mutations_keep_budget_and_move_budget_across_sizes(smol):
    rng = np.random.default_rng(0)
    cfg = smol.config_to_array(smol.uniform())
    n = np.asarray(smol.n_params)
    costs = smol.costs
    cross, pairs = 0, set()
    for _ in range(10_000):
        new = smol.mutate(cfg, rng)  # array in -> array out
        assert smol._cost_arr(new) == smol.budget
        assert new.min() >= 0 and new.max() <= 9
        changed = np.flatnonzero(new != cfg)
        assert len(changed) == 2
        i, j = changed
        # exactly equal cost change between the two layers
        assert costs[i][new[i]] - costs[i][cfg[i]] == -(costs[j][new[j]] - costs[j][cfg[j]])
        if n[i] != n[j]:
            cross += 1
            pairs.add(tuple(sorted((int(n[i]), int(n[j])))))
            steps = sorted([abs(int(new[i] - cfg[i])), abs(int(new[j] - cfg[j]))])
            assert steps == [1, 3]  # q/o (3 units) vs k/v (1 unit): a=1, b=3 is the smallest pair
        else:
            assert abs(new - cfg).sum() == 2  # equal sizes: a = b = 1
        cfg = new
    assert smol.is_feasible(smol.array_to_config(cfg))
    assert cross > 500 and (110592, 331776) in pairs
    # budget really moved between sizes: q/o vs k/v mean values drift apart from the target
    vals = np.asarray(LEVELS)[cfg]
    assert not np.allclose(vals, 0.6)


def test_mutate_dict_and_multi_switch(smol):
    rng = np.random.default_rng(1)
    u = smol.uniform()
    m = smol.mutate(u, rng, n_switches=5)
    assert isinstance(m, dict) and smol.is_feasible(m) and m != u
    assert u == smol.uniform()  # input untouched
    m2 = smol.mutate({**u, "_rp_tokens": 512}, np.random.default_rng(1), n_switches=5)
    assert m2 == m  # meta keys ignored, deterministic given the rng


def test_mutation_nonlinear_ladder_compares_actual_cost_changes():
    ladder = [0.0, 0.25, 0.5, 0.75, 0.8, 0.9]
    s = SearchSpace.from_values(ladder, 0.5, layers=[f"l{i}" for i in range(6)], n_params=[2, 1, 2, 1, 2, 1])
    rng = np.random.default_rng(0)
    cfg = s.uniform()
    for _ in range(2000):
        cfg = s.mutate(cfg, rng)
        assert s.is_feasible(cfg)


def test_no_switch_possible_raises():
    # steps up from 0.5 are +0.2/+0.3/+0.4, steps down -0.25/-0.5: no equal cost change exists
    s = SearchSpace.from_values([0.0, 0.25, 0.5, 0.7, 0.8, 0.9], 0.5, layers=list("abcd"))
    with pytest.raises(RayPressError, match="no budget-preserving level switch"):
        s.mutate(s.uniform(), np.random.default_rng(0))
    assert s.random_feasible(np.random.default_rng(0)) == s.uniform()  # walk just stays put
    one = SearchSpace.from_values(LEVELS, 0.5, layers=["only"])
    with pytest.raises(RayPressError, match="at least two layers"):
        one.mutate(one.uniform(), np.random.default_rng(0))


def test_three_way_switch_crosses_attention_mlp_pools(smol):
    # with (a, b) <= 4, gate/up/down (8 units) never pair with q/k/v/o: three_way lets budget flow
    rng = np.random.default_rng(0)
    cfg = smol.uniform()
    mlp = [l for l in smol.layers if ".mlp." in l]
    for _ in range(3000):
        cfg = smol.mutate(cfg, rng, three_way=0.5)
        assert smol.is_feasible(cfg)
    by = smol.describe(cfg)["by_kind"]
    mlp_mean = np.average([LEVELS[cfg[l]] for l in mlp])
    assert abs(mlp_mean - 0.6) > 1e-9 and by["mlp.gate_proj"] >= 0
    cfg2 = smol.uniform()
    for _ in range(500):
        cfg2 = smol.mutate(cfg2, rng)
    assert np.average([LEVELS[cfg2[l]] for l in mlp]) == pytest.approx(0.6)


def test_random_feasible(smol):
    a = smol.random_feasible(np.random.default_rng(3))
    b = smol.random_feasible(np.random.default_rng(3))
    c = smol.random_feasible(np.random.default_rng(4))
    assert a == b and a != c and smol.is_feasible(a) and smol.is_feasible(c)
    assert a != smol.uniform()
    arr = smol.random_feasible(5, n_steps=10, as_array=True)
    assert isinstance(arr, np.ndarray) and smol._cost_arr(arr) == smol.budget


# ----------------------------------------------------------------------------- repair
def test_repair_always_feasible_smol(smol):
    rng = np.random.default_rng(0)
    for t in range(400):
        x = {l: int(rng.integers(10)) for l in smol.layers}
        y = smol.repair(x, rng)
        assert smol.is_feasible(y), t
    u = smol.uniform()
    assert smol.repair(u, rng) == u  # feasible input unchanged


def test_repair_always_feasible_odd_sizes_and_ladders():
    rng = np.random.default_rng(1)
    spaces = [
        SearchSpace.from_values(LEVELS, 0.5, layers=[f"l{i}" for i in range(9)], n_params=[3, 1, 2, 5, 7, 1, 3, 2, 4]),
        SearchSpace.from_values([0.0, 0.25, 0.5, 0.7, 0.8, 0.9], 0.5, layers=list("abcdef"), n_params=[4, 1, 2, 4, 1, 2]),
        SearchSpace.from_values([2.0, 3.0, 4.0, 8.0], 3.0, layers=list("abcde"), n_params=[64, 64, 128, 32, 32]),
        SearchSpace(layers=[f"u{i}" for i in range(12)], n_params=[1] * 12, level_values=[[0.0, 1.0]] * 12,
                    target=0.25),
    ]
    for s in spaces:
        for _ in range(1000):
            x = {l: int(rng.integers(n)) for l, n in zip(s.layers, s.n_levels)}
            y = s.repair(x, rng)
            assert s.is_feasible(y), (s.layers, x)
        arr = s.repair(np.zeros(len(s.layers), dtype=np.int64), rng)  # arrays in -> arrays out
        assert isinstance(arr, np.ndarray) and s._cost_arr(arr) == s.budget


def test_repair_prefers_nearby_and_unreachable_raises():
    s = SearchSpace.from_values(LEVELS, 0.5, layers=list("abcd"))
    y = s.repair({"a": 5, "b": 5, "c": 5, "d": 6}, 0)
    assert s.is_feasible(y) and sum(abs(y[l] - v) for l, v in {"a": 5, "b": 5, "c": 5, "d": 6}.items()) == 1
    bad = SearchSpace.from_values(LEVELS, 0.55, layers=["a", "b", "c"])
    with pytest.raises(RayPressError, match="not reachable"):
        bad.repair({"a": 0, "b": 0, "c": 0}, 0)


# ----------------------------------------------------------------------------- validation / helpers
def test_config_validation(smol):
    u = smol.uniform()
    first = smol.layers[0]
    with pytest.raises(RayPressError, match="unknown layer 'nope'"):
        smol.check({**u, "nope": 1})
    with pytest.raises(RayPressError, match="no level for layer"):
        smol.cost({k: v for k, v in u.items() if k != first})
    with pytest.raises(RayPressError, match="out of range"):
        smol.check({**u, first: 10})
    with pytest.raises(RayPressError, match="out of range"):
        smol.mutate({**u, first: -1}, 0)
    with pytest.raises(RayPressError, match="integer"):
        smol.check({**u, first: 1.5})
    with pytest.raises(RayPressError, match="off budget"):
        smol.check({**u, first: 7})
    assert not smol.is_feasible({**u, first: 10})
    assert not smol.is_feasible({**u, first: 7})
    smol.check({**u, "_rp_tokens": 512, "_rp_generation": 3, first: np.int64(6), smol.layers[1]: 6.0})
    with pytest.raises(RayPressError):
        SearchSpace(layers=["a", "a"], n_params=[1, 1], level_values=[[0.0], [0.0]], target=0.0)
    with pytest.raises(RayPressError):
        SearchSpace(layers=["a"], n_params=[0], level_values=[[0.0]], target=0.0)
    with pytest.raises(RayPressError):
        SearchSpace(layers=["a"], n_params=[1], level_values=[[]], target=0.0)


def test_arrays_describe_and_tune_space(smol):
    rng = np.random.default_rng(0)
    cfg = smol.random_feasible(rng)
    arr = smol.config_to_array(cfg)
    assert arr.dtype == np.int64 and smol.array_to_config(arr) == cfg
    d = smol.describe(cfg)
    assert d["feasible"] and d["mean_value"] == pytest.approx(0.6)
    assert list(d["values"]) == smol.layers and d["values"][smol.layers[0]] == LEVELS[cfg[smol.layers[0]]]
    assert set(d["by_kind"]) == set(SMOL)
    from raypress.trial import check_tune_space, tune_space

    ts = tune_space(smol)
    assert list(ts) == smol.layers
    assert ts[smol.layers[0]].lower == 0 and ts[smol.layers[0]].upper == 10
    check_tune_space(smol, ts)  # the space a run hands Tune is the searcher's own
    with pytest.raises(RayPressError, match="param_space"):
        check_tune_space(smol, dict(list(ts.items())[1:]))
    assert SearchSpace.from_dict(smol.to_dict()).fingerprint() == smol.fingerprint()


def test_for_database_duck_typed():
    db = SimpleNamespace(layers=["b.0.q", "b.0.k"], n_params={"b.0.q": 300, "b.0.k": 100},
                         level_values={"b.0.q": [0.0, 0.5, 0.9], "b.0.k": (0.0, 0.5, 0.9)})
    s = SearchSpace.for_database(db, 0.5)
    assert s.layers == db.layers and s.n_params == [300, 100] and s.level_values[1] == [0.0, 0.5, 0.9]
    assert s.uniform() == {"b.0.q": 1, "b.0.k": 1}
    db.layers.append("b.0.v")
    with pytest.raises(RayPressError, match="b.0.v"):
        SearchSpace.for_database(db, 0.5)


def test_repair_exact_fallback_when_greedy_and_fixup_fail(monkeypatch):
    s = SearchSpace.from_values(LEVELS, 0.5, layers=[f"l{i}" for i in range(9)], n_params=[3, 1, 2, 5, 7, 1, 3, 2, 4])
    monkeypatch.setattr(s, "_greedy", lambda arr, rng: None)
    monkeypatch.setattr(s, "_fixup", lambda arr, rng, max_step=4: s._cost_arr(arr) == s.budget)
    rng = np.random.default_rng(2)
    for _ in range(200):
        x = {l: int(rng.integers(10)) for l in s.layers}
        assert s.is_feasible(s.repair(x, rng))
