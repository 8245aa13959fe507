"""Search units: linear layers that must share one level.

A serving engine fuses some linear layers into one matmul — vLLM runs q/k/v as one `qkv_proj` and
gate/up as one `gate_up_proj` — and one matmul has one weight format, so those layers must get the
same level (vLLM refuses a checkpoint whose fused shards are quantized differently). With
`units: fused` the weight families search over units: a unit is a complete fused group of one
module, named as the engine names it (`model.layers.0.self_attn.qkv_proj`), or a single linear
layer; its weight in the budget is the sum of its layers'. The level database stays per layer:
`expand` turns a unit config into the layer config that evaluators and exports apply, and
`per_unit` sums per-layer numbers (schedule errors) into per-unit ones.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..errors import RayPressError
from ..space import SearchSpace
from ..trial import META_PREFIX

#: fused module name -> the layers of one parent module it fuses (vLLM's packed_modules_mapping)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
UNITS = ("linear", "fused")


def check(setting) -> str:
    if setting not in UNITS:
        raise RayPressError(f"units must be one of {', '.join(UNITS)}, got {setting!r} (fused: layers a serving "
                            "engine fuses, q/k/v and gate/up, share one level)")
    return setting


def group(layers, setting: str = "fused") -> dict[str, list[str]]:
    """{unit: [layers]} in layer order; "linear": every layer is its own unit."""
    layers = list(layers)
    if check(setting) == "linear":
        return {layer: [layer] for layer in layers}
    present, taken, out = set(layers), set(), {}
    for layer in layers:
        if layer in taken:
            continue
        parent, _, leaf = layer.rpartition(".")
        fused = next(((f, m) for f, m in FUSED.items() if leaf in m), None)
        members = [f"{parent}.{m}" for m in fused[1]] if fused else []
        if members and all(m in present for m in members):
            out[f"{parent}.{fused[0]}"] = members
            taken.update(members)
        else:
            out[layer] = [layer]
    return out


def is_trivial(units: Mapping[str, list[str]] | None) -> bool:
    return units is None or all(v == [k] for k, v in units.items())


def space(layer_space: SearchSpace, units: Mapping[str, list[str]]) -> SearchSpace:
    """The unit space of a per-layer space: a unit's ladder is its layers' (they must agree), its
    weight their summed weights; same target."""
    if is_trivial(units):
        return layer_space
    idx = {layer: i for i, layer in enumerate(layer_space.layers)}
    names, sizes, ladders = [], [], []
    for unit, members in units.items():
        ladder = layer_space.level_values[idx[members[0]]]
        for m in members[1:]:
            if layer_space.level_values[idx[m]] != ladder:
                raise RayPressError(f"layers {members[0]} and {m} are fused into {unit} but have different level "
                                    "ladders; use units: linear, or the same levels for both")
        names.append(unit)
        sizes.append(sum(layer_space.n_params[idx[m]] for m in members))
        ladders.append(list(ladder))
    return SearchSpace(layers=names, n_params=sizes, level_values=ladders, target=layer_space.target)


def expand(config: Mapping, units: Mapping[str, list[str]] | None) -> dict:
    """A unit config -> the layer config (keys with the trial meta prefix pass through)."""
    if is_trivial(units):
        return dict(config)
    out = {}
    for key, level in config.items():
        if key.startswith(META_PREFIX):
            out[key] = level
        else:
            for layer in units.get(key, [key]):
                out[layer] = level
    return out


def per_unit(values: Mapping[str, list[float]], units: Mapping[str, list[str]] | None) -> dict[str, list[float]]:
    """Per-layer lists (errors per level) summed over each unit's layers."""
    if is_trivial(units):
        return dict(values)
    return {u: [sum(col) for col in zip(*(values[m] for m in members))] for u, members in units.items()}
