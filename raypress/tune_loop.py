"""One Ray Tune run of a searcher: trials are candidate evaluations on reused evaluator actors.

The Tuner gets the run's real search space (`trial.tune_space`, one `tune.randint` per layer) as
its param_space and the searcher as its search algorithm; every searcher checks that the two agree.
Callbacks forward the searcher's per-generation history to MLflow and save its state after every
finished trial (resume); a stopper ends the whole search at the first user error an evaluator
reports (trial.RESULT_KEY), which Tune would otherwise retry.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from . import interrupt, trial
from .errors import RayPressError
from .ray_env import resources


def atomic_write(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, default=str))
    os.replace(tmp, path)


PROGRESS_EVERY_S = 10.0  # at most one progress line this often (an EvoPress generation always gets one)
HEARTBEAT_S = 45.0  # a generation longer than this (big models, busy cores) gets in-progress lines too


def _clock(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _speed(done: int, total_evals: int, elapsed: float) -> tuple[float, float]:
    """(evaluations/s, seconds left at that rate; 0 when done or unknown)."""
    rate = done / max(elapsed, 1e-9)
    return rate, (total_evals - done) / rate if rate > 0 and total_evals > done else 0.0


def progress_line(h: dict, total_evals: int, generations: int | None, elapsed: float) -> str:
    """One line of a search's progress: where it is, its fitness, its speed and when it ends."""
    done = int(h.get("evaluations", 0))
    where = (f"gen {int(h.get('generation', 0)) + 1}/{generations}" if generations
             else f"eval {done}/{total_evals}")
    if "budget" in h:  # a pareto search: one EvoPress generation of one budget
        where = f"budget {h['budget']:g} gen {int(h.get('generation', 0)) + 1}/{h.get('generations', '?')}"
        generations = generations or h.get("generations")
    rate, eta = _speed(done, total_evals, elapsed)
    monitor = f"  elite KL (monitor) {h['elite_kl_monitor']:.4f}" if "elite_kl_monitor" in h else ""
    # an evolution's best is its last stage's winner, its median the first stage's offspring (fewer,
    # other tokens: the two are not comparable); random / Optuna: best so far, median of the last few
    best, median = ("gen best KL", "offspring median") if generations else ("best KL so far", "median")
    return (f"  {where}{monitor}  {best} {h.get('best_fitness', float('nan')):.4f}"
            f"  {median} {h.get('median_fitness', float('nan')):.4f}  {done}/{total_evals} evals  {rate:.2f} evals/s  "
            f"{int(h.get('tokens', 0)):,} tokens  {_clock(elapsed)} elapsed  ETA {_clock(eta)}")


# What a history entry's numbers are, by the kind of searcher (the README's "Reading the curves"):
# an evolution scores each generation on fresh tokens, so its generation best is noisy and only the
# monitor scores (one fixed batch) compare over time; random and Optuna score every candidate on the
# same tokens, so their best is a true best-so-far.
METRIC_NAMES = {
    True: {"best_fitness": "gen_best_kl", "median_fitness": "gen_median_kl",
           "elite_kl_monitor": "elite_kl_monitor", "best_kl_monitor": "best_kl_monitor"},
    False: {"best_fitness": "best_kl_so_far", "median_fitness": "recent_median_kl"},
}


def heartbeat_line(searcher, total_evals: int, generations: int | None, elapsed: float) -> str:
    """A line from inside a long generation (no history entry yet): evaluations so far, speed, ETA."""
    done = int(getattr(searcher, "evaluations", 0))
    gen = getattr(searcher, "generation", None)
    where = f"gen {int(gen) + 1}/{generations} running" if generations and gen is not None else f"eval {done}/{total_evals}"
    rate, eta = _speed(done, total_evals, elapsed)
    return (f"  {where}  {done}/{total_evals} evals  {rate:.2f} evals/s  {int(getattr(searcher, 'tokens', 0)):,} tokens  "
            f"{_clock(elapsed)} elapsed  ETA {_clock(eta) if done else '?'}")


def history_metrics(h: dict, generational: bool) -> dict:
    """A history entry as the MLflow metrics the README explains."""
    if "budget" in h:  # a pareto search: each budget's evolution has its own curves
        return {f"{v}_at_{h['budget']:g}": h[k] for k, v in METRIC_NAMES[True].items() if k in h} | {
            k: h[k] for k in ("evaluations", "tokens") if k in h}
    names = METRIC_NAMES[generational]
    m = {names[k]: h[k] for k in names if k in h}
    m.update({k: h[k] for k in ("evaluations", "tokens") if k in h})
    m["evaluations_per_s"] = h.get("evaluations", 0) / max(h.get("wall_time", 0.0), 1e-9)
    return m


