"""Depth compression: drop whole decoder blocks or their attention / MLP sub-blocks.

No level database: every unit has two levels, value 0.0 (kept) and 1.0 (dropped). Unit names
are module paths of the live model:

* ``granularity="block"``:    ``model.layers.3`` (OPT: ``model.decoder.layers.3``)
* ``granularity="sublayer"``: ``model.layers.3.self_attn``, ``model.layers.3.mlp``; for OPT
  the MLP is ``fc1``/``fc2`` directly inside the block, addressed by the *virtual* unit
  ``model.decoder.layers.3.mlp`` (both linears output zeros when it is dropped).

A dropped unit contributes nothing: a dropped sub-block outputs zeros (the residual stream passes
through, norms still apply), a dropped block returns its input hidden states unchanged.
Dropping is done by shadowing the module's ``forward`` with an instance attribute (a forward
hook could only replace the output *after* computing it; this skips the compute, so dropped
configs also evaluate faster) and restored by removing that attribute — weights, the module tree
and ``state_dict`` are never touched. With a KV cache in use (``use_cache`` / ``generate``), a
dropped attention writes a zero placeholder into its cache slot so ``cache.get_seq_length()``
stays right even when layer 0's attention is dropped.

ShortGPT baseline: :func:`shortgpt_scores` (block influence = 1 − mean cosine similarity of a
unit's input and output residual stream; ``metric="angular"`` for arccos(cos)/π) and
:func:`shortgpt_config` (drop the lowest-scoring units to meet the budget exactly).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from raypress.compress.base import Applier
from raypress.errors import RayPressError
from raypress.trial import META_PREFIX

GRANULARITIES = ("sublayer", "block")
METRICS = ("cosine", "angular")


# ----------------------------------------------------------------------------- units
def _n_blocks(adapter) -> int:
    return len(adapter.blocks())


def mlp_unit_name(adapter) -> str:
    """Relative name of the MLP unit inside a block ("mlp"; OPT: virtual "mlp" over fc1/fc2)."""
    return adapter.mlp_name or "mlp"


def depth_units(adapter, granularity: str = "sublayer") -> list[str]:
    """Unit names in forward order: per block ``<block>.<attn>``, ``<block>.<mlp>`` or ``<block>``."""
    if granularity not in GRANULARITIES:
        raise RayPressError(f"unknown depth granularity '{granularity}'; use one of {', '.join(GRANULARITIES)}")
    prefix = adapter.block_prefix
    n = _n_blocks(adapter)
    if granularity == "block":
        return [f"{prefix}.{i}" for i in range(n)]
    _check_sublayer_support(adapter)
    return [f"{prefix}.{i}.{sub}" for i in range(n) for sub in (adapter.attn_name, mlp_unit_name(adapter))]


def _check_sublayer_support(adapter) -> None:
    if not adapter.attn_name:
        raise RayPressError(f"{adapter.family} models have no attention sub-module the depth family can drop; "
                            "use granularity 'block'")
    if adapter.mlp_name is None:
        block = adapter.blocks()[0]
        if not (hasattr(block, "fc1") and hasattr(block, "fc2")):
            raise RayPressError(f"{adapter.family} blocks have no MLP sub-module (nor fc1/fc2) the depth family "
                                "can drop; use granularity 'block'")


def block_index(adapter, unit: str) -> tuple[int, str | None]:
    """'model.layers.3.mlp' -> (3, 'mlp'); 'model.layers.3' -> (3, None)."""
    prefix = adapter.block_prefix + "."
    if not unit.startswith(prefix):
        raise RayPressError(f"'{unit}' is not a depth unit of this {adapter.family} model (units start with "
                            f"'{prefix}'); use names from raypress.compress.depth.depth_units")
    rest = unit[len(prefix):].split(".", 1)
    try:
        idx = int(rest[0])
    except ValueError:
        raise RayPressError(f"'{unit}' is not a depth unit (no block index after '{prefix}')") from None
    n = _n_blocks(adapter)
    if not 0 <= idx < n:
        raise RayPressError(f"depth unit '{unit}' names block {idx} but the model has {n} blocks")
    sub = rest[1] if len(rest) > 1 else None
    if sub is not None and sub not in (adapter.attn_name, mlp_unit_name(adapter)):
        raise RayPressError(f"depth unit '{unit}': '{sub}' is neither the attention ('{adapter.attn_name}') nor "
                            f"the MLP ('{mlp_unit_name(adapter)}') of block {idx}")
    if sub is not None:
        _check_sublayer_support(adapter)
    return idx, sub


# ----------------------------------------------------------------------------- space
def depth_space(adapter, fraction: float, granularity: str = "sublayer"):
    """SearchSpace over depth units; `fraction` = share of units dropped (a whole number of units:
    an unreachable fraction is refused with the budget's nearest reachable targets)."""
    from raypress.space import SearchSpace

    units = depth_units(adapter, granularity)
    n = len(units)
    fraction = float(fraction)
    if not 0.0 <= fraction <= 1.0:
        raise RayPressError(f"depth target {fraction} is not a fraction of units in [0, 1]; "
                            f"e.g. 0.25 drops a quarter of the {n} {granularity} units")
    space = SearchSpace(layers=list(units), n_params=[1] * n, level_values=[[0.0, 1.0] for _ in range(n)],
                        target=fraction)
    space.require_reachable()
    return space


# ----------------------------------------------------------------------------- drop mechanics
def _cache_from(kwargs):
    c = kwargs.get("cache")
    if c is None:
        c = kwargs.get("past_key_values")
    return c if hasattr(c, "update") else None


def _cache_placeholder(attn, hidden: torch.Tensor, kwargs) -> None:
    """Keep a KV cache consistent for a skipped attention: write zeros of the right shape."""
    cache = _cache_from(kwargs)
    layer_idx = getattr(attn, "layer_idx", None)
    if cache is None or layer_idx is None or hidden is None or hidden.dim() != 3:
        return
    head_dim = getattr(attn, "head_dim", None)
    k_proj = getattr(attn, "k_proj", None)
    if head_dim and k_proj is not None:
        n_kv = k_proj.out_features // head_dim
    else:
        n_kv, head_dim = 1, 1
    z = hidden.new_zeros(hidden.shape[0], n_kv, hidden.shape[1], head_dim)
    cache.update(z, z, layer_idx)


def _hidden_arg(args, kwargs):
    return args[0] if args else kwargs.get("hidden_states")


def _zero_attention(attn):
    def forward(*args, **kwargs):
        h = _hidden_arg(args, kwargs)
        _cache_placeholder(attn, h, kwargs)
        out_features = attn.o_proj.out_features if hasattr(attn, "o_proj") else (
            attn.out_proj.out_features if hasattr(attn, "out_proj") else h.shape[-1])
        return h.new_zeros(*h.shape[:-1], out_features), None
    return forward


def _zero_linear(lin):
    def forward(x, *args, **kwargs):
        return x.new_zeros(*x.shape[:-1], lin.out_features)
    return forward


def _zero_module_like_input():
    def forward(x, *args, **kwargs):
        return torch.zeros_like(x)
    return forward


def _identity_block(block, attn_name):
    attn = getattr(block, attn_name, None) if attn_name else None

    def forward(*args, **kwargs):
        h = _hidden_arg(args, kwargs)
        if attn is not None:
            _cache_placeholder(attn, h, kwargs)
        # transformers 5 decoder layers (llama, opt, ...) return a tensor, not a tuple
        return h
    return forward


def unit_targets(adapter, unit: str) -> list[tuple[torch.nn.Module, object]]:
    """[(module, replacement forward)] that together drop `unit`."""
    idx, sub = block_index(adapter, unit)
    block = adapter.blocks()[idx]
    if sub is None:
        return [(block, _identity_block(block, adapter.attn_name))]
    if sub == adapter.attn_name:
        attn = getattr(block, sub)
        return [(attn, _zero_attention(attn))]
    if adapter.mlp_name:
        mlp = getattr(block, adapter.mlp_name)
        down = getattr(mlp, "down_proj", None) or getattr(mlp, "fc2", None) or getattr(mlp, "c_proj", None)
        return [(mlp, _zero_linear(down) if down is not None else _zero_module_like_input())]
    return [(block.fc1, _zero_linear(block.fc1)), (block.fc2, _zero_linear(block.fc2))]


_SHADOW = "_raypress_shadowed_forward"


def drop_module(module: torch.nn.Module, forward) -> None:
    """Shadow `module.forward` (remembering any instance-level forward, e.g. accelerate hooks)."""
    if _SHADOW in module.__dict__:
        return
    module.__dict__[_SHADOW] = module.__dict__.get("forward")
    module.forward = forward


def restore_module(module: torch.nn.Module) -> None:
    if _SHADOW not in module.__dict__:
        return
    prev = module.__dict__.pop(_SHADOW)
    if prev is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = prev


class DepthApplier(Applier):
    """Applies {unit: 0 kept | 1 dropped}; units missing from the config are kept (dense).

    `units` (optional) restricts which unit names are accepted; by default any block or
    sub-block unit of the attached model is. Picklable before `attach` (holds no model).
    """

    def __init__(self, units: list[str] | None = None):
        self.units = list(units) if units is not None else None
        self._dropped: set[str] = set()
        self._adapter = None
        self._targets: dict[str, list] = {}

    def __getstate__(self):
        return {"units": self.units, "_dropped": set(), "_adapter": None, "_targets": {}}

    def attach(self, model, adapter) -> None:
        if self._adapter is not None:
            self.reset()
        self._adapter = adapter
        self._targets = {}
        self._dropped = set()
        if self.units is not None:
            for u in self.units:
                self._targets[u] = unit_targets(adapter, u)  # validates names early

    def _wanted(self, levels: dict) -> set[str]:
        want = set()
        for unit, level in levels.items():
            if unit.startswith(META_PREFIX):
                continue
            if level not in (0, 1):
                raise RayPressError(f"depth level for '{unit}' is {level}; depth levels are 0 (kept) or 1 (dropped)")
            if self.units is not None and unit not in self._targets:
                raise RayPressError(f"'{unit}' is not a unit of this depth space; use names from depth_units()")
            if level == 1:
                want.add(unit)
        return want

    def apply(self, levels: dict[str, int]) -> int:
        if self._adapter is None:
            raise RayPressError("DepthApplier.apply called before attach(model, adapter)")
        want = self._wanted(levels)
        changed = 0
        for unit in sorted(self._dropped - want):
            for module, _ in self._targets[unit]:
                restore_module(module)
            self._dropped.discard(unit)
            changed += 1
        for unit in sorted(want - self._dropped):
            if unit not in self._targets:
                self._targets[unit] = unit_targets(self._adapter, unit)
            for module, fwd in self._targets[unit]:
                drop_module(module, fwd)
            self._dropped.add(unit)
            changed += 1
        return changed

    @property
    def dropped(self) -> set[str]:
        return set(self._dropped)


# ----------------------------------------------------------------------------- ShortGPT
def _score(a: torch.Tensor, b: torch.Tensor, metric: str) -> tuple[float, int]:
    a = a.reshape(-1, a.shape[-1]).float()
    b = b.reshape(-1, b.shape[-1]).float()
    cos = F.cosine_similarity(a, b, dim=-1, eps=1e-8).clamp(-1.0, 1.0)
    s = (1.0 - cos) if metric == "cosine" else torch.arccos(cos) / math.pi
    return float(s.double().sum()), int(s.numel())


@torch.no_grad()
def shortgpt_scores(model, adapter, calib_tokens, unit: str = "block", metric: str = "cosine",
                    batch_size: int = 4, device=None) -> dict[str, float]:
    """Importance of each depth unit on the dense model (higher = more important).

    block: 1 − mean over tokens of cos(block input, block output) (ShortGPT "block influence");
    sublayer: the same between the residual stream before and after adding that sub-block's
    output (attention: h vs h + attn(h); MLP: out − mlp vs out). ``metric="angular"`` uses
    arccos(cos)/π instead (Gromov et al.). Keys equal :func:`depth_units` names.
    """
    if unit not in GRANULARITIES:
        raise RayPressError(f"unknown ShortGPT unit '{unit}'; use one of {', '.join(GRANULARITIES)}")
    if metric not in METRICS:
        raise RayPressError(f"unknown ShortGPT metric '{metric}'; use one of {', '.join(METRICS)}")
    units = depth_units(adapter, unit)
    device = device or next(model.parameters()).device
    blocks = adapter.blocks()
    sums = {u: 0.0 for u in units}
    counts = {u: 0 for u in units}
    cur: dict = {}
    handles = []

    def block_hook(i):
        def hook(module, args, kwargs, output):
            h_in = _hidden_arg(args, kwargs)
            h_out = output[0] if isinstance(output, tuple) else output
            h_out = h_out.view(h_in.shape)
            if unit == "block":
                s, n = _score(h_in, h_out, metric)
                u = f"{adapter.block_prefix}.{i}"
                sums[u] += s
                counts[u] += n
                return
            a, m = cur.pop(("attn", i)), cur.pop(("mlp", i))
            for sub, (x, y) in ((adapter.attn_name, (h_in, h_in + a.view(h_in.shape))),
                                (mlp_unit_name(adapter), (h_out - m.view(h_out.shape), h_out))):
                s, n = _score(x, y, metric)
                u = f"{adapter.block_prefix}.{i}.{sub}"
                sums[u] += s
                counts[u] += n
        return hook

    def store(key):
        def hook(module, args, output):
            cur[key] = output[0] if isinstance(output, tuple) else output
        return hook

    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_hook(block_hook(i), with_kwargs=True))
            if unit == "sublayer":
                handles.append(getattr(block, adapter.attn_name).register_forward_hook(store(("attn", i))))
                mlp_out = getattr(block, adapter.mlp_name) if adapter.mlp_name else block.fc2
                handles.append(mlp_out.register_forward_hook(store(("mlp", i))))
        ids = torch.as_tensor(np.asarray(calib_tokens), dtype=torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        for j in range(0, ids.shape[0], batch_size):
            model(ids[j:j + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {u: sums[u] / max(counts[u], 1) for u in units}


def angular_distance(model, adapter, calib_tokens, unit: str = "block", **kw) -> dict[str, float]:
    """ShortGPT scores with the angular distance arccos(cos)/π (Gromov et al. 2024, n = 1)."""
    return shortgpt_scores(model, adapter, calib_tokens, unit=unit, metric="angular", **kw)


def shortgpt_config(space, scores: dict[str, float]) -> dict[str, int]:
    """Drop the lowest-scoring units of `space` so that the budget is met exactly (ties: later unit first)."""
    missing = [u for u in space.layers if u not in scores]
    if missing:
        raise RayPressError(f"no ShortGPT score for depth unit '{missing[0]}'; compute scores with the same "
                            "granularity as the search space")
    if any(n != 1 for n in space.n_params) or any(list(v) != [0.0, 1.0] for v in space.level_values):
        raise RayPressError("shortgpt_config needs a depth space (levels [0.0, 1.0], unit weights 1); "
                            "build it with raypress.compress.depth.depth_space")
    space.require_reachable()
    k = space.budget // 1000  # units weigh 1: the budget is 1000 x the units dropped
    order = sorted(range(len(space.layers)), key=lambda i: (scores[space.layers[i]], -i))
    drop = {space.layers[i] for i in order[:k]}
    config = {u: int(u in drop) for u in space.layers}
    if hasattr(space, "check"):
        space.check(config)
    return config
