"""Structured width compression for Llama-family models: attention heads and MLP channels.

Units (one pair per decoder block, forward order)::

    model.layers.<i>.self_attn     attention: q/k/v rows of heads, o_proj input columns
    model.layers.<i>.mlp           MLP: gate/up rows and down_proj input columns of channels

Every unit has a ladder of *levels*; level 0 is dense, and the level value is the exact
fraction of the unit's Linear parameters (weights + biases) the level removes, so the search
space's params-weighted mean value is the removed fraction of the searched block parameters.

Importance (OBS / ZipLM-style, one shot on the dense model)
    Φᵢⱼ = Wᵢⱼ² / [H⁻¹]ⱼⱼ for the *output* projection (o_proj / down_proj) with its input
    Hessian H = 2XXᵀ (+ 1% damping). A MLP channel's score is Σ of Φ over its down_proj column
    (one shared mask for gate/up rows and down columns); a query head's score is Σ of Φ over
    its head_dim o_proj columns. Masks are nested (level k+1 ⊂ level k).

Attention granularity (GQA)
    ``attn="query"`` (default whenever a KV head serves > 1 query head, e.g. SmolLM2 9 q / 3 kv):
    keep the same number r of query heads in *every* KV group (the best r of each group by score)
    and all KV heads. A level = r ∈ {R, ..., 1}. This is what keeps an exported model loadable
    by transformers' LlamaAttention: ``repeat_kv`` needs a uniform number of query heads per KV
    head (``num_key_value_groups = r``), and the per-layer KV-head count stays the config's, so
    DynamicCache *and* StaticCache keep working. SmolLM2-135M: 3 levels removing 0 / 25 / 50 %
    of the attention parameters (exact thousandths).
    ``attn="group"`` (forced for MHA, where R = 1): drop whole KV groups (a KV head with its
    query heads); level = kept groups ∈ {G, ..., 1}. Also loadable (num_key_value_groups is
    unchanged) but the per-layer KV-head count varies, so StaticCache(config) is wrong for it.

Reformation: the kept o_proj / down_proj columns are refit to the dense outputs on the
calibration data (`raypress.reform.lstsq_columns`, or ADMM with ``reform="admm"``).

Budget exactness: SearchSpace costs are n_params · round(value · 1000) and a feasible config
must hit the budget exactly, so by default ladders use steps whose removed fraction is a whole
number of thousandths and is the same for every step (linear costs: level switches of equal
units cancel exactly). For SmolLM2-135M that is 192-channel MLP steps (12.5 %) and query-head
steps (25 %); `width_target` then picks the reachable removed fraction nearest to the request
(multiples of 0.025 are reachable there, so keep 0.8 / 0.7 are exact). Finer MLP steps
(``mlp_step=64``) are allowed: values are then rounded to thousandths (a warning says by how
much the value misstates the real parameter count) — see `WidthLevels.exact`.
Searcher note: attention and MLP steps cost differently (SmolLM2: 2 : 3 in units of 110 592
params), so plain pair level switches only move budget attention↔attention and MLP↔MLP — the
attention/MLP split stays that of the start config. `SearchSpace.mutate(..., three_way=0.3)` (a
1-vs-2 layer switch) lets it flow between the kinds; `prepare_width` suggests it in
``context["searcher_hints"]``.

Database: `build_width_database` returns a plain dict of numpy arrays (picklable, fit for
``ray.put``) holding per (unit, level) the kept index set and the reformed output weight
[hidden, n_kept_inputs]. `WidthApplier` applies configs in place (fresh tensors only; never
writes the database arrays). `export_width` writes a physically smaller HF folder plus
``raypress.json`` and a generated modeling file: it loads with
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` or, without remote code,
`load_width_model(out)` (stock class, per-block Linear sizes replaced before the weights load).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raypress.compress.base import Applier
from raypress.errors import RayPressError

FORMAT = "raypress-width/1"
ATTN_MODES = ("auto", "query", "group")
REFORMS = ("lstsq", "admm", "none")

__all__ = [
    "BlockGeometry", "UnitLadder", "WidthLevels", "width_levels", "width_target", "width_space",
    "width_initial", "width_hessians", "width_importance", "build_width_database", "WidthApplier",
    "export_width", "load_width_model", "count_params", "prepare_width", "kept_params",
]


# ============================================================================ layout / geometry
@dataclass
class _Layout:
    prefix: str
    blocks: list
    attn_name: str
    mlp_name: str

    def unit(self, i: int, kind: str) -> str:
        return f"{self.prefix}.{i}.{self.attn_name if kind == 'attn' else self.mlp_name}"


def _layout(model, adapter=None) -> _Layout:
    if adapter is not None:
        attn = getattr(adapter, "attn_name", None) or "self_attn"
        mlp = getattr(adapter, "mlp_name", None)
        if mlp is None:
            raise RayPressError(f"width pruning supports Llama-family models (q/k/v/o + gate/up/down); "
                                f"{getattr(adapter, 'family', 'this')} models are not supported — use the "
                                "sparsity, quant or depth family")
        return _Layout(adapter.block_prefix, list(adapter.blocks()), attn, mlp)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise RayPressError("width pruning needs a Llama-family model (model.model.layers); "
                            "pass the ModelAdapter from raypress.models.get_adapter")
    return _Layout("model.layers", list(layers), "self_attn", "mlp")


@dataclass(frozen=True)
class BlockGeometry:
    """Sizes of one decoder block, read from its modules (so pruned models work too)."""

    hidden: int
    n_q: int          # query heads
    n_kv: int         # key/value heads
    head_dim: int
    inter: int        # MLP intermediate channels
    q_bias: bool = False
    k_bias: bool = False
    v_bias: bool = False
    o_bias: bool = False
    gate_bias: bool = False
    up_bias: bool = False
    down_bias: bool = False

    @property
    def r(self) -> int:  # query heads per KV head
        return self.n_q // self.n_kv

    def attn_params(self, n_q: int | None = None, n_kv: int | None = None) -> int:
        n_q = self.n_q if n_q is None else n_q
        n_kv = self.n_kv if n_kv is None else n_kv
        d, h = self.head_dim, self.hidden
        return (n_q * d * h + n_q * d * self.q_bias            # q_proj
                + n_kv * d * h * 2 + n_kv * d * (self.k_bias + self.v_bias)  # k_proj, v_proj
                + h * n_q * d + h * self.o_bias)                # o_proj

    def mlp_params(self, inter: int | None = None) -> int:
        c = self.inter if inter is None else inter
        h = self.hidden
        return c * h * 2 + c * (self.gate_bias + self.up_bias) + h * c + h * self.down_bias


def _attn_mlp(block, lay: _Layout):
    return block.get_submodule(lay.attn_name), block.get_submodule(lay.mlp_name)


def _geometry(block, lay: _Layout, head_dim_default: int | None = None) -> BlockGeometry:
    attn, mlp = _attn_mlp(block, lay)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if not isinstance(getattr(attn, n, None), nn.Linear):
            raise RayPressError(f"width pruning needs Llama-style attention with q/k/v/o_proj Linear layers; "
                                f"'{lay.attn_name}.{n}' is missing — this architecture is not supported")
    for n in ("gate_proj", "up_proj", "down_proj"):
        if not isinstance(getattr(mlp, n, None), nn.Linear):
            raise RayPressError(f"width pruning needs a gated MLP with gate/up/down_proj Linear layers; "
                                f"'{lay.mlp_name}.{n}' is missing — this architecture is not supported")
    d = getattr(attn, "head_dim", None) or head_dim_default
    if not d:
        raise RayPressError("cannot determine the attention head_dim; the attention module has no head_dim")
    n_q, n_kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
    if n_kv == 0 or n_q % n_kv:
        raise RayPressError(f"attention with {n_q} query heads and {n_kv} KV heads is not grouped uniformly; "
                            "width pruning needs num_attention_heads divisible by num_key_value_heads")
    b = lambda lin: lin.bias is not None  # noqa: E731
    return BlockGeometry(hidden=attn.q_proj.in_features, n_q=n_q, n_kv=n_kv, head_dim=d,
                         inter=mlp.gate_proj.out_features, q_bias=b(attn.q_proj), k_bias=b(attn.k_proj),
                         v_bias=b(attn.v_proj), o_bias=b(attn.o_proj), gate_bias=b(mlp.gate_proj),
                         up_bias=b(mlp.up_proj), down_bias=b(mlp.down_proj))


def _geometries(model, lay: _Layout) -> list[BlockGeometry]:
    cfg = getattr(model, "config", None)
    d = None
    if cfg is not None:
        d = getattr(cfg, "head_dim", None) or (cfg.hidden_size // cfg.num_attention_heads)
    return [_geometry(b, lay, d) for b in lay.blocks]


# ============================================================================ ladders
@dataclass
class UnitLadder:
    """One unit's levels. `kept[k]`: kept MLP channels, or (attention) kept query heads per KV
    group (mode "query") / kept KV groups (mode "group"). `removed[k]`: exact removed params."""

    name: str
    kind: str                  # "attn" | "mlp"
    block: int
    n_params: int              # the unit's full Linear parameter count
    kept: list[int]
    removed: list[int]

    def fractions(self) -> list[float]:
        return [r / self.n_params for r in self.removed]


@dataclass
class WidthLevels:
    """Ladders of every width unit (forward order) + how they were made."""

    units: list[UnitLadder]
    attn_mode: str
    geometry: list[BlockGeometry]
    resolution: int = 1000
    settings: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def by_name(self, name: str) -> UnitLadder:
        for u in self.units:
            if u.name == name:
                return u
        raise RayPressError(f"'{name}' is not a width unit of this model; units look like "
                            f"'{self.units[0].name}'")

    def values(self) -> list[list[float]]:
        """Level values (removed fraction) rounded to 1/resolution — what the SearchSpace sees."""
        res = self.resolution
        return [[round(f * res) / res for f in u.fractions()] for u in self.units]

    def costs(self) -> list[list[int]]:
        """SearchSpace integer costs n_params · round(value · resolution)."""
        res = self.resolution
        return [[u.n_params * round(f * res) for f in u.fractions()] for u in self.units]

    @property
    def exact(self) -> bool:
        """True when every cost is exactly resolution × removed params (budget = real params)."""
        return all(c == self.resolution * r for u, cs in zip(self.units, self.costs())
                   for c, r in zip(cs, u.removed))

    @property
    def linear(self) -> bool:
        """True when each unit's level steps all cost the same (equal-size units swap exactly)."""
        for cs in self.costs():
            steps = {b - a for a, b in zip(cs, cs[1:])}
            if len(steps) > 1:
                return False
        return True

    def total_params(self) -> int:
        return sum(u.n_params for u in self.units)

    def removed_params(self, config: dict[str, int]) -> int:
        return sum(u.removed[int(config.get(u.name, 0))] for u in self.units)


