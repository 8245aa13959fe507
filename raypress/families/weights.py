"""What the weight families (sparsity, quant) share: a level database of per-layer weight variants.

Each linear layer is compressed at every level by a CompressionMethod (compress/), the variants are
stored in the content-hashed level database (database.py), served to evaluators from Ray's object
store and swapped in by a WeightSwapApplier; an export writes the chosen variant of every layer.
The subclasses say which methods and keys they take and how the config's `levels` reach the method.
"""
from __future__ import annotations

from .. import placement
from ..compress import get_method
from ..compress.swap import WeightSwapApplier
from ..database import build_database, layer_storage, storage_itemsize
from ..errors import RayPressError
from ..export import base_info, clean_levels, write_export
from ..models import checkpoint_dtype, is_random
from ..search.schedules import run_schedule
from ..space import SearchSpace
from . import units
from .base import Family, Prepared


class WeightFamily(Family):
    keys = ("levels", "units", "database.storage_dtype", "database.parallel", "database.device", "database.placement",
            "database.stream")
    has_database = True

    @property
    def calibrated_schedules(self) -> tuple[str, ...]:  # every one but uniform reads the statistics: schedule()
        return tuple(n for n in self.schedules if n != "uniform")

    def driver_model(self, cfg, model=None) -> dict:
        """The driver streams the model block by block (calibration and database build materialize one
        block at a time): random models always, in the storage dtype (their weights are generated);
        checkpoints when database.stream says so, in float32 like the whole-model path (identical
        databases, only the memory differs)."""
        if is_random(cfg.model):
            return {"streamed": True, "dtype": cfg.database.storage_dtype}
        stream = cfg.database.stream
        if stream == "auto":
            import psutil

            from ..models import meta_model

            params = sum(p.numel() for p in (model if model is not None else meta_model(cfg.model)).parameters())
            stream = 4 * params > psutil.virtual_memory().total / 4
        return {"streamed": True} if stream else {}

    def database_bytes(self, cfg, adapter, space) -> int:
        """Every linear at every level, as the build will store it (database.layer_storage)."""
        m = self.method(cfg)
        n, item = len(m.level_values()), storage_itemsize(cfg.database.storage_dtype)
        return sum(layer_storage(n, lin.weight.shape, item, m.packed, m.group_size or -1)[1]
                   for lin in adapter.linear_layers().values())

    def method(self, cfg):
        """The CompressionMethod of cfg (its ladder from cfg.levels, else the method's default)."""
        return get_method(cfg.method, **self.method_kwargs(cfg))

    def method_kwargs(self, cfg) -> dict:
        return {} if cfg.levels is None else {"levels": cfg.levels}

    @staticmethod
    def grid_kwargs(cfg) -> dict:
        """Quantization grid settings of the families that quantize (quant, joint)."""
        if not isinstance(cfg.database.symmetric, bool):
            raise RayPressError(f"database.symmetric must be true or false, got {cfg.database.symmetric!r}")
        return {"group_size": cfg.database.group_size, "sym": cfg.database.symmetric}

    def check_config(self, cfg, explicit=None) -> None:
        super().check_config(cfg, explicit)
        self.method(cfg)  # the method validates its ladder and options (one-line errors)
        if cfg.database.stream not in (True, False, "auto"):
            raise RayPressError(f"database.stream must be true, false or auto, got {cfg.database.stream!r}")
        units.check(cfg.units)
        if cfg.database.placement not in placement.PLACEMENTS:
            raise RayPressError(f"database.placement must be one of {', '.join(placement.PLACEMENTS)}, got "
                                f"{cfg.database.placement!r}")

    def space(self, cfg, adapter) -> SearchSpace:
        layers = adapter.linear_layers()
        per_layer = SearchSpace.from_values(self.method(cfg).level_values(), cfg.target, layers=list(layers),
                                            n_params=[int(m.weight.numel()) for m in layers.values()])
        return units.space(per_layer, units.group(layers, cfg.units))

    def build_database(self, cfg, model, adapter, calib):
        return build_database(cfg.model, model, adapter, self.method(cfg), calib, cache_root=cfg.database.cache_dir,
                              storage_dtype=cfg.database.storage_dtype, **database_devices(cfg))

    def prepare(self, cfg, model, adapter, calib, *, serve: bool = True) -> Prepared:
        method = self.method(cfg)
        db = self.build_database(cfg, model, adapter, calib)
        groups = units.group(db.layers, cfg.units)
        space = units.space(SearchSpace.for_database(db, cfg.target), groups)
        applier, where = None, None
        if serve:
            refs, where = placement.serve(db, cfg.database.placement)
            applier = WeightSwapApplier(refs, self.dense_levels(db), decode=method.decode_stored,
                                        units=None if units.is_trivial(groups) else groups)
        return Prepared(space, applier, db=db, context={"db": db, "method": method, "units": groups},
                        describe={"db.key": db.key, "db.path": str(db.path), "db.placement": where})

    def dense_levels(self, db) -> dict[str, int]:
        """Levels whose stored variant equals the dense weight (served from the model itself)."""
        return {}

    def schedule(self, name, cfg, prep, model, adapter, calib) -> dict:
        """uniform, or a statistics-driven schedule (OWL, Hessian, DP) on what one streamed pass over
        the dense model reduced its Hessians and input norms to (prep.context["stats"], once per model,
        tokens, database and target)."""
        if name not in self.calibrated_schedules:
            return super().schedule(name, cfg, prep, model, adapter, calib)
        groups = prep.context.get("units")
        layers = None if units.is_trivial(groups) else [m for ms in groups.values() for m in ms]
        inputs = prep.context["stats"].get(cfg.model, model, adapter, calib, prep.space, prep.db,
                                           device=database_devices(cfg)["device"], layers=layers, schedule=name)
        if layers is not None:  # per-layer numbers -> per unit (OBS errors and level errors add up)
            inputs = dict(inputs)
            if "errors" in inputs:
                inputs["errors"] = units.per_unit(inputs["errors"], groups)
            if "obs_errors" in inputs:
                inputs["obs_errors"] = {u: sum(inputs["obs_errors"][m] for m in ms) for u, ms in groups.items()}
        return run_schedule(name, prep.space, db=prep.db, **inputs)

    def export(self, model, adapter, best, prep, out_dir, *, tokenizer=None, source="", overwrite=False,
               extra_info=None):
        import numpy as np
        import torch

        space, db = prep.space, prep.db
        if db is None:
            raise RayPressError(f"exporting a {self.name} config needs its level database; pass db= (the "
                                "LevelDatabase the search used, e.g. raypress.database.open_database(path))")
        cfg = clean_levels(best, space)
        space.check(cfg)
        linears = adapter.linear_layers()
        layers_info = {}
        dense = self.dense_levels(db)
        for layer, level in units.expand(cfg, prep.context.get("units")).items():
            if layer not in linears:
                raise RayPressError(f"search-space layer '{layer}' is not a linear layer of this model; "
                                    "export with the model the database was built for")
            layers_info[layer] = {"level": level, "value": float(db.level_values[layer][level])}
            if dense.get(layer) == level:
                continue  # dense: keep the model's own tensor (bit-exact, like the evaluator)
            lin = linears[layer]
            arr = np.asarray(db.variant(layer, level))
            if tuple(arr.shape) != tuple(lin.weight.shape):
                raise RayPressError(f"database variant of '{layer}' has shape {tuple(arr.shape)} but the model's "
                                    f"weight is {tuple(lin.weight.shape)}; rebuild the database for this model")
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(np.array(arr, copy=True)).to(lin.weight.dtype))
        meta = getattr(db, "meta", None) or {}
        info = base_info(space, cfg, self.name, source, meta.get("method") or meta.get("method_params"))
        info["value_kind"] = self.value_kind
        info["layers"] = layers_info
        info.update(self.export_info(info, meta.get("method") or {}))
        info["n_params"] = int(sum(p.numel() for p in model.parameters()))
        info.update(extra_info or {})
        return write_export(model, out_dir, tokenizer=tokenizer, info=info, overwrite=overwrite,
                            dtype=checkpoint_dtype(source) if source else None)

    def export_info(self, info: dict, method_params: dict) -> dict:
        return {}


def database_devices(cfg) -> dict:
    """build_database's device (driver-side calibration), parallel and task_device (Ray tasks) from
    database.device / database.parallel; "auto" = cuda where a GPU is (driver / Ray cluster)."""
    import torch

    dev, par = cfg.database.device, cfg.database.parallel
    if dev.startswith("cuda") and not par and not torch.cuda.is_available():
        raise RayPressError("database.device=cuda but this machine has no CUDA GPU; use database.device=auto or "
                            "cpu, or database.parallel=N to build on the Ray cluster's GPUs")
    driver = "cuda" if dev in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda:") and torch.cuda.is_available():
        driver = dev
    if not par:
        return {"device": driver}
    task = "cpu"
    if dev != "cpu":
        import ray

        if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
            task = "cuda"
    return {"device": driver, "parallel": par, "task_device": task}
