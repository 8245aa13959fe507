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
from .evaluator import teacher_cache_budget
from .fitness import CHUNK_ELEMENTS, teacher_token_bytes
from .families import get_family
from .models import RANDOM_NOTE, get_adapter, is_random, meta_model
from .search import registry


def plan(cfg, targets=None, searchers=None, model=None) -> dict:
    """{"model", "family", "method", "units", "total_params", "checks": [{target, searcher, ok, message,
    budget, nearest}, ...]} for every target x searcher (defaults: cfg.target x every searcher).
    model: cfg.model on the meta device, when the caller has it already."""
    family = get_family(cfg.family)
    names = list(searchers or registry.SEARCHERS)
    for n in names:
        registry.get_searcher(n)
    adapter = get_adapter(model if model is not None else meta_model(cfg.model))
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
                ok, msg = True, _starts(c, space, registry.get_searcher(n), family)
            except RayPressError as e:
                ok, msg = False, str(e)
            checks.append({"target": t, "searcher": n, "ok": ok, "message": msg, "budget": space.budget,
                           "nearest": list(verdict.nearest)})
    return {"model": cfg.model, "family": cfg.family, "method": cfg.method, "units": units, "total_params": total,
            "checks": checks, **({"note": RANDOM_NOTE} if is_random(cfg.model) else {})}


def _starts(cfg, space, info, family) -> str:
    what = f"starts: exact budget {space.budget} over {len(space.layers)} units"
    if info.one_shot:  # every schedule but uniform first runs the dense model over the calibration tokens
        if info.name in family.calibrated_schedules:  # the pass `raypress plan` estimates
            return what + (" (one-shot schedule after a pass over the dense model: the statistics pass in "
                           "the resources; once per model and tokens)")
        return what + (" (one-shot schedule)" if info.name == "uniform" else
                       " (one-shot schedule after a pass over the dense model, not in the time estimates)")
    if info.generational or info.front:  # evolutions: their own count (a front: one per budget)
        return what + f" ({info.total_evaluations(cfg)} evaluations)"
    evals, tokens = registry.evaluation_budget(cfg)
    return what + f" ({evals} evaluations x {tokens} tokens)"


