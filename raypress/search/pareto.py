"""The quality-size front in one search: an EvoPress population per budget, run side by side.

Users pick a size after seeing the trade-off, so `searcher.name: pareto` searches every budget of
`searcher.budgets` (default: 8, evenly spaced from just above the ladder's cheapest reachable value
up to `target`) in one Tune run. Each budget is an ordinary EvoPress search (the same generations,
stages and seed), so a front point is exactly what `raypress search --set target=B` would find; what
the budgets share is the run: one database, one set of evaluator actors kept busy across budgets (a
population waiting for its stage's last result lends its evaluators to the others), and the teacher
logits of each (generation, stage) batch, which evaluators cache and every budget scores against.

The runner then measures every budget's elite (and its uniform mix) on the held-out text and writes
the non-dominated points to `pareto.json`; `raypress export RUN --budget B` takes the best point
that fits B.
"""
from __future__ import annotations

import numpy as np
from ray.tune.search import Searcher

from ..errors import RayPressError
from ..space import SearchSpace
from .base import RayPressSearcher, _num
from .evolution import build as build_evolution

DEFAULT_POINTS = 8


def at_target(space: SearchSpace, target: float) -> SearchSpace:
    """`space` with another target (same layers, sizes and ladders)."""
    return SearchSpace(list(space.layers), list(space.n_params), [list(v) for v in space.level_values], float(target))


def resolve_budgets(cfg, space: SearchSpace) -> list[float]:
    """The front's budgets, ascending: searcher.budgets as given (each must be reachable: budget.py's
    verdict, quoted), or DEFAULT_POINTS evenly spaced up to `target`, each moved to a reachable one."""
    given = cfg.searcher.budgets
    if given:
        out = []
        for b in given:
            v = at_target(space, b).verdict()
            if not v.ok:
                raise RayPressError(f"searcher.budgets: {v.message}")
            out.append(float(b))
        if len(set(out)) != len(out):
            raise RayPressError(f"searcher.budgets lists a budget twice ({given}); list each once")
        return sorted(out)
    space.require_reachable()
    lo = space.verdict().lo
    hi = float(space.target)
    out = []
    for x in np.linspace(lo, hi, DEFAULT_POINTS + 1)[1:]:
        v = at_target(space, float(x)).verdict()
        b = float(x) if v.ok else float(v.nearest[0])
        if b not in out and at_target(space, b).verdict().ok:
            out.append(b)
    if len(out) < 2:  # target at (or next to) the cheapest reachable value: nothing to trade off
        raise RayPressError(f"a front needs at least 2 budgets, and between the ladder's cheapest reachable value "
                            f"{lo:g} and the target {hi:g} there is only {out}: raise target or give searcher.budgets")
    return sorted(out)


class ParetoSearcher(Searcher):
    """One EvoPress searcher per budget behind one Tune Searcher (trials routed by id)."""

    kind = "pareto"

    def __init__(self, space: SearchSpace, budgets: list[float], make):
        super().__init__(metric=None, mode="min")
        self.space = space
        self.budgets = [float(b) for b in budgets]
        self.subs = [make(at_target(space, b)) for b in self.budgets]
        self._owner: dict[str, int] = {}
        self._turn = 0
        self.history: list[dict] = []
        self._sent = 0

    # ------------------------------------------------------------------ Tune hooks
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return all(s.set_search_properties(metric, mode, config, **spec) for s in self.subs)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.subs)

    def suggest(self, trial_id: str):
        if self.finished:
            return Searcher.FINISHED
        K = len(self.subs)
        for j in range(K):  # round robin over the budgets that have a candidate waiting
            k = (self._turn + j) % K
            c = self.subs[k].suggest(trial_id)
            if c is None or c == Searcher.FINISHED:
                continue
            self._owner[str(trial_id)] = k
            self._turn = k + 1
            return c
        return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        k = self._owner.pop(str(trial_id), None)
        if k is None:
            return
        self.subs[k].on_trial_complete(trial_id, result, error)
        self._collect(k)

    def _collect(self, k: int) -> None:
        evaluations, tokens = self.evaluations, sum(s.tokens for s in self.subs)
        for h in self.subs[k].pop_new_history():
            self.history.append({**h, "budget": self.budgets[k], "budget_evaluations": h.get("evaluations"),
                                 "evaluations": evaluations, "tokens": tokens,
                                 "generations": self.subs[k].generations})

    # ------------------------------------------------------------------ the runner's view
    @property
    def evaluations(self) -> int:
        return sum(s.evaluations for s in self.subs)

    def target_index(self) -> int:
        """The budget `raypress search` reports as its result: the target's (the largest budget)."""
        t = float(self.space.target)
        return self.budgets.index(t) if t in self.budgets else len(self.budgets) - 1

    @property
    def best_config(self):
        return self.subs[self.target_index()].best_config

    @property
    def best_fitness(self):
        return self.subs[self.target_index()].best_fitness

    @property
    def monitor(self):  # the target's start and uniform references (the fitness plot's lines)
        return getattr(self.subs[self.target_index()], "monitor", None)

    def front(self) -> list[dict]:
        """Every budget's elite: {"budget", "config", "search_kl"} (the runner adds held-out numbers)."""
        return [{"budget": b, "config": s.best_config, "search_kl": _num(s.best_fitness)}
                for b, s in zip(self.budgets, self.subs) if s.best_config is not None]

    def pop_new_history(self) -> list[dict]:
        new = self.history[self._sent:]
        self._sent = len(self.history)
        return [dict(h) for h in new]

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict:
        return {"kind": self.kind, "budgets": self.budgets, "subs": [s.get_state() for s in self.subs],
                "turn": self._turn, "history": [dict(h) for h in self.history], "history_sent": self._sent}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            raise RayPressError("saved searcher state is not a pareto search's; resume with the same searcher")
        if [float(b) for b in state["budgets"]] != self.budgets:
            raise RayPressError(f"saved pareto search has budgets {state['budgets']}, this config {self.budgets}; "
                                "resume with the original config")
        for s, st in zip(self.subs, state["subs"]):
            s.set_state(st)
        self._turn = int(state.get("turn", 0))
        self.history = [dict(h) for h in state.get("history", [])]
        self._sent = int(state.get("history_sent", len(self.history)))

    # Tune's searcher checkpoint: the same JSON state file as RayPress's own searchers
    save = RayPressSearcher.save
    restore = RayPressSearcher.restore


def build(name, cfg, space, initial=None, state=None) -> ParetoSearcher:
    """The registry's builder: every budget an EvoPress search of cfg.searcher, from its uniform mix or
    (searcher.init) from `initial(space_of_that_budget)`, the runner's schedule at that budget; a plain
    config as `initial` starts the target's budget only."""
    budgets = resolve_budgets(cfg, space)

    def make(sp):
        if callable(initial):
            start = initial(sp)
        else:
            start = initial if initial is not None and float(sp.target) == float(space.target) else None
        return build_evolution("evopress", cfg, sp, start, None)

    searcher = ParetoSearcher(space, budgets, make)
    if state is not None:
        searcher.set_state(state)
    return searcher
