"""Compression families behind one interface (see base.py).

``get_method(name, **kw)`` builds a registered per-linear-layer method; the registry is a plain
dict of name -> "module:Class" (imported lazily), so families add themselves with one line.
"""
from __future__ import annotations

import importlib

from .base import Applier, CompressionMethod

#: method name -> "raypress.compress.<module>:<Class>"
METHODS: dict[str, str] = {
    "sparsegpt": "raypress.compress.sparsity:SparseGPT",
    "magnitude": "raypress.compress.sparsity:Magnitude",
    "wanda": "raypress.compress.sparsity:Wanda",
    "gptq": "raypress.compress.quant:GPTQ",
    "rtn": "raypress.compress.quant:RTN",
    "sparsegpt-gptq": "raypress.compress.joint:SparseGPTQ",
    "magnitude-rtn": "raypress.compress.joint:MagnitudeRTN",
}


def get_method(name: str, **kw) -> CompressionMethod:
    """Instantiate a registered method; unknown name -> KeyError naming the known ones."""
    try:
        target = METHODS[str(name).lower()]
    except KeyError:
        raise KeyError(f"unknown compression method '{name}'; known: {', '.join(sorted(METHODS))}") from None
    mod, cls = target.split(":")
    return getattr(importlib.import_module(mod), cls)(**kw)


__all__ = ["METHODS", "Applier", "CompressionMethod", "get_method"]
