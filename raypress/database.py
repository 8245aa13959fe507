"""The level database: every (linear layer, level) variant of a model, built once, cached on disk.

Layout of one database (a folder ``<cache_root>/<key>/`` of the content-hashed store, store.py)::

    block_000.safetensors   {"<full linear name>": [n_levels, out, in] in the storage dtype}, one per block
    ...
    meta.json               key, model + fingerprint, method params, data hash, layers, n_params,
                            shapes, level_values, zero fractions, per-file sha256 + bytes, timings

Packed storage (methods with ``packed = True``, i.e. GPTQ / RTN, unless ``pack=False``): a layer's
levels are stored as ``"<layer>::codes"`` uint8 [n_levels, out, in], ``"<layer>::scales"`` and
``"<layer>::zeros"`` float16 [n_levels, out, G] (G = ceil(in / group_size), the group size is in
meta.json) — about half the bytes of float16 stacks — wherever that is smaller than the dense stack
(else that layer falls back to a dense stack; meta["layer_storage"] says which). Dequantizing a
packed level reproduces ``method.build`` exactly in float32 (see compress/quant.py).

``key`` = sha256 over (model fingerprint, calibration token shape + bytes, json(method.params()),
storage dtype, model dtype, layer subset, storage format when packed): any change to what the
variants depend on or how they are stored is a new folder. A build writes into ``<cache_root>/.tmp-<key>-<pid>-<rand>/`` and ``os.rename``s it to
``<key>/`` only after meta.json is written, so an interrupted build never leaves a
complete-looking database (its temp folder is removed on the way out, or — after a hard kill —
by the next build of the same key). A second build of the same key is a cache hit: the folder is
opened (file hashes verified) and nothing is recomputed.

Reading is zero-copy: each block file is memory-mapped read-only and ``stored`` returns read-only
numpy views into it (the dense stack, or the packed dict); ``variant`` / ``array`` are views for dense
layers and freshly dequantized float32 arrays for packed ones. ``put`` copies each layer's stored
object once into Ray's object store, where ``ray.get`` hands out read-only zero-copy numpy arrays
(also inside the packed dict); ``WeightSwapApplier(decode=method.decode_stored)`` dequantizes a
packed level on swap-in.

Building streams the dense model one block at a time (``calibrate.iter_block_stats``): a block's
Hessians (and/or input norms) are collected, its layers are compressed at every level
(``build_block``, a pure function a Ray task can run), then the statistics are dropped — memory
stays at one block's worth. ``parallel=True`` ships ``build_block`` to Ray tasks while the driver
keeps propagating activations (the output folder must be visible to the workers).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from .progress import steps

from . import store
from .data import calib_hash
from .compress.base import torch_threads
from .compress.quant import decode_packed
from .errors import RayPressError
from .weight_source import block_turn

log = logging.getLogger("raypress")

FORMAT = 1
META = store.META

_DTYPES = {  # storage dtype name -> (torch dtype, numpy dtype, safetensors code)
    "float16": (torch.float16, np.float16, "F16"),
    "float32": (torch.float32, np.float32, "F32"),
}
_ALIASES = {"fp16": "float16", "half": "float16", "f16": "float16", "fp32": "float32", "float": "float32",
            "f32": "float32"}


def storage_dtype_name(name) -> str:
    s = str(name).lower().replace("torch.", "")
    s = _ALIASES.get(s, s)
    if s not in _DTYPES:
        raise RayPressError(f"unsupported database storage dtype '{name}'; use float16 (default) or float32")
    return s


def default_cache_root() -> Path:
    """``raypress.models.cache_dir() / "db"`` ($RAYPRESS_CACHE or ~/.cache/raypress)."""
    from .models import cache_dir

    return cache_dir() / "db"


def database_key(fingerprint: str, calib: np.ndarray, method_params: dict, storage_dtype: str,
                 model_dtype: str = "", layers=None, storage_format: str = "dense") -> str:
    """The content hash naming a database folder. storage_format: "dense" (float stacks) or
    "packed" (codes + scales + zeros where smaller); "dense" adds nothing, so dense keys are the
    ones databases had before packed storage existed."""
    parts = [f"raypress-db-{FORMAT}", fingerprint, calib_hash(calib), method_params, storage_dtype_name(storage_dtype),
             str(model_dtype), list(layers) if layers is not None else None]
    if storage_format != "dense":
        parts.append(f"storage={storage_format}")
    return store.content_key(*parts)


_PACKED_PARTS = ("codes", "scales", "zeros")


def _part_key(layer: str, part: str) -> str:
    return f"{layer}::{part}"


def _n_groups(cols: int, group_size) -> int:
    gs = int(group_size) if group_size not in (None, -1) and int(group_size) > 0 else cols
    return -(-cols // gs)


def storage_itemsize(name) -> int:
    """Bytes per element of a storage dtype (float16 or float32)."""
    return np.dtype(_DTYPES[storage_dtype_name(name)][1]).itemsize


def layer_storage(n_levels: int, shape, itemsize: int, pack: bool, group_size) -> tuple[str, int]:
    """("packed" | "dense", bytes) of one layer's stored levels: packed (codes + scales + zeros) when
    `pack` and that is smaller than the dense stack. The build and `raypress plan` both ask this."""
    dense = n_levels * int(np.prod(shape)) * itemsize
    if pack:
        packed = packed_nbytes(n_levels, shape, group_size)
        if packed < dense:
            return "packed", packed
    return "dense", dense


def packed_nbytes(n_levels: int, shape, group_size) -> int:
    """Bytes of one layer's packed levels: uint8 codes + float16 scales and zeros per group."""
    out, cols = (int(x) for x in shape)
    return n_levels * (out * cols + 2 * 2 * out * _n_groups(cols, group_size))


