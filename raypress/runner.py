"""Runs one search end to end: data → database → Ray Tune (searcher ⇄ evaluators) → report.

The Tune loop: a searcher proposes {layer: level} configs (+ _rp_* meta keys), each trial is
one candidate evaluation on a reused evaluator actor (reuse_actors=True) that keeps the base
model loaded and reads variants from the object store.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .config import ONE_SHOT, Config
from .errors import RESULT_KEY, RayPressError

log = logging.getLogger("raypress")


@dataclass
class SearchResult:
    run_name: str
    best_config: dict
    best_fitness: float | None
    mean_value: float
    ppl_dense: float
    ppl_uniform: float
    ppl_best: float
    kl_uniform: float
    kl_best: float
    evaluations: int
    wall_s: float
    search_s: float
    db_build_s: float | None
    db_bytes: int | None
    tracking_uri: str
    run_id: str
    experiment_dir: str | None = None
    history: list = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.run_name}: held-out perplexity dense {self.ppl_dense:.2f} | uniform {self.ppl_uniform:.2f} | "
            f"searched {self.ppl_best:.2f} (KL {self.kl_uniform:.4f} -> {self.kl_best:.4f}, "
            f"{self.evaluations} evaluations, search {self.search_s:.0f}s, total {self.wall_s:.0f}s)"
        )


# OpenMP threads that spin while waiting turn a shared CPU into a 10-30x slowdown once two
# processes compute at once (measured: 14.7 s vs 4.3 s for one SmolLM2 forward); passive waiting
# costs little when the machine is quiet.
CPU_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def ensure_ray(address: str | None = None):
    import ray

    # per-trial result files are off (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS): MLflow is the record
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

    # read by Tune when a Tuner runs: set them also when the caller started Ray itself
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address == "local":
        address = None
    if address:
        _check_ray_address(address)
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        else:
            # embedded default: a local Ray, dashboard bound to localhost only
            # address="local": always a fresh Ray. A bare ray.init() would instead join the cluster named
            # in /tmp/ray/ray_current_cluster, which a killed driver leaves behind (then hangs minutes)
            ray.init(address="local", include_dashboard=False, dashboard_host="127.0.0.1", logging_level=logging.WARNING,
                     runtime_env={"env_vars": CPU_ENV})
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        raise RayPressError(
            f"cannot connect to the Ray cluster at '{address}' ({str(e).splitlines()[0][:120]}); "
            "start it with `ray start --head` or unset ray_address/RAY_ADDRESS to use a local Ray"
        ) from None
    return ray


def _check_ray_address(address: str, timeout: float = 2.0) -> None:
    """A TCP connect to host:port first: ray.init on a dead address retries for minutes."""
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayPressError(
            f"ray_address '{address}' is not host:port (e.g. 127.0.0.1:6379 or ray://head:10001); "
            "fix it or unset ray_address/RAY_ADDRESS to use a local Ray"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayPressError(
            f"cannot reach the Ray cluster at '{address}' ({e.strerror or type(e).__name__}); "
            "start it with `ray start --head` or unset ray_address/RAY_ADDRESS to use a local Ray"
        ) from None


def default_run_name(cfg: Config) -> str:
    model = Path(cfg.model).name if "/" in cfg.model else cfg.model
    return f"{model}-{cfg.family}-{cfg.method}-{cfg.target:g}-{cfg.searcher.name}"


def make_searcher(cfg: Config, space, initial: dict | None, hints: dict | None = None):
    s = cfg.searcher
    three_way = (hints or {}).get("three_way", s.three_way)
    stages = [tuple(x) for x in s.stages]
    if s.name == "evopress":
        from .search.evolution import EvoPressSearcher

        return EvoPressSearcher(
            space,
            generations=s.generations,
            offspring=s.offspring,
            stages=stages,
            max_mutations=s.max_mutations,
            seed=s.seed,
            initial=initial,
            three_way=three_way,
        )
    n = s.samples or evolution_budget(cfg)
    if s.name == "random":
        from .search.random import RandomSearcher

        return RandomSearcher(space, n_samples=n, n_tokens=stages[-1][0], seed=s.seed, three_way=three_way)
    if s.name in ("tpe", "cmaes", "nsga2"):
        from .search.optuna import make_optuna_searcher

        init = [initial] if initial else None
        return make_optuna_searcher(space, sampler=s.name, seed=s.seed, n_tokens=stages[-1][0], initial=init), n
    raise RayPressError(f"searcher '{s.name}' is not a Tune searcher")


def evolution_budget(cfg: Config) -> int:
    """Candidate evaluations an evolution run would spend (to give baselines the same budget)."""
    s = cfg.searcher
    per_gen, n = 0, s.offspring + 1
    for _, survivors in s.stages:
        per_gen += n
        n = survivors
    return per_gen * s.generations


def resources(cfg: Config) -> tuple[int, dict]:
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    cpus = int(total.get("CPU", 1))
    want_gpu = cfg.evaluator.device.startswith("cuda") or (cfg.evaluator.device == "auto" and gpus > 0)
    if cfg.evaluator.device.startswith("cuda") and gpus == 0:
        raise RayPressError(
            "evaluator.device=cuda but the Ray cluster has no GPUs; use evaluator.device=cpu or add GPU nodes"
        )
    k = cfg.evaluator.gpus_per_evaluator if cfg.evaluator.mode == "device_map" else 1
    n = cfg.evaluator.num_evaluators
    if n == "auto":  # one evaluator per k GPUs (device_map spans k each)
        n = max(1, gpus // k) if want_gpu else 1
    n = int(n)
    cpe = cfg.evaluator.cpus_per_evaluator
    cpe = max(1, (cpus // n) if not want_gpu else min(4, max(1, cpus // n))) if cpe == "auto" else int(cpe)
    if cpe > cpus:  # Tune would wait forever for an actor that never fits
        raise RayPressError(
            f"evaluator.cpus_per_evaluator={cpe} but the Ray cluster has {cpus} CPUs; "
            "lower it (or use auto) or add nodes"
        )
    if want_gpu and k > max(gpus, 1):
        raise RayPressError(f"evaluator.gpus_per_evaluator={k} but the Ray cluster has {gpus} GPUs; lower it or add nodes")
    res = {"cpu": cpe, "gpu": k} if want_gpu else {"cpu": cpe}
    return n, res


class _GenerationLogger:
    """Tune callback: forwards the searcher's per-generation summaries to MLflow."""

    def __new__(cls, searcher, tracker, t0):
        from ray import tune

        class CB(tune.Callback):
            def _flush(self):
                for h in searcher.pop_new_history():
                    wall = max(time.time() - t0, 1e-9)
                    m = {k: h[k] for k in ("best_fitness", "median_fitness", "evaluations", "tokens") if k in h}
                    m["evaluations_per_s"] = h.get("evaluations", 0) / max(h.get("wall_time", wall), 1e-9)
                    tracker.log_metrics(m, step=int(h.get("generation", 0)))

            def on_trial_complete(self, iteration, trials, trial, **info):
                self._flush()

            def on_trial_error(self, iteration, trials, trial, **info):
                self._flush()

            def on_experiment_end(self, trials, **info):
                self._flush()

        return CB()


