"""Runs one search end to end: data → family (space, database, applier) → searcher ⇄ evaluators → report.

Everything a user can get wrong is checked before an MLflow run or an output folder exists
(`preflight`: the family's config checks, the space from the model's shapes, the searcher
registry's check, which quotes budget.py's verdict). Then the family prepares the space, its
database and the applier evaluators use; a one-shot schedule gives one config, a Tune searcher
runs through tune_loop.py; held-out perplexities of dense, uniform and best are measured on an
evaluator actor; everything is logged to MLflow and the run folder.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import trial
from .calibrate import StatsCache, stats_folder
from .config import Config, init_names
from .data import describe_source, load_tokens, make_splits
from .evaluator import Evaluator, EvaluatorSpec
from .families import get_family
from .models import RANDOM_NOTE, get_adapter, is_random, load_model
from .ray_env import ensure_ray, resources
from .interrupt import resumable
from .pool import EvaluatorPool, SharedPool
from .database import default_cache_root
from .atomic import atomic_write
from .rundir import STATE_FILE, check_owner, check_writable_folder, read_state
from .search import registry
from .tracking import Tracker, fitness_curve, level_heatmap, tracked
from .tune_loop import generation_logger, run_tune, state_saver

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
    note: str | None = None  # e.g. random weights: the quality numbers are meaningless
    # KL on the monitor batch (searcher.stages' last size, trial.MONITOR_GENERATION): every searcher's
    # final config and uniform on the same calibration tokens, the references of the fitness plots
    kl_monitor_best: float | None = None
    kl_monitor_uniform: float | None = None
    heldout: str = ""  # which text the held-out perplexities are on, and how many tokens

    def summary(self) -> str:
        return (
            (f"[{self.note}] " if self.note else "") + f"{self.run_name}: held-out perplexity"
            + (f" ({self.heldout})" if self.heldout else "")
            + f": dense {self.ppl_dense:.2f} | uniform {self.ppl_uniform:.2f} | searched {self.ppl_best:.2f} "
            f"(KL {self.kl_uniform:.4f} -> {self.kl_best:.4f}, {self.evaluations} evaluations, search {self.search_s:.0f}s, total {self.wall_s:.0f}s)"
        )


def model_label(cfg: Config) -> str:
    return Path(cfg.model).name if "/" in cfg.model else cfg.model


def default_run_name(cfg: Config) -> str:
    """What differs between the runs of a table first: target, searcher, then model and method."""
    return f"{cfg.target:g} {cfg.searcher.name} {model_label(cfg)} {cfg.method}"


def run_folder_name(run_name: str) -> str:
    """A run name as a folder name (no spaces, slashes or colons)."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", run_name).strip("-") or "run"


def preflight(cfg: Config, adapter):
    """The search's space from the model's shapes, after every check a user can fail (the searcher
    registry's check quotes budget.py's verdict on the target). Builds nothing."""
    family = get_family(cfg.family)
    space = family.space(cfg, adapter)
    registry.check(cfg, family, space)
    if not registry.get_searcher(cfg.searcher.name).one_shot:
        for name in init_names(cfg):  # every warm start is offered and reaches the target
            if name != registry.DEFAULT_INIT:
                registry.check(cfg, family, space, name)
    return family, space


def with_hints(cfg: Config, hints: dict) -> Config:
    """cfg with the family's searcher hints (e.g. width's three_way) for keys the user did not set."""
    hints = {k: v for k, v in hints.items() if f"searcher.{k}" not in cfg.explicit}
    if not hints:
        return cfg
    cfg = copy.deepcopy(cfg)
    for k, v in hints.items():
        setattr(cfg.searcher, k, v)
    return cfg


def evaluator_key(cfg: Config) -> str:
    """What a search's evaluators depend on: everything in its config but the searcher, the tracking
    and the output folder (the model, database, data and evaluator settings, and the target, on which
    some families' databases depend). Two searches with one key can share an evaluator pool."""
    d = cfg.to_dict()
    for k in ("searcher", "tracking", "output"):
        d.pop(k)
    return json.dumps(d, sort_keys=True, default=str)