# ----------------------------------------------------------------------------- building
def build_block(block_idx: int, weights: dict, stats: dict, method, storage_dtype: str, out_dir,
                device="cpu", on_layer=None, threads: int | None = 1, return_data: bool = False,
                pack: bool | None = None) -> dict:
    """Compress one block's linears at every level and write ``block_<idx>.safetensors`` into out_dir.

    weights: {layer: weight [out, in]}; stats: {layer: {"hessian": H, "norms": n}} (what the
    method needs). Pure function of its arguments (a Ray task can call it). `threads`: torch CPU
    threads while compressing (its ops are small or memory-bound: one thread is fastest on a
    small/busy machine; None leaves torch's setting). Returns the file's entry for meta.json:
    file, sha256, bytes, layers, shapes, zero_fraction, seconds. return_data=True writes nothing and
    puts the file's bytes under "data" instead (Ray tasks on other nodes: the driver writes).
    pack: store ``method.pack_levels`` output (codes/scales/zeros) for each layer where it is smaller
    than the dense stack (None: when ``method.packed``); the entry then also has "storage"
    {layer: "packed"|"dense"}, "group_size" and "unpacked_bytes" (the dense stacks' size)."""
    import io

    t0 = time.perf_counter()
    sdt = storage_dtype_name(storage_dtype)
    tdtype, npdtype = _DTYPES[sdt][0], np.dtype(_DTYPES[sdt][1])
    values = method.level_values()
    L = len(values)
    pack = method.packed if pack is None else bool(pack)
    if pack and not method.packed:
        raise RayPressError(f"{method.name} has no packed storage (pack_levels); build with pack=False")
    gs = method.group_size or -1
    # what goes where is known from the shapes alone: the file's header is written first and every
    # layer's levels are streamed into it as soon as they are built (peak memory: one layer's stack)
    storage, specs = {}, []
    for name, W in weights.items():
        out, cols = W.shape
        storage[name] = layer_storage(L, W.shape, npdtype.itemsize, pack, gs)[0]
        if storage[name] == "packed":
            G = _n_groups(cols, gs)
            specs += [(_part_key(name, "codes"), np.uint8, (L, out, cols)),
                      (_part_key(name, "scales"), np.float16, (L, out, G)),
                      (_part_key(name, "zeros"), np.float16, (L, out, G))]
        else:
            specs.append((name, npdtype, (L, out, cols)))
    group_size = gs if "packed" in storage.values() else None
    st_meta = {"format": f"raypress-db-{FORMAT}", "block": str(block_idx)}
    if group_size is not None:
        st_meta["group_size"] = str(group_size)
    fname = f"block_{block_idx:03d}.safetensors"
    fh = io.BytesIO() if return_data else open(Path(out_dir) / fname, "wb")
    zero, shapes, unpacked = {}, {}, 0
    dev = torch.device(device)
    try:
        writer = store.TensorWriter(fh, specs, st_meta)
        with torch.no_grad(), torch_threads(threads if dev.type == "cpu" else None):
            for name, W in weights.items():
                st = stats.get(name, {}) or {}
                H = st.get("hessian")
                W = W.detach().to(dev)
                H = H.to(dev) if H is not None else None
                unpacked += L * W.numel() * npdtype.itemsize
                shapes[name] = list(W.shape)
                if storage[name] == "packed":
                    p = method.pack_levels(W, H, values)
                    for k in range(L):
                        if not (np.isfinite(p["scales"][k]).all() and np.isfinite(p["zeros"][k]).all()):
                            raise RayPressError(f"{method.name}: non-finite scales in layer {name} at level "
                                                f"{values[k]}; raise percdamp or use more calibration tokens")
                    zero[name] = [np.count_nonzero(decode_packed(p, k) == 0) / W.numel() for k in range(L)]
                    for part in _PACKED_PARTS:
                        writer.write(_part_key(name, part), p[part])
                    del p
                else:
                    kw = {"norms": st["norms"].to(dev) if st.get("norms") is not None else None} \
                        if method.needs_norms else {}
                    variants = method.build_levels(W, H, values, **kw)
                    stored = torch.empty((L, *W.shape), dtype=tdtype, device=dev)
                    for k, v in enumerate(variants):
                        stored[k].copy_(v.detach().reshape(W.shape))
                    del variants
                    finite = [bool(torch.isfinite(stored[k]).all()) for k in range(L)]
                    if not all(finite):
                        bad = finite.index(False)
                        raise RayPressError(f"{method.name}: non-finite weights in layer {name} at level "
                                            f"{values[bad]} (storage {sdt}); raise percdamp, use more calibration "
                                            "tokens or storage_dtype=float32")
                    arr = stored.cpu().numpy()
                    # per level: (stored == 0).sum(1) over the whole stack would make an int64 copy of it
                    zero[name] = [np.count_nonzero(arr[k] == 0) / arr[k].size for k in range(L)]
                    writer.write(name, arr)
                    del arr
                    del stored
                if on_layer is not None:
                    on_layer(name)
        entry = writer.close()
        data = fh.getvalue() if return_data else None
    finally:
        fh.close()
    info = {"index": int(block_idx), "file": fname, **entry, "layers": list(weights), "shapes": shapes,
            "zero_fraction": zero, "storage": storage, "group_size": group_size, "unpacked_bytes": int(unpacked),
            "seconds": time.perf_counter() - t0}
    if return_data:
        info["data"] = data
    return info


