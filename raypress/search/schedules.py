"""One-shot schedules: a single exactly-feasible config {layer: level_index} of a SearchSpace.

- `uniform(space)`                       every layer at the target level
- `owl(space, stats, lam, M)`            OWL, outlier-weighted layerwise sparsity (Yin et al. 2023)
- `hessian_schedule(space, stats, k)`    OBS error at the target sparsity, log, 1-D k-means into k
                                         levels, higher error -> lower sparsity
- `dp_schedule(space, errors)`           knapsack: min Σ errors[layer][level] s.t. the exact budget
- `SCHEDULES` / `run_schedule(name, space, **ctx)`  registry; ctx may hold more keys than needed

Exactness. Budgets are integers and their one definition is budget.py (`space.budget_model`):
`solve_budgeted` is its exact solver (DP over reduced units, Lagrangian fallback past `max_cells`)
plus `space.repair` when the relaxation misses the budget. Only the last step can lose optimality;
the result is always feasible (asserted).

Snapping + exact fix-up of a continuous schedule (OWL, Hessian) is one call: `project(space,
desired)` = the exactly-feasible config nearest to the desired per-layer values in the
params-weighted L2 sense (the same DP with errors n_l·(v_lk − d_l)²).

"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from raypress.budget import MAX_DP_CELLS as DEFAULT_MAX_CELLS
from raypress.errors import RayPressError
from raypress.hessian import damp_, inverse_diagonal

__all__ = [
    "LayerStats",
    "solve_budgeted",
    "project",
    "uniform",
    "owl",
    "outlier_ratios",
    "hessian_schedule",
    "obs_error",
    "layer_errors",
    "dp_schedule",
    "layer_stats_from_model",
    "stats_from",
    "block_of",
    "SCHEDULES",
    "run_schedule",
]



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
# exact integer budget (budget.py decides; this is its objective-driven use)
# --------------------------------------------------------------------------------------------
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
    """argmin Σ_l errors[l][k_l]  s.t.  Σ_l cost[l][k_l] == budget exactly (budget.Budget.solve).

    errors: {layer: per-level sequence} or a list aligned with space.layers. Unreachable target ->
    RayPressError with the budget's verdict (nearest reachable targets)."""
    space.require_reachable()
    err = _errors_matrix(space, errors)
    b = space.budget_model
    levels, method = b.solve(err, max_cells=max_cells)
    if levels is None:
        space.require_reachable()  # unreachable despite the verdict (too large to prove): say so
        raise RayPressError(space.verdict().message or f"target {space.target:g} cannot be hit exactly; change it")
    cfg = {layer: int(k) for layer, k in zip(space.layers, levels)}
    if not space.is_feasible(cfg):
        method += "+repair"
        cfg = {k: int(v) for k, v in space.repair(cfg, np.random.default_rng(0)).items()}
    assert space.is_feasible(cfg), "solve_budgeted produced an infeasible config"
    if return_info:
        total = sum(float(err[i][cfg[layer]]) for i, layer in enumerate(space.layers))
        width = min(b.budget - b.offset, b.total_units * b.unit - b.budget + b.offset) // b.unit + 1
        return cfg, {"method": method, "objective": total, "cells": len(space.layers) * width}
    return cfg


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
    return {b: block_outlier_ratio([_get_stats(stats, layer, "OWL") for layer in layers], M)
            for b, layers in groups.items()}


def block_outlier_ratio(stats: Sequence[LayerStats], M: float = 5.0) -> float:
    """One block's outlier ratio: the fraction of its scores |W_ij|·‖X_j‖ above M x their mean."""
    scores = []
    for st in stats:
        w = _t(st.weight).abs()
        if st.norms is not None:
            w = w * _t(st.norms).reshape(1, -1)
        scores.append(w.reshape(-1))
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    thr = M * total / max(count, 1)
    return sum(int((s > thr).sum()) for s in scores) / max(count, 1)


