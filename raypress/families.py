"""Family dispatch: config -> (SearchSpace, Applier, context) for sparsity/quant/depth/width."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from .config import Config
from .errors import RayPressError

log = logging.getLogger("raypress")


@dataclass
class Prepared:
    space: object  # SearchSpace
    applier: object  # Applier (driver-side prototype; pickled to evaluators)
    db: object | None = None  # LevelDatabase for database families
    context: dict = field(default_factory=dict)  # extra inputs for schedules (db, stats, ...)
    describe: dict = field(default_factory=dict)  # family facts for MLflow params


def method_for(cfg: Config):
    from .compress import get_method

    kw = {}
    if cfg.levels is not None:
        kw["bits" if cfg.family == "quant" else "levels"] = cfg.levels
    if cfg.family == "quant":
        kw["group_size"] = cfg.database.group_size
    try:
        return get_method(cfg.method, **kw)
    except KeyError:
        from .compress import METHODS

        raise RayPressError(f"unknown method '{cfg.method}' for family {cfg.family}; use one of "
                            f"{', '.join(sorted(METHODS))}") from None


def database_devices(cfg: Config) -> dict:
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


def dense_levels(db) -> dict[str, int]:
    """Levels whose variant equals the dense weight (sparsity 0.0): served from the model itself."""
    if db.meta.get("value_kind", "sparsity") != "sparsity":
        return {}
    return {l: vals.index(0.0) for l, vals in db.level_values.items() if 0.0 in vals}


def prepare(cfg: Config, model, adapter, calib: np.ndarray, spec: str, serve: bool = True) -> Prepared:
    """serve=False: no object-store copy and no applier (export / inspection of a finished run)."""
    from .space import SearchSpace

    if cfg.family in ("sparsity", "quant"):
        from .compress.swap import WeightSwapApplier
        from .database import build_database

        method = method_for(cfg)
        db = build_database(
            spec,
            model,
            adapter,
            method,
            calib,
            cache_root=cfg.database.cache_dir,
            storage_dtype=cfg.database.storage_dtype,
            **database_devices(cfg),
        )
        space = SearchSpace.for_database(db, cfg.target)
        decode = getattr(method, "decode_stored", None)
        applier = WeightSwapApplier(db.put(), dense_levels(db), decode=decode) if serve else None
        return Prepared(space, applier, db=db, context={"db": db, "method": method},
                        describe={"db.key": db.key, "db.path": str(db.path)})
    if cfg.family == "depth":
        from .compress.depth import DepthApplier, depth_space

        space = depth_space(adapter, cfg.target, cfg.database.granularity)
        return Prepared(space, DepthApplier(), describe={"depth.units": len(space.layers)})
    if cfg.family == "width":
        from .compress import width

        return width.prepare_width(cfg, model, adapter, calib)
    raise RayPressError(f"unknown family '{cfg.family}'")