def build_database(spec: str, model, adapter, method, calib: np.ndarray, *, cache_root=None,
                   storage_dtype="float16", device="cpu", batch_size: int = 8, layers=None,
                   progress: bool = True, verify=True, parallel=False, fingerprint: str | None = None,
                   threads: int | None = None, task_device: str | None = None,
                   pack: bool | None = None) -> LevelDatabase:
    """Build (or find cached) the level database of `model` under `method` on `calib` tokens.

    cache_root: default ``models.cache_dir()/"db"``. layers: subset of linear names (default all).
    verify: on a cache hit, check file hashes (True), sizes only ("size") or nothing (False).
    parallel: False (sequential), True or an int (max in-flight Ray tasks running build_block): the
    driver streams the dense model block by block (calibration on `device`) while Ray tasks compress
    finished blocks, each on a GPU of its own when task_device is "cuda" (default: cpu); tasks return
    the block file's bytes and the driver writes them (no shared file system needed).
    fingerprint: override ``models.model_fingerprint(spec)`` (tests / in-memory models).
    threads: torch CPU threads for the calibration forward passes (None: torch's setting; 1 is
    fastest on a busy 2-core machine). Compression always runs single-threaded (see build_block).
    pack: packed storage (uint8 codes + float16 scales/zeros per layer, where smaller than the dense
    stack); None (default) = when the method says ``packed = True`` (GPTQ, RTN). Part of the key."""
    from .calibrate import block_layers, iter_block_stats, release_gpu_cache

    sdt = storage_dtype_name(storage_dtype)
    root = Path(cache_root).expanduser() if cache_root else default_cache_root()
    if fingerprint is None:
        from .models import model_fingerprint

        fingerprint = model_fingerprint(spec)
    params = method.params()
    mdtype = str(next(model.parameters()).dtype)
    layer_list = list(layers) if layers is not None else None
    pack = method.packed if pack is None else bool(pack)
    if pack and not method.packed:
        raise RayPressError(f"{method.name} has no packed storage (pack_levels); build with pack=False")
    key = database_key(fingerprint, calib, params, sdt, mdtype, layer_list,
                       storage_format="packed" if pack else "dense")
    final = root / key
    if (final / META).is_file() or final.exists():
        t = time.perf_counter()
        try:
            if not (final / META).is_file():
                raise store.corrupt(final, "meta.json missing")
            db = open_database(final, verify=verify)
            log.info("database cache hit %s (%.2f s)", final, time.perf_counter() - t)
            return db
        except store.CorruptStore as e:  # a damaged cache is rebuilt, not a dead end
            log.warning("%s: rebuilding it", str(e).split("; delete")[0])
            aside = root / f"{store.TMP_PREFIX}corrupt-{key[:16]}-{os.getpid()}"
            os.replace(final, aside)
            shutil.rmtree(aside, ignore_errors=True)

    plan = block_layers(adapter, layer_list)
    if not plan:
        raise RayPressError("no linear layers to compress; check the `layers` selection")
    all_layers = [n for _, mods in plan for n in mods]
    want = tuple(w for w, flag in (("hessian", method.needs_hessian), ("norms", method.needs_norms)) if flag)

    tmp = store.new_tmp(root, key)
    t_start = time.perf_counter()
    t_calib = 0.0
    threads_ctx = torch_threads(threads)
    threads_ctx.__enter__()
    bar = steps(len(all_layers), f"{method.name} database", "layer", enabled=progress)
    infos: list[dict] = []
    try:
        if want:
            stats_iter = iter_block_stats(model, adapter, calib, want, batch_size, device, layer_list,
                                          progress=False)
        else:
            stats_iter = _blocks_without_stats(model, plan)
        mods_of = dict(plan)

        def per_layer_stats(st: dict, names) -> dict:
            return {n: {w: st[w][n] for w in st} for n in names}

        def next_stats():
            nonlocal t_calib
            t = time.perf_counter()
            if want:
                bar.set_postfix_str("calibrating", refresh=True)
            try:
                return next(stats_iter)
            except StopIteration:
                return None
            finally:
                t_calib += time.perf_counter() - t

        if not parallel:
            while (item := next_stats()) is not None:
                i, st = item
                bar.set_postfix_str(f"block {i}", refresh=False)
                weights = {n: m.weight for n, m in mods_of[i].items()}
                infos.append(build_block(i, weights, per_layer_stats(st, weights), method, sdt, tmp,
                                         device=device, on_layer=lambda _n: bar.update(1), pack=pack))
        else:
            infos = _build_parallel(next_stats, mods_of, per_layer_stats, method, sdt, tmp, bar,
                                    max_inflight=parallel if type(parallel) is int and parallel > 1 else 2,
                                    task_device=task_device or "cpu", pack=pack)
        bar.close()
        infos.sort(key=lambda d: d["index"])
        total = time.perf_counter() - t_start
        meta = _make_meta(key, spec, fingerprint, method, params, sdt, mdtype, calib, infos, all_layers,
                          t_calib, total)
        if not store.finalize(tmp, final, meta):  # another process finished the same build first
            return open_database(final, verify=verify)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        threads_ctx.__exit__(None, None, None)
        release_gpu_cache(device)
    log.info("built database %s in %.1f s (calibration %.1f s): %d layers x %d levels, %.1f MiB at %s",
             key[:12], total, t_calib, len(all_layers), len(meta["level_values_list"]),
             meta["total_bytes"] / 2**20, final)
    return LevelDatabase(final, meta)


