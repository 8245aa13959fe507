"""One-shot schedules: a single exactly-feasible config {layer: level_index} of a SearchSpace.

- `uniform(space)`                       every layer at the target level
- `owl(space, stats, lam, M)`            OWL, outlier-weighted layerwise sparsity (Yin et al. 2023)
- `hessian_schedule(space, stats, k)`    OBS error at the target sparsity, log, 1-D k-means into k
                                         levels, higher error -> lower sparsity
- `dp_schedule(space, errors)`           knapsack: min Σ errors[layer][level] s.t. the exact budget
- `random_schedule(space, seed)`         space.random_feasible
- `SCHEDULES` / `run_schedule(name, space, **ctx)`  registry; ctx may hold more keys than needed

Exactness. Budgets are integers (space.py: cost[l][k] = n_params[l]·round(value·1000),
budget = round(target·1000)·Σ n_params). `integer_costs` / `reduce_costs` rewrite them in small
units: subtract each layer's cheapest level, divide everything by the gcd of what is left. For
SparseGPT-style ladders (0.0, 0.1, ...) and transformer shapes the gcd is huge, so the exact DP
(`solve_budgeted`) over the remaining budget is small (SmolLM2-135M: 210 layers x ~5k units).

Snapping + exact fix-up of a continuous schedule (OWL, Hessian) is one call: `project(space,
desired)` = the exactly-feasible config nearest to the desired per-layer values in the
params-weighted L2 sense (the same DP with errors n_l·(v_lk − d_l)²).

Fallback. When the DP table would exceed `max_cells` (default 5e7 cells = L x reduced budget),
`solve_budgeted` uses a Lagrangian relaxation (bisection on the price of one cost unit, each layer
independently picks argmin err − λ·cost), then a greedy exact-or-closest fix-up (best error change
per unit of cost, never overshooting), and finally `space.repair` if the budget is still not hit
exactly. Only the last step can lose optimality; the result is always feasible (asserted).
"""
from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from functools import reduce
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from raypress.errors import RayPressError

__all__ = [
    "LayerStats",
    "ReducedCosts",
    "integer_costs",
    "reduce_costs",
    "solve_budgeted",
    "project",
    "uniform",
    "owl",
    "outlier_ratios",
    "hessian_schedule",
    "obs_error",
    "layer_errors",
    "dp_schedule",
    "random_schedule",
    "layer_stats_from_model",
    "stats_from",
    "block_of",
    "SCHEDULES",
    "run_schedule",
]

DEFAULT_MAX_CELLS = 50_000_000


# --------------------------------------------------------------------------------------------
# statistics holders
# --------------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """What the statistic-driven schedules need per linear layer.

    weight:  [out, in] dense weight (torch or numpy; never modified)
    norms:   [in] ‖X_j‖₂ per input column (OWL; None -> plain magnitude |W|)
    hessian: [in, in] H = 2/N Σ x xᵀ (Hessian scheduler)
    """

    weight: Any
    norms: Any = None
    hessian: Any = None


StatsLike = Mapping[str, Any] | Callable[[str], Any]


def _as_stats(obj: Any) -> LayerStats:
    if isinstance(obj, LayerStats):
        return obj
    if isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 3:
        return LayerStats(*obj)
    if isinstance(obj, Mapping):
        return LayerStats(obj["weight"], obj.get("norms"), obj.get("hessian"))
    raise RayPressError(
        f"layer statistics of type {type(obj).__name__} are not understood; pass LayerStats(weight, "
        "norms, hessian) or a (weight, norms[, hessian]) tuple per layer"
    )


def _get_stats(stats: StatsLike | None, layer: str, what: str) -> LayerStats:
    if stats is None:
        raise RayPressError(
            f"the {what} schedule needs per-layer statistics; pass stats={{layer: LayerStats(...)}} "
            "(see raypress.search.schedules.layer_stats_from_model)"
        )
    if callable(stats) and not isinstance(stats, Mapping):
        return _as_stats(stats(layer))
    if layer not in stats:
        raise RayPressError(f"no statistics for layer {layer!r}; collect them for every layer of the search space")
    return _as_stats(stats[layer])


def _t(x, dtype=torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", dtype)
    arr = np.asarray(x)
    if not arr.flags.writeable:  # read-only database views: copy (torch warns on them otherwise)
        arr = np.array(arr, dtype=np.float64 if dtype == torch.float64 else np.float32)
    return torch.as_tensor(arr, dtype=dtype)


def layer_stats_from_model(adapter, input_norms: Mapping | None = None,
                           hessians: Mapping | None = None,
                           layers: Sequence[str] | None = None) -> dict[str, LayerStats]:
    """LayerStats for the adapter's linear layers (weights by reference, no copies)."""
    lin = adapter.linear_layers()
    names = list(layers) if layers is not None else list(lin)
    return {
        n: LayerStats(
            lin[n].weight.data,
            None if input_norms is None else input_norms.get(n),
            None if hessians is None else hessians.get(n),
        )
        for n in names
    }