def owl(space, stats: StatsLike | None = None, lam: float = 0.08, M: float = 5.0,
        blocks: Mapping[str, str] | None = None, *, db=None, norms=None,
        ratios: Mapping[str, float] | None = None) -> dict[str, int]:
    """OWL: more outliers in a block -> lower sparsity there.

    Block outlier ratios D_b are min-max scaled into [0, 2λ] and centred (params-weighted):
    δ_b ∈ [−2λ, 2λ] with mean 0 (exactly [−λ, λ] for a symmetric spread), density_b = 1 − s + δ_b,
    s_b = 1 − density_b (as in the OWL reference code). Every layer of a block gets s_b (clipped to
    the ladder); snap + exact fix-up via `project`.
    blocks: optional {layer: block key}; default: `block_of(layer)`.
    stats: {layer: LayerStats(weight, norms)} or callable; or db= (dense weights from its 0.0 level)
    with norms= {layer: ‖X_j‖ vector} (calibrate.collect_input_norms); or ratios= {block: D_b}
    already computed (`schedule_inputs`, block by block on a streamed model).
    """
    _require_sparsity_target(space, "OWL")
    if ratios is None:
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
    # on the Hessian's device: a 36864-wide OPT-66B fc2 takes minutes on CPU, a second on a GPU
    dev = hessian.device if isinstance(hessian, torch.Tensor) else torch.device("cpu")
    n_remove = int(round(sparsity * int(np.prod(weight.shape))))
    if n_remove <= 0:
        return 0.0
    W = (weight.detach() if isinstance(weight, torch.Tensor) else _t(weight)).to(dev, torch.float32, copy=True)
    H = (hessian.detach() if isinstance(hessian, torch.Tensor) else _t(hessian)).to(dev, torch.float64, copy=True)
    dead = damp_(H, percdamp)
    W[:, dead] = 0.0
    hd = inverse_diagonal(H).clamp_min(1e-12).to(torch.float32)
    sal = (W**2 / hd.reshape(1, -1)).reshape(-1)
    n_remove = min(n_remove, sal.numel())
    if n_remove == sal.numel():
        return float(sal.sum(dtype=torch.float64))
    if sal.is_cuda:
        return float(torch.sort(sal).values[:n_remove].sum(dtype=torch.float64))
    sal = sal.numpy()
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
                     return_info: bool = False, *, db=None, hessians=None,
                     obs_errors: Mapping[str, float] | None = None):
    """Hessian layer-wise scheduler.

    Per layer the OBS error of pruning it at the target sparsity (`obs_error`), log-transformed,
    clustered with optimal 1-D k-means into k groups. Group ranks are spread linearly over
    [s_min, s_max] (default target ± 0.1, clipped to the ladder), the lowest-error group at s_max,
    then shifted (and clipped) so the params-weighted mean equals the target; snap + exact fix-up.
    stats: {layer: LayerStats(weight, hessian=H)} or callable; or db= with hessians= {layer: H}; or
    obs_errors= {layer: OBS error at the target} already computed (`schedule_inputs`, block by block).
    """
    _require_sparsity_target(space, "Hessian")
    s = float(space.target)
    lo, hi = _ladder_range(space)
    s_min = max(lo, s - 0.1) if s_min is None else float(s_min)
    s_max = min(hi, s + 0.1) if s_max is None else float(s_max)
    if obs_errors is not None:
        errs = [float(obs_errors[layer]) for layer in space.layers]
    else:
        stats = stats_from(stats, db=db, hessians=hessians)
        errs = []
        for layer in space.layers:
            st = _get_stats(stats, layer, "Hessian")
            if st.hessian is None:
                raise RayPressError(f"layer {layer!r} has no Hessian; collect them with "
                                    "raypress.calibrate.collect_hessians")
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
            W = dense(layer) if callable(dense) and not isinstance(dense, Mapping) else dense[layer]
        else:
            W = _dense_from_db(db, layer)
        H = hessians(layer) if callable(hessians) and not isinstance(hessians, Mapping) else hessians[layer]
        out[layer] = level_errors(db, layer, W, H)
    return out


@torch.no_grad()
def level_errors(db, layer: str, weight, hessian) -> list[float]:
    """One layer's `layer_errors`, computed on the Hessian's device (a GPU when the caller has one)."""
    H = hessian.float() if isinstance(hessian, torch.Tensor) else _t(hessian)
    W = (weight.detach() if isinstance(weight, torch.Tensor) else _t(weight)).to(H.device, torch.float32)
    denom = float(((W @ H) * W).double().sum())
    errs = []
    for k in range(len(db.level_values[layer])):
        D = W - _t(db.variant(layer, k)).to(H.device)
        num = float(((D @ H) * D).double().sum())
        errs.append(max(num, 0.0) / denom if denom > 0 else 0.0)
    return errs


def dp_schedule(space, errors=None, *, db=None, hessians=None, dense=None,
                max_cells: int = DEFAULT_MAX_CELLS) -> dict[str, int]:
    """Knapsack: minimise Σ errors[layer][level] with the exact budget (see `solve_budgeted`).
    errors default: layer_errors(db, hessians, dense)."""
    if errors is None:
        if db is None or hessians is None:
            raise RayPressError("dp_schedule needs errors=, or db= and hessians= to compute them (layer_errors)")
        errors = layer_errors(db, hessians, dense=dense, layers=space.layers)
    return _finish(space, solve_budgeted(space, errors, max_cells=max_cells))


SCHEDULES: dict[str, Callable[..., dict[str, int]]] = {
    "uniform": uniform,
    "owl": owl,
    "hessian": hessian_schedule,
    "dp": dp_schedule,
}


def takes_level_errors(name: str) -> bool:
    """Whether schedule `name` uses every layer's error at every level (`errors`, DP): the costly part
    of the statistics pass, skipped for the others. Read from its signature, like run_schedule's inputs."""
    return name in SCHEDULES and "errors" in inspect.signature(SCHEDULES[name]).parameters


def run_schedule(name: str, space, **ctx) -> dict[str, int]:
    """Run a registered schedule; ctx may carry more keys than it takes (stats, errors, db,
    hessians, seed, lam, M, k, ...) — only those in its signature are passed."""
    if name not in SCHEDULES:
        raise RayPressError(f"unknown schedule {name!r}; choose one of {', '.join(sorted(SCHEDULES))}")
    fn = SCHEDULES[name]
    params = inspect.signature(fn).parameters
    kw = {k: v for k, v in ctx.items() if k in params and k != "space"}
    return _finish(space, fn(space, **kw))