def _user_error_stopper():
    """Tune stopper: ends the whole search on the first result carrying RESULT_KEY (a user error
    such as GPU out of memory, reported by the evaluator instead of raised so it is not retried)."""
    from ray import tune

    class Stopper(tune.Stopper):
        error: str | None = None

        def __call__(self, trial_id, result):
            if result.get(RESULT_KEY):
                self.error = self.error or str(result[RESULT_KEY])
                return True
            return False

        def stop_all(self):
            return self.error is not None

    return Stopper()


def _batched(cfg: Config, searcher, num_samples: int, n_eval: int):
    """Several candidates per Tune trial (evaluator.candidates_per_trial; search/batched.py)."""
    from .search.batched import BatchedSearcher, candidates_per_trial

    g = candidates_per_trial(cfg.evaluator.candidates_per_trial, cfg.searcher.name, cfg.searcher.offspring, n_eval)
    if g <= 1:
        return searcher, num_samples
    return BatchedSearcher(searcher, g, limit=num_samples if num_samples > 0 else None), -1


def run_tune(cfg: Config, spec, searcher, num_samples: int, callbacks: list, storage: Path, name: str):
    from ray import tune

    from .evaluator import make_trainable

    n_eval, res = resources(cfg)
    stopper = _user_error_stopper()
    searcher, num_samples = _batched(cfg, searcher, num_samples, n_eval)
    tuner = tune.Tuner(
        make_trainable(spec, res),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            metric="fitness",
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
    results = tuner.fit()
    if stopper.error:
        raise RayPressError(stopper.error)
    return results


def _atomic_write(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, default=str))
    os.replace(tmp, path)


class _StateSaver:
    """Tune callback: persists the searcher state after every finished trial (for --resume)."""

    def __new__(cls, searcher, path: Path, base: dict):
        from ray import tune

        class CB(tune.Callback):
            def on_trial_complete(self, iteration, trials, trial, **info):
                _atomic_write(path, {**base, "searcher": searcher.get_state()})

            on_trial_error = on_trial_complete

        return CB()


STATE_FILE = "raypress_state.json"


