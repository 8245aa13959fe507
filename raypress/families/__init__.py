"""The family registry: compression families by name (see base.py for the interface).

A new family is one module with one `Family` subclass and one line in `FAMILIES`; nothing else in
RayPress changes (config validation, `raypress plan`, the runner, build-db and export all go
through `get_family`).
"""
from __future__ import annotations

import importlib

from ..errors import RayPressError
from .base import Family, Prepared

#: family name -> "module:Class" (imported on first use)
FAMILIES: dict[str, str] = {
    "sparsity": "raypress.families.sparsity:SparsityFamily",
    "quant": "raypress.families.quant:QuantFamily",
    "depth": "raypress.families.depth:DepthFamily",
    "width": "raypress.families.width:WidthFamily",
    "joint": "raypress.families.joint:JointFamily",
}
_INSTANCES: dict[str, Family] = {}


def get_family(name: str) -> Family:
    fam = _INSTANCES.get(name)
    if fam is None:
        if name not in FAMILIES:
            raise RayPressError(f"unknown family '{name}'; choose one of {', '.join(FAMILIES)}")
        mod, cls = FAMILIES[name].split(":")
        fam = _INSTANCES[name] = getattr(importlib.import_module(mod), cls)()
    return fam


def family_of_method(method: str) -> Family:
    """The family whose `methods` include `method` (export_model accepts either name)."""
    for name in FAMILIES:
        fam = get_family(name)
        if method in fam.methods:
            return fam
    raise RayPressError(f"'{method}' is neither a family ({', '.join(FAMILIES)}) nor a method of one")


def prepare(cfg, model, adapter, calib, serve: bool = True) -> Prepared:
    """The family's Prepared (space, database, applier) for cfg."""
    return get_family(cfg.family).prepare(cfg, model, adapter, calib, serve=serve)


def dense_levels(db) -> dict[str, int]:
    """Levels whose stored variant equals the dense weight (e.g. sparsity 0.0): evaluators serve those
    from the model itself, so the dense config is bit-exact. Asks the family whose levels the
    database holds (its `value_kind`)."""
    kind = db.meta.get("value_kind")
    for name in FAMILIES:
        fam = get_family(name)
        if fam.has_database and fam.value_kind == kind and hasattr(fam, "dense_levels"):
            return fam.dense_levels(db)
    return {}


def export_model(model, out_dir, *, family: str, levels: dict, space, db=None, tokenizer=None, source: str = "",
                 overwrite: bool = False, extra_info: dict | None = None):
    """Export `levels` (a config of `space`) of a loaded model (not modified: a copy is exported) or
    of a model spec (loaded, its tokenizer exported too). family: a family or a method name."""
    import copy
    import os

    from ..models import get_adapter, load_model

    fam = get_family(family) if family in FAMILIES else family_of_method(family)
    if isinstance(model, (str, os.PathLike)):
        source = source or str(model)
        model, tok = load_model(str(model))
        tokenizer = tokenizer if tokenizer is not None else tok
    else:
        source = source or getattr(model.config, "_name_or_path", "") or ""
        model = copy.deepcopy(model)
    prep = Prepared(space=space, applier=None, db=db)
    return fam.export(model, get_adapter(model), levels, prep, out_dir, tokenizer=tokenizer, source=source,
                      overwrite=overwrite, extra_info=extra_info)


__all__ = ["FAMILIES", "Family", "Prepared", "dense_levels", "export_model", "family_of_method", "get_family",
           "prepare"]
