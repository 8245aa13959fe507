"""Swap per-layer weight variants in from Ray's object store (sparsity / quantization families).

Each layer's variants live in the object store as one object: a read-only numpy array
[n_levels, out, in], or (packed quantization databases) a dict of read-only arrays
{"codes", "scales", "zeros", "group_size"} that `decode` (e.g. ``method.decode_stored``)
dequantizes on swap-in; `ray.get` maps either without copying. A level is applied by pointing the
Linear's weight at a view of that array (or at a device/dtype copy of it when the model runs
on a GPU or in another dtype), and the dense weight is restored by pointing back at the
tensor the model was loaded with — nothing is ever written into a shared array.

Where the evaluator holds the variants is its `hold` (raypress.placement.decide_hold): "gpu" copies
every variant to the GPU once, in the model's dtype (a swap is then a pointer change); "host" keeps
them in pinned host memory (a swap is one DMA copy, and streamed evaluators' block copies become
asynchronous); "shared" reads them from the node's shared copy on every swap. Under "shared" and
"host", on a GPU the evaluator sets `cache_bytes` (evaluator.variant_cache × free memory): device
copies are kept (least recently used first out) so that switching back to a variant seen before is
a pointer change. Searchers whose candidates differ in most layers (random, TPE) otherwise pay a
full-model copy per candidate.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import torch

from ..errors import RayPressError
from .base import Applier
from .quant import decode_packed


def _as_tensor(arr: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        # read-only object-store memory: torch warns because it cannot prove we won't write
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    if t.dtype != like.dtype or t.device != like.device:
        t = t.to(device=like.device, dtype=like.dtype)  # a private copy, not the shared array
    return t


def _shares(t: torch.Tensor, stored) -> bool:
    """Is t a view of the object-store array (nothing to cache: it already costs no copy)?"""
    return isinstance(stored, np.ndarray) and t.device.type == "cpu" and \
        stored.ctypes.data <= t.data_ptr() < stored.ctypes.data + stored.nbytes


def mapped_at(arr: np.ndarray) -> str | None:
    """"<device inode path>+<file offset>" of the file mapping that holds `arr`'s data (from
    /proc/self/maps); None for anonymous (private) memory or where /proc is not there."""
    ptr = arr.ctypes.data
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= ptr < hi:
                    if len(parts) < 6 or parts[4] == "0":
                        return None
                    return f"{parts[3]} {parts[4]} {parts[5].strip()}+{int(parts[2], 16) + ptr - lo}"
    except OSError:
        return None
    return None


class WeightSwapApplier(Applier):
    """Applies {layer: level} by swapping Linear weights to object-store variants.

    refs: {layer: ObjectRef (or the object itself) of an ndarray [n_levels, out, in] or a packed
    dict (see raypress.database.LevelDatabase.stored)}; dense_levels: {layer: level index
    whose variant *is* the dense weight (e.g. sparsity 0.0)} — those use the model's own tensor so
    the dense config is bit-exact.
    """

    def __init__(self, refs: dict, dense_levels: dict[str, int] | None = None, decode=None,
                 units: dict[str, list[str]] | None = None):
        self.refs = refs
        self.units = units  # {unit: [layers]} when configs name fused units (families/units.py)
        self.dense_levels = dense_levels or {}
        self.decode = decode  # optional: (stored_obj, level) -> ndarray, e.g. packed quant codes
        self.cache_bytes = 0  # device copies kept for reuse (set by the evaluator on a GPU)
        self._reset_local()

    _LOCAL = ("_arrays", "_current", "_cache", "_cached_bytes", "_modules", "_dense", "_held", "_hold")

    def _reset_local(self) -> None:
        """Per-process state: mapped arrays, swapped-in levels, device copies (never pickled)."""
        self._arrays: dict = {}
        self._current: dict[str, int | None] = {}
        self._cache: OrderedDict = OrderedDict()
        self._cached_bytes = 0
        self._held: dict = {}  # (layer, level) -> tensor on the GPU or in pinned host memory
        self._hold = "shared"

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._LOCAL}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("cache_bytes", 0)  # pickled before the device cache existed
        self.__dict__.setdefault("units", None)
        self._reset_local()

    def attach(self, model, adapter) -> None:
        linears = adapter.linear_layers()
        missing = [n for n in self.refs if n not in linears]
        if missing:
            raise RayPressError(
                f"the level database has layers the model lacks (e.g. {missing[0]}); "
                "rebuild the database for this model with `raypress build-db`"
            )
        self._modules = {n: linears[n] for n in self.refs}
        self._dense = {n: m.weight.data for n, m in self._modules.items()}
        self._current = {n: None for n in self.refs}

    def _stored(self, layer: str):
        arr = self._arrays.get(layer)
        if arr is None:
            ref = self.refs[layer]
            if getattr(ref, "on_disk", False):  # placement "disk": map the database's own files
                ref = ref.get()
            elif not isinstance(ref, (np.ndarray, dict)):
                import ray

                ref = ray.get(ref)
            arr = self._arrays[layer] = ref
        return arr

    def shared_copy(self) -> str | None:
        """Which memory this evaluator reads the database from: "<mapped file>+<offset>" of its first
        layer's stored array (Ray's plasma file of this node, or the database's own file on disk).
        Evaluators of one node that share one copy give the same answer; a private copy gives None."""
        for layer in self.refs:
            stored = self._stored(layer)
            arr = stored if isinstance(stored, np.ndarray) else next(
                (v for v in stored.values() if isinstance(v, np.ndarray)), None)
            return None if arr is None else mapped_at(arr)
        return None

    def _n_levels(self, layer: str) -> int:
        stored = self._stored(layer)
        return int((stored["codes"] if isinstance(stored, dict) else stored).shape[0])

    def _held_levels(self):
        for layer in self._modules:
            for level in range(self._n_levels(layer)):
                if self.dense_levels.get(layer) != level:  # dense levels are the model's own tensor
                    yield layer, level

    def variant_bytes(self, itemsize: int) -> int:
        """Bytes of every non-dense variant at `itemsize` bytes per weight (what a gpu/host hold takes)."""
        return sum(self._modules[layer].weight.numel() * itemsize for layer, _ in self._held_levels())

    def hold(self, where: str, device: str) -> None:
        """Copy every variant to where the evaluator keeps it (see the module docstring): "gpu" (device
        copies in the model's dtype), "host" (pinned host copies in the model's dtype), or "shared"."""
        self._held.clear()
        self._hold = where
        if where == "shared":
            return
        pin = where == "host" and device.startswith("cuda")
        for layer, level in self._held_levels():
            dense = self._dense[layer]
            like = dense if where == "gpu" else torch.empty(0, dtype=dense.dtype)
            t = self._variant(layer, level, like)
            if _shares(t, self._stored(layer)):
                t = t.clone()  # own memory: the pinned / device copy must not alias the shared array
            self._held[(layer, level)] = t.pin_memory() if pin else t
        if where == "gpu":
            self.cache_bytes = 0  # every variant is already a device tensor

    def variant(self, layer: str, level: int) -> torch.Tensor:
        key = (layer, level)
        t = self._held.get(key)
        if t is not None:
            dense = self._dense[layer]
            if t.device == dense.device:
                return t
            key = ("held", layer, level)  # pinned host copy -> device: cached like any other copy
        t = self._cache.get(key)
        if t is not None:
            self._cache.move_to_end(key)
            return t
        held = self._held.get((layer, level))
        t = held.to(self._dense[layer].device, non_blocking=True) if held is not None else self._variant(layer, level)
        if self.cache_bytes > 0 and t.data_ptr() != 0 and not _shares(t, self._stored(layer)):
            self._cache[key] = t
            self._cached_bytes += t.numel() * t.element_size()
            while self._cached_bytes > self.cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.numel() * old.element_size()
        return t

    def _variant(self, layer: str, level: int, like: torch.Tensor | None = None) -> torch.Tensor:
        stored = self._stored(layer)
        if self.decode is not None:
            arr = self.decode(stored, level)
        elif isinstance(stored, dict):  # packed codes without a decoder: the generic dequantizer
            arr = decode_packed(stored, level)
        else:
            arr = stored[level]
        return _as_tensor(arr, self._dense[layer] if like is None else like)

    def apply(self, levels: dict[str, int]) -> int:
        if self.units:  # a unit's level goes to each of its layers
            levels = {layer: lv for u, lv in levels.items() for layer in self.units.get(u, [u])}
        changed = 0
        for layer, module in self._modules.items():
            level = levels.get(layer)
            if level is not None and self.dense_levels.get(layer) == level:
                level = None
            if self._current[layer] == level:
                continue
            module.weight.data = self._dense[layer] if level is None else self.variant(layer, level)
            self._current[layer] = level
            changed += 1
        return changed