def generation_logger(searcher, tracker, t0: float, total_evals: int = 0, generations: int | None = None):
    """Tune callback: forwards the searcher's per-generation summaries to MLflow, and prints a progress
    line (logger "raypress.progress": every EvoPress generation, else at most every PROGRESS_EVERY_S)."""
    import logging

    from ray import tune

    log = logging.getLogger("raypress.progress")

    class GenerationLogger(tune.Callback):
        last = 0.0
        references_logged = False

        def _flush(self, final: bool = False):
            if interrupt.pending() is not None:  # what ran after a stop request is not the searcher's history
                return
            monitor = getattr(searcher, "monitor", None)
            if monitor and not self.references_logged:  # the plot's reference lines, on the monitor batch
                tracker.log_metrics({f"{k}_kl_monitor": v for k, v in monitor.items()}, step=0)
                self.references_logged = True
            new = searcher.pop_new_history()
            for i, h in enumerate(new):
                tracker.log_metrics(history_metrics(h, bool(generations)), step=int(h.get("generation", 0)))
                now = time.time()
                if generations or now - self.last >= PROGRESS_EVERY_S or (final and i == len(new) - 1):
                    log.info(progress_line(h, total_evals, generations, now - t0))
                    self.last = now

        def on_step_end(self, iteration, trials, **info):
            now = time.time()
            if now - max(self.last, t0) >= HEARTBEAT_S and interrupt.pending() is None:
                log.info(heartbeat_line(searcher, total_evals, generations, now - t0))
                self.last = now

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._flush()

        def on_trial_error(self, iteration, trials, trial, **info):
            self._flush()

        def on_experiment_end(self, trials, **info):
            self._flush(final=True)

    return GenerationLogger()


def state_saver(searcher, path: Path, base: dict):
    """Tune callback: persists the searcher state after every finished trial (for --resume)."""
    from ray import tune

    class StateSaver(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if interrupt.pending() is None:  # trials ended by a stop request were not evaluated
                atomic_write(path, {**base, "searcher": searcher.get_state()})

        on_trial_error = on_trial_complete

    return StateSaver()


def _user_error_stopper():
    """Tune stopper: ends the whole search on the first result carrying trial.RESULT_KEY (a user error
    such as GPU out of memory, reported by the evaluator instead of raised so it is not retried)."""
    from ray import tune

    class Stopper(tune.Stopper):
        error: str | None = None

        def __call__(self, trial_id, result):
            if result.get(trial.RESULT_KEY):
                self.error = self.error or str(result[trial.RESULT_KEY])
                return True
            return False

        def stop_all(self):
            return self.error is not None or interrupt.pending() is not None

    return Stopper()


def _batched(cfg, info, searcher, num_samples: int, n_eval: int):
    """Several candidates per Tune trial (evaluator.candidates_per_trial; search/batched.py)."""
    from .search.batched import BatchedSearcher, candidates_per_trial

    g = candidates_per_trial(cfg.evaluator.candidates_per_trial, info.batched, cfg.searcher.offspring, n_eval)
    if g <= 1:
        return searcher, num_samples
    return BatchedSearcher(searcher, g, limit=num_samples if num_samples > 0 else None), -1


def run_tune(cfg, info, spec, searcher, space, callbacks: list, name: str):
    """Drive `searcher` (registry entry `info`) through Ray Tune until it is finished.

    Tune's own files (a folder per trial, its experiment and searcher state) go to a temporary folder
    deleted at the end: a resume restarts Tune from the searcher state in the run folder
    (raypress_state.json, written after every trial by `state_saver`), and MLflow is the record, so
    Tune's files would only be litter (hundreds of empty trial folders, megabytes of state)."""
    import shutil
    import tempfile

    from ray import tune

    from .evaluator import make_trainable

    n_eval, res = resources(cfg)
    stopper = _user_error_stopper()
    num_samples = getattr(searcher, "num_samples", -1)  # -1: the searcher says when it is finished
    if num_samples == 0:  # a resume whose budget was already spent (killed after its last trial)
        return None
    searcher, num_samples = _batched(cfg, info, searcher, num_samples, n_eval)
    storage = Path(tempfile.mkdtemp(prefix="raypress-tune-"))
    tuner = tune.Tuner(
        make_trainable(spec, res),
        param_space=trial.tune_space(space),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            metric=trial.METRIC,
            mode="min",
            num_samples=num_samples,
            max_concurrent_trials=n_eval,
            reuse_actors=True,
            # layer names make Tune's default trial names hundreds of characters long
            trial_name_creator=lambda t: f"trial_{t.trial_id}",
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(storage.resolve()),
            callbacks=callbacks,
            verbose=0,
            stop=stopper,
            # a dead evaluator actor only costs a retry of its candidate, never a generation
            failure_config=tune.FailureConfig(max_failures=3),
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False, checkpoint_frequency=0),
        ),
    )
    try:
        with interrupt.graceful():  # a first Ctrl-C / SIGTERM stops the trials, then raises Interrupted
            results = tuner.fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if stopper.error:
        raise RayPressError(stopper.error)
    return results
