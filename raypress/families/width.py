"""Width: query heads and MLP channels kept per block (training-free structured search).

cfg.target is the removed fraction of the searched block parameters (0.2 keeps 80%); cfg.levels is
the MLP ladder, as kept ratios starting at 1.0 ([1.0, 0.9, ..., 0.3]) or removed fractions starting
at 0.0; cfg.method is the reformation of the kept output weights (lstsq, admm, none). The database
(kept sets + reformed weights) is cached in the content-hashed store like every database.
"""
from __future__ import annotations

from pathlib import Path


from ..compress.width import (FORMAT, WidthApplier, build_width_database, export_width, open_width_database,
                              load_width_model, save_width_database, width_hessians, width_initial,
                              width_levels)
from ..data import calib_hash
from ..database import default_cache_root, storage_dtype_name
from ..models import checkpoint_dtype
from ..space import SearchSpace
from ..store import META, content_key
from .base import Family, Prepared


class WidthFamily(Family):
    name = "width"
    methods = ("lstsq", "admm", "none")
    keys = ("levels", "database.storage_dtype")
    schedules = ("uniform",)
    value_kind = "removed"
    has_database = True

    def levels(self, cfg, adapter):
        kw = {}
        if cfg.levels:
            lv = [float(x) for x in cfg.levels]
            kw["mlp_keep"] = lv if lv[0] == 1.0 else [1.0 - x for x in lv]
        return width_levels(adapter, **kw)

    def check_config(self, cfg, explicit=None) -> None:
        super().check_config(cfg, explicit)
        storage_dtype_name(cfg.database.storage_dtype)

    def space(self, cfg, adapter) -> SearchSpace:
        lv = self.levels(cfg, adapter)
        return SearchSpace(layers=lv.names, n_params=[u.n_params for u in lv.units], level_values=lv.values(),
                           target=float(cfg.target))

    def build_database(self, cfg, model, adapter, calib, lv=None) -> dict:
        from ..models import model_fingerprint

        lv = lv or self.levels(cfg, adapter)
        storage = storage_dtype_name(cfg.database.storage_dtype)
        root = (Path(cfg.database.cache_dir).expanduser() if cfg.database.cache_dir else default_cache_root()) / "width"
        key = content_key(FORMAT, model_fingerprint(cfg.model), calib_hash(calib), lv.settings, cfg.method, storage)
        if not (root / key / META).is_file():
            H = width_hessians(model, adapter, calib, device=str(next(model.parameters()).device))
            db = build_width_database(model, adapter, H, lv, reform=cfg.method, storage_dtype=storage)
            save_width_database(db, root, key)
        return open_width_database(root / key)

    def prepare(self, cfg, model, adapter, calib, *, serve: bool = True) -> Prepared:
        lv = self.levels(cfg, adapter)
        space = self.space(cfg, adapter)
        space.require_reachable()
        db = self.build_database(cfg, model, adapter, calib, lv)
        applier = None
        if serve:
            import ray

            applier = WidthApplier(ray.put(db) if ray.is_initialized() else db)
        init = width_initial(lv, space.target)
        # attention and MLP steps differ in cost (SmolLM2: 2:3), so plain pair switches only trade budget
        # attention<->attention and MLP<->MLP; three-way switches let it flow between the two kinds
        return Prepared(space, applier, db=db, context={"width_levels": lv, "width_db": db, "initial": init},
                        describe={"width.attn_mode": lv.attn_mode, "width.reform": cfg.method,
                                  "width.units": len(lv.units), "width.exact_costs": lv.exact},
                        hints={"three_way": 0.3})

    def load_export(self, path):
        return load_width_model(path)

    def start(self, prep: Prepared) -> dict:
        return dict(prep.context["initial"])

    def export(self, model, adapter, best, prep, out_dir, *, tokenizer=None, source="", overwrite=False,
               extra_info=None):
        prep.space.check({k: v for k, v in best.items() if not str(k).startswith("_")})
        return export_width(model, adapter, best, out_dir, database=prep.db, applier=prep.applier,
                            tokenizer=tokenizer, overwrite=overwrite, extra_info=extra_info,
                            dtype=checkpoint_dtype(source) if source else None)


__all__ = ["WidthFamily"]