def _lookup(src, layer):
    if src is None:
        return None
    if callable(src) and not isinstance(src, Mapping):
        return src(layer)
    return src.get(layer)


def _dense_from_db(db, layer):
    vals = db.level_values[layer]
    if 0.0 not in [float(v) for v in vals]:
        raise RayPressError(
            f"layer {layer!r}: the database has no dense (0.0) level to read the weight from; pass stats= "
            "built with layer_stats_from_model(adapter, ...)"
        )
    return db.variant(layer, [float(v) for v in vals].index(0.0))


def stats_from(stats: StatsLike | None = None, *, db=None, norms=None, hessians=None) -> StatsLike | None:
    """`stats` if given; else a lazy callable layer -> LayerStats(dense weight from the database's
    0.0 level, norms[layer], hessians[layer]) (norms / hessians: dicts or callables)."""
    if stats is not None or db is None:
        return stats
    return lambda layer: LayerStats(_dense_from_db(db, layer), _lookup(norms, layer), _lookup(hessians, layer))


_BLOCK_RE = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_of(name: str) -> str:
    """Block key of a layer name: the prefix up to the first numeric component
    ('model.layers.3.mlp.up_proj' -> 'model.layers.3'); the name itself if it has none."""
    m = _BLOCK_RE.match(name)
    return m.group(1) if m else name


# --------------------------------------------------------------------------------------------
# exact integer budget
# --------------------------------------------------------------------------------------------
def integer_costs(space) -> tuple[list[list[int]], int]:
    """The contract's exact integer costs cost[l][k] and budget (python ints)."""
    costs = [[int(n) * int(round(v * 1000)) for v in vals]
             for n, vals in zip(space.n_params, space.level_values)]
    budget = int(round(space.target * 1000)) * int(sum(int(n) for n in space.n_params))
    return costs, budget


@dataclass
class ReducedCosts:
    """Costs in small units: costs[l][k] = (cost[l][k] − min_k cost[l][k]) / unit, budget alike."""

    costs: list[np.ndarray]  # int64 per layer
    budget: int              # remaining budget in units, 0 <= budget <= total_max
    unit: int
    offset: int              # Σ_l min_k cost[l][k] (original units)
    total_max: int           # Σ_l max_k costs[l][k] (units)


