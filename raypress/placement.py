"""Where evaluators read a level database from: Ray's object store, or the database's own
memory-mapped files on disk (shared by every evaluator of a node through the page cache).

`database.placement`: "object_store" puts each layer's stored levels in the object store once
(zero-copy read-only arrays in every evaluator); "disk" hands evaluators `OnDisk` references and
they map the block files themselves (the folder must be visible at the same path on every node,
e.g. a shared filesystem); "auto" picks the object store when the database takes at most half of
its capacity, else disk. The choice is logged and recorded in MLflow (`db.placement`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import RayPressError

log = logging.getLogger("raypress")

PLACEMENTS = ("auto", "object_store", "disk")
_OPEN: dict = {}  # per process: database path -> LevelDatabase (its files mapped lazily)


@dataclass(frozen=True)
class OnDisk:
    """A layer served from the database's memory-mapped files (what an evaluator holds instead of an ObjectRef)."""

    path: str
    layer: str
    on_disk = True

    def get(self):
        db = _OPEN.get(self.path)
        if db is None:
            from .database import open_database

            db = _OPEN[self.path] = open_database(self.path, verify="size")  # the driver checked the hashes
        return db.stored(self.layer)


def decide(setting: str, db_bytes: int, store_capacity: float) -> str:
    """The placement of a database of `db_bytes` for `setting`: auto takes the object store when
    the database fits in half of its capacity, else disk."""
    if setting not in PLACEMENTS:
        raise RayPressError(f"database.placement must be one of {', '.join(PLACEMENTS)}, got {setting!r}")
    if setting != "auto":
        return setting
    return "object_store" if db_bytes <= store_capacity / 2 else "disk"


def choose(db, setting: str) -> str:
    """`decide` with the running Ray cluster's object store capacity."""
    import ray

    capacity = ray.cluster_resources().get("object_store_memory", 0) if ray.is_initialized() else 0
    return decide(setting, db.total_bytes, capacity)


def serve(db, setting: str = "auto") -> tuple[dict, str]:
    """({layer: ObjectRef or OnDisk}, the placement chosen) for WeightSwapApplier."""
    where = choose(db, setting)
    log.info("level database %s (%.1f GiB): served from %s", db.key[:12], db.total_bytes / 2**30,
             "Ray's object store" if where == "object_store" else f"memory-mapped files in {db.path}")
    if where == "object_store":
        return db.put(), where
    return {layer: OnDisk(str(db.path), layer) for layer in db.layers}, where
