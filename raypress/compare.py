"""Searcher comparison: every searcher and schedule on one database, one MLflow parent run.

Budgets are matched by the searcher registry (search/registry.evaluation_budget), exactly as in
`raypress search`: random and Optuna samplers get as many candidate evaluations as the evolution
spends, each on the evolution's mean tokens per evaluation. Schedules that need dense-model
statistics (OWL, Hessian, DP) share one StatsCache, so the comparison calibrates once, and every
searcher of a target shares one evaluator pool (runner.evaluator_key), so it loads the model once.
"""
from __future__ import annotations

import copy
import logging
import time

from .calibrate import StatsCache, stats_folder
from .config import Config, init_names, validate
from .models import RANDOM_NOTE, is_random
from .ray_env import ensure_ray
from .pool import SharedPool
from .runner import run_search, search_curves
from .search import registry
from .tracking import Tracker, fitness_curve, tracked

log = logging.getLogger("raypress")

DEFAULT_SEARCHERS = ("evopress", "tpe", "random", "uniform", "owl", "hessian", "dp")


def matched_budget(cfg: Config) -> tuple[int, int]:
    """(evaluations, tokens per evaluation) matching the evolution's spend (the registry's answer)."""
    return registry.evaluation_budget(cfg)


def _variant(cfg: Config, name: str, target: float) -> Config:
    c = copy.deepcopy(cfg)
    c.target = target
    c.searcher.name = name
    c.tracking.run_name = None
    return validate(c)


def format_table(rows: list[dict]) -> str:
    head = f"{'target':>6} {'searcher':<9} {'ppl':>9} {'KL':>8} {'evals':>6} {'tokens/eval':>11} {'wall s':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['target']:>6.2f} {r['searcher']:<9} {r['ppl']:>9.2f} {r['kl']:>8.4f} {r['evaluations']:>6d} "
            f"{r['tokens_per_eval']:>11} {r['wall_s']:>7.0f}"
        )
    return "\n".join(lines)


def compare(cfg: Config, searchers=DEFAULT_SEARCHERS, targets=None) -> list[dict]:
    """Run each searcher at each target as child MLflow runs of one parent; return the table rows."""
    targets = list(targets or [cfg.target])
    for s in searchers:
        registry.get_searcher(s)
    variants = {(t, s): _variant(cfg, s, t) for t in targets for s in searchers}  # every config checked first
    ensure_ray(cfg.ray_address)
    # the schedules this comparison will ask for (searchers and warm starts): DP's level errors, if one
    # takes them, are computed in the first statistics pass instead of a second one
    stats = StatsCache(schedules=[*searchers, *init_names(cfg)], folder=stats_folder())
    model = cfg.model.rstrip("/").split("/")[-1]
    parent = Tracker(cfg.tracking.uri, cfg.tracking.experiment,
                     f"compare {'/'.join(f'{t:g}' for t in targets)} {','.join(searchers)} {model} {cfg.method}")
    rows: list[dict] = []
    # one evaluator pool for every searcher of a target: at OPT-66B width a start is ~100 s of loading
    with tracked(parent), SharedPool() as pools:
        parent.log_params({**cfg.flat(), "compare.searchers": ",".join(searchers),
                           "compare.targets": ",".join(map(str, targets))})
        evals, per_eval = matched_budget(cfg)
        parent.log_params({"compare.matched_evaluations": evals, "compare.matched_tokens_per_eval": per_eval})
        for target in targets:
            curves, references, scatter, done = {}, {}, {}, {}
            # schedules first: OWL, Hessian and DP calibrate the dense model on the driver's GPU, which the
            # evaluators kept for the searches after them would hold; those reuse the statistics (cached)
            for name in sorted(searchers, key=lambda s: not registry.get_searcher(s).one_shot):
                c = variants[(target, name)]
                t0 = time.time()
                r = run_search(c, parent_run_id=parent.run_id, stats=stats, pools=pools)
                tok = "-" if registry.get_searcher(name).one_shot else (
                    r.history[-1]["tokens"] // max(r.evaluations, 1) if r.history else per_eval)
                done[name] = {"target": target, "searcher": name, "ppl": r.ppl_best, "kl": r.kl_best,
                              "evaluations": r.evaluations, "tokens_per_eval": tok, "wall_s": time.time() - t0,
                              "ppl_uniform": r.ppl_uniform, "ppl_dense": r.ppl_dense, "run_id": r.run_id}
                if r.history:
                    c_, s_ = search_curves(name, r.history)
                    curves.update(c_)
                    scatter.update(s_)
                else:  # one-shot baselines: their config on the monitor batch, a horizontal line
                    references[f"{name}, monitor batch"] = r.kl_monitor_best
                references.setdefault("uniform, monitor batch", r.kl_monitor_uniform)
                parent.log_metrics({f"ppl_{name}_{target:g}": r.ppl_best, f"kl_{name}_{target:g}": r.kl_best})
                log.info("%s", format_table([done[name]]))
            rows += [done[name] for name in searchers]  # the table in the order asked
            pools.close()  # the next target's schedules calibrate on a free GPU (its evaluators differ anyway)
            if curves:
                parent.log_figure(fitness_curve(curves, references, scatter, f"KL vs evaluations at {target:g}"),
                                  f"fitness_curves_{target:g}.png")
        table = format_table(rows)
        parent.log_json(rows, "comparison.json")
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / "comparison.txt"
            p.write_text(table + "\n")
            parent.log_file(p)
    if is_random(cfg.model):
        table = f"[{RANDOM_NOTE}]\n{table}"
    print(table)
    print(f"MLflow: {parent.uri}  parent run {parent.run_id}")
    return rows