def reduce_costs(space) -> ReducedCosts:
    costs, budget = integer_costs(space)
    mins = [min(c) for c in costs]
    shifted = [[c - m for c in cs] for cs, m in zip(costs, mins)]
    offset = sum(mins)
    rest = budget - offset
    unit = reduce(math.gcd, (c for cs in shifted for c in cs), 0)
    total = sum(max(cs) for cs in shifted)
    if unit == 0:  # every layer has a single cost
        if rest != 0:
            raise RayPressError(
                f"target {space.target} is not reachable: every layer has one fixed cost; change the target"
            )
        return ReducedCosts([np.zeros(len(cs), np.int64) for cs in shifted], 0, 1, offset, 0)
    if rest < 0 or rest > total or rest % unit:
        lo = offset / (1000 * sum(space.n_params))
        hi = (offset + total) / (1000 * sum(space.n_params))
        raise RayPressError(
            f"target {space.target} is not exactly reachable by the level ladders (range {lo:.4g}..{hi:.4g}, "
            f"step {unit / (1000 * sum(space.n_params)):.3g}); pick a target on that grid"
        )
    red = [np.asarray([c // unit for c in cs], dtype=np.int64) for cs in shifted]
    return ReducedCosts(red, rest // unit, unit, offset, total // unit)


def _errors_matrix(space, errors) -> list[np.ndarray]:
    out = []
    for i, layer in enumerate(space.layers):
        if isinstance(errors, Mapping):
            if layer not in errors:
                raise RayPressError(f"no errors for layer {layer!r}; compute them for every layer (layer_errors)")
            e = errors[layer]
        else:
            e = errors[i]
        e = np.asarray(e, dtype=np.float64).reshape(-1)
        if e.shape[0] != len(space.level_values[i]):
            raise RayPressError(
                f"layer {layer!r} has {len(space.level_values[i])} levels but {e.shape[0]} errors; "
                "give one error per level"
            )
        if not np.all(np.isfinite(e)):
            raise RayPressError(f"layer {layer!r} has non-finite errors; check its Hessian / database variants")
        out.append(e)
    return out


def solve_budgeted(space, errors, *, max_cells: int = DEFAULT_MAX_CELLS,
                   return_info: bool = False):
    """argmin Σ_l errors[l][k_l]  s.t.  Σ_l cost[l][k_l] == budget exactly.

    errors: {layer: per-level sequence} or a list aligned with space.layers.
    Exact DP over the reduced budget when L x W <= max_cells (W = min(B, total − B) + 1: the table
    is run on the complement when the budget is past the middle); Lagrangian fallback otherwise.
    """
    red = reduce_costs(space)
    err = _errors_matrix(space, errors)
    L = len(space.layers)
    width = min(red.budget, red.total_max - red.budget) + 1
    if L * width <= max_cells:
        levels = _dp_exact(red, err)
        method = "dp"
    else:
        levels = _lagrangian(red, err)
        method = "lagrangian"
    cfg = {layer: int(k) for layer, k in zip(space.layers, levels)}
    cost = sum(int(red.costs[i][k]) for i, k in enumerate(levels))
    if cost != red.budget:
        method += "+repair"
        cfg = {k: int(v) for k, v in space.repair(cfg, np.random.default_rng(0)).items()}
    assert space.is_feasible(cfg), "solve_budgeted produced an infeasible config"
    if return_info:
        total = sum(float(err[i][cfg[layer]]) for i, layer in enumerate(space.layers))
        return cfg, {"method": method, "objective": total, "cells": L * width}
    return cfg


def _dp_exact(red: ReducedCosts, err: list[np.ndarray]) -> list[int]:
    B, S = red.budget, red.total_max
    flip = B > S - B
    if flip:  # track the complement: Σ (max_l − c_l) == S − B
        costs = [c.max() - c for c in red.costs]
        W = S - B
    else:
        costs = red.costs
        W = B
    L = len(costs)
    n_lv = max(len(c) for c in costs)
    ch_dtype = np.int8 if n_lv < 127 else np.int16
    choice = np.full((L, W + 1), -1, dtype=ch_dtype)
    dp = np.full(W + 1, np.inf)
    dp[0] = 0.0
    for l in range(L):
        new = np.full(W + 1, np.inf)
        ch = choice[l]
        for k in range(len(costs[l])):
            c = int(costs[l][k])
            if c > W:
                continue
            cand = dp[: W + 1 - c] + err[l][k]
            tgt = new[c:]
            better = cand < tgt
            tgt[better] = cand[better]
            ch[c:][better] = k
        dp = new
    if not np.isfinite(dp[W]):
        raise RayPressError("no level combination hits the budget exactly; change the target")  # unreachable
    levels = [0] * L
    b = W
    for l in range(L - 1, -1, -1):
        k = int(choice[l, b])
        levels[l] = k
        b -= int(costs[l][k])
    assert b == 0
    return levels


def _lagrangian(red: ReducedCosts, err: list[np.ndarray]) -> list[int]:
    L = len(err)
    K = max(len(e) for e in err)
    C = np.full((L, K), np.iinfo(np.int64).max // 4, dtype=np.int64)
    E = np.full((L, K), np.inf)
    for i, (c, e) in enumerate(zip(red.costs, err)):
        C[i, : len(c)] = c
        E[i, : len(e)] = e
    Cf = np.where(np.isfinite(E), C, 0).astype(np.float64)
    rows = np.arange(L)
    B = red.budget

    def pick(lam):
        obj = np.where(np.isfinite(E), E - lam * Cf, np.inf)
        best = obj.min(axis=1, keepdims=True)
        # ties -> the cheaper level (first minimum after masking)
        tie = np.where(obj <= best + 1e-15 * np.abs(best), Cf, np.inf)
        ks = tie.argmin(axis=1)
        return ks, int(C[rows, ks].sum())

    # total cost is nondecreasing in λ; bisection for the smallest λ reaching the budget
    finite = E[np.isfinite(E)]
    scale = max(1e-12, float(finite.max() - finite.min())) + 1.0
    lo, hi = -scale, scale
    while pick(hi)[1] < B:
        hi *= 2
    while pick(lo)[1] > B:
        lo *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if pick(mid)[1] >= B:
            hi = mid
        else:
            lo = mid
    ks, cost = pick(hi)
    # greedy fix-up toward the budget: the single level move with the best Δerror per Δcost
    # that goes toward the budget without overshooting it
    for _ in range(20 * L + 100):
        gap = B - cost
        if gap == 0:
            break
        dc = C - C[rows, ks][:, None]
        ok = np.isfinite(E) & (dc != 0) & (np.sign(dc) == np.sign(gap)) & (np.abs(dc) <= abs(gap))
        if not ok.any():
            break
        score = np.where(ok, (E - E[rows, ks][:, None]) / np.maximum(np.abs(dc), 1), np.inf)
        i, k2 = np.unravel_index(int(np.argmin(score)), score.shape)
        cost += int(dc[i, k2])
        ks[i] = k2
    return [int(k) for k in ks]


def project(space, desired: Mapping[str, float] | Sequence[float], *,
            max_cells: int = DEFAULT_MAX_CELLS) -> dict[str, int]:
    """Snap per-layer desired values to the ladders with the exact budget: the feasible config
    minimising Σ_l n_l (value_l − desired_l)² (snap + exact fix-up in one DP)."""
    total = float(sum(space.n_params))
    errs = []
    for i, layer in enumerate(space.layers):
        d = float(desired[layer] if isinstance(desired, Mapping) else desired[i])
        v = np.asarray(space.level_values[i], dtype=np.float64)
        errs.append(space.n_params[i] / total * (v - d) ** 2)
    return solve_budgeted(space, errs, max_cells=max_cells)


def _finish(space, cfg: dict) -> dict[str, int]:
    cfg = {layer: int(cfg[layer]) for layer in space.layers}
    assert space.is_feasible(cfg), "schedule produced an infeasible config"
    return cfg


def _ladder_range(space) -> tuple[float, float]:
    return (max(min(v) for v in space.level_values), min(max(v) for v in space.level_values))


def _require_sparsity_target(space, what: str) -> None:
    if not (0.0 <= space.target < 1.0):
        raise RayPressError(
            f"the {what} schedule is for sparsity ladders (target in [0, 1)), got target {space.target}; "
            "use dp_schedule or uniform for other families"
        )


# --------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------
def uniform(space) -> dict[str, int]:
    """Every layer at the target level (space.uniform)."""
    return _finish(space, space.uniform())


def outlier_ratios(space, stats: StatsLike | None, M: float = 5.0,
                   blocks: Mapping[str, str] | None = None) -> dict[str, float]:
    """OWL's layerwise outlier ratio per block: the fraction of the block's scores |W_ij|·‖X_j‖
    (all linear layers of the block together) above M x their mean."""
    groups: dict[str, list[str]] = {}
    for layer in space.layers:
        groups.setdefault(blocks[layer] if blocks else block_of(layer), []).append(layer)
    ratios = {}
    for b, layers in groups.items():
        scores = []
        for layer in layers:
            st = _get_stats(stats, layer, "OWL")
            w = _t(st.weight).abs()
            if st.norms is not None:
                w = w * _t(st.norms).reshape(1, -1)
            scores.append(w.reshape(-1))
        total = sum(float(s.double().sum()) for s in scores)
        count = sum(s.numel() for s in scores)
        thr = M * total / max(count, 1)
        ratios[b] = sum(int((s > thr).sum()) for s in scores) / max(count, 1)
    return ratios


def owl(space, stats: StatsLike | None = None, lam: float = 0.08, M: float = 5.0,
        blocks: Mapping[str, str] | None = None, *, db=None, norms=None) -> dict[str, int]:
    """OWL: more outliers in a block -> lower sparsity there.

    Block outlier ratios D_b are min-max scaled into [0, 2λ] and centred (params-weighted):
    δ_b ∈ [−2λ, 2λ] with mean 0 (exactly [−λ, λ] for a symmetric spread), density_b = 1 − s + δ_b,
    s_b = 1 − density_b (as in the OWL reference code). Every layer of a block gets s_b (clipped to
    the ladder); snap + exact fix-up via `project`.
    blocks: optional {layer: block key}; default: `block_of(layer)`.
    stats: {layer: LayerStats(weight, norms)} or callable; or db= (dense weights from its 0.0 level)
    with norms= {layer: ‖X_j‖ vector} (calibrate.collect_input_norms).
    """
    _require_sparsity_target(space, "OWL")
    ratios = outlier_ratios(space, stats_from(stats, db=db, norms=norms), M=M, blocks=blocks)
    keys = list(ratios)
    r = np.asarray([ratios[b] for b in keys], dtype=np.float64)
    bparams = {b: 0 for b in keys}
    for layer, n in zip(space.layers, space.n_params):
        bparams[blocks[layer] if blocks else block_of(layer)] += n
    w = np.asarray([bparams[b] for b in keys], dtype=np.float64)
    ptp = float(r.max() - r.min()) if r.size else 0.0
    d = (r - r.min()) / ptp * (2 * lam) if ptp > 0 else np.zeros_like(r)
    d = d - float((d * w).sum() / w.sum())
    density = (1.0 - space.target) + d
    lo, hi = _ladder_range(space)
    block_sparsity = {b: float(np.clip(1.0 - x, lo, hi)) for b, x in zip(keys, density)}
    desired = {layer: block_sparsity[blocks[layer] if blocks else block_of(layer)] for layer in space.layers}
    return _finish(space, project(space, desired))


def obs_error(weight, hessian, sparsity: float, percdamp: float = 0.01) -> float:
    """OBS estimate of the error of pruning a fraction `sparsity` of the weights:
    Σ over the removed weights of w_ij² / [H⁻¹]_jj, removing those with the smallest saliency."""
    W = _t(weight)
    H = _t(hessian, torch.float64).clone()
    n_remove = int(round(sparsity * W.numel()))
    if n_remove <= 0:
        return 0.0
    diag = torch.diagonal(H)
    dead = diag == 0
    H[dead, dead] = 1.0
    W = W.clone()
    W[:, dead] = 0.0
    damp = percdamp * float(torch.diagonal(H).mean())
    H += damp * torch.eye(H.shape[0], dtype=H.dtype)
    try:  # diag(H⁻¹)_j = Σ_i (L⁻¹)_ij² with H = L Lᵀ (much faster than cholesky_inverse on CPU)
        Linv = torch.linalg.solve_triangular(torch.linalg.cholesky(H), torch.eye(H.shape[0], dtype=H.dtype),
                                             upper=False)
        hd = (Linv * Linv).sum(0)
    except RuntimeError:
        hd = torch.diagonal(torch.linalg.pinv(H))
    hd = hd.clamp_min(1e-12).to(torch.float32)
    sal = (W**2 / hd.reshape(1, -1)).reshape(-1).numpy()
    n_remove = min(n_remove, sal.size)
    if n_remove == sal.size:
        return float(sal.sum(dtype=np.float64))
    return float(np.partition(sal, n_remove - 1)[:n_remove].sum(dtype=np.float64))


def _kmeans_1d(x: np.ndarray, k: int) -> np.ndarray:
    """Optimal 1-D k-means (DP over the sorted values); labels 0..k'-1 ascending in value."""
    n = len(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    k = max(1, min(k, len(np.unique(xs))))
    P = np.concatenate([[0.0], np.cumsum(xs)])
    P2 = np.concatenate([[0.0], np.cumsum(xs * xs)])
    D = np.full((k + 1, n + 1), np.inf)
    D[0, 0] = 0.0
    arg = np.zeros((k + 1, n + 1), dtype=np.int64)
    for m in range(1, k + 1):
        for j in range(m, n + 1):
            i = np.arange(m - 1, j)
            cnt = j - i
            s = P[j] - P[i]
            sse = (P2[j] - P2[i]) - s * s / cnt
            vals = D[m - 1, i] + sse
            b = int(np.argmin(vals))
            D[m, j] = vals[b]
            arg[m, j] = i[b]
    labels_sorted = np.empty(n, dtype=np.int64)
    j = n
    for m in range(k, 0, -1):
        i = arg[m, j]
        labels_sorted[i:j] = m - 1
        j = i
    labels = np.empty(n, dtype=np.int64)
    labels[order] = labels_sorted
    return labels


def _shift_to_mean(values: np.ndarray, weights: np.ndarray, target: float, lo: float, hi: float) -> np.ndarray:
    """values + δ clipped to [lo, hi] with weighted mean == target (bisection on δ)."""
    if not lo - 1e-12 <= target <= hi + 1e-12:
        raise RayPressError(f"target {target} is outside [s_min, s_max] = [{lo}, {hi}]; widen them")
    a, b = -2.0 - abs(lo) - abs(hi), 2.0 + abs(lo) + abs(hi)
    for _ in range(200):
        m = 0.5 * (a + b)
        mean = float((np.clip(values + m, lo, hi) * weights).sum() / weights.sum())
        if mean < target:
            a = m
        else:
            b = m
    return np.clip(values + 0.5 * (a + b), lo, hi)


def hessian_schedule(space, stats: StatsLike | None = None, k: int = 5, s_min: float | None = None,
                     s_max: float | None = None, percdamp: float = 0.01,
                     return_info: bool = False, *, db=None, hessians=None):
    """Hessian layer-wise scheduler.

    Per layer the OBS error of pruning it at the target sparsity (`obs_error`), log-transformed,
    clustered with optimal 1-D k-means into k groups. Group ranks are spread linearly over
    [s_min, s_max] (default target ± 0.1, clipped to the ladder), the lowest-error group at s_max,
    then shifted (and clipped) so the params-weighted mean equals the target; snap + exact fix-up.
    stats: {layer: LayerStats(weight, hessian=H)} or callable; or db= with hessians= {layer: H}.
    """
    _require_sparsity_target(space, "Hessian")
    stats = stats_from(stats, db=db, hessians=hessians)
    s = float(space.target)
    lo, hi = _ladder_range(space)
    s_min = max(lo, s - 0.1) if s_min is None else float(s_min)
    s_max = min(hi, s + 0.1) if s_max is None else float(s_max)
    errs = []
    for layer in space.layers:
        st = _get_stats(stats, layer, "Hessian")
        if st.hessian is None:
            raise RayPressError(f"layer {layer!r} has no Hessian; collect them with raypress.calibrate.collect_hessians")
        errs.append(obs_error(st.weight, st.hessian, s, percdamp=percdamp))
    errs = np.asarray(errs, dtype=np.float64)
    tiny = max(1e-30, 1e-12 * float(errs.max()) if errs.size else 1e-30)
    logerr = np.log(errs + tiny)
    labels = _kmeans_1d(logerr, k)
    kk = int(labels.max()) + 1
    # rank 0 = lowest error -> s_max ; rank kk-1 -> s_min
    ladder = np.linspace(s_max, s_min, kk) if kk > 1 else np.asarray([s])
    values = ladder[labels]
    weights = np.asarray(space.n_params, dtype=np.float64)
    values = _shift_to_mean(values, weights, s, s_min, s_max)
    cfg = _finish(space, project(space, {layer: float(v) for layer, v in zip(space.layers, values)}))
    if return_info:
        return cfg, {"errors": dict(zip(space.layers, errs.tolist())),
                     "clusters": dict(zip(space.layers, labels.tolist())),
                     "desired": dict(zip(space.layers, values.tolist()))}
    return cfg


@torch.no_grad()
def layer_errors(db, hessians, dense: Mapping | Callable | None = None,
                 layers: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Normalized per-level error ‖(W−Ŵ_k)X‖² / ‖WX‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) for every layer
    and level of a LevelDatabase (the N/2 of H = 2/N XXᵀ cancels).

    hessians: {layer: H} or callable. dense: {layer: W} or callable; default: the database's 0.0
    (dense) variant.
    """
    out: dict[str, list[float]] = {}
    for layer in (layers if layers is not None else db.layers):
        if dense is not None:
            W = _t(dense(layer) if callable(dense) and not isinstance(dense, Mapping) else dense[layer])
        else:
            W = _t(_dense_from_db(db, layer))
        H = hessians(layer) if callable(hessians) and not isinstance(hessians, Mapping) else hessians[layer]
        H = _t(H)
        denom = float(((W @ H) * W).double().sum())
        errs = []
        for k in range(len(db.level_values[layer])):
            D = W - _t(db.variant(layer, k))
            num = float(((D @ H) * D).double().sum())
            errs.append(max(num, 0.0) / denom if denom > 0 else 0.0)
        out[layer] = errs
    return out


def dp_schedule(space, errors=None, *, db=None, hessians=None, dense=None,
                max_cells: int = DEFAULT_MAX_CELLS) -> dict[str, int]:
    """Knapsack: minimise Σ errors[layer][level] with the exact budget (see `solve_budgeted`).
    errors default: layer_errors(db, hessians, dense)."""
    if errors is None:
        if db is None or hessians is None:
            raise RayPressError("dp_schedule needs errors=, or db= and hessians= to compute them (layer_errors)")
        errors = layer_errors(db, hessians, dense=dense, layers=space.layers)
    return _finish(space, solve_budgeted(space, errors, max_cells=max_cells))


def random_schedule(space, seed: int = 0) -> dict[str, int]:
    """A random feasible config (space.random_feasible with default_rng(seed))."""
    return _finish(space, space.random_feasible(np.random.default_rng(seed)))


SCHEDULES: dict[str, Callable[..., dict[str, int]]] = {
    "uniform": uniform,
    "owl": owl,
    "hessian": hessian_schedule,
    "dp": dp_schedule,
    "random": random_schedule,
}


def run_schedule(name: str, space, **ctx) -> dict[str, int]:
    """Run a registered schedule; ctx may carry more keys than it takes (stats, errors, db,
    hessians, seed, lam, M, k, ...) — only those in its signature are passed."""
    if name not in SCHEDULES:
        raise RayPressError(f"unknown schedule {name!r}; choose one of {', '.join(sorted(SCHEDULES))}")
    fn = SCHEDULES[name]
    params = inspect.signature(fn).parameters
    kw = {k: v for k, v in ctx.items() if k in params and k != "space"}
    return _finish(space, fn(space, **kw))