def format_plan(report: dict) -> str:
    head = (f"{report['model']} · {report['family']} ({report['method']}) · {report['units']} units, "
            f"{report['total_params']} parameters" + (f" · {report['note']}" if report.get("note") else ""))
    lines = [head, f"{'target':>8}  {'searcher':<9} {'ok':<3} message", "-" * 72]
    for c in report["checks"]:
        lines.append(f"{c['target']:>8g}  {c['searcher']:<9} {'yes' if c['ok'] else 'no':<3} {c['message']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- resources
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # evaluator dtypes


def parse_cluster(text: str | None) -> tuple[int, int, float | None]:
    """'NODESxGPUS[xGPU_GB]' -> (nodes, gpus per node, GPU GiB or None); None: this machine."""
    if not text:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gb = torch.cuda.get_device_properties(0).total_memory / 2**30 if n else None
        return 1, n, gb
    parts = text.lower().split("x")
    try:
        nums = [float(p) for p in parts]
        if len(nums) not in (2, 3) or nums[0] < 1 or nums[1] < 0 or nums[0] != int(nums[0]) or nums[1] != int(nums[1]):
            raise ValueError
    except ValueError:
        raise RayPressError(f"--cluster takes NODESxGPUS[xGPU_GB], e.g. 4x8x80 (4 nodes of 8 80-GiB GPUs); "
                            f"got {text!r}") from None
    return int(nums[0]), int(nums[1]), nums[2] if len(nums) == 3 else None


def resources(cfg, cluster: str | None = None, model=None) -> dict:
    """What the search will hold, from config.json alone: database bytes (the family's formula),
    driver host peak, evaluator GPU peak, how many evaluators the cluster runs, and the build and
    search time estimated from measured per-block costs (raypress/costs.py). model: as in `plan`."""
    from .database import storage_itemsize
    from .models import is_random

    family = get_family(cfg.family)
    model = model if model is not None else meta_model(cfg.model)
    adapter = get_adapter(model)
    space = family.space(cfg, adapter)
    params = {id(p): p.numel() for p in model.parameters()}
    total = int(sum(params.values()))
    blocks = adapter.blocks()
    block_params = max(int(sum(p.numel() for p in b.parameters())) for b in blocks)
    outside = total - int(sum(p.numel() for b in blocks for p in b.parameters()))
    n_levels = max(len(v) for v in space.level_values)
    sbytes = storage_itemsize(cfg.database.storage_dtype)
    linears = adapter.linear_layers()
    db_bytes = family.database_bytes(cfg, adapter, space)
    largest_stack = n_levels * max((m.weight.numel() for m in linears.values()), default=0) * sbytes
    kw = family.driver_model(cfg, model)
    streamed = kw.get("streamed", False)
    mbytes = storage_itemsize(kw["dtype"]) if "dtype" in kw else 4  # checkpoints stream in float32
    driver = (outside + 2 * block_params) * mbytes if streamed else total * 4
    driver += largest_stack + 2**30
    nodes, gpus, gb = parse_cluster(cluster)
    k = cfg.evaluator.gpus_per_evaluator if cfg.evaluator.mode == "device_map" else 1
    evaluators = max(1, nodes * gpus // k) if gpus else 1
    dev = "cuda" if gpus else "cpu"
    ebytes = 2 if (cfg.evaluator.dtype == "auto" and dev == "cuda") else _BYTES.get(cfg.evaluator.dtype, 4)
    vocab = int(getattr(model.config, "vocab_size", 0))
    # the evaluator caches the teacher of every calibration row it has drawn, up to its page budget
    # (at least one stage's worth); an unknown GPU size: the budget's ceiling
    per_token = teacher_token_bytes(vocab, cfg.evaluator.kl_topk)
    pool = cfg.data.n_calib * (cfg.data.seq_len - 1) * per_token
    stage = max(t for t, _ in cfg.searcher.stages) * per_token
    cap = teacher_cache_budget(cfg.evaluator.teacher_cache_gb, gpu_free=int(gb * 2**30) if gb else None)
    teacher = int(max(min(pool, cap), stage)) if cfg.evaluator.teacher_memory == "device" else 0
    on_gpu = total * ebytes if cfg.evaluator.mode != "streamed" else (outside + 2 * block_params) * ebytes
    # a forward batch's logits in the model dtype, their next-token copy, and the KL's float32 work on
    # fitness.CHUNK_ELEMENTS at a time (~5 copies: upcast, log-softmax, teacher exp, difference, product)
    logits = 2 * cfg.evaluator.batch_size * cfg.data.seq_len * vocab * ebytes + 5 * CHUNK_ELEMENTS * 4
    gpu_peak = on_gpu // k + teacher + logits
    hold = _hold(cfg, family, db_bytes, gpu_peak, gb, gpus // k if gpus else 1, ebytes, sbytes)
    if hold == "gpu":  # every variant beside the model
        gpu_peak += db_bytes * ebytes // sbytes // k
    out = {"model_params": total, "database_bytes": db_bytes,
           "database_placement": _placement(cfg, family, db_bytes, nodes), "database_hold": hold,
           "driver_host_peak_bytes": int(driver), "driver_streamed": bool(streamed),
           "evaluator_gpu_peak_bytes": int(gpu_peak) if gpus else None, "evaluators": evaluators,
           "cluster": {"nodes": nodes, "gpus_per_node": gpus, "gpu_gib": gb},
           **_estimates(cfg, model, adapter, evaluators, nodes * gpus, gb)}
    if gpus and nodes * gpus < k:
        out["warning"] = (f"evaluator.mode=device_map spans {k} GPUs per evaluator but the cluster has {nodes * gpus}; "
                          "lower evaluator.gpus_per_evaluator or use evaluator.mode=streamed")
    elif gb and gpus and gpu_peak > gb * 2**30:
        out["warning"] = (f"an evaluator needs ~{gpu_peak / 2**30:.0f} GiB of GPU memory but a GPU has {gb:.0f}; use "
                          "evaluator.mode=device_map with more gpus_per_evaluator, or evaluator.mode=streamed")
    if is_random(cfg.model):
        out["note"] = RANDOM_NOTE
    return out


def _hold(cfg, family, db_bytes, gpu_peak, gpu_gib, evaluators_on_node, ebytes, sbytes) -> str | None:
    """placement.decide_hold's answer for one evaluator (this machine's free memory stands for a node's)."""
    if not family.has_database or db_bytes is None:
        return None
    import psutil

    from .errors import RayPressError
    from .placement import decide_hold

    total = int(gpu_gib * 2**30) if gpu_gib else None
    try:
        return decide_hold(cfg.database.placement, db_bytes * ebytes // sbytes,
                           gpu_free=None if total is None else total - gpu_peak, gpu_total=total,
                           host_free=psutil.virtual_memory().available, evaluators_on_node=evaluators_on_node,
                           streamed=cfg.evaluator.mode == "streamed")[0]
    except RayPressError as e:
        return f"does not fit: {e}"


def _estimates(cfg, model, adapter, evaluators: int, gpus: int, gpu_gib) -> dict:
    from . import costs

    if not gpus:
        return {"est_build_s": None, "est_search_s": None, "est_stats_s": None,
                "est_basis": ["no GPUs in --cluster: nothing measured on CPU"]}
    gib = gpu_gib or 141.0
    est = costs.estimate(cfg, costs.arch_of(model, adapter), evaluators=evaluators, gpus=gpus, gpu_gib=gib)
    return {"est_build_s": est["est_build_s"], "est_search_s": est["est_search_s"],
            "est_stats_s": est["est_stats_s"], "est_basis": est["basis"]}


def _placement(cfg, family, db_bytes, nodes: int) -> str | None:
    """placement.decide's answer, with Ray's default object store (30% of a node's memory per node);
    a database of unknown size (width) is put in the object store, as the width family does."""
    if not family.has_database:
        return None
    if db_bytes is None:
        return "object_store"
    import psutil

    from .placement import decide

    return decide(cfg.database.placement, db_bytes, 0.3 * psutil.virtual_memory().total * nodes)


def _hours(s) -> str:
    if s is None:
        return "not estimated (see below)"
    return f"~{s / 3600:.1f} h" if s >= 3600 else f"~{s / 60:.0f} min" if s >= 60 else f"~{s:.0f} s"


def format_resources(r: dict) -> str:
    g = lambda b: "-" if b is None else f"{b / 2**30:.1f} GiB"  # noqa: E731
    c = r["cluster"]
    lines = [f"resources on {c['nodes']} node(s) x {c['gpus_per_node']} GPU(s)"
             + (f" of {c['gpu_gib']:.0f} GiB" if c["gpu_gib"] else ""),
             f"  model parameters        {r['model_params'] / 1e9:.2f} B",
             f"  level database          {g(r['database_bytes'])} (reaches nodes via "
             f"{r['database_placement'] or 'none'}; evaluators hold it: {r['database_hold'] or 'none'})",
             f"  driver host RAM peak    {g(r['driver_host_peak_bytes'])}"
             + (" (streamed block by block)" if r["driver_streamed"] else " (whole model in float32)"),
             f"  evaluator GPU peak      {g(r['evaluator_gpu_peak_bytes'])}",
             f"  evaluators              {r['evaluators']}",
             f"  database build time     {_hours(r['est_build_s'])}",
             f"  search time             {_hours(r['est_search_s'])}",
             *([f"  statistics pass         {_hours(r['est_stats_s'])} (before OWL, Hessian, DP; once per model "
                "and tokens)"] if r.get("est_stats_s") is not None else []),
             *(f"    ({b})" for b in r.get("est_basis", []))]
    if r.get("warning"):
        lines.append(f"  warning: {r['warning']}")
    return "\n".join(lines)
