"""Several candidates per Ray Tune trial: amortizes Tune's per-trial cost over fast evaluations.

A Tune trial costs the driver a few milliseconds (scheduling, `reset_config`, result processing,
callbacks) no matter how long the evaluation takes. On a GPU a SmolLM2 candidate at EvoPress stage
sizes (512-2048 tokens) is scored in a few milliseconds too, so one candidate per trial spends a
large share of the time in Tune. `BatchedSearcher` wraps any Searcher (EvoPress, random, Optuna):
it asks the inner searcher for up to `batch` candidates and hands them to Tune as ONE trial config
``{trial.BATCH: [cfg, ...]}``; the evaluator scores them one after another (reusing its swapped
layers between them) and reports each candidate's fitness under the same key, which the wrapper
passes back to the inner searcher candidate by candidate. A failed trial re-queues all of its
candidates (the inner searcher's own retry logic). The inner searcher keeps its state, history and
best config; callers keep talking to it (get_state, pop_new_history, best_config).

With n evaluators, ``batch = ceil(candidates per stage / n)`` keeps every evaluator busy while a
stage runs (EvoPress's stage barrier returns None once a stage is handed out, which closes a
partial batch).
"""
from __future__ import annotations

import math

from ray.tune.search import Searcher

from ..trial import BATCH


class BatchedSearcher(Searcher):
    def __init__(self, inner: Searcher, batch: int, limit: int | None = None):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner = inner
        self.batch = max(1, int(batch))
        self.limit = limit if limit is None or limit > 0 else None  # total candidates (random/TPE budgets)
        self.count = 0
        self._subs: dict[str, list[str]] = {}
        self._done = False

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        ok = self.inner.set_search_properties(metric, mode, config, **spec)
        if ok:
            self._metric, self._mode = self.inner.metric, self.inner.mode
        return ok

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return False  # Tune's own max_concurrent_trials limits trials; candidates per trial are ours

    def suggest(self, trial_id: str):
        if self._done:
            return Searcher.FINISHED
        cfgs, subs = [], []
        while len(cfgs) < self.batch:
            if self.limit is not None and self.count >= self.limit:
                self._done = True
                break
            sid = f"{trial_id}#{len(cfgs)}"
            cfg = self.inner.suggest(sid)
            if cfg is None:
                break
            if cfg == Searcher.FINISHED:
                self._done = True
                break
            cfgs.append(cfg)
            subs.append(sid)
            self.count += 1
        if not cfgs:
            return Searcher.FINISHED if self._done else None
        self._subs[str(trial_id)] = subs
        return {BATCH: cfgs}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        subs = self._subs.pop(str(trial_id), [])
        per = None if (error or not result) else result.get(BATCH)
        common = {k: v for k, v in (result or {}).items() if k != BATCH}
        for k, sid in enumerate(subs):
            if per is not None and k < len(per):
                self.inner.on_trial_complete(sid, {**common, **per[k]}, error=False)
            else:  # errored trial, or a result without per-candidate entries (user error): all fail
                self.inner.on_trial_complete(sid, common or None, error=error or not common)

    # state and reports stay with the inner searcher
    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state)

    def save(self, checkpoint_path) -> None:
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path) -> None:
        self.inner.restore(checkpoint_path)

    def __getattr__(self, name):  # best_config, history, pop_new_history, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def candidates_per_trial(setting, batched: bool, offspring: int, n_evaluators: int) -> int:
    """`evaluator.candidates_per_trial`: an int, or "auto" = a stage's first-step candidates
    (offspring + parent) spread over the evaluators for searchers whose registry trait `batched` is
    set (EvoPress, random); 1 for the others (model-based samplers: each suggestion should see the
    previous results)."""
    if setting != "auto":
        return max(1, int(setting))
    if batched:
        return max(1, math.ceil((offspring + 1) / max(1, n_evaluators)))
    return 1
