"""Shared plumbing for RayPress's own Tune searchers (EvoPress, random).

Plain Python behind the Ray Tune `Searcher` interface: `suggest` / `on_trial_complete` can be
driven by hand (tests) or by Tune. State is JSON (get_state/set_state/save/restore): configs as
level lists in `space.layers` order, the numpy Generator's bit_generator state, counters, history.
Trials that were in flight when a state was saved are re-queued on restore (their results died
with the old Tune run), so a restored searcher finishes the same generation with the same tokens.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
from ray.tune.search import Searcher

from .. import trial
from ..errors import RayPressError
from ..atomic import atomic_write

log = logging.getLogger("raypress")


def make_rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(int(seed)))


def rng_state(rng: np.random.Generator) -> dict:
    return json.loads(json.dumps(rng.bit_generator.state))


def set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state


def _num(x):
    """JSON-friendly float (inf/nan kept as floats; json handles them)."""
    return None if x is None else float(x)


class RetryQueue:
    """A searcher's candidates by index: waiting (re-queued failures first), in flight (by trial id)
    and failure counts. A failed trial re-queues its candidate up to `max_retries` times, so a
    crashed evaluator never costs a generation; a restored queue hands the trials that were in
    flight at save time out first (their results died with the old Tune run)."""

    def __init__(self, max_retries: int = 3):
        self.max_retries = int(max_retries)
        self.reset()

    def reset(self, indices=()) -> None:
        self.pending: list[int] = [int(i) for i in indices]
        self.in_flight: dict[str, int] = {}
        self.retries: dict[int, int] = {}

    def hand_out(self, trial_id: str, index: int | None = None) -> int | None:
        """The next waiting candidate (or `index`) now runs as `trial_id`; None when none waits."""
        if index is None:
            if not self.pending:
                return None
            index = self.pending.pop(0)
        self.in_flight[str(trial_id)] = int(index)
        return int(index)

    def finish(self, trial_id: str) -> int | None:
        """The candidate trial `trial_id` ran (None: not ours, e.g. from before a restore)."""
        return self.in_flight.pop(str(trial_id), None)

    def retry(self, index: int) -> bool:
        """Count a failure; True when the candidate was re-queued (False: it has failed too often)."""
        n = self.retries[index] = self.retries.get(index, 0) + 1
        if n <= self.max_retries:
            self.pending.insert(0, index)
            return True
        return False

    def forget(self, index: int) -> None:
        self.retries.pop(index, None)

    @property
    def idle(self) -> bool:
        return not self.pending and not self.in_flight

    def state(self) -> dict:
        return {"pending": list(self.pending), "in_flight": [[t, i] for t, i in self.in_flight.items()],
                "retries": [[i, n] for i, n in self.retries.items()]}

    def restore(self, state: dict) -> None:
        self.pending = [int(i) for _, i in state["in_flight"]] + [int(i) for i in state["pending"]]
        self.in_flight = {}
        r = state.get("retries", [])
        if r and not isinstance(r[0], (list, tuple)):  # states written before the queue: one count per index
            r = [[i, n] for i, n in enumerate(r) if n]
        self.retries = {int(i): int(n) for i, n in r}


class RayPressSearcher(Searcher):
    """Base: space, seed, metric/mode, trial-config building, result parsing, history, JSON state."""

    kind = "base"

    def __init__(self, space, *, seed: int = 0, metric: str = trial.METRIC, mode: str = "min", max_retries: int = 3):
        if mode not in ("min", "max"):
            raise RayPressError(f"mode must be 'min' or 'max', got {mode!r}")
        super().__init__(metric=metric, mode=mode)
        self.space = space
        self.seed = int(seed)
        self.max_retries = int(max_retries)
        self.queue = RetryQueue(max_retries)
        self.rng = make_rng(self.seed)
        self.history: list[dict] = []
        self._history_sent = 0
        self.best_config: dict | None = None
        self.best_fitness: float | None = None
        self.evaluations = 0
        self.tokens = 0
        self.failures = 0
        self._elapsed_before = 0.0
        self._t0: float | None = None
        self.finished = False

    def _start_array(self, config, rng) -> np.ndarray:
        """A warm start as a level array on the budget: repaired (with a warning) when it is off it."""
        arr = self.space.config_to_array(config)
        if self.space.is_feasible(arr):
            return arr
        log.warning("initial config is off budget (mean value %.4g vs target %g); repairing it",
                    self.space.mean_value(arr), self.space.target)
        return self.space.config_to_array(self.space.repair(arr, rng))

    # ------------------------------------------------------------------ Tune hooks
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        """Accept Tune's metric/mode and its param_space, which must be our space (trial.tune_space)."""
        trial.check_tune_space(self.space, config)
        if metric:
            self._metric = metric
        if mode:
            if mode not in ("min", "max"):
                return False
            self._mode = mode
        return True

    @property
    def sign(self) -> float:
        return 1.0 if (self._mode or "min") == "min" else -1.0

    def _start_clock(self):
        if self._t0 is None:
            self._t0 = time.monotonic()

    def wall_time(self) -> float:
        return self._elapsed_before + (time.monotonic() - self._t0 if self._t0 is not None else 0.0)

    def _trial_config(self, arr: np.ndarray, tokens: int, generation: int, stage: int) -> dict:
        return trial.trial_config(self.space.array_to_config(arr), tokens=tokens, generation=generation,
                                  stage=stage, seed=self.seed)

    def _fitness(self, result, error: bool) -> float | None:
        """Metric of a finished trial, or None when the trial failed (error / no result / no metric).
        NaN fitness counts as the worst possible (+inf in min mode)."""
        if error or not result or result.get(trial.RESULT_KEY):  # a user error: the search stops
            return None
        v = result.get(self._metric or "fitness")
        if v is None:
            return None
        try:
            v = float(v)
        except (TypeError, ValueError):
            return None
        if math.isnan(v):
            return math.inf if self.sign > 0 else -math.inf
        return v

    @staticmethod
    def _result_tokens(result, default: int) -> int:
        """Tokens the trial reports having used (falls back to what it was asked for)."""
        tok = result.get("tokens") if isinstance(result, dict) else None
        try:
            tok = float(tok)
        except (TypeError, ValueError):
            return int(default)
        return int(tok) if math.isfinite(tok) and tok >= 0 else int(default)

    def _key(self, f: float) -> float:
        """Sort key: smaller is better."""
        return self.sign * f

    # ------------------------------------------------------------------ history
    def pop_new_history(self) -> list[dict]:
        new = self.history[self._history_sent:]
        self._history_sent = len(self.history)
        return [dict(h) for h in new]

    # ------------------------------------------------------------------ state
    def _base_state(self) -> dict:
        return {
            "kind": self.kind,
            "version": 1,
            "space": self.space.fingerprint(),
            "seed": self.seed,
            "metric": self._metric,
            "mode": self._mode,
            "max_retries": self.max_retries,
            "rng": rng_state(self.rng),
            "history": [dict(h) for h in self.history],
            "history_sent": self._history_sent,
            "best_config": None if self.best_config is None else [int(self.best_config[l]) for l in self.space.layers],
            "best_fitness": _num(self.best_fitness),
            "evaluations": self.evaluations,
            "tokens": self.tokens,
            "failures": self.failures,
            "elapsed": self.wall_time(),
            "finished": self.finished,
            **self.queue.state(),
        }

    def _set_base_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("kind") != self.kind:
            got = state.get("kind") if isinstance(state, dict) else type(state).__name__
            raise RayPressError(f"saved searcher state is for '{got}', not '{self.kind}'; resume with the same searcher")
        if state.get("space") != self.space.fingerprint():
            raise RayPressError(
                "saved searcher state belongs to a different search space (layers/levels/target changed); "
                "resume with the original config or start a new search"
            )
        self.seed = int(state["seed"])
        self._metric = state.get("metric") or self._metric
        self._mode = state.get("mode") or self._mode
        self.max_retries = int(state.get("max_retries", self.max_retries))
        self.queue = RetryQueue(self.max_retries)
        self.queue.restore(state)
        self.rng = make_rng(self.seed)
        set_rng_state(self.rng, state["rng"])
        self.history = [dict(h) for h in state["history"]]
        self._history_sent = int(state["history_sent"])
        bc = state.get("best_config")
        self.best_config = None if bc is None else self.space.array_to_config(np.asarray(bc, dtype=np.int64))
        self.best_fitness = state.get("best_fitness")
        self.evaluations = int(state["evaluations"])
        self.tokens = int(state["tokens"])
        self.failures = int(state.get("failures", 0))
        self._elapsed_before = float(state.get("elapsed", 0.0))
        self._t0 = None
        self.finished = bool(state.get("finished", False))

    def get_state(self) -> dict:
        raise NotImplementedError

    def set_state(self, state: dict) -> None:
        raise NotImplementedError

    def save(self, checkpoint_path) -> None:
        """JSON state file (atomic: written next to the path, then renamed)."""
        atomic_write(checkpoint_path, self.get_state(), default=None)  # a state JSON cannot hold is a bug: raise

    def restore(self, checkpoint_path) -> None:
        path = Path(checkpoint_path)
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise RayPressError(f"cannot read searcher state {path} ({e}); resume from an intact state file") from None
        self.set_state(state)
