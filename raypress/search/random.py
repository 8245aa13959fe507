"""Random search baseline: `n_samples` feasible configs (space.random_feasible), each scored
once at the final-stage token count, all on the same calibration tokens (generation 0, stage 0)
so their fitnesses compare fairly. Same trial-config keys, history, best_* and JSON state API as
EvoPressSearcher. Sample i is a pure function of (seed, i), so re-queues and restores are exact;
with a warm start (searcher.init: dp) sample 0 is that schedule, so the result is never behind it.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from ray.tune.search import Searcher

from ..errors import RayPressError
from .base import RayPressSearcher

log = logging.getLogger("raypress")


class RandomSearcher(RayPressSearcher):
    kind = "random"

    def __init__(self, space, *, n_samples: int, n_tokens: int = 2048, seed: int = 0,
                 metric: str = "fitness", mode: str = "min", n_steps: int | None = None,
                 max_step: int = 4, three_way: float = 0.0, history_every: int | None = None,
                 max_retries: int = 3, start: dict | None = None):
        if int(n_samples) < 1 or int(n_tokens) < 1:
            raise RayPressError("n_samples and n_tokens must be >= 1 (e.g. n_samples=200, n_tokens=2048)")
        super().__init__(space, seed=seed, metric=metric, mode=mode, max_retries=max_retries)
        self.n_samples = int(n_samples)
        self.n_tokens = int(n_tokens)
        self.n_steps = None if n_steps is None else int(n_steps)
        self.max_step = int(max_step)
        self.three_way = float(three_way)
        self.history_every = int(history_every) if history_every else max(1, math.ceil(self.n_samples / 20))
        self.next_index = 0
        self.done = 0
        self._chunk: list[float] = []
        self._best_index: int | None = None
        self._cache: dict[int, np.ndarray] = {}
        self.best_config = space.uniform()
        self.start = None if start is None else self._start_array(start, np.random.default_rng(self.seed))

    def sample(self, index: int) -> np.ndarray:
        """Sample `index` (deterministic in (seed, index)); sample 0 is the warm start if one was given."""
        if index == 0 and self.start is not None:
            return self.start
        arr = self._cache.get(index)
        if arr is None:
            rng = np.random.Generator(np.random.PCG64([self.seed, int(index)]))
            arr = self.space.random_feasible(rng, n_steps=self.n_steps, max_step=self.max_step,
                                             three_way=self.three_way, as_array=True)
            self._cache[index] = arr
        return arr

    def suggest(self, trial_id: str):
        if self.finished:
            return Searcher.FINISHED
        self._start_clock()
        idx = self.queue.hand_out(trial_id)  # a re-queued failure first
        if idx is None:
            if self.next_index >= self.n_samples:
                return None
            idx = self.queue.hand_out(trial_id, self.next_index)
            self.next_index += 1
        return self._trial_config(self.sample(idx), self.n_tokens, 0, 0)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        idx = self.queue.finish(trial_id)
        if idx is None:
            return
        f = self._fitness(result, error)
        if f is None:
            self.failures += 1
            if self.queue.retry(idx):
                return
            log.warning("random sample %d failed %d times; skipping it", idx, self.queue.retries[idx])
        else:
            self.evaluations += 1
            self.tokens += self._result_tokens(result, self.n_tokens)
            if self.best_fitness is None or (self._key(f), idx) < (self._key(self.best_fitness), self._best_index):
                self.best_fitness = float(f)
                self._best_index = idx
                self.best_config = self.space.array_to_config(self.sample(idx))
            self._chunk.append(float(f))
        self.queue.forget(idx)
        self._cache.pop(idx, None)
        self.done += 1
        if self._chunk and (len(self._chunk) >= self.history_every or self.done >= self.n_samples):
            self.history.append({
                "generation": len(self.history),
                "best_fitness": self.best_fitness,
                "median_fitness": float(np.median(self._chunk)),
                "evaluations": self.evaluations,
                "tokens": self.tokens,
                "wall_time": self.wall_time(),
                "failures": self.failures,
            })
            self._chunk = []
        if self.done >= self.n_samples:
            self.finished = True

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict:
        s = self._base_state()
        s.update({
            "settings": {"n_samples": self.n_samples, "n_tokens": self.n_tokens, "n_steps": self.n_steps,
                         "max_step": self.max_step, "three_way": self.three_way,
                         "history_every": self.history_every},
            "next_index": self.next_index,
            "done": self.done,
            "chunk": list(self._chunk),
            "best_index": self._best_index,
            "start": None if self.start is None else [int(x) for x in self.start],
        })
        return s

    def set_state(self, state: dict) -> None:
        self._set_base_state(state)
        st = state["settings"]
        self.n_samples = int(st["n_samples"])
        self.n_tokens = int(st["n_tokens"])
        self.n_steps = None if st.get("n_steps") is None else int(st["n_steps"])
        self.max_step = int(st.get("max_step", 4))
        self.three_way = float(st.get("three_way", 0.0))
        self.history_every = int(st["history_every"])
        self.next_index = int(state["next_index"])
        self.done = int(state["done"])
        self._chunk = [float(f) for f in state["chunk"]]
        self._best_index = state.get("best_index")
        start = state.get("start")
        self.start = None if start is None else np.asarray(start, dtype=np.int64)
        self._cache = {}
        if self.best_config is None:
            self.best_config = self.space.uniform()


def build(name, cfg, space, initial=None, state=None) -> RandomSearcher:
    """The registry's builder: the evaluation budget of search/registry.evaluation_budget."""
    from ..config import init_names
    from .registry import DEFAULT_INIT, evaluation_budget

    n, tokens = evaluation_budget(cfg)
    warm = init_names(cfg) != [DEFAULT_INIT]  # a schedule the user named; random takes at most one
    searcher = RandomSearcher(space, n_samples=n, n_tokens=tokens, seed=cfg.searcher.seed,
                              three_way=cfg.searcher.three_way, start=initial if warm else None)
    if state is not None:
        searcher.set_state(state)
    return searcher
