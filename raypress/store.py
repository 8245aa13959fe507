"""Content-hashed folders of safetensors files: how every RayPress database lives on disk.

A database is a folder ``<root>/<key>/`` (key = a content hash of everything its arrays depend
on) holding safetensors files and a ``meta.json`` that lists each file's sha256 and size. It is
built in ``<root>/.tmp-<key>-<pid>-<rand>/`` and renamed into place only after meta.json is
written, so an interrupted build never leaves a complete-looking folder (a dead build's temp
folder is removed by the next build of the same key). Opening verifies every listed file
(sha256, or size only) and maps the tensors read-only and zero-copy. The level database of the
weight families (database.py) and the width database (compress/width/database.py) both use it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from .errors import RayPressError

META = "meta.json"
TMP_PREFIX = ".tmp-"
ST_TO_NP = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "U8": np.uint8, "I8": np.int8,
            "I32": np.int32, "I64": np.int64}


def content_key(*parts) -> str:
    """sha256 over the given parts (strings, or anything json-serializable)."""
    h = hashlib.sha256()
    for part in parts:
        h.update((part if isinstance(part, str) else json.dumps(part, sort_keys=True, default=str)).encode())
        h.update(b"\0")
    return h.hexdigest()


def sha256_file(path: Path, chunk: int = 16 * 2**20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class CorruptStore(RayPressError):
    """A cached folder that fails its checks; a build of the same key replaces it (database.build_database)."""


def corrupt(path: Path, what: str, label: str = "level database") -> RayPressError:
    return CorruptStore(f"{label} {path} is corrupt or incomplete ({what}); delete the folder "
                        f"{path} and rebuild it with `raypress build-db`")


META_DIGEST = "meta_sha256"  # meta.json's own checksum: its level values and file list are read from it


def meta_digest(meta: dict) -> str:
    return content_key({k: v for k, v in meta.items() if k != META_DIGEST})


def usual_permissions(folder: Path) -> None:
    """Files 0666 and folders 0777 minus the umask, as `cp` would make them: what is built in a
    mkdtemp folder (0700) and renamed into place would otherwise stay unreadable by the user's group."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [folder, *folder.rglob("*")]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def clean_stale_tmp(root: Path, key: str) -> None:
    """Remove temp folders of builds of `key` whose process is gone."""
    for d in root.glob(f"{TMP_PREFIX}{key[:16]}-*"):
        try:
            pid = int(d.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)


def new_tmp(root: Path, key: str) -> Path:
    """A fresh temp folder for building `key` under `root` (stale ones of dead builds removed)."""
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(root, key)
    tmp = root / f"{TMP_PREFIX}{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def finalize(tmp: Path, final: Path, meta: dict) -> bool:
    """Write meta.json into `tmp` and rename it to `final`. False when another process finished the
    same build first (then `tmp` is removed and `final` is the one to open)."""
    meta = {**meta, META_DIGEST: meta_digest(meta)}
    with open(tmp / META, "w") as fh:
        json.dump(meta, fh, indent=1)
    try:
        os.rename(tmp, final)
    except OSError:
        if (final / META).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    return True


