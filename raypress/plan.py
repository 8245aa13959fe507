"""`raypress plan`: will this search start? Checked from the model's shapes alone, before anything is built.

For every (target, searcher) the answer is the one the runner would give (search/registry.check,
which quotes budget.py's verdict): ok with the exact integer budget, or the one-line reason with
the nearest reachable targets. The model is built on the meta device (no weights, no memory), so
OPT-66B plans offline in seconds from its bundled config.json.
"""
from __future__ import annotations

import copy

from .config import validate
from .errors import RayPressError
from .families import get_family
from .models import RANDOM_NOTE, get_adapter, is_random, meta_model
from .search import registry


def plan(cfg, targets=None, searchers=None) -> dict:
    """{"model", "family", "method", "units", "total_params", "checks": [{target, searcher, ok, message,
    budget, nearest}, ...]} for every target x searcher (defaults: cfg.target x every searcher)."""
    family = get_family(cfg.family)
    names = list(searchers or registry.SEARCHERS)
    for n in names:
        registry.get_searcher(n)
    adapter = get_adapter(meta_model(cfg.model))
    checks, units, total = [], None, None
    for t in targets if targets is not None else [cfg.target]:
        c = copy.deepcopy(cfg)
        c.target = float(t)
        try:
            validate(c)
            space = family.space(c, adapter)
        except RayPressError as e:
            checks += [{"target": t, "searcher": n, "ok": False, "message": str(e), "budget": None, "nearest": []}
                       for n in names]
            continue
        units, total = len(space.layers), space.total_params
        verdict = space.verdict()
        for n in names:
            try:
                registry.check(c, family, space, n)
                ok, msg = True, _starts(c, space, registry.get_searcher(n))
            except RayPressError as e:
                ok, msg = False, str(e)
            checks.append({"target": t, "searcher": n, "ok": ok, "message": msg, "budget": space.budget,
                           "nearest": list(verdict.nearest)})
    return {"model": cfg.model, "family": cfg.family, "method": cfg.method, "units": units, "total_params": total,
            "checks": checks, **({"note": RANDOM_NOTE} if is_random(cfg.model) else {})}


def _starts(cfg, space, info) -> str:
    what = f"starts: exact budget {space.budget} over {len(space.layers)} units"
    if info.one_shot:
        return what + " (one-shot schedule)"
    if info.name == "evopress":
        return what + f" ({registry.evolution_budget(cfg.searcher)} evaluations)"
    evals, tokens = registry.evaluation_budget(cfg)
    return what + f" ({evals} evaluations x {tokens} tokens)"


def format_plan(report: dict) -> str:
    head = (f"{report['model']} · {report['family']} ({report['method']}) · {report['units']} units, "
            f"{report['total_params']} parameters" + (f" · {report['note']}" if report.get("note") else ""))
    lines = [head, f"{'target':>8}  {'searcher':<9} {'ok':<3} message", "-" * 72]
    for c in report["checks"]:
        lines.append(f"{c['target']:>8g}  {c['searcher']:<9} {'yes' if c['ok'] else 'no':<3} {c['message']}")
    return "\n".join(lines)