def _blocks_without_stats(model, plan):
    """(block index, {}) per block for methods that need no calibration; a streamed model's block
    is materialized while the caller compresses it."""
    for i, _ in plan:
        with block_turn(model, i):
            yield i, {}


def _build_parallel(next_stats, mods_of, per_layer_stats, method, sdt, tmp, bar, max_inflight=2,
                    task_device="cpu", pack=False):
    import ray

    gpu = str(task_device).startswith("cuda")
    remote = ray.remote(build_block).options(num_cpus=1, num_gpus=1 if gpu else 0)
    pending, infos = [], []

    def collect(refs):
        for ref in refs:
            try:
                info = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, RayPressError):
                    raise RayPressError(str(cause)) from None
                raise
            data = info.pop("data")
            with open(Path(tmp) / info["file"], "wb") as fh:
                fh.write(data)
            infos.append(info)
            bar.update(len(info["layers"]))

    try:
        while (item := next_stats()) is not None:
            i, st = item
            weights = {n: m.weight.detach().cpu() for n, m in mods_of[i].items()}
            pending.append(remote.remote(i, weights, per_layer_stats(st, weights), method, sdt, None,
                                         "cuda" if gpu else "cpu", None, 1, True, pack=pack))
            while len(pending) >= max_inflight:
                done, pending = ray.wait(pending, num_returns=1)
                collect(done)
        collect(pending)
        pending = []
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return infos


