"""Measured per-block costs (written by bench/scale.py) and the time estimates `raypress plan` makes from them.

A measurement is one model at true width on one GPU: database build seconds per block and level, and
the evaluator's candidate tokens/s at EvoPress's stage sizes. The plan scales it to another model and
cluster by work, never by guesswork:
  * build: seconds per (weight x level) for methods without a Hessian (magnitude: sorting and writing
    ∝ weights), per (weight x input width x level) for Hessian methods (SparseGPT/GPTQ's column sweeps
    ∝ out·in²); blocks build in parallel over the cluster's GPUs when database.parallel is set;
  * search: resident and device_map evaluators are compute bound: seconds = 2·P·tokens / (measured
    FLOP/s x the target GPU's bf16 peak / the measured GPU's); streamed evaluators are bound by the
    host->GPU copy of every block per forward: seconds ∝ the model's block bytes.
  * statistics: the one pass over the dense model that OWL, the Hessian scheduler and DP take first
    (calibrate.schedule_inputs: every layer's Hessian and an inverse per layer), ∝ weights x input
    width like a Hessian build, on the driver's one device; run once per model and tokens (kept in
    the cache: calibrate.StatsCache).
Every estimate names the measurement it came from. Random-weight measurements time real work.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

PATH = Path(__file__).with_name("measured_costs.json")
# dense bf16 tensor-core peaks, TFLOP/s, for scaling between GPU kinds (H200 as issue 15 defines MFU)
PEAKS = {"H200": 790.0, "H100": 790.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}
GPU_BY_MEMORY = ((141, "H200"), (80, "H100"), (40, "A100"), (24, "A10G"))  # --cluster's xGB -> a GPU kind


def gpu_peak_tflops(name: str, default: float = float("nan")) -> float:
    return next((v for k, v in PEAKS.items() if k in name), default)


def gpu_kind(gpu_gib: float | None) -> str | None:
    """The GPU kind a --cluster size stands for (141 -> H200, 80 -> H100, ...)."""
    if not gpu_gib:
        return None
    return next((k for gb, k in GPU_BY_MEMORY if gpu_gib >= gb * 0.95), GPU_BY_MEMORY[-1][1])


def arch_of(model, adapter) -> dict:
    """The shapes an estimate scales by (meta-device models work: shapes only)."""
    import torch

    blocks = adapter.blocks()
    lin = [m for m in blocks[0].modules() if isinstance(m, torch.nn.Linear)]
    seen, matmul = set(), 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            matmul += m.weight.numel()
    return {"model_type": model.config.model_type, "blocks": len(blocks),
            "block_params": int(sum(p.numel() for p in blocks[0].parameters())),
            "block_linear_params": int(sum(m.weight.numel() for m in lin)),
            "block_linear_x_in": int(sum(m.weight.numel() * m.in_features for m in lin)),
            "matmul_params": int(matmul), "hidden": int(getattr(model.config, "hidden_size", 0))}


def load() -> list[dict]:
    return json.loads(PATH.read_text()) if PATH.is_file() else []


def record(arch: dict, *, gpu: str, method: str, levels: int, build_s: float, build_device: str, mode: str,
           evals_per_s: float, tokens_per_s: float, stages: str, offspring: int) -> dict:
    """Add (or replace) the measurement for (gpu, method, mode, architecture) in measured_costs.json."""
    from .compress import get_method

    hessian = bool(get_method(method).needs_hessian)
    work = arch["block_linear_x_in"] if hessian else arch["block_linear_params"]
    key = f"{gpu}|{method}|{mode}|{arch['model_type']}-{arch['hidden']}x{arch['blocks']}"
    entry = {"key": key, "gpu": gpu, "method": method, "hessian": hessian, "mode": mode, "arch": arch,
             "build_device": build_device, "levels": levels, "build_s": build_s,
             "build_s_per_work": build_s / (arch["blocks"] * work * levels),
             "evals_per_s": evals_per_s, "tokens_per_s": tokens_per_s,  # None: a build-only measurement
             "flops_per_s": tokens_per_s and 2 * arch["matmul_params"] * tokens_per_s,
             "stream_bytes_per_s": evals_per_s and arch["blocks"] * arch["block_params"] * 2 * evals_per_s,
             "stages": stages, "offspring": offspring, "measured": time.strftime("%Y-%m-%d")}
    return _save(entry)


def record_statistics(arch: dict, *, gpu: str, seconds: float, calib_tokens: int, source: str) -> dict:
    """Add (or replace) the statistics pass measured on `arch` (seconds for all its blocks)."""
    key = f"{gpu}|statistics|{arch['model_type']}-{arch['hidden']}x{arch['blocks']}"
    entry = {"key": key, "kind": "statistics", "gpu": gpu, "arch": arch, "stats_s": seconds,
             "stats_s_per_work": seconds / (arch["blocks"] * arch["block_linear_x_in"]),
             "calib_tokens": calib_tokens, "source": source, "measured": time.strftime("%Y-%m-%d")}
    return _save(entry)


def _save(entry: dict) -> dict:
    """`entry` into measured_costs.json, replacing the measurement with its key."""
    rows = [r for r in load() if r["key"] != entry["key"]] + [entry]
    PATH.write_text(json.dumps(rows, indent=1) + "\n")
    return entry


def _peak_ratio(measured_gpu: str, target_gpu: str) -> float:
    """How much longer compute-bound work measured on `measured_gpu` takes on `target_gpu` (bf16 peaks;
    1.0 when either is unknown)."""
    return gpu_peak_tflops(measured_gpu, 1.0) / gpu_peak_tflops(target_gpu, gpu_peak_tflops(measured_gpu, 1.0))


def _pick(rows, **want):
    """The measurement matching most of `want` (later keys matter less), newest first."""
    best, score = None, -1
    for r in reversed(rows):
        s = sum(2 ** (len(want) - i) for i, (k, v) in enumerate(want.items()) if r.get(k) == v)
        if s > score:
            best, score = r, s
    return best


def search_work(cfg) -> tuple[int, int]:
    """(evaluations, candidate tokens) of an EvoPress search of cfg: every generation, the offspring at
    the first stage's tokens, then each stage's survivors at the next stage's (random and Optuna get
    the same budget: search/registry.evaluation_budget)."""
    evals, tokens, n = 0, 0, cfg.searcher.offspring
    for t, survivors in cfg.searcher.stages:
        evals, tokens, n = evals + n, tokens + n * t, survivors
    return cfg.searcher.generations * evals, cfg.searcher.generations * tokens


def estimate(cfg, arch: dict, *, evaluators: int, gpus: int, gpu_gib: float | None, rows=None) -> dict:
    """{"est_build_s", "est_search_s", "basis"}: None (with the reason in basis) when nothing was measured."""
    from .families import get_family

    rows = load() if rows is None else rows
    stats_rows = [r for r in rows if r.get("kind") == "statistics"]
    rows = [r for r in rows if r.get("kind") != "statistics"]
    target_gpu = gpu_kind(gpu_gib) or "H200"
    out = {"est_build_s": None, "est_search_s": None, "est_stats_s": None, "basis": []}
    if not rows and not stats_rows:
        out["basis"].append("no measured costs (run bench/scale.py on a GPU)")
        return out
    family = get_family(cfg.family)
    if family.calibrated_schedules:  # OWL / Hessian / DP pass over the dense model first
        m = _pick(stats_rows, gpu=target_gpu)
        if m is not None:
            out["est_stats_s"] = (m["stats_s_per_work"] * arch["blocks"] * arch["block_linear_x_in"]
                                  * _peak_ratio(m["gpu"], target_gpu))
            out["basis"].append(f"statistics pass (OWL, Hessian, DP; once per model and tokens): measured on "
                                f"{m['gpu']} ({m['key'].split('|')[-1]}, {m['stats_s'] / m['arch']['blocks']:.1f} "
                                f"s/block, {m['calib_tokens']:,} calibration tokens), scaled by weights x input width")
    if family.has_database and getattr(family, "method", None):
        method = family.method(cfg)
        hessian = bool(method.needs_hessian)
        m = _pick([r for r in rows if r["hessian"] == hessian], method=method.name, gpu=target_gpu)
        if m is not None:
            work = arch["block_linear_x_in"] if hessian else arch["block_linear_params"]
            builders = max(1, min(gpus, arch["blocks"])) if cfg.database.parallel and gpus else 1
            out["est_build_s"] = (m["build_s_per_work"] * arch["blocks"] * work * len(method.level_values())
                                  / builders * (_peak_ratio(m["gpu"], target_gpu) if hessian else 1.0))
            out["basis"].append(f"build: {m['method']} measured on {m['gpu']} ({m['key'].split('|')[-1]}, "
                                f"{m['build_s'] / m['arch']['blocks']:.1f} s/block at {m['levels']} levels), scaled by "
                                f"{'weights x input width' if hessian else 'weights'} x levels over {builders} builder(s)")
        else:
            out["basis"].append(f"build: no measurement for a {'Hessian' if hessian else 'Hessian-free'} method")
    mode = cfg.evaluator.mode
    kind = "streamed" if mode == "streamed" else "resident"  # copy bound vs compute bound: never mixed
    m = _pick([r for r in rows if r.get("evals_per_s") and (r["mode"] == "streamed") == (kind == "streamed")],
              gpu=target_gpu)
    if m is not None:
        n_evals, tokens = search_work(cfg)
        if mode == "streamed":  # every evaluation copies every block to the GPU once
            per_evaluator = n_evals * arch["blocks"] * arch["block_params"] * 2 / m["stream_bytes_per_s"]
        else:
            flops = m["flops_per_s"] * gpu_peak_tflops(target_gpu, 1.0) / gpu_peak_tflops(m["gpu"], 1.0)
            per_evaluator = 2 * arch["matmul_params"] * tokens / flops
        out["est_search_s"] = per_evaluator / max(evaluators, 1)
        out["basis"].append(f"search: {tokens:,} candidate tokens, {mode} evaluators at the "
                            f"{m['flops_per_s'] / 1e12:.0f} TFLOP/s measured on {m['gpu']} "
                            f"({m['key'].split('|')[-1]}, {m['mode']}), scaled to {target_gpu} x{evaluators}")
    else:
        out["basis"].append(f"search: no measurement for evaluator.mode={mode}")
    return out
