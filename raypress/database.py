"""The level database: every (linear layer, level) variant of a model, built once, cached on disk.

Layout of one database (a folder ``<cache_root>/<key>/``)::

    block_000.safetensors   {"<full linear name>": [n_levels, out, in] in the storage dtype}, one per block
    ...
    meta.json               key, model + fingerprint, method params, data hash, layers, n_params,
                            shapes, level_values, zero fractions, per-file sha256 + bytes, timings

``key`` = sha256 over (model fingerprint, calibration token shape + bytes, json(method.params()),
storage dtype, model dtype, layer subset): any change to what the variants depend on is a new
folder. A build writes into ``<cache_root>/.tmp-<key>-<pid>-<rand>/`` and ``os.rename``s it to
``<key>/`` only after meta.json is written, so an interrupted build never leaves a
complete-looking database (its temp folder is removed on the way out, or — after a hard kill —
by the next build of the same key). A second build of the same key is a cache hit: the folder is
opened (file hashes verified) and nothing is recomputed.

Reading is zero-copy: each block file is memory-mapped read-only and ``variant`` / ``array``
return read-only numpy views into it; ``put`` copies each layer's stacked array once into Ray's
object store, where ``ray.get`` hands out read-only zero-copy numpy arrays.

Building streams the dense model one block at a time (``calibrate.iter_block_stats``): a block's
Hessians (and/or input norms) are collected, its layers are compressed at every level
(``build_block``, a pure function a Ray task can run), then the statistics are dropped — memory
stays at one block's worth. ``parallel=True`` ships ``build_block`` to Ray tasks while the driver
keeps propagating activations (the output folder must be visible to the workers).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .compress.sparsity import _torch_threads
from .errors import RayPressError

log = logging.getLogger("raypress")

FORMAT = 1
META = "meta.json"
_TMP_PREFIX = ".tmp-"

_DTYPES = {  # storage dtype name -> (torch dtype, numpy dtype, safetensors code)
    "float16": (torch.float16, np.float16, "F16"),
    "float32": (torch.float32, np.float32, "F32"),
}
_ALIASES = {"fp16": "float16", "half": "float16", "f16": "float16", "fp32": "float32", "float": "float32",
            "f32": "float32"}
_ST_TO_NP = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "U8": np.uint8, "I8": np.int8,
             "I32": np.int32, "I64": np.int64}


def storage_dtype_name(name) -> str:
    s = str(name).lower().replace("torch.", "")
    s = _ALIASES.get(s, s)
    if s not in _DTYPES:
        raise RayPressError(f"unsupported database storage dtype '{name}'; use float16 (default) or float32")
    return s


def default_cache_root() -> Path:
    """``raypress.models.cache_dir() / "db"`` ($RAYPRESS_CACHE or ~/.cache/raypress)."""
    try:
        from .models import cache_dir
    except ImportError:  # pragma: no cover
        root = os.environ.get("RAYPRESS_CACHE")
        return (Path(root).expanduser() if root else Path.home() / ".cache" / "raypress") / "db"
    return cache_dir() / "db"


def calib_hash(calib: np.ndarray) -> str:
    """sha256 of the calibration tokens (int64, C order) including their shape."""
    a = np.ascontiguousarray(calib, dtype=np.int64)
    h = hashlib.sha256(f"{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def database_key(fingerprint: str, calib: np.ndarray, method_params: dict, storage_dtype: str,
                 model_dtype: str = "", layers=None) -> str:
    """The content hash naming a database folder."""
    h = hashlib.sha256()
    for part in (f"raypress-db-{FORMAT}", fingerprint, calib_hash(calib),
                 json.dumps(method_params, sort_keys=True, default=str), storage_dtype_name(storage_dtype),
                 str(model_dtype), json.dumps(list(layers) if layers is not None else None)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _sha256_file(path: Path, chunk: int = 16 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _corrupt(path: Path, what: str) -> RayPressError:
    return RayPressError(f"level database {path} is corrupt or incomplete ({what}); delete the folder "
                         f"{path} and rebuild it with `raypress build-db`")


# ----------------------------------------------------------------------------- building
def build_block(block_idx: int, weights: dict, stats: dict, method, storage_dtype: str, out_dir,
                device="cpu", on_layer=None, threads: int | None = 1) -> dict:
    """Compress one block's linears at every level and write ``block_<idx>.safetensors`` into out_dir.

    weights: {layer: weight [out, in]}; stats: {layer: {"hessian": H, "norms": n}} (what the
    method needs). Pure function of its arguments (a Ray task can call it). `threads`: torch CPU
    threads while compressing (its ops are small or memory-bound: one thread is fastest on a
    small/busy machine; None leaves torch's setting). Returns the file's entry for meta.json:
    file, sha256, bytes, layers, shapes, zero_fraction, seconds."""
    from safetensors.numpy import save as st_save

    t0 = time.perf_counter()
    sdt = storage_dtype_name(storage_dtype)
    tdtype = _DTYPES[sdt][0]
    values = method.level_values()
    needs_norms = bool(getattr(method, "needs_norms", False))
    multi = getattr(method, "build_levels", None)
    dev = torch.device(device)
    arrays, zero, shapes = {}, {}, {}
    with torch.no_grad(), _torch_threads(threads if dev.type == "cpu" else None):
        for name, W in weights.items():
            st = stats.get(name, {}) or {}
            H = st.get("hessian")
            W = W.detach().to(dev)
            H = H.to(dev) if H is not None else None
            kw = {"norms": st["norms"].to(dev) if st.get("norms") is not None else None} if needs_norms else {}
            if multi is not None:
                variants = multi(W, H, values, **kw)
            else:
                variants = [method.build(W, H, v, **kw) for v in values]
            stored = torch.empty((len(values), *W.shape), dtype=tdtype, device=dev)
            for k, v in enumerate(variants):
                stored[k].copy_(v.detach().reshape(W.shape))
            del variants
            finite = torch.isfinite(stored).flatten(1).all(1)
            if not bool(finite.all()):
                bad = int((~finite).nonzero()[0, 0])
                raise RayPressError(f"{method.name}: non-finite weights in layer {name} at level {values[bad]} "
                                    f"(storage {sdt}); raise percdamp, use more calibration tokens or "
                                    "storage_dtype=float32")
            n = stored[0].numel()
            zero[name] = [int(c) / n for c in (stored == 0).flatten(1).sum(1).cpu()]
            arrays[name] = stored.cpu().numpy()
            shapes[name] = list(W.shape)
            del stored
            if on_layer is not None:
                on_layer(name)
    data = st_save(arrays, metadata={"format": f"raypress-db-{FORMAT}", "block": str(block_idx)})
    fname = f"block_{block_idx:03d}.safetensors"
    with open(Path(out_dir) / fname, "wb") as fh:
        fh.write(data)
    return {"index": int(block_idx), "file": fname, "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), "layers": list(weights), "shapes": shapes, "zero_fraction": zero,
            "seconds": time.perf_counter() - t0}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def _clean_stale_tmp(root: Path, key: str) -> None:
    for d in root.glob(f"{_TMP_PREFIX}{key[:16]}-*"):
        try:
            pid = int(d.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def build_database(spec: str, model, adapter, method, calib: np.ndarray, *, cache_root=None,
                   storage_dtype="float16", device="cpu", batch_size: int = 8, layers=None,
                   progress: bool = True, verify=True, parallel=False, fingerprint: str | None = None,
                   threads: int | None = None) -> LevelDatabase:
    """Build (or find cached) the level database of `model` under `method` on `calib` tokens.

    cache_root: default ``models.cache_dir()/"db"``. layers: subset of linear names (default all).
    verify: on a cache hit, check file hashes (True), sizes only ("size") or nothing (False).
    parallel: False (sequential), True or an int (max in-flight Ray tasks running build_block).
    fingerprint: override ``models.model_fingerprint(spec)`` (tests / in-memory models).
    threads: torch CPU threads for the calibration forward passes (None: torch's setting; 1 is
    fastest on a busy 2-core machine). Compression always runs single-threaded (see build_block)."""
    from .calibrate import block_layers, iter_block_stats

    sdt = storage_dtype_name(storage_dtype)
    root = Path(cache_root).expanduser() if cache_root else default_cache_root()
    if fingerprint is None:
        from .models import model_fingerprint

        fingerprint = model_fingerprint(spec)
    params = method.params()
    mdtype = str(next(model.parameters()).dtype)
    layer_list = list(layers) if layers is not None else None
    key = database_key(fingerprint, calib, params, sdt, mdtype, layer_list)
    final = root / key
    if (final / META).is_file():
        t = time.perf_counter()
        db = open_database(final, verify=verify)
        log.info("database cache hit %s (%.2f s)", final, time.perf_counter() - t)
        return db
    if final.exists():
        raise _corrupt(final, "meta.json missing")

    plan = block_layers(adapter, layer_list)
    if not plan:
        raise RayPressError("no linear layers to compress; check the `layers` selection")
    all_layers = [n for _, mods in plan for n in mods]
    want = tuple(w for w, flag in (("hessian", getattr(method, "needs_hessian", True)),
                                   ("norms", getattr(method, "needs_norms", False))) if flag)

    root.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(root, key)
    tmp = root / f"{_TMP_PREFIX}{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    t_start = time.perf_counter()
    t_calib = 0.0
    threads_ctx = _torch_threads(threads)
    threads_ctx.__enter__()
    bar = tqdm(total=len(all_layers), desc=f"{method.name} database", unit="layer", disable=not progress)
    infos: list[dict] = []
    try:
        if want:
            stats_iter = iter_block_stats(model, adapter, calib, want, batch_size, device, layer_list,
                                          progress=False)
        else:
            stats_iter = iter((i, {}) for i, _ in plan)
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
                                         device=device, on_layer=lambda _n: bar.update(1)))
        else:
            infos = _build_parallel(next_stats, mods_of, per_layer_stats, method, sdt, tmp, bar,
                                    max_inflight=parallel if isinstance(parallel, int) and parallel > 1 else 2)
        bar.close()
        infos.sort(key=lambda d: d["index"])
        total = time.perf_counter() - t_start
        meta = _make_meta(key, spec, fingerprint, method, params, sdt, mdtype, calib, infos, all_layers,
                          t_calib, total)
        with open(tmp / META, "w") as fh:
            json.dump(meta, fh, indent=1)
        try:
            os.rename(tmp, final)
        except OSError:
            if (final / META).is_file():  # another process finished the same build first
                shutil.rmtree(tmp, ignore_errors=True)
                return open_database(final, verify=verify)
            raise
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        threads_ctx.__exit__(None, None, None)
    log.info("built database %s in %.1f s (calibration %.1f s): %d layers x %d levels, %.1f MiB at %s",
             key[:12], total, t_calib, len(all_layers), len(meta["level_values_list"]),
             meta["total_bytes"] / 2**20, final)
    return LevelDatabase(final, meta)


def _build_parallel(next_stats, mods_of, per_layer_stats, method, sdt, tmp, bar, max_inflight=2):
    import ray

    remote = ray.remote(build_block).options(num_cpus=1)
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
            infos.append(info)
            bar.update(len(info["layers"]))

    try:
        while (item := next_stats()) is not None:
            i, st = item
            weights = {n: m.weight.detach().cpu() for n, m in mods_of[i].items()}
            pending.append(remote.remote(i, weights, per_layer_stats(st, weights), method, sdt, str(tmp), "cpu"))
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
    return {
        "format": FORMAT,
        "key": key,
        "model": str(spec),
        "model_fingerprint": fingerprint,
        "model_dtype": mdtype,
        "method": params,
        "method_name": method.name,
        "value_kind": getattr(method, "value_kind", "sparsity"),
        "storage_dtype": sdt,
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
        "calib_seconds": round(t_calib, 3),
        "compress_seconds": round(sum(i["seconds"] for i in infos), 3),
        "build_seconds": round(total, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "raypress_version": getattr(raypress, "__version__", "?"),
    }


# ----------------------------------------------------------------------------- reading
def _map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read-only zero-copy numpy views of every tensor of a safetensors file (memory-mapped)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("truncated header")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise ValueError("bad header length")
        header = json.loads(fh.read(n))
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = np.dtype(_ST_TO_NP[info["dtype"]])
        s, e = info["data_offsets"]
        shape = tuple(info["shape"])
        if base + e > size or e - s != dt.itemsize * int(np.prod(shape)):
            raise ValueError(f"tensor {name} out of bounds")
        arr = np.asarray(buf[base + s:base + e]).view(dt).reshape(shape)
        arr.flags.writeable = False
        out[name] = arr
    return out


class LevelDatabase:
    """All variants of all layers: ``variant(layer, level)`` -> read-only [out, in] numpy view."""

    def __init__(self, path, meta: dict):
        self.path = Path(path)
        self.meta = meta
        self.key: str = meta["key"]
        self.layers: list[str] = list(meta["layers"])
        self.n_params: dict[str, int] = {n: int(v) for n, v in meta["n_params"].items()}
        self.level_values: dict[str, list[float]] = {n: [float(x) for x in v] for n, v in meta["level_values"].items()}
        self.shapes: dict[str, tuple[int, int]] = {n: tuple(s) for n, s in meta["shapes"].items()}
        self.storage_dtype: str = meta["storage_dtype"]
        self._file_of = {n: b["file"] for b in meta["blocks"] for n in b["layers"]}
        self._arrays: dict[str, np.ndarray] = {}

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

    def array(self, layer: str) -> np.ndarray:
        """Stacked variants [n_levels, out, in] of one layer (read-only, memory-mapped)."""
        arr = self._arrays.get(layer)
        if arr is None:
            self._levels(layer)
            fname = self._file_of[layer]
            try:
                maps = _map_safetensors(self.path / fname)
            except (OSError, ValueError, KeyError) as e:
                raise _corrupt(self.path, f"{fname}: {e}") from None
            for n in [n for n, f in self._file_of.items() if f == fname]:
                if n not in maps:
                    raise _corrupt(self.path, f"{fname} lacks layer {n}")
                self._arrays[n] = maps[n]
            arr = self._arrays[layer]
        return arr

    def variant(self, layer: str, level: int) -> np.ndarray:
        """Weight of `layer` at `level` [out, in] (read-only view, storage dtype)."""
        n = self.n_levels(layer)
        if not isinstance(level, (int, np.integer)) or not 0 <= int(level) < n:
            raise RayPressError(f"level {level} out of range for {layer} (0..{n - 1})")
        return self.array(layer)[int(level)]

    def put(self) -> dict:
        """{layer: ObjectRef} of each layer's stacked [n_levels, out, in] array in Ray's object store
        (``ray.get`` returns a read-only zero-copy numpy array)."""
        import ray

        return {n: ray.put(np.asarray(self.array(n))) for n in self.layers}

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
                "layers": len(self.layers), "params": total, "n_levels": len(values),
                "total_bytes": self.total_bytes, "build_seconds": self.meta.get("build_seconds"),
                "calib_seconds": self.meta.get("calib_seconds"), "levels": per_level}


def open_database(path, verify=True) -> LevelDatabase:
    """Open a database folder. verify: True checks every file's sha256 (and size), "size" only
    sizes, False nothing. Corrupt or incomplete -> RayPressError naming the fix."""
    path = Path(path).expanduser()
    mfile = path / META
    if not mfile.is_file():
        if not path.exists():
            raise RayPressError(f"no level database at {path}; build one with `raypress build-db`")
        raise _corrupt(path, "meta.json missing")
    try:
        meta = json.loads(mfile.read_text())
        files = meta["files"]
        for k in ("key", "layers", "n_params", "level_values", "shapes", "blocks", "storage_dtype"):
            meta[k]
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(path, f"unreadable meta.json: {e.__class__.__name__} {e}") from None
    if meta.get("format") != FORMAT:
        raise RayPressError(f"level database {path} has format {meta.get('format')}, this RayPress reads "
                            f"{FORMAT}; delete the folder and rebuild it with `raypress build-db`")
    if verify:
        for fname, info in files.items():
            f = path / fname
            if not f.is_file():
                raise _corrupt(path, f"{fname} missing")
            if f.stat().st_size != int(info["bytes"]):
                raise _corrupt(path, f"{fname} has {f.stat().st_size} bytes, expected {info['bytes']}")
            if verify != "size" and _sha256_file(f) != info["sha256"]:
                raise _corrupt(path, f"{fname} sha256 mismatch")
    return LevelDatabase(path, meta)
