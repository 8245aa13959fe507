"""One Ray Tune run of a searcher: trials are candidate evaluations, lent to the evaluator actors of
a pool (raypress.pool) that lives as long as the search.

The Tuner gets the run's real search space (`trial.tune_space`, one `tune.randint` per layer) as
its param_space and the searcher as its search algorithm; every searcher checks that the two agree.
Callbacks forward the searcher's per-generation history to MLflow and save its state after every
finished trial (resume); a stopper ends the whole search at the first user error an evaluator
reports (trial.RESULT_KEY), which Tune would otherwise retry.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from . import interrupt, trial
from .errors import RayPressError
from .atomic import atomic_write


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


# The resume state is written at most this often, and when the search ends or stops: a driver killed
# outright loses at most this much scoring, which --resume re-runs (the state it resumes from is a
# consistent earlier one). Written after every trial it cost 1.4-2.2 ms per trial on a SmolLM2-sized
# EvoPress search (JSON of a growing history, then a file replace), ~5% of a 25 ms candidate.
# RAYPRESS_SAVE_EVERY_S=0 writes it after every trial again.
SAVE_EVERY_S = float(os.environ.get("RAYPRESS_SAVE_EVERY_S", 1.0))


def state_saver(searcher, path: Path, base: dict):
    """Tune callback: persists the searcher state for --resume, as it was after the last trial that was
    scored, at most every SAVE_EVERY_S; its `write()` saves the last one when the search ends."""
    from ray import tune

    class StateSaver(tune.Callback):
        snapshot, last = None, float("-inf")

        def on_trial_complete(self, iteration, trials, trial, **info):
            # trials ended by a stop request were not scored: the searcher has re-queued them, counting
            # a failure, so the state to keep is the one before them
            if interrupt.pending() is None:
                self.snapshot = searcher.get_state()
                if time.monotonic() - self.last >= SAVE_EVERY_S:
                    self.write()

        on_trial_error = on_trial_complete

        def write(self):
            """The last snapshot to the state file (the runner calls it however the search ends)."""
            if self.snapshot is not None:
                atomic_write(path, {**base, "searcher": self.snapshot})
                self.snapshot, self.last = None, time.monotonic()

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


MAX_FAILURES = 3  # Tune's retries of a trial whose actor crashed (a node lost, a killed process)
CRASH_LOOP = 3  # trials failing in a row, each after Tune's retries, end the search: one more will not help


def _crash_loop_guard(stopper, limit: int = CRASH_LOOP):
    """Tune callback: a failed trial's candidate is queued again (no generation is lost), so a failure
    that repeats for every trial (a worker that cannot import RayPress, a crash at every call) would
    retry forever. `limit` failures in a row, with no success between them, stop the search with
    the last failure's first line."""
    from ray import tune

    class Guard(tune.Callback):
        failed, last = 0, None

        def on_trial_error(self, iteration, trials, trial, **info):
            self.failed += 1
            self.last = _trial_error(trial) or self.last
            if self.failed >= limit and stopper.error is None:
                stopper.error = (
                    f"{self.failed} trials in a row failed, each after {MAX_FAILURES} retries (the last error "
                    f"recorded: {self.last or 'none'}); fix what the Ray workers' logs (logs/worker-*.err in the "
                    "Ray session folder) say, then continue with `raypress search --resume`")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.failed, self.last = 0, None

    return Guard()