def read_state(run_dir) -> dict:
    """The resume state of an output folder; missing or unreadable -> RayPressError."""
    out_dir = Path(run_dir)
    f = out_dir / STATE_FILE
    if not out_dir.is_dir():
        raise RayPressError(
            f"resume folder '{out_dir}' does not exist; pass the output folder of the interrupted search "
            "(printed at its start, under output: e.g. raypress_runs/<run name>-<time>)"
        )
    if not f.is_file():
        raise RayPressError(f"nothing to resume in {out_dir}: no {STATE_FILE} (was the search started there?)")
    try:
        state = json.loads(f.read_text())
        if not (isinstance(state["run_name"], str) and isinstance(state["config"], dict)):
            raise TypeError("run_name/config")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RayPressError(
            f"{f} is unreadable ({type(e).__name__}: {str(e)[:80]}); it is written atomically, so it was "
            "edited or damaged afterwards: restore it or start a new search"
        ) from None
    return state


def check_budget(cfg: Config, adapter) -> None:
    """An unreachable target fails here: before a database is built or an MLflow run exists."""
    if cfg.family not in ("sparsity", "quant"):
        return
    from .families import method_for
    from .space import SearchSpace

    layers = adapter.linear_layers()
    space = SearchSpace.from_values(method_for(cfg).level_values(), cfg.target, layers=list(layers),
                                    n_params=[int(m.weight.numel()) for m in layers.values()])
    space.uniform()


_STATS_CACHE: dict = {}


def _one_shot_config(cfg: Config, prep, seed: int, model, adapter, calib, name: str | None = None) -> dict:
    """A schedule's config (no search): uniform, OWL, Hessian, DP, random or ShortGPT."""
    name = name or cfg.searcher.name
    space = prep.space
    if name == "uniform":  # a family may define its own most-uniform config (width: per-unit ladders)
        return prep.context.get("initial") or space.uniform()
    if name == "shortgpt":
        if cfg.family != "depth":
            raise RayPressError("the shortgpt schedule scores depth units; use it with family: depth")
        from .compress.depth import shortgpt_config, shortgpt_scores

        unit = "block" if cfg.database.granularity == "block" else "sublayer"
        return shortgpt_config(space, shortgpt_scores(model, adapter, calib, unit=unit))
    from .search.schedules import run_schedule

    ctx = dict(prep.context)
    if name in ("owl", "hessian", "dp") and "hessians" not in ctx:
        import hashlib

        from .calibrate import collect_stats

        # comparisons run several schedules on the same model and tokens: calibrate once
        key = (cfg.model, hashlib.sha256(np.ascontiguousarray(calib).tobytes()).hexdigest())
        if key not in _STATS_CACHE:
            _STATS_CACHE.clear()
            st = collect_stats(model, adapter, calib)
            _STATS_CACHE[key] = {"hessians": st["hessian"], "norms": st["norms"]}
        ctx.update(_STATS_CACHE[key])
        prep.context.update(_STATS_CACHE[key])
    return run_schedule(name, space, seed=seed, **ctx)


