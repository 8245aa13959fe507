"""EvoPress (Sieberling et al., 2024) as a Ray Tune Searcher.

(1+λ) evolution over {layer: level} configs with exact budget preservation:

- each generation the parent spawns `offspring` distinct children (distinct from each other
  and from the parent); a child applies k level switches (k ~ U{1..max_mutations}), each one
  layer up a levels and another down b levels with exactly equal cost change (space.mutate);
- multi-step selection: stage s evaluates every remaining candidate on stages[s].tokens fresh
  calibration tokens (the trial config carries _rp_tokens/_rp_generation/_rp_stage/_rp_seed,
  so every candidate of a stage sees the same tokens) and keeps the best stages[s].survivors;
- the parent is a stage-0 candidate (elitism) and is re-measured on the same tokens as its
  children, so comparisons are fair; the winner of the last stage becomes the next parent.

`suggest` hands out the current stage's candidates one at a time, returns None while the stage
waits for results, and Searcher.FINISHED after the last generation. A failed trial (error, or
no result) re-queues its candidate, so no generation is lost. Plain Python: drive it by hand
(tests) or through Tune (`TuneConfig(search_alg=EvoPressSearcher(space), metric="fitness",
mode="min")`, no param_space).
"""
from __future__ import annotations

import logging
import math

import numpy as np
from ray.tune.search import Searcher

from .. import trial
from ..errors import RayPressError
from .base import RayPressSearcher, _num

log = logging.getLogger("raypress")


def _check_stages(stages) -> list[tuple[int, int]]:
    try:
        out = [(int(t), int(s)) for t, s in stages]
    except (TypeError, ValueError):
        raise RayPressError(f"stages must be a list of (tokens, survivors) pairs, got {stages!r}") from None
    if not out or any(t <= 0 or s <= 0 for t, s in out):
        raise RayPressError(f"stages must be non-empty (tokens, survivors) pairs of positive integers, got {stages!r}")
    return out