def _exact_step(full: int, removed_at, max_steps: int, resolution: int, multiple: int = 1) -> int | None:
    """Smallest step s (a multiple of `multiple`, ≤ max_steps) whose ladder 0, s, 2s, ... removes a
    whole number of 1/resolution of the unit at every level (linear, exact costs); None if none."""
    s = multiple
    while s <= max_steps:
        if all((removed_at(k * s) * resolution) % full == 0 for k in range(1, max_steps // s + 1)):
            return s
        s += multiple
    return None


def width_levels(model_or_adapter, *, mlp_keep: list[float] | None = None, mlp_step: int | None = None,
                 channel_multiple: int = 32, min_keep: float = 0.3, attn: str = "auto",
                 attn_step: int | None = None, attn_min_keep: float = 0.0, resolution: int = 1000,
                 adapter=None) -> WidthLevels:
    """Build the level ladders of every attention / MLP unit.

    MLP: ``mlp_keep`` (kept ratios, descending from 1.0; channels rounded to `channel_multiple`),
    or ``mlp_step`` channels per level, or by default the smallest multiple of `channel_multiple`
    whose every level removes a whole number of 1/`resolution` of the unit (exact, linear costs;
    SmolLM2-135M: 192 channels = 12.5 %); levels go down to `min_keep` of the channels.
    Attention: see the module docstring (`attn`); one level per query head per group ("query") or
    per KV group ("group"), or ``attn_step`` of them; by default the smallest exact step (SmolLM2:
    1 query head per group = 25 %; Llama-2-7B MHA: 4 of 32 groups = 12.5 %); down to
    `attn_min_keep` (default: one query head per group / one group).
    A warning reports inexact ladders (costs then misstate parameters; see `WidthLevels.exact`).
    """
    if hasattr(model_or_adapter, "block_prefix"):
        adapter = model_or_adapter
        model = adapter.model
    else:
        model = model_or_adapter
    lay = _layout(model, adapter)
    geoms = _geometries(model, lay)
    if attn not in ATTN_MODES:
        raise RayPressError(f"unknown attention granularity '{attn}'; use one of {', '.join(ATTN_MODES)}")
    if not 0.0 < min_keep <= 1.0:
        raise RayPressError(f"min_keep={min_keep} must be in (0, 1]; e.g. 0.3 keeps at least 30% of MLP channels")
    if mlp_keep is not None and any(not 0 < r <= 1 for r in mlp_keep):
        raise RayPressError(f"mlp_keep {mlp_keep} must be kept ratios in (0, 1], e.g. [1.0, 0.9, ..., 0.3]")
    units: list[UnitLadder] = []
    modes = set()
    for i, g in enumerate(geoms):
        # attention
        mode = attn if attn != "auto" else ("query" if g.r > 1 else "group")
        if mode == "query" and g.r == 1:
            mode = "group"  # MHA: one query head per KV head, only whole groups can go
        modes.add(mode)
        full_a = g.attn_params()
        if mode == "query":
            top = g.r
            rem = lambda n, g=g, full=full_a: full - g.attn_params(n_q=(g.r - n) * g.n_kv)  # noqa: E731
        else:
            top = g.n_kv
            rem = lambda n, g=g, full=full_a: full - g.attn_params(n_q=(g.n_kv - n) * g.r, n_kv=g.n_kv - n)  # noqa: E731
        lo = max(1, math.ceil(attn_min_keep * top - 1e-9))
        st = attn_step or _exact_step(full_a, rem, top - lo, resolution) or 1
        kept_a = [top - k * st for k in range(top) if top - k * st >= lo]
        units.append(UnitLadder(lay.unit(i, "attn"), "attn", i, full_a, kept_a, [rem(top - k) for k in kept_a]))
        # MLP
        I = g.inter
        full_m = g.mlp_params()
        if mlp_keep is not None:
            ks = sorted({max(channel_multiple, min(I, int(round(r * I / channel_multiple)) * channel_multiple))
                         for r in mlp_keep} | {I}, reverse=True)
        else:
            lo_c = max(1, math.ceil(min_keep * I - 1e-9))
            step = mlp_step or _exact_step(full_m, lambda c, g=g, full=full_m: full - g.mlp_params(I - c),
                                           I - lo_c, resolution, channel_multiple)
            if not step:
                step = max(1, min(I // 2, channel_multiple))
            ks = [I - k * step for k in range(I // step + 1) if I - k * step >= lo_c]
        units.append(UnitLadder(lay.unit(i, "mlp"), "mlp", i, full_m, ks, [full_m - g.mlp_params(c) for c in ks]))
    lv = WidthLevels(units, "query" if modes == {"query"} else ("group" if modes == {"group"} else "mixed"),
                     geoms, resolution, settings=dict(mlp_keep=mlp_keep, mlp_step=mlp_step,
                                                      channel_multiple=channel_multiple, min_keep=min_keep,
                                                      attn=attn, attn_step=attn_step, attn_min_keep=attn_min_keep))
    if not lv.exact:
        bad = [(abs(c - resolution * r) / max(1, resolution * r), u.kind) for u, cs in zip(units, lv.costs())
               for c, r in zip(cs, u.removed) if r and c != resolution * r]
        worst, kind = max(bad)
        warnings.warn(f"width ladder values are not whole 1/{resolution}s of their units ({kind}): budget costs "
                      f"misstate removed parameters by up to {worst:.2%} per unit (the default steps are exact)",
                      stacklevel=2)
    return lv


# ============================================================================ target / space
def _reachable_bits(costs: list[list[int]], g: int) -> tuple[int, int]:
    """Bitset (python int) of reachable total cost / g, and its bit length bound."""
    reach = 1
    top = 0
    for cs in costs:
        nxt = 0
        for c in set(cs):
            nxt |= reach << (c // g)
        reach = nxt
        top += max(cs) // g
    return reach, top


def width_target(levels: WidthLevels, removed_fraction: float) -> tuple[float, bool]:
    """Nearest SearchSpace target (removed fraction, whole 1/resolution) that some config hits exactly.

    Returns (target, exact) where exact says the request itself was reachable. Ties go to the
    smaller removal. RayPressError when nothing within ±0.1 is reachable.
    """
    res = levels.resolution
    if not 0.0 <= removed_fraction < 1.0:
        raise RayPressError(f"width target {removed_fraction} must be a removed fraction in [0, 1) "
                            "(0.2 = keep 80% of the block parameters)")
    costs = levels.costs()
    N = sum(u.n_params for u in levels.units)
    g = 0
    for cs in costs:
        for c in cs:
            g = math.gcd(g, c)
    g = g or 1
    span = sum(max(cs) for cs in costs) // g
    if span > 50_000_000:
        raise RayPressError("width ladders are too irregular to check budget reachability; use the default "
                            "(exact) MLP step or fewer levels")
    reach, _ = _reachable_bits(costs, g)
    t0 = int(round(removed_fraction * res))
    max_t = min(res - 1, int(sum(max(cs) for cs in costs) // N) + 1)
    for delta in range(0, res // 10 + 1):
        for t in ((t0 - delta, t0 + delta) if delta else (t0,)):
            if t < 0 or t > max_t:
                continue
            b = t * N
            if b % g == 0 and (reach >> (b // g)) & 1:
                return t / res, delta == 0
    hi = sum(max(cs) for cs in costs) / (N * res)
    raise RayPressError(f"width target {removed_fraction} (removed fraction) is not reachable by these ladders "
                        f"(they remove at most {hi:.3f} of the block parameters); lower min_keep or pick a "
                        "smaller target (0.2 = keep 80%)")


def width_space(adapter, keep_fraction: float, *, levels: WidthLevels | None = None, strict: bool = False,
                **ladder_kw):
    """raypress.space.SearchSpace over the width units for keeping `keep_fraction` of block params.

    target = removed fraction (1 − keep_fraction) of the searched parameters (all attention + MLP
    Linear params of the blocks), snapped to the nearest exactly reachable value (warning when
    snapped; RayPressError instead when strict=True). n_params = each unit's full parameter count,
    level values = removed fraction of the unit (0 = dense).
    """
    lv = levels or width_levels(adapter, **ladder_kw)
    want = 1.0 - float(keep_fraction)
    target, exact = width_target(lv, want)
    if not exact:
        msg = (f"width: keep_fraction {keep_fraction} is not exactly reachable with these ladders; "
               f"using removed fraction {target} (keep {1 - target:.3f})")
        if strict:
            raise RayPressError(msg + "; choose that keep fraction or finer ladders")
        warnings.warn(msg, stacklevel=2)
    from raypress.space import SearchSpace

    return SearchSpace(layers=lv.names, n_params=[u.n_params for u in lv.units], level_values=lv.values(),
                       target=float(target))


def width_initial(levels: WidthLevels, target: float) -> dict[str, int]:
    """The most uniform exactly-feasible config: minimizes Σ n_l (value_l − target)² subject to the
    budget round(target·res)·Σn being hit exactly (DP over reachable costs). A start for evolution
    when SearchSpace.uniform() has no common level (different ladders for attention and MLP)."""
    res = levels.resolution
    costs = levels.costs()
    vals = levels.values()
    N = sum(u.n_params for u in levels.units)
    budget = int(round(target * res)) * N
    g = 0
    for cs in costs:
        for c in cs:
            g = math.gcd(g, c)
    g = g or 1
    if budget % g:
        raise RayPressError(f"width target {target} is not reachable; use width_target() to snap it")
    B = budget // g
    span = sum(max(cs) for cs in costs) // g
    if span > 5_000_000:
        raise RayPressError("width ladders are too irregular for the uniform start; use the default MLP step")
    INF = float("inf")
    best = np.full(B + 1, INF)
    best[0] = 0.0
    choice = []
    for u, cs, vs in zip(levels.units, costs, vals):
        nb = np.full(B + 1, INF)
        ch = np.full(B + 1, -1, dtype=np.int16)
        for k, (c, v) in enumerate(zip(cs, vs)):
            s = c // g
            if s > B:
                continue
            pen = u.n_params / N * (v - target) ** 2
            cand = np.full(B + 1, INF)
            cand[s:] = best[: B + 1 - s] + pen
            better = cand < nb
            nb[better] = cand[better]
            ch[better] = k
        best = nb
        choice.append(ch)
    if not np.isfinite(best[B]):
        raise RayPressError(f"width target {target} is not reachable; use width_target() to snap it")
    cfg = {}
    b = B
    for u, cs, ch in zip(reversed(levels.units), reversed(costs), reversed(choice)):
        k = int(ch[b])
        cfg[u.name] = k
        b -= cs[k] // g
    return {u.name: cfg[u.name] for u in levels.units}


def kept_params(levels: WidthLevels, config: dict[str, int]) -> int:
    """Searched (block Linear) parameters left by `config`."""
    return levels.total_params() - levels.removed_params(config)


# ============================================================================ calibration
@torch.no_grad()
def width_hessians(model, adapter, calib: np.ndarray, batch_size: int = 8, device: str | None = None,
                   ) -> dict[str, torch.Tensor]:
    """H = 2/N Σ x xᵀ of every o_proj and down_proj input on the dense model.

    Uses raypress.calibrate.collect_hessians(layers=...) when available; otherwise one full
    forward per batch with input hooks (fine for the small models width pruning targets)."""
    lay = _layout(model, adapter)
    names = []
    for i in range(len(lay.blocks)):
        names += [f"{lay.unit(i, 'attn')}.o_proj", f"{lay.unit(i, 'mlp')}.down_proj"]
    try:
        from raypress.calibrate import collect_hessians
    except ImportError:
        collect_hessians = None
    if collect_hessians is not None and adapter is not None:
        return collect_hessians(model, adapter, calib, batch_size=batch_size, device=device or "cpu",
                                layers=names)
    dev = device or next(model.parameters()).device
    acc: dict[str, torch.Tensor] = {}
    cnt: dict[str, int] = {}
    hooks = []

    def mk(name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            acc[name] = acc.get(name, 0) + x.T @ x
            cnt[name] = cnt.get(name, 0) + x.shape[0]
        return hook

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_pre_hook(mk(n)))
    try:
        ids = torch.as_tensor(np.asarray(calib), dtype=torch.long)
        for s in range(0, ids.shape[0], batch_size):
            model(ids[s:s + batch_size].to(dev), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: (2.0 * acc[n] / cnt[n]).float().cpu() for n in names}


def _hinv_diag(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    Hd = H.double().clone()
    dm = float(torch.diagonal(Hd).mean())
    Hd.diagonal().add_(percdamp * (dm if dm > 0 else 1.0))
    dead = torch.diagonal(H) == 0
    Hd[dead, dead] = 1.0
    L, info = torch.linalg.cholesky_ex(Hd)
    inv = torch.cholesky_inverse(L) if int(info) == 0 else torch.linalg.pinv(Hd)
    return torch.diagonal(inv)


def _column_scores(W: torch.Tensor, H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Φ summed per input column: Σᵢ Wᵢⱼ² / [H⁻¹]ⱼⱼ."""
    return (W.double() ** 2).sum(0) / _hinv_diag(H, percdamp)


@torch.no_grad()
def width_importance(model, adapter, hessians: dict, percdamp: float = 0.01) -> dict[str, np.ndarray]:
    """Per unit: MLP → score per channel [inter]; attention → score per query head [n_q]."""
    lay = _layout(model, adapter)
    geoms = _geometries(model, lay)
    out = {}
    for i, (blk, g) in enumerate(zip(lay.blocks, geoms)):
        attn, mlp = _attn_mlp(blk, lay)
        on, dn = f"{lay.unit(i, 'attn')}.o_proj", f"{lay.unit(i, 'mlp')}.down_proj"
        for n in (on, dn):
            if n not in hessians:
                raise RayPressError(f"no calibration Hessian for '{n}'; compute them with width_hessians()")
        dev = attn.o_proj.weight.device  # compute where the model lives (GPU: fast float64 solves)
        s = _column_scores(attn.o_proj.weight.detach(), hessians[on].to(dev), percdamp)
        out[lay.unit(i, "attn")] = s.view(g.n_q, g.head_dim).sum(1).cpu().numpy()
        out[lay.unit(i, "mlp")] = _column_scores(mlp.down_proj.weight.detach(), hessians[dn].to(dev),
                                                  percdamp).cpu().numpy()
    return out


def _kept_heads(scores: np.ndarray, g: BlockGeometry, mode: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept query heads sorted, kept kv heads sorted) for attention level parameter k."""
    per = scores.reshape(g.n_kv, g.r)
    if mode == "query":
        q = []
        for j in range(g.n_kv):
            top = np.argsort(-per[j], kind="stable")[:k]
            q += sorted(int(j * g.r + t) for t in top)
        return np.array(q, dtype=np.int64), np.arange(g.n_kv, dtype=np.int64)
    grp = np.sort(np.argsort(-per.sum(1), kind="stable")[:k])
    q = np.concatenate([np.arange(j * g.r, (j + 1) * g.r) for j in grp])
    return q.astype(np.int64), grp.astype(np.int64)


def _head_cols(heads: np.ndarray, d: int) -> np.ndarray:
    return (heads[:, None] * d + np.arange(d)[None, :]).reshape(-1).astype(np.int64)


# ============================================================================ database
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32}


@torch.no_grad()
def build_width_database(model, adapter, hessians: dict, levels: WidthLevels | None = None, *,
                         reform: str = "lstsq", percdamp: float = 0.01, storage_dtype: str = "float32",
                         admm_iters: int = 30, rho: float = 1.0, progress: bool = True) -> dict:
    """Per (unit, level): kept index set + reformed output weight. A picklable dict of numpy arrays::

        {"format", "attn_mode", "settings", "reform", "geometry": [per-block dict],
         "units": {name: {"kind", "block", "n_params", "kept_counts", "removed", "values",
                          "mode" (attn), "importance": ndarray,
                          "levels": [None (dense),
                                     {"kept": int64 [channels | query heads],
                                      "kept_kv": int64 [kv heads] (attn),
                                      "weight": [hidden, n_kept_inputs] reformed o_proj/down_proj}]}}}

    `reform`: "lstsq" (exact least squares on the kept columns), "admm" (raypress.reform.admm_reform
    with the column mask) or "none" (plain masking, for ablations).
    """
    from raypress import reform as rf

    if reform not in REFORMS:
        raise RayPressError(f"unknown reformation '{reform}'; use one of {', '.join(REFORMS)}")
    if storage_dtype not in _NP_DTYPES:
        raise RayPressError(f"unknown storage dtype '{storage_dtype}'; use float32 or float16")
    npdt = _NP_DTYPES[storage_dtype]
    lv = levels or width_levels(model, adapter=adapter)
    lay = _layout(model, adapter)
    geoms = _geometries(model, lay)
    if [g for g in geoms] != list(lv.geometry):
        raise RayPressError("the width ladders were built for a different model geometry; rebuild them with "
                            "width_levels(model)")
    scores = width_importance(model, adapter, hessians, percdamp)
    db = {"format": FORMAT, "attn_mode": lv.attn_mode, "settings": dict(lv.settings), "reform": reform,
          "resolution": lv.resolution, "percdamp": percdamp, "storage_dtype": storage_dtype,
          "geometry": [g.__dict__.copy() for g in geoms], "units": {}}
    it = lv.units
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(lv.units, desc="width database", unit="unit")
        except ImportError:
            pass
    for u in it:
        g = geoms[u.block]
        blk = lay.blocks[u.block]
        attn, mlp = _attn_mlp(blk, lay)
        if u.kind == "attn":
            lin, hname = attn.o_proj, f"{u.name}.o_proj"
            mode = "query" if (lv.settings.get("attn", "auto") in ("auto", "query") and g.r > 1) else "group"
        else:
            lin, hname, mode = mlp.down_proj, f"{u.name}.down_proj", None
        W = lin.weight.detach().float()
        H = hessians[hname].float().to(W.device)
        entries = []
        for k, kc in enumerate(u.kept):
            if k == 0:
                entries.append(None)
                continue
            if u.kind == "attn":
                q, kv = _kept_heads(scores[u.name], g, mode, kc)
                cols = _head_cols(q, g.head_dim)
                ent = {"kept": q, "kept_kv": kv}
            else:
                q = np.sort(np.argsort(-scores[u.name], kind="stable")[:kc]).astype(np.int64)
                cols = q
                ent = {"kept": q}
            if reform == "lstsq":
                Wk = rf.lstsq_columns(W, H, cols, percdamp=percdamp)
            elif reform == "admm":
                Wk = rf.admm_reform(W, H, rf.column_mask(W.shape[1], cols, device=W.device), rho=rho,
                                    iters=admm_iters, percdamp=percdamp)[:, torch.as_tensor(cols, device=W.device)]
            else:
                Wk = W[:, torch.as_tensor(cols, device=W.device)]
            ent["weight"] = np.ascontiguousarray(Wk.cpu().numpy().astype(npdt))
            entries.append(ent)
        rec = {"kind": u.kind, "block": u.block, "n_params": u.n_params, "kept_counts": list(u.kept),
               "removed": list(u.removed), "values": [round(f * lv.resolution) / lv.resolution
                                                      for f in u.fractions()],
               "importance": np.asarray(scores[u.name], dtype=np.float32), "levels": entries}
        if u.kind == "attn":
            rec["mode"] = mode
        db["units"][u.name] = rec
    return db


def levels_from_database(db: dict) -> WidthLevels:
    """Rebuild the ladders (for width_space / width_initial) from a database dict."""
    geoms = [BlockGeometry(**g) for g in db["geometry"]]
    units = [UnitLadder(n, r["kind"], r["block"], r["n_params"], list(r["kept_counts"]), list(r["removed"]))
             for n, r in db["units"].items()]
    return WidthLevels(units, db["attn_mode"], geoms, db.get("resolution", 1000), dict(db.get("settings", {})))


def database_key(parts: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


# ============================================================================ applier
def _resolve_db(db):
    if isinstance(db, dict):
        return db
    if type(db).__name__ == "ObjectRef":
        import ray

        return ray.get(db)
    raise RayPressError("WidthApplier needs the dict from build_width_database (or its ray ObjectRef)")


def _fresh(arr: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A private tensor copy of a (possibly read-only, object-store) array, in `like`'s dtype/device."""
    return torch.from_numpy(np.array(arr, copy=True)).to(device=like.device, dtype=like.dtype)


class WidthApplier(Applier):
    """Applies {unit: level} to a live Llama-family model, in place, touching only changed units.

    Level k > 0 of a MLP: gate/up rows of pruned channels zeroed, down_proj = reformed weight on the
    kept columns (zeros elsewhere). Attention: q rows of pruned query heads (and k/v rows of pruned
    KV heads, mode "group") zeroed, o_proj = reformed weight on the kept head columns. Every change
    assigns fresh tensors (`.data = new`); level 0 points the Linear back at the tensors the model
    was loaded with, so dense is bit-exact. Database arrays are only ever read.
    """

    def __init__(self, database):
        self.database = database  # dict or ray ObjectRef (resolved on attach)
        self._db = None
        self._units: dict = {}
        self._current: dict[str, int] = {}
        self._idx_cache: dict = {}

    def __getstate__(self):
        s = self.__dict__.copy()
        s["_db"], s["_units"], s["_current"], s["_idx_cache"] = None, {}, {}, {}
        return s

    # -- setup -----------------------------------------------------------------------------
    def attach(self, model, adapter=None) -> None:
        db = _resolve_db(self.database)
        lay = _layout(model, adapter)
        geoms = _geometries(model, lay)
        if [g.__dict__ for g in geoms] != db["geometry"]:
            raise RayPressError("the width database was built for a different model (block sizes differ); "
                                "rebuild it for this model")
        self._db = db
        self._units, self._current, self._idx_cache = {}, {}, {}
        for name, rec in db["units"].items():
            mod = model.get_submodule(name)
            names = ("q_proj", "k_proj", "v_proj", "o_proj") if rec["kind"] == "attn" else \
                ("gate_proj", "up_proj", "down_proj")
            lins = {n: getattr(mod, n) for n in names}
            dense = {n: (l.weight.data, None if l.bias is None else l.bias.data) for n, l in lins.items()}
            self._units[name] = (rec, lins, dense, geoms[rec["block"]])
            self._current[name] = 0

    @property
    def units(self) -> list[str]:
        return list(self._units)

    @property
    def current(self) -> dict[str, int]:
        return dict(self._current)

    def dense_tensors(self, unit: str) -> dict:
        """{linear name: (weight, bias)} as loaded (read these, never write)."""
        return self._units[unit][2]

    # -- hot path --------------------------------------------------------------------------
    def apply(self, levels: dict[str, int]) -> int:
        if not self._units:
            raise RayPressError("WidthApplier.apply called before attach(model, adapter)")
        want = {}
        for k, v in levels.items():
            if k.startswith("_"):
                continue
            if k not in self._units:
                raise RayPressError(f"'{k}' is not a width unit of this database; units look like "
                                    f"'{next(iter(self._units))}'")
            v = int(v)
            n = len(self._units[k][0]["levels"])
            if not 0 <= v < n:
                raise RayPressError(f"level {v} of '{k}' is out of range (0..{n - 1})")
            want[k] = v
        changed = 0
        with torch.no_grad():
            for name in self._units:
                lvl = want.get(name, 0)
                if self._current[name] != lvl:
                    self._set(name, lvl)
                    self._current[name] = lvl
                    changed += 1
        return changed

    def _indices(self, name: str, lvl: int, device):
        key = (name, lvl, str(device))
        hit = self._idx_cache.get(key)
        if hit is not None:
            return hit
        rec, lins, dense, g = self._units[name]
        ent = rec["levels"][lvl]
        kept = np.asarray(ent["kept"])
        if rec["kind"] == "mlp":
            row = torch.zeros(g.inter, dtype=torch.bool)
            row[torch.from_numpy(kept.copy())] = True
            res = {"rows": row.to(device), "cols": torch.from_numpy(kept.copy()).to(device)}
        else:
            cols = torch.from_numpy(_head_cols(kept, g.head_dim))
            qrow = torch.zeros(g.n_q * g.head_dim, dtype=torch.bool)
            qrow[cols] = True
            kvrow = torch.zeros(g.n_kv * g.head_dim, dtype=torch.bool)
            kvrow[torch.from_numpy(_head_cols(np.asarray(ent["kept_kv"]), g.head_dim))] = True
            res = {"qrows": qrow.to(device), "kvrows": kvrow.to(device), "cols": cols.to(device),
                   "all_kv": bool(kvrow.all())}
        self._idx_cache[key] = res
        return res

    @staticmethod
    def _mask_rows(lin: nn.Linear, dense: tuple, rows: torch.Tensor) -> None:
        w, b = dense
        lin.weight.data = w * rows.to(w.dtype).unsqueeze(1)
        if b is not None:
            lin.bias.data = b * rows.to(b.dtype)

    def _set(self, name: str, lvl: int) -> None:
        rec, lins, dense, g = self._units[name]
        if lvl == 0:
            for n, lin in lins.items():
                w, b = dense[n]
                lin.weight.data = w
                if b is not None:
                    lin.bias.data = b
            return
        ent = rec["levels"][lvl]
        out_name = "down_proj" if rec["kind"] == "mlp" else "o_proj"
        w_out = dense[out_name][0]
        idx = self._indices(name, lvl, w_out.device)
        new = torch.zeros_like(w_out)
        new[:, idx["cols"]] = _fresh(ent["weight"], w_out)
        lins[out_name].weight.data = new
        b = dense[out_name][1]
        if b is not None:
            lins[out_name].bias.data = b
        if rec["kind"] == "mlp":
            self._mask_rows(lins["gate_proj"], dense["gate_proj"], idx["rows"])
            self._mask_rows(lins["up_proj"], dense["up_proj"], idx["rows"])
        else:
            self._mask_rows(lins["q_proj"], dense["q_proj"], idx["qrows"])
            for n in ("k_proj", "v_proj"):
                if idx["all_kv"]:
                    w, b = dense[n]
                    lins[n].weight.data = w
                    if b is not None:
                        lins[n].bias.data = b
                else:
                    self._mask_rows(lins[n], dense[n], idx["kvrows"])


# ============================================================================ export / load
def count_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w.detach().clone().contiguous(), requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.detach().clone().contiguous(), requires_grad=False)
    return lin


def _set_attn_sizes(attn, n_q: int, n_kv: int) -> None:
    attn.num_key_value_groups = n_q // n_kv
    attn.num_heads = n_q
    attn.num_key_value_heads = n_kv


_MODELING_FILE = "modeling_raypress_width.py"
_MODELING_TEMPLATE = '''"""Written by RayPress (width export): {base} whose decoder blocks have their own number of
attention heads / KV heads / MLP channels (config.raypress_width_layers). Loads with
AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) or, without remote code,
raypress.compress.width.load_width_model(path)."""
from torch import nn

from {module} import {base} as _Base


class RayPressWidthForCausalLM(_Base):
    def __init__(self, config):
        super().__init__(config)
        for blk, s in zip(self.get_submodule("{prefix}"), getattr(config, "raypress_width_layers", None) or []):
            attn, mlp = blk.get_submodule("{attn}"), blk.get_submodule("{mlp}")
            h, d = attn.q_proj.in_features, s["head_dim"]
            nq, nkv, inter = s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"]
            for mod, shapes in ((attn, {{"q_proj": (h, nq * d), "k_proj": (h, nkv * d), "v_proj": (h, nkv * d),
                                         "o_proj": (nq * d, h)}}),
                                (mlp, {{"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}})):
                for name, (i, o) in shapes.items():
                    old = getattr(mod, name)
                    setattr(mod, name, nn.Linear(i, o, bias=old.bias is not None, device=old.weight.device,
                                                 dtype=old.weight.dtype))
            attn.num_key_value_groups = nq // nkv
            attn.num_heads, attn.num_key_value_heads = nq, nkv
            mlp.intermediate_size = inter
'''


@torch.no_grad()
def export_width(model, adapter, levels: dict[str, int], out_dir, *, database=None, applier=None,
                 tokenizer=None, overwrite: bool = False, extra_info: dict | None = None) -> Path:
    """Write the config `levels` as a physically smaller HF folder (+ raypress.json).

    Weights come from the dense model (the attached `applier`'s dense tensors if given, so the live
    model may currently hold any config) and the width `database` (default: the applier's).
    Pruned gate/up rows, down columns, q heads (and k/v heads in mode "group") are sliced away and
    o_proj/down_proj get the reformed weights. config.json keeps the dense maxima and gains
    ``raypress_width_layers`` + an ``auto_map`` to a generated modeling file, so the folder loads with
    ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``; `load_width_model(out)`
    loads it without remote code. Written to a temporary sibling and renamed into place.
    """
    import os
    import shutil
    import uuid

    if database is None and applier is not None:
        database = applier._db if applier._db is not None else applier.database
    if database is None:
        raise RayPressError("export_width needs the width database (database=...) or the attached WidthApplier")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise RayPressError(f"export folder {out} already exists; choose another folder or pass overwrite=True")
    db = _resolve_db(database)
    lay = _layout(model, adapter)
    geoms = _geometries(model, lay)
    for k, v in levels.items():
        if k.startswith("_"):
            continue
        if k not in db["units"]:
            raise RayPressError(f"'{k}' is not a width unit of this database; units look like "
                                f"'{next(iter(db['units']))}'")
        if not 0 <= int(v) < len(db["units"][k]["levels"]):
            raise RayPressError(f"level {v} of '{k}' is out of range (0..{len(db['units'][k]['levels']) - 1})")
    small = copy.deepcopy(model)
    slay = _layout(small, None if adapter is None else _ShadowAdapter(adapter, small))
    sizes = []
    for i, g in enumerate(geoms):
        s_attn, s_mlp = _attn_mlp(slay.blocks[i], slay)
        a_name, m_name = lay.unit(i, "attn"), lay.unit(i, "mlp")
        live_attn, live_mlp = _attn_mlp(lay.blocks[i], lay)

        def dense(unit, mod, n):
            if applier is not None and unit in applier._units:
                return applier.dense_tensors(unit)[n]
            lin = getattr(mod, n)
            return lin.weight.data, None if lin.bias is None else lin.bias.data

        # attention
        la = int(levels.get(a_name, 0))
        dw = {n: dense(a_name, live_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if la == 0:
            q, kv = np.arange(g.n_q), np.arange(g.n_kv)
            o_w = dw["o_proj"][0]
        else:
            ent = db["units"][a_name]["levels"][la]
            q, kv = np.asarray(ent["kept"]), np.asarray(ent["kept_kv"])
            o_w = _fresh(ent["weight"], dw["o_proj"][0])
        qr = torch.as_tensor(_head_cols(q, g.head_dim))
        kvr = torch.as_tensor(_head_cols(kv, g.head_dim))
        for n, rows in (("q_proj", qr), ("k_proj", kvr), ("v_proj", kvr)):
            w, b = dw[n]
            setattr(s_attn, n, _linear(w[rows.to(w.device)], None if b is None else b[rows.to(b.device)]))
        setattr(s_attn, "o_proj", _linear(o_w, dw["o_proj"][1]))
        _set_attn_sizes(s_attn, len(q), len(kv))
        # MLP
        lm = int(levels.get(m_name, 0))
        dw = {n: dense(m_name, live_mlp, n) for n in ("gate_proj", "up_proj", "down_proj")}
        if lm == 0:
            ch = np.arange(g.inter)
            d_w = dw["down_proj"][0]
        else:
            ent = db["units"][m_name]["levels"][lm]
            ch = np.asarray(ent["kept"])
            d_w = _fresh(ent["weight"], dw["down_proj"][0])
        cr = torch.as_tensor(ch.astype(np.int64))
        for n in ("gate_proj", "up_proj"):
            w, b = dw[n]
            setattr(s_mlp, n, _linear(w[cr.to(w.device)], None if b is None else b[cr.to(b.device)]))
        setattr(s_mlp, "down_proj", _linear(d_w, dw["down_proj"][1]))
        s_mlp.intermediate_size = len(ch)
        sizes.append({"num_attention_heads": int(len(q)), "num_key_value_heads": int(len(kv)),
                      "head_dim": g.head_dim, "intermediate_size": int(len(ch))})
    base = type(model)
    small.config.raypress_width_layers = sizes
    small.config.auto_map = {"AutoModelForCausalLM": f"{_MODELING_FILE[:-3]}.RayPressWidthForCausalLM"}
    meta = {"format": FORMAT, "block_prefix": lay.prefix, "attn_name": lay.attn_name, "mlp_name": lay.mlp_name,
            "base_class": f"{base.__module__}.{base.__name__}", "attn_mode": db["attn_mode"],
            "reform": db.get("reform"),
            "levels": {k: int(v) for k, v in levels.items() if not k.startswith("_")},
            "layers": [dict(s, kept_heads=None) for s in sizes],
            "n_params": count_params(small), "dense_n_params": count_params(model)}
    for s_, (i, g) in zip(meta["layers"], enumerate(geoms)):
        a = int(levels.get(lay.unit(i, "attn"), 0))
        m = int(levels.get(lay.unit(i, "mlp"), 0))
        ea, em = db["units"][lay.unit(i, "attn")]["levels"][a], db["units"][lay.unit(i, "mlp")]["levels"][m]
        s_["kept_heads"] = list(range(g.n_q)) if ea is None else [int(x) for x in ea["kept"]]
        s_["kept_kv_heads"] = list(range(g.n_kv)) if ea is None else [int(x) for x in ea["kept_kv"]]
        s_["kept_channels"] = None if em is None else [int(x) for x in em["kept"]]
    if extra_info:
        meta.update(extra_info)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        small.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / _MODELING_FILE).write_text(_MODELING_TEMPLATE.format(
            base=base.__name__, module=base.__module__, prefix=lay.prefix, attn=lay.attn_name, mlp=lay.mlp_name))
        (tmp / "raypress.json").write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class _ShadowAdapter:
    """The adapter's naming applied to another (copied) model."""

    def __init__(self, adapter, model):
        self.block_prefix = adapter.block_prefix
        self.attn_name = getattr(adapter, "attn_name", "self_attn")
        self.mlp_name = getattr(adapter, "mlp_name", "mlp")
        self.family = getattr(adapter, "family", "llama")
        self.model = model

    def blocks(self):
        return list(self.model.get_submodule(self.block_prefix))


def _read_state_dict(path: Path) -> dict:
    from safetensors.torch import load_file

    single = path / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {}
        for f in files:
            sd.update(load_file(str(path / f)))
        return sd
    raise RayPressError(f"'{path}' has no model.safetensors; export it with `raypress export` / export_width")


@torch.no_grad()
def load_width_model(path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a folder written by `export_width`: a transformers model whose blocks have their own
    head counts / intermediate sizes (config.json keeps the dense maxima; raypress.json has the
    per-layer sizes). Returns the model in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    mf = p / "raypress.json"
    if not mf.is_file():
        raise RayPressError(f"'{p}' is not a RayPress width export (no raypress.json); plain HF folders load with "
                            "transformers.AutoModelForCausalLM.from_pretrained")
    meta = json.loads(mf.read_text())
    if meta.get("format") != FORMAT:
        raise RayPressError(f"'{mf}' has format {meta.get('format')!r}, expected {FORMAT!r}; re-export the model")
    config = AutoConfig.from_pretrained(p)
    if hasattr(config, "auto_map"):
        del config.auto_map  # build the stock class; the sizes below do what the modeling file does
    model = AutoModelForCausalLM.from_config(config)
    blocks = list(model.get_submodule(meta["block_prefix"]))
    if len(blocks) != len(meta["layers"]):
        raise RayPressError(f"raypress.json lists {len(meta['layers'])} layers but the config builds {len(blocks)}")
    for blk, s in zip(blocks, meta["layers"]):
        attn, mlp = blk.get_submodule(meta["attn_name"]), blk.get_submodule(meta["mlp_name"])
        d, h = s["head_dim"], attn.q_proj.in_features
        nq, nkv, inter = s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"]
        for n, (i, o) in {"q_proj": (h, nq * d), "k_proj": (h, nkv * d), "v_proj": (h, nkv * d),
                          "o_proj": (nq * d, h)}.items():
            setattr(attn, n, nn.Linear(i, o, bias=getattr(attn, n).bias is not None, device="meta"))
        for n, (i, o) in {"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}.items():
            setattr(mlp, n, nn.Linear(i, o, bias=getattr(mlp, n).bias is not None, device="meta"))
        _set_attn_sizes(attn, nq, nkv)
        mlp.intermediate_size = inter
    sd = _read_state_dict(p)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    tied = bool(getattr(config, "tie_word_embeddings", False) or
                getattr(getattr(config, "get_text_config", lambda: config)(), "tie_word_embeddings", False))
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
        missing = [m for m in missing if m not in ("lm_head.weight",)]
    if unexpected or missing:
        bad = (unexpected or missing)[0]
        raise RayPressError(f"width export '{p}' does not match its raypress.json ({bad!r} "
                            f"{'unexpected' if unexpected else 'missing'}); re-export the model")
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model


# ============================================================================ lead wiring
def prepare_width(cfg, model, adapter, calib: np.ndarray):
    """families.prepare() hook: (SearchSpace, WidthApplier, context) for `family: width`.

    cfg.target = removed fraction of block parameters (SearchSpace semantics: 0.2 keeps 80%),
    snapped to the nearest reachable value. cfg.levels: MLP ladder either as kept ratios starting
    at 1.0 ([1.0, 0.9, ..., 0.3]) or removed fractions starting at 0.0. cfg.method: reformation
    ("lstsq" default, "admm", "none"); anything else means lstsq. The database is cached under
    cfg.database.cache_dir (if set) keyed by model, calibration tokens and settings.
    """
    from raypress.families import Prepared

    kw = {}
    if cfg.levels:
        lv = [float(x) for x in cfg.levels]
        kw["mlp_keep"] = lv if lv[0] == 1.0 else [1.0 - x for x in lv]
    reform = cfg.method if cfg.method in REFORMS else "lstsq"
    storage = cfg.database.storage_dtype if cfg.database.storage_dtype in _NP_DTYPES else "float16"
    lv = width_levels(adapter, **kw)
    target, exact = width_target(lv, float(cfg.target))
    if not exact:
        warnings.warn(f"width target {cfg.target} is not reachable exactly; using {target}", stacklevel=2)
    db = None
    cache = None
    if cfg.database.cache_dir:
        try:
            from raypress.models import model_fingerprint
            fp = model_fingerprint(cfg.model)
        except Exception:  # noqa: BLE001 - fingerprint is best effort
            fp = cfg.model
        key = database_key({"fp": fp, "calib": hashlib.sha256(np.ascontiguousarray(calib).tobytes()).hexdigest(),
                            "settings": lv.settings, "reform": reform, "storage": storage, "format": FORMAT})
        cache = Path(cfg.database.cache_dir) / "width" / f"{key}.pkl"
        if cache.is_file():
            from raypress.safe_pickle import safe_loads  # a shared cache dir: allow-listed types only

            db = safe_loads(cache.read_bytes(), ("raypress.compress.width",), f"width database cache {cache}")
    if db is None:
        dev = str(next(model.parameters()).device)
        H = width_hessians(model, adapter, calib, device=dev)
        db = build_width_database(model, adapter, H, lv, reform=reform, storage_dtype=storage)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_bytes(pickle.dumps(db, protocol=5))
            tmp.rename(cache)
    from raypress.space import SearchSpace

    space = SearchSpace(layers=lv.names, n_params=[u.n_params for u in lv.units], level_values=lv.values(),
                        target=float(target))
    ref = db
    try:
        import ray

        if ray.is_initialized():
            ref = ray.put(db)
    except ImportError:
        pass
    init = width_initial(lv, target)
    # attention and MLP steps differ in cost (SmolLM2: 2:3), so plain pair switches only trade budget
    # attention<->attention and MLP<->MLP; three_way switches let it flow between the two kinds.
    hints = {"three_way": 0.3}
    return Prepared(space, WidthApplier(ref), context={"width_levels": lv, "width_db": db, "initial": init,
                                                       "searcher_hints": hints},
                    describe={"width.attn_mode": lv.attn_mode, "width.reform": reform, "width.target": target,
                              "width.units": len(lv.units), "width.exact_costs": lv.exact})
