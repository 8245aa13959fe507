"""Where a level database lives while a search runs: how it reaches each node, and where each
evaluator holds its variants.

`database.placement` (auto | gpu | host | object_store | disk) answers two questions, in two places:

* **transport** (the driver, `decide`/`serve`): how a node gets its one copy. "object_store" puts each
  layer's stored levels in Ray's object store once; a node pulls an object the first time one of its
  evaluators asks for it and every evaluator of the node then maps that same shared-memory copy
  (zero-copy, read-only). "disk" hands evaluators `OnDisk` references and they map the database's own
  block files, shared by every evaluator of a node through the page cache (the folder must be at the
  same path on every node: a shared filesystem). gpu, host and auto travel through the object store
  when the database takes at most half of its capacity, else from disk.
* **hold** (each evaluator, `decide_hold`, from what its node has): "gpu" keeps every variant on the
  evaluator's GPU in the model's dtype, so a swap is a pointer change; "host" keeps them in pinned host
  memory, so a swap is one DMA copy; "shared" reads them where the transport left them (a copy per
  swap from the object store / page cache, with the applier's LRU device cache). auto picks gpu when
  the variants fit beside the model with a working reserve, else host when the node's evaluators can
  each pin a copy in half of the free host memory, else shared. An explicit gpu/host that does not fit
  is an error naming the alternatives, never a silent fallback.
Both choices are logged; the transport is recorded in MLflow (`db.placement`), the hold in every
evaluator's stats.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .errors import RayPressError

log = logging.getLogger("raypress")

PLACEMENTS = ("auto", "gpu", "host", "object_store", "disk")
HOLDS = ("gpu", "host", "shared")
GPU_RESERVE = 0.15  # share of the GPU's total memory left for activations, logits and the teacher cache
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


def check(setting: str) -> str:
    if setting not in PLACEMENTS:
        raise RayPressError(f"database.placement must be one of {', '.join(PLACEMENTS)}, got {setting!r}")
    return setting


def decide(setting: str, db_bytes: int, store_capacity: float) -> str:
    """The transport of a database of `db_bytes` for `setting`: "object_store" or "disk" (explicit
    settings are kept; the others take the object store when the database fits in half of it)."""
    if check(setting) in ("object_store", "disk"):
        return setting
    return "object_store" if db_bytes <= store_capacity / 2 else "disk"


def decide_hold(setting: str, variant_bytes: int, *, gpu_free: int | None, gpu_total: int | None,
                host_free: int, evaluators_on_node: int = 1, streamed: bool = False) -> tuple[str, str]:
    """(hold, why) for one evaluator: where it keeps the variants (`variant_bytes` in the model's dtype).

    gpu_free/gpu_total: the evaluator's GPU after the model is loaded (None: no GPU); host_free: the
    node's available memory, shared by `evaluators_on_node` evaluators; streamed evaluators keep their
    blocks on the host, so their variants never go to the GPU."""
    check(setting)
    gib = lambda b: f"{b / 2**30:.1f} GiB"  # noqa: E731
    gpu_room = None if gpu_free is None else gpu_free - GPU_RESERVE * (gpu_total or 0)
    host_room = host_free / 2 / max(evaluators_on_node, 1)
    if setting == "gpu":
        if gpu_room is None or streamed:
            raise RayPressError("database.placement=gpu keeps the variants on the evaluator's GPU, but "
                                + ("this evaluator has no GPU" if gpu_room is None else "evaluator.mode=streamed "
                                   "keeps the model on the host") + "; use database.placement=host or auto")
        if variant_bytes > gpu_room:
            raise RayPressError(f"database.placement=gpu needs {gib(variant_bytes)} beside the model but the GPU has "
                                f"{gib(max(gpu_room, 0))} to spare; use database.placement=host, disk or auto")
        return "gpu", f"{gib(variant_bytes)} of variants fit the GPU's {gib(gpu_room)} to spare"
    if setting == "host":
        if variant_bytes > host_room:
            raise RayPressError(f"database.placement=host pins {gib(variant_bytes)} per evaluator but the node has "
                                f"{gib(host_room)} per evaluator to spare (half its free memory over "
                                f"{evaluators_on_node} evaluators); use database.placement=disk or auto")
        return "host", f"{gib(variant_bytes)} pinned per evaluator ({gib(host_room)} to spare)"
    if setting == "auto":
        if gpu_room is not None and not streamed and variant_bytes <= gpu_room:
            return "gpu", f"auto: {gib(variant_bytes)} of variants fit the GPU's {gib(gpu_room)} to spare"
        if gpu_room is not None and variant_bytes <= host_room:  # pinning only pays with a GPU to copy to
            return "host", f"auto: {gib(variant_bytes)} pinned per evaluator ({gib(host_room)} to spare)"
        return "shared", "auto: read from the node's shared copy (object store or page cache)"
    return "shared", f"database.placement={setting}: read from the node's shared copy"


def choose(db, setting: str) -> str:
    """`decide` with the running Ray cluster's object store capacity."""
    import ray

    capacity = ray.cluster_resources().get("object_store_memory", 0) if ray.is_initialized() else 0
    return decide(setting, db.total_bytes, capacity)


def serve(db, setting: str = "auto") -> tuple[dict, str]:
    """({layer: ObjectRef or OnDisk}, the transport chosen) for WeightSwapApplier."""
    where = choose(db, setting)
    log.info("level database %s (%.1f GiB): reaches each node %s; evaluators hold it: %s", db.key[:12],
             db.total_bytes / 2**30, "through Ray's object store" if where == "object_store"
             else f"as memory-mapped files in {db.path}", setting if setting in ("gpu", "host") else "by size")
    if where == "object_store":
        return db.put(), where
    return {layer: OnDisk(str(db.path), layer) for layer in db.layers}, where
