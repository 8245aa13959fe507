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
                 max_step: int = 4, three_way: float = 0.0, max_retries: int = 3):
        if int(generations) < 1 or int(offspring) < 1:
            raise RayPressError("generations and offspring must be >= 1 (e.g. generations=20, offspring=16)")
        if int(max_mutations) < 1:
            raise RayPressError("max_mutations must be >= 1 (level switches per offspring)")
        super().__init__(space, seed=seed, metric=metric, mode=mode, max_retries=max_retries)
        self.generations = int(generations)
        self.offspring = int(offspring)
        self.stages = _check_stages(stages)
        self.max_mutations = int(max_mutations)
        self.max_step = int(max_step)
        self.three_way = float(three_way)
        if initial is not None:
            parent = space.config_to_array(initial)
            if space._cost_arr(parent) != space.budget:
                log.warning("initial config is off budget (mean value %.4g vs target %g); repairing it",
                            space._mean_arr(parent), space.target)
                parent = space.config_to_array(space.repair(parent, self.rng))
        else:
            parent = space.config_to_array(space.uniform())
        self.parent = parent
        self.parent_fitness: float | None = None
        self.best_config = space.array_to_config(parent)
        self.generation = 0
        self.stage = 0
        self._stage0: list[float] = []
        self._start_generation()

    # ------------------------------------------------------------------ generation bookkeeping
    def _start_generation(self) -> None:
        sp = self.space
        cands = [self.parent.copy()]
        seen = {self.parent.tobytes()}
        attempts, limit = 0, 50 * self.offspring + 100
        while len(cands) < self.offspring + 1 and attempts < limit:
            attempts += 1
            child = self.parent.copy()
            n = int(self.rng.integers(1, self.max_mutations + 1))
            for _ in range(n):
                try:
                    sp._switch(child, self.rng, self.max_step, self.three_way)
                except RayPressError:
                    if len(cands) == 1 and np.array_equal(child, self.parent):
                        raise RayPressError(
                            "evolution cannot mutate the parent: no budget-preserving level switch exists "
                            f"(max_step={self.max_step}); use a finer level ladder, a larger max_step or another target"
                        ) from None
                    break
            key = child.tobytes()
            if key in seen:
                continue
            seen.add(key)
            cands.append(child)
        if len(cands) < self.offspring + 1:
            log.warning("generation %d: only %d distinct offspring found (asked for %d); the space is small",
                        self.generation, len(cands) - 1, self.offspring)
        self._set_candidates(cands)
        self._stage0 = []

    def _set_candidates(self, cands: list[np.ndarray]) -> None:
        self.cands = cands
        self.fit: list[float | None] = [None] * len(cands)
        self.retries = [0] * len(cands)
        self.pending: list[int] = list(range(len(cands)))
        self.in_flight: dict[str, int] = {}

    @property
    def stage_tokens(self) -> int:
        return self.stages[self.stage][0]

    @property
    def parent_config(self) -> dict:
        return self.space.array_to_config(self.parent)

    def candidates(self) -> list[dict]:
        """The current stage's candidates (stage 0: parent first, then the offspring)."""
        return [self.space.array_to_config(c) for c in self.cands]

    # ------------------------------------------------------------------ Searcher API
    def suggest(self, trial_id: str):
        if self.finished:
            return Searcher.FINISHED
        self._start_clock()
        if not self.pending:
            return None  # waiting for this stage's results
        idx = self.pending.pop(0)
        self.in_flight[str(trial_id)] = idx
        return self._trial_config(self.cands[idx], self.stage_tokens, self.generation, self.stage)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        idx = self.in_flight.pop(str(trial_id), None)
        if idx is None:
            return  # not ours (or from before a restore): nothing to do
        f = self._fitness(result, error)
        if f is None:
            self.failures += 1
            self.retries[idx] += 1
            if self.retries[idx] <= self.max_retries:
                self.pending.insert(0, idx)  # re-queued: retried next, no generation lost
                return
            log.warning("generation %d stage %d: candidate %d failed %d times; scoring it as worst",
                        self.generation, self.stage, idx, self.retries[idx])
            f = math.inf * self.sign
        else:
            self.evaluations += 1
            self.tokens += self._result_tokens(result, self.stage_tokens)
        self.fit[idx] = f
        self._maybe_advance()

    def _maybe_advance(self) -> None:
        if self.pending or self.in_flight:
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
        self.history.append({
            "generation": self.generation,
            "best_fitness": self.best_fitness,
            "median_fitness": float(np.median(self._stage0)),
            "evaluations": self.evaluations,
            "tokens": self.tokens,
            "wall_time": self.wall_time(),
            "failures": self.failures,
        })
        self.generation += 1
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
                         "max_step": self.max_step, "three_way": self.three_way},
            "generation": self.generation,
            "stage": self.stage,
            "parent": self.parent.tolist(),
            "parent_fitness": _num(self.parent_fitness),
            "candidates": [c.tolist() for c in self.cands],
            "fitness": [_num(f) for f in self.fit],
            "retries": list(self.retries),
            "pending": list(self.pending),
            "in_flight": [[t, i] for t, i in self.in_flight.items()],
            "stage0": list(self._stage0),
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
        self.retries = [int(r) for r in state["retries"]]
        # trials in flight at save time died with the old Tune run: hand them out again first
        self.pending = [int(i) for _, i in state["in_flight"]] + [int(i) for i in state["pending"]]
        self.in_flight = {}
        self._stage0 = [float(f) for f in state.get("stage0", [])]
