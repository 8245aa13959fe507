"""Write a compressed model as a plain Hugging Face folder (safetensors) + ``raypress.json``.

* sparsity — each linear layer gets its database variant (zeros included); level value 0.0 keeps
  the model's own dense tensor (as the evaluator's weight swap does).
* quant — each linear layer gets its *dequantized* variant (transformers has no config for
  per-layer mixed bitwidths); the per-layer bits are recorded in ``raypress.json``.
* depth — dropped whole blocks are really removed (ModuleList, ``config.num_hidden_layers``,
  ``layer_idx`` and per-layer config lists such as ``layer_types`` are fixed). A block whose
  attention *and* MLP are both dropped is removed too when that is exact (pre-norm blocks). A
  dropped attention / MLP inside a kept block cannot be expressed in a transformers config, so its
  output projection (``o_proj``/``out_proj``, ``down_proj``/``fc2``; weight and bias) is zeroed —
  the sub-block then outputs exactly zero — and it is listed under ``depth.dropped_sublayers`` in
  ``raypress.json``; :func:`load_exported` additionally skips those sub-blocks' compute.

``AutoModelForCausalLM.from_pretrained(out_dir)`` loads every export and computes the same
function as the in-memory compressed model. The folder is written to a temporary sibling
directory and renamed into place, so a crash never leaves a half-written export.
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from raypress import __version__
from raypress.errors import RayPressError

INFO_FILE = "raypress.json"
FAMILY_ALIASES = {
    "sparsity": "sparsity", "sparsegpt": "sparsity", "wanda": "sparsity", "magnitude": "sparsity",
    "quant": "quant", "gptq": "quant", "rtn": "quant",
    "depth": "depth", "shortgpt": "depth",
}
_OUT_PROJ = ("o_proj", "out_proj", "c_proj", "dense")
_PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers", "sliding_window_layers", "attention_types")
_DOWN_PROJ = ("down_proj", "fc2", "c_proj", "dense_4h_to_h")


# ----------------------------------------------------------------------------- helpers
def _clean_levels(levels: dict, space) -> dict[str, int]:
    cfg = {k: int(v) for k, v in levels.items() if not str(k).startswith("_rp_")}
    unknown = [k for k in cfg if k not in set(space.layers)]
    if unknown:
        raise RayPressError(f"config names '{unknown[0]}', which is not a layer of the search space; "
                            "export the config that the search over this space produced")
    missing = [l for l in space.layers if l not in cfg]
    if missing:
        raise RayPressError(f"config has no level for '{missing[0]}' ({len(missing)} layers missing); "
                            "pass a complete {layer: level} config")
    for i, l in enumerate(space.layers):
        if not 0 <= cfg[l] < len(space.level_values[i]):
            raise RayPressError(f"level {cfg[l]} of '{l}' is out of range 0..{len(space.level_values[i]) - 1}")
    return {l: cfg[l] for l in space.layers}


def _mean_value(space, cfg) -> float:
    if hasattr(space, "mean_value"):
        return float(space.mean_value(cfg))
    tot = sum(space.n_params)
    return float(sum(n * v[cfg[l]] for l, n, v in zip(space.layers, space.n_params, space.level_values)) / tot)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


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


def remove_blocks(model, adapter, drop: list[int]) -> dict[int, int]:
    """Delete blocks `drop` from the model in place; returns {old index: new index} of kept blocks.

    Fixes ``config.num_hidden_layers``, every ``layer_idx`` attribute inside kept blocks (KV-cache
    slots) and per-layer config lists (``layer_types`` and other lists of one entry per layer)."""
    layers = model.get_submodule(adapter.block_prefix)
    n_old = len(layers)
    drop = sorted(set(int(i) for i in drop))
    if drop and not (0 <= drop[0] and drop[-1] < n_old):
        raise RayPressError(f"cannot remove blocks {drop} from a model with {n_old} blocks")
    if len(drop) == n_old:
        raise RayPressError("the config drops every block; keep at least one block (lower the depth target)")
    keep = [i for i in range(n_old) if i not in set(drop)]
    parent_name, _, attr = adapter.block_prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, torch.nn.ModuleList([layers[i] for i in keep]))
    for new, old in enumerate(keep):
        block = getattr(parent, attr)[new]
        for m in block.modules():
            if hasattr(m, "layer_idx") and isinstance(getattr(m, "layer_idx"), int):
                m.layer_idx = new
    cfgs = [model.config] + [c for c in (getattr(model.config, "text_config", None),) if c is not None]
    for cfg in cfgs:
        if getattr(cfg, "num_hidden_layers", None) == n_old:
            cfg.num_hidden_layers = len(keep)
        for key, val in list(vars(cfg).items()):
            if key.startswith("_") or not isinstance(val, list) or len(val) != n_old:
                continue
            if key in _PER_LAYER_CONFIG_LISTS:
                setattr(cfg, key, [val[i] for i in keep])
    return {old: new for new, old in enumerate(keep)}


# ----------------------------------------------------------------------------- families
def _apply_weights(model, adapter, space, cfg, db, family: str) -> dict:
    if db is None:
        raise RayPressError(f"exporting a {family} config needs its level database; pass db= (the LevelDatabase "
                            "the search used, e.g. raypress.database.open_database(path))")
    linears = adapter.linear_layers()
    layers_info = {}
    for i, layer in enumerate(space.layers):
        if layer not in linears:
            raise RayPressError(f"search-space layer '{layer}' is not a linear layer of this model; "
                                "export with the model the database was built for")
        level = cfg[layer]
        value = float(space.level_values[i][level])
        layers_info[layer] = {"level": level, "value": value}
        lin = linears[layer]
        if family == "sparsity" and value == 0.0:
            continue  # dense: keep the model's own tensor (bit-exact, like the evaluator)
        arr = np.asarray(db.variant(layer, level))
        if tuple(arr.shape) != tuple(lin.weight.shape):
            raise RayPressError(f"database variant of '{layer}' has shape {tuple(arr.shape)} but the model's weight "
                                f"is {tuple(lin.weight.shape)}; rebuild the database for this model")
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.array(arr, copy=True)).to(lin.weight.dtype))
    return layers_info


def _apply_depth(model, adapter, space, cfg) -> tuple[dict, dict]:
    from raypress.compress.depth import _block_index, _mlp_rel

    layers_info = {}
    drop_blocks, drop_sub = set(), {}
    for i, unit in enumerate(space.layers):
        level = cfg[unit]
        layers_info[unit] = {"level": level, "value": float(space.level_values[i][level])}
        if space.level_values[i][level] == 0.0:
            continue
        idx, sub = _block_index(adapter, unit)
        if sub is None:
            drop_blocks.add(idx)
        else:
            drop_sub.setdefault(idx, set()).add(sub)
    attn_name, mlp_rel = adapter.attn_name, _mlp_rel(adapter)
    if _pre_norm(model, adapter):
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


# ----------------------------------------------------------------------------- public API
def export_model(spec_or_model, out_dir, *, family: str, levels: dict[str, int], space, db=None, tokenizer=None,
                 method_params: dict | None = None, source: str | None = None, overwrite: bool = False,
                 inplace: bool = False, check_budget: bool = True, extra_info: dict | None = None) -> Path:
    """Write the compressed model for `levels` (a config of `space`) to `out_dir`; returns the path.

    spec_or_model: a model spec for :func:`raypress.models.load_model` (its tokenizer is exported too
    unless `tokenizer` is given) or a loaded model (deep-copied unless ``inplace=True``).
    family: "sparsity" | "quant" | "depth" (method names such as "sparsegpt"/"gptq" are accepted).
    db: the LevelDatabase (sparsity / quant). method_params: recorded in raypress.json
    (default: ``db.meta["method"]`` when present). overwrite: replace an existing `out_dir`.
    """
    fam = FAMILY_ALIASES.get(str(family).lower())
    if fam is None:
        raise RayPressError(f"cannot export family '{family}'; export supports sparsity, quant and depth")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise RayPressError(f"export folder {out_dir} already exists; choose another --out or pass overwrite")

    if isinstance(spec_or_model, (str, os.PathLike)):
        from raypress.models import load_model

        source = source or str(spec_or_model)
        model, tok = load_model(str(spec_or_model))
        tokenizer = tokenizer if tokenizer is not None else tok
    else:
        model = spec_or_model if inplace else copy.deepcopy(spec_or_model)
        source = source or getattr(model.config, "_name_or_path", "") or ""
    from raypress.models import get_adapter

    adapter = get_adapter(model)
    cfg = _clean_levels(levels, space)
    if check_budget and hasattr(space, "check"):
        space.check(cfg)

    info: dict = {
        "raypress_version": __version__,
        "format": 1,
        "family": fam,
        "source_model": source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "target": float(space.target),
        "mean_value": _mean_value(space, cfg),
    }
    if method_params is None and db is not None:
        meta = getattr(db, "meta", None) or {}
        method_params = meta.get("method") or meta.get("method_params")
    info["method"] = _jsonable(method_params or {"name": family})

    if fam in ("sparsity", "quant"):
        info["value_kind"] = "sparsity" if fam == "sparsity" else "bits"
        info["layers"] = _apply_weights(model, adapter, space, cfg, db, fam)
        if fam == "quant":
            from raypress.compress.quant import effective_bits

            gs = (method_params or {}).get("group_size")
            info["bits"] = {l: v["value"] for l, v in info["layers"].items()}
            if gs:
                info["effective_bits_mean"] = effective_bits(info["mean_value"], gs)
            info["note"] = "weights are stored dequantized (float); per-layer bits are in 'bits'"
    else:
        info["value_kind"] = "dropped"
        info["layers"], info["depth"] = _apply_depth(model, adapter, space, cfg)
    info["n_params"] = int(sum(p.numel() for p in model.parameters()))
    if extra_info:
        info.update(_jsonable(extra_info))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(_jsonable(info), indent=2) + "\n")
        if out_dir.exists():  # overwrite: swap in, then delete the old export
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_export_info(path) -> dict:
    """The ``raypress.json`` of an export folder."""
    p = Path(path) / INFO_FILE
    if not p.is_file():
        raise RayPressError(f"{path} has no {INFO_FILE}; it is not a RayPress export (write one with `raypress export`)")
    return json.loads(p.read_text())


def load_exported(path, dtype=None, device="cpu"):
    """Load an export: ``(model, tokenizer or None)``, eval mode, ``model.raypress_info`` = raypress.json.

    Like ``AutoModelForCausalLM.from_pretrained`` plus: dropped attention / MLP sub-blocks inside
    kept blocks are skipped (they output zeros without computing), which is exact since their
    output projections were zeroed."""
    from transformers import AutoModelForCausalLM

    info = read_export_info(path)
    kw = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kw).to(device).eval()
    subs = (info.get("depth") or {}).get("dropped_sublayers") or []
    if subs:
        from raypress.compress.depth import drop_module, unit_targets
        from raypress.models import get_adapter

        adapter = get_adapter(model)
        for unit in subs:
            for module, fwd in unit_targets(adapter, unit):
                drop_module(module, fwd)
    model.raypress_info = info
    tokenizer = None
    if any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer
