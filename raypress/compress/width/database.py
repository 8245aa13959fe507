"""The width database: per (unit, level) the kept channels / heads and the reformed output weight.

`build_width_database` computes it (reformation: the kept o_proj / down_proj columns are refit to
the dense outputs on the calibration data, `raypress.reform.lstsq_columns`, or ADMM). In memory it
is a plain dict of numpy arrays (picklable, fit for ``ray.put``); on disk it lives in the same
content-hashed safetensors store as every RayPress database (store.py): one ``width.safetensors``
with the arrays and ``meta.json`` with the structure, verified by sha256 when opened
(`save_width_database` / `open_width_database`).
"""
from __future__ import annotations

import numpy as np
import torch

from raypress import reform as rf
from raypress import store
from raypress.errors import RayPressError
from raypress.progress import steps

from .importance import _head_cols, _kept_heads, width_importance
from .levels import BlockGeometry, UnitLadder, WidthLevels, _attn_mlp, _geometries, _layout, width_levels

FORMAT = "raypress-width/1"
REFORMS = ("lstsq", "admm", "none")

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


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
    bar = steps(len(lv.units), "width database", "unit", enabled=progress)
    for u in lv.units:
        bar.update(1)
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
    bar.close()
    return db


def levels_from_database(db: dict) -> WidthLevels:
    """Rebuild the ladders (for width_space / width_initial) from a database dict."""
    geoms = [BlockGeometry(**g) for g in db["geometry"]]
    units = [UnitLadder(n, r["kind"], r["block"], r["n_params"], list(r["kept_counts"]), list(r["removed"]))
             for n, r in db["units"].items()]
    return WidthLevels(units, db["attn_mode"], geoms, db.get("resolution", 1000), dict(db.get("settings", {})))




# ============================================================================ on disk (store.py)
def _arrays_and_structure(db: dict) -> tuple[dict[str, np.ndarray], dict]:
    """Split a database dict into safetensors arrays and a JSON structure that names them."""
    arrays, units = {}, {}
    for name, rec in db["units"].items():
        r = {k: v for k, v in rec.items() if k not in ("importance", "levels")}
        arrays[f"{name}::importance"] = np.asarray(rec["importance"])
        levels = []
        for k, ent in enumerate(rec["levels"]):
            if ent is None:
                levels.append(None)
                continue
            keys = {}
            for part, arr in ent.items():
                keys[part] = f"{name}::{k}::{part}"
                arrays[keys[part]] = np.asarray(arr)
            levels.append(keys)
        r["levels"] = levels
        units[name] = r
    return arrays, {**{k: v for k, v in db.items() if k != "units"}, "units": units}


def save_width_database(db: dict, root, key: str) -> None:
    """Write `db` as the store folder root/key (atomic; a concurrent identical build is fine)."""
    from pathlib import Path

    root = Path(root)
    arrays, structure = _arrays_and_structure(db)
    tmp = store.new_tmp(root, key)
    try:
        entry = store.write_arrays(tmp / "width.safetensors", arrays, {"format": FORMAT})
        store.finalize(tmp, root / key, {"format": FORMAT, "key": key, "structure": structure,
                                         "files": {"width.safetensors": entry}})
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def open_width_database(path, verify=True) -> dict:
    """The database dict of a store folder (arrays memory-mapped read-only; every file verified)."""
    from pathlib import Path

    path = Path(path)
    meta = store.read_meta(path, ("files", "structure", "format"))
    if meta["format"] != FORMAT:
        raise store.corrupt(path, f"format {meta['format']!r}, expected {FORMAT!r}", "width database")
    store.verify_files(path, meta["files"], verify)
    try:
        maps = store.map_safetensors(path / "width.safetensors")
        db = dict(meta["structure"])
        units = {}
        for name, r in db["units"].items():
            rec = dict(r)
            rec["importance"] = maps[f"{name}::importance"]
            rec["levels"] = [None if ent is None else {part: maps[k] for part, k in ent.items()}
                             for ent in r["levels"]]
            units[name] = rec
        db["units"] = units
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise store.corrupt(path, f"{type(e).__name__}: {e}", "width database") from None
    return db