def file_entry(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_arrays(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> dict:
    """Write one safetensors file; returns its meta.json entry {sha256, bytes}."""
    from safetensors.numpy import save as st_save

    data = st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)
    with open(path, "wb") as fh:
        fh.write(data)
    return file_entry(data)


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
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
        dt = np.dtype(ST_TO_NP[info["dtype"]])
        s, e = info["data_offsets"]
        shape = tuple(info["shape"])
        if base + e > size or e - s != dt.itemsize * int(np.prod(shape)):
            raise ValueError(f"tensor {name} out of bounds")
        arr = np.asarray(buf[base + s:base + e]).view(dt).reshape(shape)
        arr.flags.writeable = False
        out[name] = arr
    return out


def read_meta(path: Path, required=("files",)) -> dict:
    """meta.json of a database folder (RayPressError naming the fix when missing or unreadable)."""
    mfile = path / META
    if not mfile.is_file():
        if not path.exists():
            raise RayPressError(f"no database at {path}; build one with `raypress build-db`")
        raise corrupt(path, "meta.json missing")
    try:
        meta = json.loads(mfile.read_text())
        for k in required:
            meta[k]
    except (ValueError, KeyError, TypeError) as e:
        raise corrupt(path, f"unreadable meta.json: {e.__class__.__name__} {e}") from None
    if META_DIGEST in meta and meta[META_DIGEST] != meta_digest(meta):  # older databases carry none
        raise corrupt(path, "meta.json does not match its own checksum: edited or damaged")
    return meta


# file -> (size, mtime_ns, inode, sha256) of the files this process has hashed and found intact: a
# comparison opens its database once per searcher, and hashing OPT-66B@8's 46 GiB took ~45 s each time
_VERIFIED: dict[str, tuple] = {}
HASH_THREADS = 8  # hashlib releases the GIL: block files hash in parallel, up to the disk's speed


def verify_files(path: Path, files: dict, verify=True) -> None:
    """verify: True checks every listed file's sha256 and size, "size" sizes only, False nothing.
    A file this process already hashed is not hashed again unless its size, mtime or inode changed."""
    if not verify:
        return
    todo = []
    for fname, info in files.items():
        f = path / fname
        if not f.is_file():
            raise corrupt(path, f"{fname} missing")
        st = f.stat()
        if st.st_size != int(info["bytes"]):
            raise corrupt(path, f"{fname} has {st.st_size} bytes, expected {info['bytes']}")
        seen = (st.st_size, st.st_mtime_ns, st.st_ino, info["sha256"])
        if verify != "size" and _VERIFIED.get(str(f)) != seen:
            todo.append((fname, f, seen))
    if not todo:
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(HASH_THREADS, len(todo), os.cpu_count() or 1)) as ex:
        for (fname, f, seen), digest in zip(todo, ex.map(lambda t: sha256_file(t[1]), todo)):
            if digest != seen[3]:
                raise corrupt(path, f"{fname} sha256 mismatch")
            _VERIFIED[str(f)] = seen


_NP_TO_ST = {np.dtype(v): k for k, v in ST_TO_NP.items()}


class TensorWriter:
    """A safetensors file written tensor by tensor: the header (names, dtypes, shapes) first, then
    each tensor's bytes as soon as it is computed, so a builder never holds a whole file (nor its
    serialized copy). `close()` returns the file's meta.json entry {sha256, bytes}."""

    def __init__(self, fh, specs, metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata)} if metadata else {}
        off = 0
        self.order, self.expect = [], {}
        for name, dtype, shape in specs:
            dt = np.dtype(dtype)
            n = dt.itemsize * int(np.prod(shape))
            header[name] = {"dtype": _NP_TO_ST[dt], "shape": [int(s) for s in shape], "data_offsets": [off, off + n]}
            self.order.append(name)
            self.expect[name] = (dt, tuple(int(s) for s in shape))
            off += n
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)  # safetensors aligns the data to 8 bytes
        self.fh, self.sha, self.total, self.next = fh, hashlib.sha256(), 8 + len(hb) + off, 0
        self._put(len(hb).to_bytes(8, "little"))
        self._put(hb)

    def _put(self, b) -> None:
        self.sha.update(b)
        self.fh.write(b)

    def write(self, name: str, arr: np.ndarray) -> None:
        if self.next >= len(self.order) or self.order[self.next] != name:
            raise ValueError(f"tensor {name} written out of order (expected {self.order[self.next:self.next + 1]})")
        dt, shape = self.expect[name]
        arr = np.ascontiguousarray(arr)
        if arr.dtype != dt or arr.shape != shape:
            raise ValueError(f"tensor {name}: {arr.dtype}{arr.shape} written, {dt}{shape} declared")
        self._put(memoryview(arr.reshape(-1).view(np.uint8)))
        self.next += 1

    def close(self) -> dict:
        if self.next != len(self.order):
            raise ValueError(f"{len(self.order) - self.next} declared tensors were not written")
        return {"sha256": self.sha.hexdigest(), "bytes": self.total}
