"""The one interface every compression family implements.

A family turns one dense linear layer into variants, one per *level*. A level has a
float `value` (sparsity in [0,1), bits, kept ratio, 0/1 dropped) and the search space
turns values into exact integer costs (see space.py), so budgets are checked exactly.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod

import torch


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily run torch CPU ops with n intra-op threads (process-wide setting; None: unchanged).
    The column loops of SparseGPT / GPTQ are small ops: with 2+ OpenMP threads they mostly wait."""
    old = torch.get_num_threads()
    if not n or n == old:
        yield
        return
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


class CompressionMethod(ABC):
    """A per-linear-layer compression family (sparsity, quantization, ...)."""

    #: short name used in configs, cache keys and MLflow params, e.g. "sparsegpt"
    name: str = "base"
    #: True when build() needs the layer's input Hessian H = 2 X Xᵀ (shape [in, in])
    needs_hessian: bool = True
    #: what a level value means, for reports: "sparsity", "bits", ...
    value_kind: str = "sparsity"
    #: True when build() needs per-input-column norms ‖X_j‖₂ (passed as build(..., norms=...))
    needs_norms: bool = False
    #: True when the level database may store this method's levels packed (`pack_levels`)
    packed: bool = False
    #: input columns per quantization group (packed storage), None for unquantized methods
    group_size: int | None = None

    @abstractmethod
    def level_values(self) -> list[float]:
        """The ladder of level values, ascending compression (level index = position)."""

    @abstractmethod
    def build(self, weight: torch.Tensor, hessian: torch.Tensor | None, value: float) -> torch.Tensor:
        """Return the compressed weight for `value`, same shape/layout as `weight` (dense layout,
        float32). `weight` is [out, in]; `hessian` is [in, in] float32 or None. Must not modify inputs."""

    def params(self) -> dict:
        """Settings that change the output (go into the database content hash and MLflow)."""
        return {"name": self.name, "levels": self.level_values()}

    def build_levels(self, weight: torch.Tensor, hessian: torch.Tensor | None, values, **kw):
        """All variants of one layer, one per value, in order (an iterable: this default builds each
        level when it is consumed, so a builder holds one float32 variant at a time; methods that
        share work across levels override it)."""
        return (self.build(weight, hessian, v, **kw) for v in values)

    def pack_levels(self, weight: torch.Tensor, hessian: torch.Tensor | None, values=None) -> dict:
        """Packed storage of every level (methods with `packed = True`): {"codes", "scales", "zeros",
        "group_size"} numpy arrays, decoded by `decode_stored`."""
        raise NotImplementedError(f"{self.name} has no packed storage")

    def decode_stored(self, stored, level: int):
        """The [out, in] weight of `level` from what the database stored for a layer (a dense stack
        [n_levels, out, in]; packed methods also decode their `pack_levels` dict)."""
        if isinstance(stored, dict):
            raise TypeError(f"{self.name} stores dense stacks, not packed levels")
        return stored[level]


class Applier(ABC):
    """Makes a live model inside an evaluator reflect a config {unit_name: level_index}.

    Built on the driver (picklable: holds object-store refs / small metadata, no model),
    shipped to evaluator actors, then `attach`ed to that actor's model once. `apply` must only
    touch units whose level changed since the last call (the evaluator's hot path), must never
    write into shared (object-store) arrays, and `apply({})`/`reset()` restores the dense model.
    """

    @abstractmethod
    def attach(self, model, adapter) -> None:
        """Bind to the evaluator's model (called once per actor)."""

    @abstractmethod
    def apply(self, levels: dict[str, int]) -> int:
        """Apply the config; return how many units were actually changed."""

    def reset(self) -> None:
        """Return to the dense model."""
        self.apply({})