def run_search(cfg: Config, resume: str | Path | None = None, callbacks: list | None = None,
               parent_run_id: str | None = None, stats: StatsCache | None = None,
               pools: SharedPool | None = None) -> SearchResult:
    """Run (or resume) one search and return its report. Every MLflow run ends FINISHED/FAILED.
    callbacks: extra Ray Tune callbacks (monitoring, fault-injection tests); parent_run_id: log as
    a child run (comparisons); stats: dense-model statistics shared between searches (comparisons);
    pools: evaluators shared between searches (comparisons; their owner closes them), else the
    search starts its own and closes them when it ends."""
    t_start = time.time()
    state = None
    if resume:
        out_dir = Path(resume)
        state = read_state(out_dir)
        check_owner(out_dir, state)  # a copy of another search's folder: refused before anything loads
        run_name = state["run_name"]
    else:
        run_name = cfg.tracking.run_name or default_run_name(cfg)
        out_dir = Path(cfg.output) / f"{run_folder_name(run_name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    state_file = out_dir / STATE_FILE
    info = registry.get_searcher(cfg.searcher.name)

    # everything a user can get wrong is checked before an MLflow run exists
    check_writable_folder(cfg.output, "output")
    check_writable_folder(cfg.database.cache_dir or default_cache_root(), "database.cache_dir")
    model, tokenizer = load_model(cfg.model, **get_family(cfg.family).driver_model(cfg))
    adapter = get_adapter(model)
    family, _ = preflight(cfg, adapter)
    tokens = load_tokens(cfg.data.source, tokenizer, cfg.data.max_tokens)
    splits = make_splits(tokens, cfg.data.seq_len, cfg.data.n_calib, cfg.data.n_eval, cfg.data.seed)
    ray = ensure_ray(cfg.ray_address)
    n_eval, res = resources(cfg)

    uri = (state or {}).get("tracking_uri") or cfg.tracking.uri  # resume: the store the search began in
    tracker = Tracker(uri, cfg.tracking.experiment, run_name, parent_run_id=parent_run_id,
                      run_id=state and state.get("run_id"))

    def stopped(stop):  # Ctrl-C / SIGTERM: the run is KILLED (tracked), no result, the state file resumes it
        tracker.note_interrupt(f"stopped by {stop.signal_name}; resume with `raypress search --resume {out_dir}`")

    # owned: the evaluator pool of a Tune search, closed however the search ends
    with resumable(out_dir, stopped), tracked(tracker), contextlib.ExitStack() as owned:
        out_dir.mkdir(parents=True, exist_ok=True)
        log.info("search %s: outputs in %s (continue an interrupted search with `raypress search --resume %s`)",
                 run_name, out_dir, out_dir)
        if not resume:
            tracker.log_params(cfg.flat())
            tracker.set_tags({"raypress.searcher": cfg.searcher.name, "raypress.family": cfg.family,
                              "raypress.method": cfg.method, "raypress.model": model_label(cfg)})
            if is_random(cfg.model):
                tracker.set_tags({"raypress.random_weights": RANDOM_NOTE})
        tracker.set_tags({"raypress.output_dir": str(out_dir.resolve())})  # a moved folder owns its run
        t_db = time.time()
        # evaluators that a previous search of a comparison left running already hold the database:
        # serving it again would put a second copy into the object store
        key = evaluator_key(cfg) if pools is not None else None  # the searcher hints below do not change it
        reuse = pools is not None and pools.peek(key) is not None
        prep = family.prepare(cfg, model, adapter, splits.calib, serve=not reuse)
        db_s = time.time() - t_db
        prep.context["stats"] = stats or StatsCache(folder=stats_folder())
        cfg = with_hints(cfg, prep.hints)
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
            teacher_cache_gb=cfg.evaluator.teacher_cache_gb,
            db_placement=cfg.database.placement,
            max_gpu_memory=cfg.evaluator.max_gpu_memory,
        )
        uniform = family.initial(prep)
        pool = None
        t_search = time.time()
        history: list = []
        evaluations = 0
        best_fitness = None
        # every run folder says what ran (one-shot schedules too: `raypress export` reads it)
        base = {"run_name": run_name, "run_id": tracker.run_id, "tracking_uri": tracker.uri,
                "config": cfg.to_dict(), "explicit": sorted(cfg.explicit)}
        atomic_write(state_file, {**base, "searcher": state.get("searcher") if state else None})
        if info.one_shot:
            best = family.schedule(info.name, cfg, prep, model, adapter, splits.calib)
        else:
            initial = family.start(prep)
            inits = init_names(cfg)
            if inits != [registry.DEFAULT_INIT]:  # a warm start from a schedule (or several), for any searcher
                def schedule_at(sp):
                    starts = [family.schedule(n, cfg, dataclasses.replace(prep, space=sp), model, adapter,
                                              splits.calib) for n in inits]
                    return starts[0] if len(starts) == 1 else starts

                # a front starts every budget from the schedule at that budget
                initial = schedule_at if info.front else schedule_at(space)
            searcher = info.build(cfg, space, initial, state.get("searcher") if state else None)
            name = "tune" if not resume else f"tune-resume-{int(time.time())}"
            if not getattr(searcher, "finished", False):  # a resume after the last evaluation: nothing to tune
                t_pool = time.time()
                if pools is not None:
                    pool, started = pools.get(key, spec, n_eval, res)
                else:
                    pool, started = owned.enter_context(EvaluatorPool(spec, n_eval, res)), True
                t_ready = time.time()
                logging.getLogger("raypress.progress").info(
                    "  %d evaluator%s %s", n_eval, "s" if n_eval > 1 else "",
                    f"ready in {t_ready - t_pool:.0f} s" if started else "of the previous search reused")
                # progress rates and ETAs count from here: loading the model (minutes at 70B) is not search speed
                saver = state_saver(searcher, state_file, base)
                cbs = [generation_logger(searcher, tracker, t_ready, info.total_evaluations(cfg),
                                         cfg.searcher.generations if info.generational else None), saver]
                try:
                    run_tune(cfg, info, pool, searcher, space, cbs + list(callbacks or []), name)
                finally:  # finished, stopped or failed: the state after the last scored trial
                    saver.write()
            best, best_fitness = searcher.best_config, searcher.best_fitness
            history = list(searcher.history)
            evaluations = history[-1]["evaluations"] if history else 0
        search_s = time.time() - t_search
        space.check(best)

        # final held-out numbers on an evaluator actor (GPU if the cluster has one)
        logging.getLogger("raypress.progress").info(
            "  held-out evaluation: dense, uniform and the result on %s tokens (%s), then both on the monitor batch",
            f"{splits.eval.size:,}", describe_source(cfg.data.source))
        if pool is None and pools is not None:  # a schedule in a comparison: the evaluators the next searches reuse
            pool, _ = pools.get(key, spec, n_eval, res)
        if pool is not None:
            run, close = pool.call, (lambda: None) if pools is not None else pool.close
        else:
            run, close = final_evaluator(spec, res)
        progress = logging.getLogger("raypress.progress")
        ppl_dense = run("perplexity", {})
        progress.info("  held-out perplexity: dense %.2f", ppl_dense)
        ppl_uniform, kl_uniform = run("heldout", uniform)
        progress.info("  held-out perplexity: uniform %.2f", ppl_uniform)
        ppl_best, kl_best = run("heldout", best)
        monitor = {"n_tokens": cfg.searcher.stages[-1][0], "seed": cfg.searcher.seed,
                   "generation": trial.MONITOR_GENERATION, "stage": 0}
        kl_mon_uniform, kl_mon_best = (run("score", c, **monitor)["fitness"] for c in (uniform, best))
        if info.front:
            from .pareto_report import report_front

            report_front(run, searcher, family, tracker, out_dir, f"{run_name}: held-out perplexity vs size")
        close()
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
            db_build_s=db_s if family.has_database else None,
            db_bytes=_db_bytes(prep.db),
            tracking_uri=tracker.uri,
            run_id=tracker.run_id,
            experiment_dir=str(out_dir.resolve()),
            history=history,
            note=RANDOM_NOTE if is_random(cfg.model) else None,
            kl_monitor_best=kl_mon_best,
            kl_monitor_uniform=kl_mon_uniform,
            heldout=f"{describe_source(cfg.data.source)}, last {splits.eval.size:,} tokens",
        )
        _report(tracker, cfg, space, result, out_dir)
    return result


