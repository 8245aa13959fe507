"""Unpickling of files RayPress wrote itself, without trusting them.

A pickle can run any callable it names (os.system, subprocess.Popen, ...). Files that RayPress
reads back — the Optuna sampler inside `raypress_state.json`, the width-database cache — may come
from someone else (a copied run folder, a shared cache directory), so they are loaded with an
allow-list unpickler: plain containers, numpy arrays / dtypes / random generators, and classes or
functions *defined in* the modules a caller names (e.g. ``optuna.samplers``). Anything else
raises RayPressError before it is called. Weights are never pickled: the level databases are
safetensors, models load through transformers (safetensors), and nothing calls torch.load.
"""
from __future__ import annotations

import importlib
import inspect
import io
import pickle

from .errors import RayPressError

_EXACT = {
    ("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "bytearray", "bytes", "complex", "slice",
                              "range", "int", "float", "str", "bool", "object")
} | {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("collections", "deque"),
    ("copyreg", "_reconstructor"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy.random._pickle", "__randomstate_ctor"), ("numpy.random._pickle", "__bit_generator_ctor"),
    ("numpy.random._pickle", "__generator_ctor"), ("numpy.random.bit_generator", "__pyx_unpickle_SeedSequence"),
}
# numpy classes (dtype classes, bit generators, RandomState/Generator) are safe to reconstruct
_CLASS_PREFIXES = ("numpy.dtypes", "numpy.random")


def _defined_in(obj, prefixes) -> bool:
    mod = getattr(obj, "__module__", None) or ""
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, allow: tuple[str, ...], what: str):
        super().__init__(file)
        self.allow, self.what = tuple(allow), what

    def find_class(self, module, name):
        if (module, name) in _EXACT:
            return super().find_class(module, name)
        in_allowed = any(module == p or module.startswith(p + ".") for p in self.allow + _CLASS_PREFIXES)
        if in_allowed and "." not in name:
            try:
                obj = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                obj = None
            # only classes, and (for the caller's modules) functions, that are *defined* there:
            # a re-exported os.system or subprocess.run never passes
            if isinstance(obj, type) and _defined_in(obj, self.allow + _CLASS_PREFIXES):
                return obj
            if inspect.isfunction(obj) and _defined_in(obj, self.allow):
                return obj
        raise RayPressError(
            f"refusing to unpickle {module}.{name} from {self.what}: not a type RayPress writes there; "
            "the file was not written by RayPress (delete it, or start a new search)"
        )


def safe_loads(data: bytes, allow: tuple[str, ...] = (), what: str = "a pickle") -> object:
    """pickle.loads restricted to containers, numpy and the classes/functions of `allow` modules."""
    try:
        return _Unpickler(io.BytesIO(data), allow, what).load()
    except RayPressError:
        raise
    except Exception as e:  # truncated / garbled data
        raise RayPressError(f"cannot read {what} ({type(e).__name__}: {str(e)[:120]}); delete it or start anew") from None
