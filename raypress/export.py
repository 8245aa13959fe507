"""Writing an export folder: a plain Hugging Face folder (safetensors) + ``raypress.json``.

The family-specific part (which weights change, which blocks go) is each family's `export`
(raypress/families/); this module holds what every export shares: the atomic folder write
(`write_export`: a temporary sibling renamed into place, so a crash never leaves a half-written
export; an overwrite swaps the new folder in before deleting the old one), block removal for
depth exports (`remove_blocks`), and reading an export back (`load_exported`).

``AutoModelForCausalLM.from_pretrained(out_dir)`` loads every export. Depth exports: a dropped
attention / MLP inside a kept block cannot be expressed in a transformers config, so its output
projection is zeroed (the sub-block outputs exactly zero) and it is listed under
``depth.dropped_sublayers`` in raypress.json; `load_exported` additionally skips its compute.
"""
from __future__ import annotations

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
from raypress.store import usual_permissions
from raypress.trial import META_PREFIX

INFO_FILE = "raypress.json"
_PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers", "sliding_window_layers", "attention_types")


# ----------------------------------------------------------------------------- helpers
def clean_levels(levels: dict, space) -> dict[str, int]:
    cfg = {k: int(v) for k, v in levels.items() if not str(k).startswith(META_PREFIX)}
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


# ----------------------------------------------------------------------------- writing
def base_info(space, cfg: dict, family: str, source: str, method_params=None) -> dict:
    """The raypress.json fields every export has."""
    return {
        "raypress_version": __version__,
        "format": 1,
        "family": family,
        "source_model": source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "target": float(space.target),
        "mean_value": _mean_value(space, cfg),
        "method": _jsonable(method_params or {"name": family}),
    }


def staging_folder(out_dir: Path, overwrite: bool) -> Path:
    """The temporary sibling an export is written to before `publish` renames it to `out_dir`
    (refused when `out_dir` exists and this is not an overwrite; rundir.check_export_target
    decides, for the CLI, which folders may be overwritten at all)."""
    if out_dir.exists() and not overwrite:
        raise RayPressError(f"export folder {out_dir} already exists; choose another --out or pass overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"


def write_export(model, out_dir, *, tokenizer=None, info: dict | None = None, files: dict[str, str] | None = None,
                 overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Save `model` (+ tokenizer, + raypress.json from `info`, + extra text `files`) as `out_dir`,
    atomically: written to a temporary sibling, then renamed into place (an existing folder is
    swapped out first and deleted after, with overwrite=True). `dtype`: the weights' dtype on disk
    (the source checkpoint's, models.checkpoint_dtype; the search works in float32, which would
    double a bf16 model's size); files get the usual umask permissions."""
    out_dir = Path(out_dir)
    tmp = staging_folder(out_dir, overwrite)
    try:
        if dtype is not None:
            model.to(dtype)  # in place: the caller's model is done with (exports load their own copy)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if info is not None:
            (tmp / INFO_FILE).write_text(json.dumps(_jsonable(info), indent=2) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        usual_permissions(tmp)
        publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished export folder `tmp` to `out_dir`: renamed into place, or (overwrite) swapped
    with the existing folder first, which is deleted after (never a half-written `out_dir`)."""
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


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