def final_evaluator(spec: EvaluatorSpec, res: dict):
    """(run(method, *args, **kw), close) of the Evaluator that measures the final numbers of a search
    that has no evaluator pool (a one-shot schedule, a resume after its last evaluation; a Tune search
    measures on its pool).

    On a GPU cluster, or when Ray spans several nodes, a one-evaluator pool without a dispatcher
    (placed like the search's evaluators). On a one-node CPU-only Ray it runs in this process: an actor
    would live on this same machine with the same memory, but start a process and import torch again
    (~5 s of a small search)."""
    import ray

    if res.get("gpu") or len([n for n in ray.nodes() if n.get("Alive")]) > 1:
        pool = EvaluatorPool(spec, 1, res, dispatch=False).__enter__()
        return pool.call, pool.close
    local = Evaluator(spec)
    return (lambda name, *a, **kw: getattr(local, name)(*a, **kw)), (lambda: None)


def search_curves(name: str, history: list) -> tuple[dict, dict]:
    """A searcher's history as (curves, scatter) for tracking.fitness_curve: an evolution's elite on the
    fixed monitor batch (a line) over its noisy per-generation bests (faint points); the best-so-far
    of searchers that score every candidate on the same tokens (random, Optuna)."""
    monitored = [(h["evaluations"], h["elite_kl_monitor"]) for h in history if "elite_kl_monitor" in h]
    if monitored:
        start = next((h.get("start_kl_monitor") for h in history if h.get("start_kl_monitor") is not None), None)
        monitored = ([(0, start)] if start is not None else []) + monitored
        return ({f"{name}: elite, monitor batch": monitored},
                {f"{name}: generation best, fresh tokens": [(h["evaluations"], h["best_fitness"]) for h in history]})
    return {f"{name}: best so far": [(h["evaluations"], h["best_fitness"]) for h in history]}, {}


