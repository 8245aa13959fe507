"""Width units of Llama-family blocks, their level ladders, and the width budget.

Units (one pair per decoder block, forward order)::

    model.layers.<i>.self_attn     attention: q/k/v rows of heads, o_proj input columns
    model.layers.<i>.mlp           MLP: gate/up rows and down_proj input columns of channels

Every unit has a ladder of *levels*; level 0 is dense, and the level value is the exact fraction of
the unit's Linear parameters (weights + biases) the level removes, so the search space's
params-weighted mean value is the removed fraction of the searched block parameters.

Attention granularity (GQA): ``attn="query"`` (default whenever a KV head serves > 1 query head,
e.g. SmolLM2 9 q / 3 kv) keeps the same number r of query heads in *every* KV group and all KV
heads (a level = r), so an exported model stays loadable by transformers' LlamaAttention
(``repeat_kv`` needs a uniform number of query heads per KV head) and StaticCache keeps working;
``attn="group"`` (forced for MHA) drops whole KV groups.

Budget exactness: costs and the budget are budget.py's (n_params · round(value · 1000)); by
default ladders use steps whose removed fraction is a whole number of thousandths and the same for
every step (SmolLM2-135M: 192-channel MLP steps = 12.5 %, query-head steps = 25 %). Finer steps
(``mlp_step=64``) are allowed: values are then rounded to thousandths (a warning says by how much
the value misstates the real parameter count) — see `WidthLevels.exact`. Attention and MLP steps
cost differently (SmolLM2: 2 : 3), so plain pair level switches only move budget between units of
one kind; three-way switches (``searcher.three_way``) let it flow between the kinds.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from torch import nn

from raypress.budget import Budget
from raypress.errors import RayPressError

ATTN_MODES = ("auto", "query", "group")


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
def width_budget(levels: WidthLevels, removed_fraction: float) -> Budget:
    """budget.py's Budget of the width units for a removed fraction (the one judge of the target)."""
    return Budget([u.n_params for u in levels.units], levels.values(), removed_fraction, layer_names=levels.names)


def width_target(levels: WidthLevels, removed_fraction: float) -> tuple[float, bool]:
    """(target, exact): the request itself when the budget can hit it, else the nearest reachable
    target of the budget's verdict (ties: the smaller removal). RayPressError when none is."""
    if not 0.0 <= removed_fraction < 1.0:
        raise RayPressError(f"width target {removed_fraction} must be a removed fraction in [0, 1) "
                            "(0.2 = keep 80% of the block parameters)")
    v = width_budget(levels, removed_fraction).verdict()
    if v.ok:
        return float(removed_fraction), True
    if not v.nearest:
        raise RayPressError(v.message)
    best = min((float(t) for t in v.nearest), key=lambda t: (abs(t - removed_fraction), t))
    if abs(best - removed_fraction) > 0.1:
        raise RayPressError(v.message)
    return best, False


def width_space(adapter, keep_fraction: float, *, levels: WidthLevels | None = None, strict: bool = False,
                **ladder_kw):
    """raypress.space.SearchSpace over the width units for keeping `keep_fraction` of block params.

    target = removed fraction (1 − keep_fraction) of the searched parameters (all attention + MLP
    Linear params of the blocks). An unreachable request is snapped to the nearest reachable target
    with a warning (strict=True: RayPressError quoting the budget's verdict instead).
    """
    lv = levels or width_levels(adapter, **ladder_kw)
    want = 1.0 - float(keep_fraction)
    if strict:
        width_budget(lv, want).require()
    target, exact = width_target(lv, want)
    if not exact:
        warnings.warn(f"width: keep_fraction {keep_fraction} is not exactly reachable with these ladders; "
                      f"using removed fraction {target} (keep {1 - target:.4g})", stacklevel=2)
    from raypress.space import SearchSpace

    return SearchSpace(layers=lv.names, n_params=[u.n_params for u in lv.units], level_values=lv.values(),
                       target=float(target))


def width_initial(levels: WidthLevels, target: float) -> dict[str, int]:
    """The most uniform exactly-feasible config: minimizes Σ n_l (value_l − target)² subject to the
    exact budget (budget.Budget.solve). A start for evolution when SearchSpace.uniform() has no common
    level (different ladders for attention and MLP)."""
    b = width_budget(levels, target)
    b.require()
    N = b.total
    obj = [[u.n_params / N * (v - target) ** 2 for v in vs] for u, vs in zip(levels.units, levels.values())]
    arr, method = b.solve(obj)
    if arr is None or b.cost_of(arr) != b.budget:
        raise RayPressError(f"width target {target} has no uniform start within the solver's limits; "
                            "use the default (exact) MLP step or fewer levels")
    return {u.name: int(k) for u, k in zip(levels.units, arr)}


def kept_params(levels: WidthLevels, config: dict[str, int]) -> int:
    """Searched (block Linear) parameters left by `config`."""
    return levels.total_params() - levels.removed_params(config)


