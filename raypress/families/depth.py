"""Depth: drop whole decoder blocks or their attention / MLP sub-blocks (no database).

Every unit has two levels, 0.0 (kept) and 1.0 (dropped), and weighs 1 in the budget, so the target
is the fraction of units dropped. Schedules: uniform (the feasible mix closest to the target:
here, the first units dropped) and ShortGPT (drop the units whose output changes the residual
stream least). The export really removes dropped blocks (and zeroes the output projection of a
dropped sub-block inside a kept block).
"""
from __future__ import annotations

import torch

from ..compress.depth import DepthApplier, block_index, depth_units, mlp_unit_name, shortgpt_config, shortgpt_scores
from ..errors import RayPressError
from ..export import base_info, clean_levels, remove_blocks, write_export
from ..models import checkpoint_dtype
from ..space import SearchSpace
from .base import Family, Prepared

_OUT_PROJ = ("o_proj", "out_proj", "c_proj", "dense")
_DOWN_PROJ = ("down_proj", "fc2", "c_proj", "dense_4h_to_h")


class DepthFamily(Family):
    name = "depth"
    methods = ("drop",)
    keys = ("database.granularity",)
    schedules = ("uniform", "shortgpt")
    value_kind = "dropped"

    def space(self, cfg, adapter) -> SearchSpace:
        units = depth_units(adapter, cfg.database.granularity)
        if not 0.0 <= cfg.target <= 1.0:
            raise RayPressError(f"depth target {cfg.target} is not a fraction of units in [0, 1]; e.g. 0.25 drops a "
                                f"quarter of the {len(units)} {cfg.database.granularity} units")
        return SearchSpace(layers=units, n_params=[1] * len(units), level_values=[[0.0, 1.0]] * len(units),
                           target=float(cfg.target))

    def prepare(self, cfg, model, adapter, calib, *, serve: bool = True) -> Prepared:
        space = self.space(cfg, adapter)
        space.require_reachable()
        return Prepared(space, DepthApplier() if serve else None, describe={"depth.units": len(space.layers)})

    def schedule(self, name, cfg, prep, model, adapter, calib) -> dict:
        if name == "shortgpt":
            unit = "block" if cfg.database.granularity == "block" else "sublayer"
            return shortgpt_config(prep.space, shortgpt_scores(model, adapter, calib, unit=unit))
        return super().schedule(name, cfg, prep, model, adapter, calib)

    def export(self, model, adapter, best, prep, out_dir, *, tokenizer=None, source="", overwrite=False,
               extra_info=None):
        space = prep.space
        cfg = clean_levels(best, space)
        space.check(cfg)
        info = base_info(space, cfg, self.name, source)
        info["value_kind"] = self.value_kind
        info["layers"], info["depth"] = _apply_depth(model, adapter, space, cfg)
        info["n_params"] = int(sum(p.numel() for p in model.parameters()))
        info.update(extra_info or {})
        return write_export(model, out_dir, tokenizer=tokenizer, info=info, overwrite=overwrite,
                            dtype=checkpoint_dtype(source) if source else None)


def _first_attr(module, names):
    for n in names:
        m = getattr(module, n, None)
        if isinstance(m, torch.nn.Linear):
            return m
    return None


def _zero_linear_(lin: torch.nn.Linear) -> None:
    with torch.no_grad():
        lin.weight.zero_()
        if lin.bias is not None:
            lin.bias.zero_()


def _pre_norm(model, adapter) -> bool:
    """True when a block with zero attention and zero MLP output is exactly the identity."""
    if getattr(adapter, "family", "") == "opt" or model.config.model_type == "opt":
        return bool(getattr(model.config, "do_layer_norm_before", True))
    return True


def _apply_depth(model, adapter, space, cfg) -> tuple[dict, dict]:
    """Drop the config's units from the model in place; returns (per-unit info, raypress.json 'depth')."""
    layers_info = {}
    drop_blocks, drop_sub = set(), {}
    for i, unit in enumerate(space.layers):
        level = cfg[unit]
        layers_info[unit] = {"level": level, "value": float(space.level_values[i][level])}
        if space.level_values[i][level] == 0.0:
            continue
        idx, sub = block_index(adapter, unit)
        if sub is None:
            drop_blocks.add(idx)
        else:
            drop_sub.setdefault(idx, set()).add(sub)
    attn_name, mlp_rel = adapter.attn_name, mlp_unit_name(adapter)
    if _pre_norm(model, adapter):  # attention and MLP both dropped: the block is the identity, remove it
        for idx, subs in list(drop_sub.items()):
            if {attn_name, mlp_rel} <= subs:
                drop_blocks.add(idx)
    blocks = adapter.blocks()
    zeroed = []  # (old block idx, sub)
    for idx, subs in sorted(drop_sub.items()):
        if idx in drop_blocks:
            continue
        block = blocks[idx]
        for sub in sorted(subs):
            if sub == attn_name:
                lin = _first_attr(getattr(block, attn_name), _OUT_PROJ)
            elif adapter.mlp_name:
                lin = _first_attr(getattr(block, adapter.mlp_name), _DOWN_PROJ)
            else:
                lin = _first_attr(block, ("fc2",))
            if lin is None:
                raise RayPressError(f"cannot find the output projection of '{adapter.block_prefix}.{idx}.{sub}' "
                                    "to zero; export this family with block granularity")
            _zero_linear_(lin)
            zeroed.append((idx, sub))
    n_old = len(blocks)
    block_map = remove_blocks(model, adapter, sorted(drop_blocks)) if drop_blocks else {i: i for i in range(n_old)}
    dropped_sub = [f"{adapter.block_prefix}.{block_map[idx]}.{sub}" for idx, sub in zeroed]
    depth = {"dropped_blocks": sorted(drop_blocks), "dropped_sublayers": dropped_sub,
             "block_map": {str(k): v for k, v in block_map.items()},
             "num_hidden_layers_source": n_old, "num_hidden_layers": len(block_map)}
    return layers_info, depth
