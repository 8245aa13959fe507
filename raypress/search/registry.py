"""The searcher registry: every searcher and one-shot schedule by name, with its declared traits.

A Tune searcher is a `ray.tune.search.Searcher` built by `build(cfg, space, initial, state)`; a
one-shot schedule produces one config through its family (`Family.schedule`). Traits say how the
runner drives a searcher:

    one_shot     a schedule: one config, no Tune loop
    batched      several candidates may share one Tune trial (evaluator.candidates_per_trial=auto)
    sequential   each suggestion should see every earlier result (model-based samplers: one
                 candidate per trial, in order)
    resumable    get_state() / build(state=...) continue an interrupted search
    generational its history has one entry per generation (searcher.generations of them); others
                 report per trial or per chunk of trials (progress lines say "eval i/n")
    many_starts  takes several warm starts (searcher.init: [uniform, dp]) and scores them all

Every Tune searcher reports the same way (search/base.py `REPORTING`): best_config, best_fitness,
history (+ pop_new_history), evaluations, get_state. `check(cfg, family, space)` is the one
pre-flight check of a (searcher, target): the runner calls it before anything is built and
`raypress plan` prints its answer.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

from ..errors import RayPressError


@dataclass(frozen=True)
class SearcherInfo:
    name: str
    one_shot: bool = False
    batched: bool = False
    sequential: bool = False
    resumable: bool = False
    generational: bool = False
    front: bool = False  # searches several budgets (searcher.budgets): the runner writes pareto.json
    many_starts: bool = False
    builder: str | None = None  # "module:function" (name, cfg, space, initial, state) -> Searcher
    summary: str = ""

    def total_evaluations(self, cfg) -> int:
        """Candidate evaluations this searcher will spend on cfg (the progress lines' denominator)."""
        if self.front:  # an evolution per budget (the default budgets: at most pareto.DEFAULT_POINTS)
            from .pareto import DEFAULT_POINTS

            return len(cfg.searcher.budgets or range(DEFAULT_POINTS)) * evolution_budget(cfg.searcher)
        return evolution_budget(cfg.searcher) if self.generational else evaluation_budget(cfg)[0]

    def build(self, cfg, space, initial=None, state=None):
        mod, fn = self.builder.split(":")
        return getattr(importlib.import_module(mod), fn)(self.name, cfg, space, initial, state)


SEARCHERS: dict[str, SearcherInfo] = {s.name: s for s in (
    SearcherInfo("evopress", batched=True, many_starts=True, resumable=True, generational=True, builder="raypress.search.evolution:build",
                 summary="EvoPress: level-switch mutations + multi-step selection"),
    SearcherInfo("pareto", resumable=True, many_starts=True, front=True, builder="raypress.search.pareto:build",
                 summary="the quality-size front: an EvoPress search per budget of searcher.budgets, side by side"),
    SearcherInfo("random", batched=True, resumable=True, builder="raypress.search.random:build",
                 summary="random feasible configs"),
    SearcherInfo("tpe", sequential=True, many_starts=True, resumable=True, builder="raypress.search.optuna:build",
                 summary="Optuna TPE (windowed)"),
    SearcherInfo("cmaes", sequential=True, many_starts=True, resumable=True, builder="raypress.search.optuna:build",
                 summary="Optuna CMA-ES"),
    SearcherInfo("nsga2", sequential=True, many_starts=True, resumable=True, builder="raypress.search.optuna:build",
                 summary="Optuna NSGA-II"),
    SearcherInfo("uniform", one_shot=True, summary="every layer at the target (or the closest feasible mix)"),
    SearcherInfo("owl", one_shot=True, summary="OWL: outlier-weighted layerwise sparsity"),
    SearcherInfo("hessian", one_shot=True, summary="Hessian scheduler: OBS error, log-scale clusters"),
    SearcherInfo("dp", one_shot=True, summary="knapsack over per-level reconstruction errors"),
    SearcherInfo("shortgpt", one_shot=True, summary="ShortGPT: drop the least influential depth units"),
)}
ONE_SHOT = tuple(n for n, s in SEARCHERS.items() if s.one_shot)
#: searcher.init: the schedule whose config is every search's default start (no warm start)
DEFAULT_INIT = "uniform"


def get_searcher(name: str) -> SearcherInfo:
    try:
        return SEARCHERS[name]
    except KeyError:
        raise RayPressError(f"unknown searcher '{name}'; choose one of {', '.join(SEARCHERS)}") from None


def evolution_budget(s) -> int:
    """Candidate evaluations an EvoPress run spends (searcher config `s`); with several starts
    (searcher.init: [uniform, dp]) the first generation also scores the starts after the first (at
    most: a start equal to another is scored once)."""
    per_gen, n = 0, s.offspring + 1
    for _, survivors in s.stages:
        per_gen += n
        n = survivors
    starts = len(s.init) if isinstance(s.init, (list, tuple)) else 1
    return per_gen * s.generations + starts - 1


def evaluation_budget(cfg) -> tuple[int, int]:
    """(candidate evaluations, calibration tokens per evaluation) of a non-evolution Tune searcher:
    as many evaluations as the evolution of the same config would spend (or searcher.samples), each
    on the evolution's mean tokens per evaluation rounded up to whole sequences. `search` and
    `compare` both ask this, so a baseline gets the same budget in both."""
    s = cfg.searcher
    evals = evolution_budget(s)
    tokens, n = 0, s.offspring + 1
    for stage_tokens, survivors in s.stages:
        tokens += n * stage_tokens
        n = survivors
    per_eval = tokens * s.generations / evals
    seq = cfg.data.seq_len
    return (s.samples or evals), int(math.ceil(per_eval / seq) * seq)


def check(cfg, family, space, name: str | None = None) -> None:
    """RayPressError (one line) when searcher `name` (default cfg.searcher.name) cannot start on
    `space` for `family`: not offered, or the target is not reachable (budget.py's verdict)."""
    info = get_searcher(name or cfg.searcher.name)
    if info.one_shot and info.name not in family.schedules:
        raise RayPressError(f"the {info.name} schedule is not offered by family {family.name} (it offers "
                            f"{', '.join(family.schedules)}); pick one of those or a search")
    try:
        space.require_reachable()
    except RayPressError as e:  # a target the user gave in other units (joint's target_bytes): say which
        note = family.target_note(cfg)
        raise (RayPressError(f"{note}: {e}") if note else e) from None
    if info.front:  # every budget of the front: reachable (the verdict, quoted) before anything is built
        from .pareto import resolve_budgets

        resolve_budgets(cfg, space)