def _make_meta(key, spec, fingerprint, method, params, sdt, mdtype, calib, infos, all_layers, t_calib, total):
    import raypress

    values = [float(v) for v in method.level_values()]
    shapes = {n: s for info in infos for n, s in info["shapes"].items()}
    layer_storage = {n: f for info in infos for n, f in info.get("storage", {}).items()}
    packed = any(f == "packed" for f in layer_storage.values())
    gs = next((i["group_size"] for i in infos if i.get("group_size") is not None), None)
    return {
        "format": FORMAT,
        "key": key,
        "model": str(spec),
        "model_fingerprint": fingerprint,
        "model_dtype": mdtype,
        "method": params,
        "method_name": method.name,
        "value_kind": method.value_kind,
        "storage_dtype": sdt,
        "storage": "packed" if packed else "dense",
        "layer_storage": {n: layer_storage.get(n, "dense") for n in all_layers},
        "group_size": gs,
        "data_hash": calib_hash(calib),
        "calib_shape": list(np.shape(calib)),
        "layers": list(all_layers),
        "n_params": {n: int(np.prod(shapes[n])) for n in all_layers},
        "shapes": shapes,
        "level_values": {n: values for n in all_layers},
        "level_values_list": values,
        "zero_fraction": {n: z for info in infos for n, z in info["zero_fraction"].items()},
        "blocks": [{"index": i["index"], "file": i["file"], "layers": i["layers"]} for i in infos],
        "files": {i["file"]: {"sha256": i["sha256"], "bytes": i["bytes"]} for i in infos},
        "total_bytes": int(sum(i["bytes"] for i in infos)),
        "unpacked_bytes": int(sum(i.get("unpacked_bytes", i["bytes"]) for i in infos)),
        "calib_seconds": round(t_calib, 3),
        "compress_seconds": round(sum(i["seconds"] for i in infos), 3),
        "build_seconds": round(total, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "raypress_version": getattr(raypress, "__version__", "?"),
    }


# ----------------------------------------------------------------------------- reading
class LevelDatabase:
    """All variants of all layers: ``variant(layer, level)`` -> read-only [out, in] numpy array.

    Dense layers: views in the storage dtype. Packed layers (``layer_storage[layer] == "packed"``):
    ``variant`` / ``array`` dequantize to float32 (exactly the method's build output); ``stored``
    gives what is on disk either way (dense stack or packed dict) and ``put`` serves that.
    """

    def __init__(self, path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.key: str = meta["key"]
        self.layers: list[str] = list(meta["layers"])
        self.n_params: dict[str, int] = {n: int(v) for n, v in meta["n_params"].items()}
        self.level_values: dict[str, list[float]] = {n: [float(x) for x in v] for n, v in meta["level_values"].items()}
        self.shapes: dict[str, tuple[int, int]] = {n: tuple(s) for n, s in meta["shapes"].items()}
        self.storage_dtype: str = meta["storage_dtype"]
        self.storage: str = meta.get("storage", "dense")  # "packed" when any layer is packed
        self.layer_storage: dict[str, str] = {n: meta.get("layer_storage", {}).get(n, "dense")
                                              for n in self.layers}
        self.group_size = meta.get("group_size")
        self._file_of = {n: b["file"] for b in meta["blocks"] for n in b["layers"]}
        self._arrays: dict = {}  # layer -> dense stack ndarray or packed dict (memory-mapped views)

    def __repr__(self):
        return (f"LevelDatabase({self.meta.get('method_name')}, {len(self.layers)} layers x "
                f"{len(self.meta.get('level_values_list', []))} levels, {self.total_bytes / 2**20:.1f} MiB, {self.path})")

    def __getstate__(self):  # picklable without the memory maps
        s = self.__dict__.copy()
        s["_arrays"] = {}
        return s

    @property
    def total_bytes(self) -> int:
        return int(self.meta.get("total_bytes", 0))

    def n_levels(self, layer: str) -> int:
        return len(self._levels(layer))

    def _levels(self, layer: str) -> list[float]:
        try:
            return self.level_values[layer]
        except KeyError:
            raise RayPressError(f"layer '{layer}' is not in the level database (it has {len(self.layers)} "
                                f"layers such as {self.layers[0]}); rebuild it for this model") from None

    def is_packed(self, layer: str) -> bool:
        return self.layer_storage.get(layer) == "packed"

    def _load(self, layer: str):
        obj = self._arrays.get(layer)
        if obj is None:
            self._levels(layer)
            fname = self._file_of[layer]
            try:
                maps = store.map_safetensors(self.path / fname)
            except (OSError, ValueError, KeyError) as e:
                raise store.corrupt(self.path, f"{fname}: {e}") from None
            for n in [n for n, f in self._file_of.items() if f == fname]:
                if self.is_packed(n):
                    keys = [_part_key(n, part) for part in _PACKED_PARTS]
                    if any(k not in maps for k in keys):
                        raise store.corrupt(self.path, f"{fname} lacks packed layer {n}")
                    self._arrays[n] = {part: maps[k] for part, k in zip(_PACKED_PARTS, keys)}
                    self._arrays[n]["group_size"] = int(self.group_size if self.group_size is not None else -1)
                else:
                    if n not in maps:
                        raise store.corrupt(self.path, f"{fname} lacks layer {n}")
                    self._arrays[n] = maps[n]
            obj = self._arrays[layer]
        return obj

    def stored(self, layer: str):
        """What is stored for `layer`, as read-only memory-mapped numpy arrays: the dense stack
        [n_levels, out, in] (storage dtype), or for packed layers a dict {"codes": uint8 [L, out, in],
        "scales": float16 [L, out, G], "zeros": float16 [L, out, G], "group_size": int (-1: per row)}
        — the format ``method.decode_stored(stored, level)`` decodes."""
        obj = self._load(layer)
        return dict(obj) if isinstance(obj, dict) else obj

    def array(self, layer: str) -> np.ndarray:
        """Stacked variants [n_levels, out, in] of one layer (read-only). Dense layers: the
        memory-mapped stack itself; packed layers: all levels dequantized into a new float32 array
        (n_levels x the float32 size of the weight — prefer ``variant`` or ``stored``)."""
        obj = self._load(layer)
        if not isinstance(obj, dict):
            return obj
        arr = np.stack([decode_packed(obj, k) for k in range(self.n_levels(layer))])
        arr.flags.writeable = False
        return arr

    def variant(self, layer: str, level: int) -> np.ndarray:
        """Weight of `layer` at `level` [out, in], read-only: a view in the storage dtype for dense
        layers; for packed layers a dequantized float32 array (exactly ``method.build``'s output)."""
        n = self.n_levels(layer)
        if not isinstance(level, (int, np.integer)) or not 0 <= int(level) < n:
            raise RayPressError(f"level {level} out of range for {layer} (0..{n - 1})")
        obj = self._load(layer)
        if not isinstance(obj, dict):
            return obj[int(level)]
        arr = decode_packed(obj, int(level))
        arr.flags.writeable = False
        return arr

    def put(self) -> dict:
        """{layer: ObjectRef} of each layer's stored object in Ray's object store — the dense
        stack [n_levels, out, in], or the packed dict (one object per layer; ``ray.get`` returns its
        arrays read-only and zero-copy too). Serve with
        ``WeightSwapApplier(refs, decode=method.decode_stored)``, which dequantizes on swap-in."""
        import ray

        refs = {}
        for n in self.layers:
            obj = self._load(n)
            if isinstance(obj, dict):
                obj = {k: (np.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in obj.items()}
            else:
                obj = np.asarray(obj)
            refs[n] = ray.put(obj)
        return refs

    def actual_sparsity(self, layer: str, level: int) -> float:
        """Fraction of exact zeros in the stored variant."""
        n = self.n_levels(layer)
        if not 0 <= int(level) < n:
            raise RayPressError(f"level {level} out of range for {layer} (0..{n - 1})")
        zf = self.meta.get("zero_fraction", {}).get(layer)
        if zf is not None:
            return float(zf[int(level)])
        return float((self.variant(layer, level) == 0).mean())

    def stats(self) -> dict:
        """Summary for reports: per level the params-weighted mean value and actual zero fraction."""
        values = self.meta.get("level_values_list") or self.level_values[self.layers[0]]
        total = sum(self.n_params[n] for n in self.layers)
        per_level = []
        for k, v in enumerate(values):
            zf = sum(self.actual_sparsity(n, k) * self.n_params[n] for n in self.layers
                     if k < self.n_levels(n)) / max(total, 1)
            per_level.append({"level": k, "value": v, "zero_fraction": zf})
        return {"key": self.key, "path": str(self.path), "method": self.meta.get("method"),
                "value_kind": self.meta.get("value_kind"), "storage_dtype": self.storage_dtype,
                "storage": self.storage, "group_size": self.group_size,
                "unpacked_bytes": int(self.meta.get("unpacked_bytes", self.total_bytes)),
                "layers": len(self.layers), "params": total, "n_levels": len(values),
                "total_bytes": self.total_bytes, "build_seconds": self.meta.get("build_seconds"),
                "calib_seconds": self.meta.get("calib_seconds"), "levels": per_level}


def open_database(path, verify=True) -> LevelDatabase:
    """Open a database folder. verify: True checks every file's sha256 (and size), "size" only
    sizes, False nothing. Corrupt or incomplete -> RayPressError naming the fix."""
    path = Path(path).expanduser()
    meta = store.read_meta(path, ("files", "key", "layers", "n_params", "level_values", "shapes", "blocks",
                                  "storage_dtype"))
    if meta.get("format") != FORMAT:
        raise RayPressError(f"level database {path} has format {meta.get('format')}, this RayPress reads "
                            f"{FORMAT}; delete the folder and rebuild it with `raypress build-db`")
    store.verify_files(path, meta["files"], verify)
    return LevelDatabase(path, meta)
