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
            if not space.is_feasible(parent):
                log.warning("initial config is off budget (mean value %.4g vs target %g); repairing it",
                            space.mean_value(parent), space.target)
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
        if len(cands) < self.offspring + 1:
            log.warning("generation %d: only %d distinct offspring found (asked for %d); the space is small",
                        self.generation, len(cands) - 1, self.offspring)
        self._set_candidates(cands)
        self._stage0 = []

    def _set_candidates(self, cands: list[np.ndarray]) -> None:
        self.cands = cands
        self.fit: list[float | None] = [None] * len(cands)
        self.queue.reset(range(len(cands)))

    @property
    def stage_tokens(self) -> int:
        return self.stages[self.stage][0]

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
        else:
            self.evaluations += 1
            self.tokens += self._result_tokens(result, self.stage_tokens)
        self.fit[idx] = f
        self._maybe_advance()

    def _maybe_advance(self) -> None:
        if not self.queue.idle:
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
        self._stage0 = [float(f) for f in state.get("stage0", [])]


def build(name, cfg, space, initial=None, state=None) -> EvoPressSearcher:
    """The registry's builder (search/registry.py)."""
    s = cfg.searcher
    searcher = EvoPressSearcher(space, generations=s.generations, offspring=s.offspring,
                                stages=[tuple(x) for x in s.stages], max_mutations=s.max_mutations, seed=s.seed,
                                initial=initial, three_way=s.three_way)
    if state is not None:
        searcher.set_state(state)
    return searcher
