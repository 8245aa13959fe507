"""The searcher registry's contract, for every Tune searcher it lists: built the same way, reporting
the same way, and resumable from its JSON state to exactly the suggestions an undisturbed run makes."""
from __future__ import annotations

import json

import numpy as np
import pytest
from ray.tune.search import Searcher

from raypress.config import load_config
from raypress.search import SEARCHERS, evaluation_budget, evolution_budget
from raypress.search.pareto import at_target
from raypress.space import SearchSpace
from raypress.trial import TOKENS, split

TUNE = [n for n, s in SEARCHERS.items() if not s.one_shot]


def _space():
    sizes = [300, 100, 100, 300, 800, 800, 400] * 2
    layers = [f"model.layers.{i // 7}.l{i % 7}" for i in range(len(sizes))]
    return SearchSpace(layers=layers, n_params=sizes, level_values=[[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]] * 14,
                       target=0.4)


def _cfg():
    return load_config(None, ["searcher.generations=4", "searcher.offspring=4", "searcher.stages=[[128, 2], [256, 1]]",
                              "data.seq_len=64", "data.n_calib=8"])


def _f(levels):
    return float(sum((k - 3) ** 2 * (1 + i % 3) for i, k in enumerate(levels.values())))


def _drive(s, space, n, log, start=0):
    """n trials one at a time (state saved by the caller in between); records suggestions."""
    for t in range(start, start + n):
        cfg = s.suggest(f"t{t}")
        if cfg is None or cfg == Searcher.FINISHED:
            return False
        levels, meta = split(cfg)
        spaces = [at_target(space, b) for b in s.budgets] if hasattr(s, "budgets") else [space]  # a front: any budget
        assert any(sp.is_feasible(levels) for sp in spaces) and meta[TOKENS] > 0
        log.append(levels)
        s.on_trial_complete(f"t{t}", {"fitness": _f(levels), "tokens": meta[TOKENS]})
    return True


@pytest.mark.parametrize("name", TUNE)
def test_every_tune_searcher_reports_and_resumes_alike(name):
    if name == "cmaes":
        pytest.importorskip("cmaes")
    info = SEARCHERS[name]
    space, cfg = _space(), _cfg()
    a = info.build(cfg, space)
    ref: list = []
    _drive(a, space, 12, ref)
    state = json.loads(json.dumps(a.get_state()))  # what the runner writes after every trial
    b = info.build(cfg, space, state=state)
    for attr in ("best_config", "best_fitness", "evaluations"):
        assert getattr(b, attr) == getattr(a, attr), attr
    assert b.history == a.history and space.is_feasible(b.best_config)
    cont_a, cont_b = [], []
    _drive(a, space, 10, cont_a, start=12)
    _drive(b, space, 10, cont_b, start=12)
    assert cont_a == cont_b  # the resumed searcher makes exactly the undisturbed run's suggestions
    assert [h["evaluations"] for h in a.pop_new_history()] == sorted(h["evaluations"] for h in a.history)


def test_baselines_get_the_evolutions_budget_in_search_and_compare():
    from raypress.compare import matched_budget

    cfg = _cfg()
    evals, tokens = evaluation_budget(cfg)
    assert evals == evolution_budget(cfg.searcher) == 4 * (5 + 2)
    mean = (5 * 128 + 2 * 256) / 7  # tokens per evaluation of the evolution
    assert tokens == 64 * int(np.ceil(mean / 64)) and matched_budget(cfg) == (evals, tokens)
    for name in ("random", "tpe"):
        s = SEARCHERS[name].build(cfg, _space())
        assert s.suggest("x")[TOKENS] == tokens
    assert SEARCHERS["tpe"].build(cfg, _space()).num_samples == evals