def run_search(cfg: Config, resume: str | Path | None = None, callbacks: list | None = None,
               parent_run_id: str | None = None) -> SearchResult:
    """Run (or resume) one search and return its report. Every MLflow run ends FINISHED/FAILED.
    callbacks: extra Ray Tune callbacks (monitoring, fault-injection tests); parent_run_id: log as
    a child run (comparisons)."""
    from .data import load_tokens, make_splits
    from .evaluator import Evaluator, EvaluatorSpec
    from .families import prepare
    from .models import get_adapter, load_model
    from .tracking import Tracker, fitness_curve, level_heatmap, tracked

    t_start = time.time()
    state = None
    if resume:
        out_dir = Path(resume)
        state_file = out_dir / STATE_FILE
        state = read_state(out_dir)
        run_name = state["run_name"]
    else:
        run_name = cfg.tracking.run_name or default_run_name(cfg)
        out_dir = Path(cfg.output) / f"{run_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        state_file = out_dir / "raypress_state.json"

    # everything a user can get wrong is checked before an MLflow run exists
    model, tokenizer = load_model(cfg.model)
    adapter = get_adapter(model)
    check_budget(cfg, adapter)
    tokens = load_tokens(cfg.data.source, tokenizer, cfg.data.max_tokens)
    splits = make_splits(tokens, cfg.data.seq_len, cfg.data.n_calib, cfg.data.n_eval, cfg.data.seed)
    ray = ensure_ray(cfg.ray_address)
    n_eval, res = resources(cfg)

    uri = (state or {}).get("tracking_uri") or cfg.tracking.uri  # resume: the store the search began in
    tracker = Tracker(uri, cfg.tracking.experiment, run_name, parent_run_id=parent_run_id,
                      run_id=state and state.get("run_id"))
    with tracked(tracker):
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info("search %s: outputs in %s (continue an interrupted search with `raypress search --resume %s`)",
                 run_name, out_dir, out_dir)
        if not resume:
            tracker.log_params(cfg.flat())
            tracker.set_tags({"raypress.output_dir": str(out_dir.resolve())})
        t_db = time.time()
        prep = prepare(cfg, model, adapter, splits.calib, cfg.model)
        db_s = time.time() - t_db
        space = prep.space
        if not resume:
            tracker.log_params({"space.layers": len(space.layers), **prep.describe})
        spec = EvaluatorSpec(
            model=cfg.model,
            applier=prep.applier,
            calib=ray.put(splits.calib),
            eval=ray.put(splits.eval),
            device=cfg.evaluator.device,
            dtype=cfg.evaluator.dtype,
            batch_size=cfg.evaluator.batch_size,
            kl_topk=cfg.evaluator.kl_topk,
            mode=cfg.evaluator.mode,
            teacher_memory=cfg.evaluator.teacher_memory,
        )
        uniform = prep.context.get("initial") or space.uniform()
        t_search = time.time()
        history: list = []
        evaluations = 0
        best_fitness = None
        if cfg.searcher.name in ONE_SHOT:
            best = _one_shot_config(cfg, prep, cfg.searcher.seed, model, adapter, splits.calib)
        else:
            initial = prep.context.get("initial")
            if cfg.searcher.init != "uniform":
                initial = _one_shot_config(cfg, prep, cfg.searcher.seed, model, adapter, splits.calib,
                                           name=cfg.searcher.init)  # a warm start, for any searcher
            made = make_searcher(cfg, space, initial, prep.context.get("searcher_hints"))
            searcher, n = (made if isinstance(made, tuple) else (made, -1))
            if state and state.get("searcher"):
                searcher.set_state(state["searcher"])
            base = {"run_name": run_name, "run_id": tracker.run_id, "tracking_uri": tracker.uri,
                    "config": cfg.to_dict()}
            _atomic_write(state_file, {**base, "searcher": state.get("searcher") if state else None})
            cbs = [_GenerationLogger(searcher, tracker, t_search), _StateSaver(searcher, state_file, base)]
            name = "tune" if not resume else f"tune-resume-{int(time.time())}"
            run_tune(cfg, spec, searcher, n, cbs + list(callbacks or []), out_dir, name)
            best, best_fitness = searcher.best_config, searcher.best_fitness
            history = list(getattr(searcher, "history", []))
            evaluations = history[-1]["evaluations"] if history else 0
        search_s = time.time() - t_search
        space.check(best)

        # final held-out numbers on an evaluator actor (GPU if the cluster has one)
        actor = ray.remote(Evaluator).options(num_cpus=res["cpu"], num_gpus=res.get("gpu", 0)).remote(spec)
        ppl_dense = ray.get(actor.perplexity.remote({}))
        ppl_uniform, kl_uniform = ray.get(actor.heldout.remote(uniform))
        ppl_best, kl_best = ray.get(actor.heldout.remote(best))
        ray.kill(actor)

        desc = space.describe(best)
        result = SearchResult(
            run_name=run_name,
            best_config=best,
            best_fitness=best_fitness,
            mean_value=float(space.mean_value(best)),
            ppl_dense=ppl_dense,
            ppl_uniform=ppl_uniform,
            ppl_best=ppl_best,
            kl_uniform=kl_uniform,
            kl_best=kl_best,
            evaluations=evaluations,
            wall_s=time.time() - t_start,
            search_s=search_s,
            db_build_s=db_s if prep.db is not None else None,
            db_bytes=int(prep.db.meta.get("total_bytes", 0)) if prep.db is not None else None,
            tracking_uri=tracker.uri,
            run_id=tracker.run_id,
            experiment_dir=str(out_dir.resolve()),
            history=history,
        )
        tracker.log_metrics(
            {
                "ppl_dense": ppl_dense,
                "ppl_uniform": ppl_uniform,
                "ppl_best": ppl_best,
                "kl_heldout_uniform": kl_uniform,
                "kl_heldout_best": kl_best,
                "mean_value_best": result.mean_value,
                "search_seconds": search_s,
                "wall_seconds": result.wall_s,
                "db_build_seconds": result.db_build_s,
                "evaluations_total": evaluations,
            }
        )
        tracker.log_json(
            {
                "family": cfg.family,
                "method": cfg.method,
                "target": cfg.target,
                "mean_value": result.mean_value,
                "layers": {l: {"level": best[l], "value": v} for l, v in desc["values"].items()},
            },
            "best_config.json",
        )
        tracker.log_json(history, "history.json")
        tracker.log_json(asdict(result) | {"best_config": None}, "summary.json")
        fig = level_heatmap(space, best, f"{run_name}: level values")
        tracker.log_figure(fig, "level_heatmap.png")
        if history:
            curve = [(h["evaluations"], h["best_fitness"]) for h in history]
            tracker.log_figure(fitness_curve({cfg.searcher.name: curve}), "fitness_curve.png")
        _atomic_write(out_dir / "result.json", asdict(result))
    return result