class EvoPressSearcher(RayPressSearcher):
    kind = "evopress"

    def __init__(self, space, *, generations: int = 20, offspring: int = 16,
                 stages=((512, 4), (2048, 1)), max_mutations: int = 3, seed: int = 0,
                 initial: dict | None = None, metric: str = "fitness", mode: str = "min",
                 max_step: int = 4, three_way: float = 0.0, max_retries: int = 3, monitor_every: int = 0):
        if int(generations) < 1 or int(offspring) < 1:
            raise RayPressError("generations and offspring must be >= 1 (e.g. generations=20, offspring=16)")
        if int(max_mutations) < 1:
            raise RayPressError("max_mutations must be >= 1 (level switches per offspring)")
        if int(monitor_every) < 0:
            raise RayPressError(f"searcher.monitor_every must be >= 0 (0: no monitoring), got {monitor_every}")
        super().__init__(space, seed=seed, metric=metric, mode=mode, max_retries=max_retries)
        self.generations = int(generations)
        self.offspring = int(offspring)
        self.stages = _check_stages(stages)
        self.max_mutations = int(max_mutations)
        self.max_step = int(max_step)
        self.three_way = float(three_way)
        # several starts (searcher.init: [uniform, dp]): the first generation scores them all beside the
        # first one's offspring, and multi-step selection keeps the best as the parent
        starts = [space.uniform()] if initial is None else list(initial) if isinstance(initial, list) else [initial]
        arrs = []
        for start in starts:
            arr = self._start_array(start, self.rng)
            if not any(np.array_equal(arr, a) for a in arrs):
                arrs.append(arr)
        parent, self._starts = arrs[0], arrs[1:]
        self.parent = parent
        self.parent_fitness: float | None = None
        self.best_config = space.array_to_config(parent)
        self.generation = 0
        self.stage = 0
        self._stage0: list[float] = []
        # Monitoring: every stage scores on fresh tokens, so a generation's best is noisy and its curve
        # goes up and down. Every `monitor_every` generations the elite is also scored on one fixed
        # batch (the last stage's size, trial.MONITOR_GENERATION): that curve is comparable over time.
        # The start config and the uniform one are scored on it first (the plot's reference lines).
        # Monitor evaluations are not part of the selection budget (`evaluations`).
        self.monitor_every = int(monitor_every)
        self.monitor: dict[str, float] = {}  # "start" / "uniform": their KL on the monitor batch
        self.monitor_evaluations = 0
        self._pending: dict | None = None  # a finished generation's history entry waiting for its monitor KL
        if self.monitor_every:
            uniform = space.config_to_array(space.uniform())
            self._set_monitor([parent] + ([uniform] if not np.array_equal(uniform, parent) else []))
        else:
            self._start_generation()

    # ------------------------------------------------------------------ generation bookkeeping
    def _start_generation(self) -> None:
        sp = self.space
        cands = [self.parent.copy()] + ([a.copy() for a in self._starts] if self.generation == 0 else [])
        seen = {c.tobytes() for c in cands}
        n_fixed = len(cands)
        attempts, limit = 0, 50 * self.offspring + 100
        while len(cands) < self.offspring + n_fixed and attempts < limit:
            attempts += 1
            child = self.parent.copy()
            n = int(self.rng.integers(1, self.max_mutations + 1))
            stuck = False
            for _ in range(n):
                try:
                    sp.switch_(child, self.rng, self.max_step, self.three_way)
                except RayPressError:
                    stuck = len(cands) == 1 and np.array_equal(child, self.parent)
                    break
            if stuck:  # not one budget-preserving switch from the parent: it is the only reachable config
                log.warning("no budget-preserving level switch exists from the start config (max_step=%d): it is "
                            "the only config this search can reach, so the search keeps it", self.max_step)
                self.finished = True
                self._set_candidates([])
                return
            key = child.tobytes()
            if key in seen:
                continue
            seen.add(key)
            cands.append(child)
        if len(cands) < self.offspring + n_fixed:
            log.warning("generation %d: only %d distinct offspring found (asked for %d); the space is small",
                        self.generation, len(cands) - n_fixed, self.offspring)
        self._set_candidates(cands)
        self._stage0 = []

    def _set_candidates(self, cands: list[np.ndarray]) -> None:
        self.cands = cands
        self.fit: list[float | None] = [None] * len(cands)
        self.queue.reset(range(len(cands)))

    @property
    def monitoring(self) -> bool:
        return self.stage == len(self.stages)

    def _set_monitor(self, cands: list[np.ndarray]) -> None:
        self.stage = len(self.stages)
        self._set_candidates(cands)

    @property
    def stage_tokens(self) -> int:
        return self.stages[min(self.stage, len(self.stages) - 1)][0]  # monitoring: the last stage's size

    def candidates(self) -> list[dict]:
        """The current stage's candidates (stage 0: parent first, then the offspring)."""
        return [self.space.array_to_config(c) for c in self.cands]

    # ------------------------------------------------------------------ Searcher API
    def suggest(self, trial_id: str):
        if self.finished:
            return Searcher.FINISHED
        self._start_clock()
        idx = self.queue.hand_out(trial_id)
        if idx is None:
            return None  # waiting for this stage's results
        if self.monitoring:
            return self._trial_config(self.cands[idx], self.stage_tokens, trial.MONITOR_GENERATION, 0)
        return self._trial_config(self.cands[idx], self.stage_tokens, self.generation, self.stage)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        idx = self.queue.finish(trial_id)
        if idx is None:
            return  # not ours (or from before a restore): nothing to do
        f = self._fitness(result, error)
        if f is None:
            self.failures += 1
            if self.queue.retry(idx):  # re-queued: retried next, no generation lost
                return
            log.warning("generation %d stage %d: candidate %d failed %d times; scoring it as worst",
                        self.generation, self.stage, idx, self.queue.retries[idx])
            f = math.inf * self.sign
        elif self.monitoring:
            self.monitor_evaluations += 1
        else:
            self.evaluations += 1
            self.tokens += self._result_tokens(result, self.stage_tokens)
        self.fit[idx] = f
        self._maybe_advance()

    def _maybe_advance(self) -> None:
        if not self.queue.idle:
            return
        if self.monitoring:
            self._monitored()
            return
        order = np.argsort([self._key(f) for f in self.fit], kind="stable")  # ties: earlier candidate wins
        if self.stage == 0:
            self._stage0 = [float(f) for f in self.fit]
        survivors = self.stages[self.stage][1]
        keep = [int(i) for i in order[:survivors]]
        if self.stage + 1 < len(self.stages):
            self.stage += 1
            self._set_candidates([self.cands[i] for i in keep])
            return
        w = keep[0]
        self.parent = self.cands[w].copy()
        self.parent_fitness = float(self.fit[w])
        self.best_config = self.space.array_to_config(self.parent)
        self.best_fitness = self.parent_fitness
        entry = {
            "generation": self.generation,
            "best_fitness": self.best_fitness,  # on this generation's last-stage tokens: noisy
            "median_fitness": float(np.median(self._stage0)),
            "evaluations": self.evaluations,
            "tokens": self.tokens,
            "wall_time": self.wall_time(),
            "failures": self.failures,
        }
        self.generation += 1
        if self.monitor_every and (self.generation % self.monitor_every == 0 or self.generation >= self.generations):
            self._pending = entry
            self._set_monitor([self.parent])
            return
        self.history.append(entry)
        self._next_generation()

    def _monitored(self) -> None:
        """The monitor batch's scores are in: the start references, or the elite's after a generation."""
        f = [float(x) for x in self.fit]
        if self._pending is None:  # before generation 0: the start config, then uniform when it differs
            self.monitor = {"start": f[0], "uniform": f[1] if len(f) > 1 else f[0]}
            self.stage = 0
            self._start_generation()
            return
        best = min([h["elite_kl_monitor"] for h in self.history if "elite_kl_monitor" in h] + [f[0]], key=self._key)
        self.history.append({**self._pending, "elite_kl_monitor": f[0], "best_kl_monitor": best,
                             "start_kl_monitor": self.monitor.get("start"),
                             "wall_time": self.wall_time(), "monitor_evaluations": self.monitor_evaluations})
        self._pending = None
        self._next_generation()

    def _next_generation(self) -> None:
        self.stage = 0
        if self.generation >= self.generations:
            self.finished = True
            self._set_candidates([])
        else:
            self._start_generation()

    # ------------------------------------------------------------------ state
    def get_state(self) -> dict:
        s = self._base_state()
        s.update({
            "settings": {"generations": self.generations, "offspring": self.offspring,
                         "stages": [list(x) for x in self.stages], "max_mutations": self.max_mutations,
                         "max_step": self.max_step, "three_way": self.three_way,
                         "monitor_every": self.monitor_every},
            "generation": self.generation,
            "stage": self.stage,
            "parent": self.parent.tolist(),
            "parent_fitness": _num(self.parent_fitness),
            "candidates": [c.tolist() for c in self.cands],
            "fitness": [_num(f) for f in self.fit],
            "stage0": list(self._stage0),
            "monitor": dict(self.monitor),
            "monitor_evaluations": self.monitor_evaluations,
            "monitor_pending": self._pending,
        })
        return s

    def set_state(self, state: dict) -> None:
        self._set_base_state(state)
        st = state["settings"]
        self.generations = int(st["generations"])
        self.offspring = int(st["offspring"])
        self.stages = _check_stages(st["stages"])
        self.max_mutations = int(st["max_mutations"])
        self.max_step = int(st.get("max_step", 4))
        self.three_way = float(st.get("three_way", 0.0))
        self.generation = int(state["generation"])
        self.stage = int(state["stage"])
        self.parent = np.asarray(state["parent"], dtype=np.int64)
        self.parent_fitness = state.get("parent_fitness")
        self.cands = [np.asarray(c, dtype=np.int64) for c in state["candidates"]]
        self.fit = [None if f is None else float(f) for f in state["fitness"]]
        self._stage0 = [float(f) for f in state.get("stage0", [])]
        self.monitor_every = int(st.get("monitor_every", 0))
        self.monitor = {k: float(v) for k, v in state.get("monitor", {}).items()}
        self.monitor_evaluations = int(state.get("monitor_evaluations", 0))
        self._pending = state.get("monitor_pending")


def build(name, cfg, space, initial=None, state=None) -> EvoPressSearcher:
    """The registry's builder (search/registry.py)."""
    s = cfg.searcher
    searcher = EvoPressSearcher(space, generations=s.generations, offspring=s.offspring,
                                stages=[tuple(x) for x in s.stages], max_mutations=s.max_mutations, seed=s.seed,
                                initial=initial, three_way=s.three_way, monitor_every=s.monitor_every)
    if state is not None:
        searcher.set_state(state)
    return searcher