def _trial_error(trial) -> str | None:
    """'Type: message' of what a failed trial raised, or None. Tune's callback is not handed the
    exception; Tune has just appended it, as text and in this thread, to the trial's driver-side error
    file, which is read here. Not `trial.get_pickled_error()`: it unpickles (never done here on files we
    did not write: raypress.safe_pickle) the copy in the storage folder, which a background sync can
    leave half-written (CI read it empty: `EOFError`); an error raised in a Tune callback would end the
    whole search with a traceback instead of the crash-loop line."""
    import re

    try:
        text = Path(trial.error_file).read_text(errors="replace")
    except (OSError, TypeError):  # no file kept for it (TypeError: no error_file at all)
        return None
    block = text.rsplit("Failure # ", 1)[-1].splitlines()[1:]  # the last failure, less its header
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", l).rstrip() for l in block if l.strip()]
    # a Ray task error is a header line, the worker's traceback, then "Type: message" unindented
    raised = [l for l in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", l)]
    if not lines:
        return None
    return (raised[-1] if raised else lines[0])[:200]  # else (an actor that died) the message's first line


def _batched(cfg, info, searcher, num_samples: int, n_eval: int):
    """Several candidates per Tune trial (evaluator.candidates_per_trial; search/batched.py)."""
    from .search.batched import BatchedSearcher, candidates_per_trial

    g = candidates_per_trial(cfg.evaluator.candidates_per_trial, info.batched, cfg.searcher.offspring, n_eval)
    if g <= 1:
        return searcher, num_samples
    return BatchedSearcher(searcher, g, limit=num_samples if num_samples > 0 else None), -1


class _WarmTrialActors:
    """Keep `keep` of Tune's trial actors alive for the whole run, each serving trial after trial.

    Two habits of Tune's actor reuse (tune_controller, Ray 2.60) would otherwise leave one trial running
    at a time when evaluations are shorter than an actor's start (~1 s for our thin trials): a cached
    actor that frees up takes over a pending trial whose own new actor is still starting, and kills that
    one; and between two generations Tune keeps one cached actor (its _ObjectCache, may_keep_one) and
    kills the rest. Here a trial waits for the actor started for it, and up to `keep` idle actors stay
    cached. Trials are thin clients (raypress.pool), so `keep` idle actors cost a few idle processes.
    Swapped in for the length of one Tuner.fit(); checked by tests/test_pool.py."""

    def __init__(self, keep: int):
        self.keep = keep

    def __enter__(self):
        import ray
        from ray.tune.execution import tune_controller
        from ray.tune.utils.object_cache import _ObjectCache

        keep = self.keep
        self._saved = None
        if not (hasattr(tune_controller, "_ObjectCache") and hasattr(tune_controller.TuneController,
                                                                      "_maybe_reuse_cached_actor")):
            logging.getLogger("raypress.progress").warning(
                "Ray %s's Tune has no actor cache RayPress knows: trials may reach the evaluators one at a "
                "time; use the Ray version pyproject.toml names", ray.__version__)
            return self

        class _Warm(_ObjectCache):
            def cache_object(self, key, obj) -> bool:
                if len(self._cached_objects[key]) < keep:
                    self._cached_objects[key].append(obj)
                    self._num_cached_objects += 1
                    return True
                return super().cache_object(key, obj)

            def flush_cached_objects(self, force_all: bool = False):
                if force_all:
                    yield from super().flush_cached_objects(force_all=True)
                    return
                for objs in self._cached_objects.values():
                    while len(objs) > max(keep, 1):
                        self._num_cached_objects -= 1
                        yield objs.pop(0)

        controller = tune_controller.TuneController
        reuse = controller._maybe_reuse_cached_actor

        def wait_for_own_actor(ctl, trial) -> bool:
            if trial in ctl._trial_to_actor and trial not in ctl._resetting_trials:
                return False  # its actor is starting: let it start, the cached one serves the next trial
            return reuse(ctl, trial)

        self._saved = (tune_controller, tune_controller._ObjectCache, controller, reuse)
        tune_controller._ObjectCache = _Warm
        controller._maybe_reuse_cached_actor = wait_for_own_actor
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            return
        module, cache, controller, reuse = self._saved
        module._ObjectCache = cache
        controller._maybe_reuse_cached_actor = reuse


def run_tune(cfg, info, pool, searcher, space, callbacks: list, name: str):
    """Drive `searcher` (registry entry `info`) through Ray Tune until it is finished, its candidates
    scored by the evaluators of `pool` (a started raypress.pool.EvaluatorPool).

    Tune's own files (a folder per trial, its experiment and searcher state) go to a temporary folder
    deleted at the end: a resume restarts Tune from the searcher state in the run folder
    (raypress_state.json, kept by `state_saver`), and MLflow is the record, so
    Tune's files would only be litter (hundreds of empty trial folders, megabytes of state)."""
    import shutil
    import tempfile

    from ray import tune

    from .pool import make_trainable

    n_eval = pool.n
    stopper = _user_error_stopper()
    num_samples = getattr(searcher, "num_samples", -1)  # -1: the searcher says when it is finished
    if num_samples == 0:  # a resume whose budget was already spent (killed after its last trial)
        return None
    searcher, num_samples = _batched(cfg, info, searcher, num_samples, n_eval)
    storage = Path(tempfile.mkdtemp(prefix="raypress-tune-"))
    tuner = tune.Tuner(
        make_trainable(pool),
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
            callbacks=[*callbacks, _crash_loop_guard(stopper)],
            verbose=0,
            stop=stopper,
            # a dead trial actor (its node lost) costs a retry of its candidate, never a generation
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False, checkpoint_frequency=0),
        ),
    )
    try:
        # a first Ctrl-C / SIGTERM stops the trials, then raises Interrupted
        with interrupt.graceful(), _WarmTrialActors(n_eval):
            results = tuner.fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if stopper.error:
        raise RayPressError(stopper.error)
    return results