def _db_bytes(db) -> int | None:
    meta = getattr(db, "meta", None)
    return int(meta.get("total_bytes", 0)) if meta is not None else None


def _report(tracker, cfg: Config, space, result: SearchResult, out_dir: Path) -> None:
    """Metrics, best config, history, plots and result.json of a finished search."""
    best = result.best_config
    tracker.log_metrics({
        "ppl_dense": result.ppl_dense,
        "ppl_uniform": result.ppl_uniform,
        "ppl_best": result.ppl_best,
        "kl_heldout_uniform": result.kl_uniform,
        "kl_heldout_best": result.kl_best,
        "kl_monitor_uniform": result.kl_monitor_uniform,
        "kl_monitor_best": result.kl_monitor_best,
        "mean_value_best": result.mean_value,
        "search_seconds": result.search_s,
        "wall_seconds": result.wall_s,
        "db_build_seconds": result.db_build_s,
        "evaluations_total": result.evaluations,
        "target": cfg.target,
    })
    desc = space.describe(best)
    tracker.log_json({
        "family": cfg.family,
        "method": cfg.method,
        "target": cfg.target,
        "mean_value": result.mean_value,
        **({"note": result.note} if result.note else {}),
        "layers": {l: {"level": best[l], "value": v} for l, v in desc["values"].items()},
    }, "best_config.json")
    tracker.log_json(result.history, "history.json")
    tracker.log_json(asdict(result) | {"best_config": None}, "summary.json")
    tracker.log_figure(level_heatmap(space, best, f"{result.run_name}: level values"), "level_heatmap.png")
    if result.history:
        curves, scatter = search_curves(cfg.searcher.name, result.history)
        tracker.log_figure(fitness_curve(curves, {"uniform, monitor batch": result.kl_monitor_uniform}, scatter,
                                         f"{result.run_name}: KL vs evaluations"), "fitness_curve.png")
    atomic_write(out_dir / "result.json", asdict(result))
