"""Unstructured sparsity (SparseGPT, Wanda, magnitude): a level is a fraction of weights set to zero.

Schedules: uniform, OWL (outlier-weighted layerwise sparsity), the Hessian layer-wise scheduler
(OBS error, log-scale clustering) and DP (knapsack over per-level reconstruction errors).
"""
from __future__ import annotations

from .weights import WeightFamily


class SparsityFamily(WeightFamily):
    name = "sparsity"
    methods = ("sparsegpt", "wanda", "magnitude")
    schedules = ("uniform", "owl", "hessian", "dp")
    value_kind = "sparsity"

    def dense_levels(self, db) -> dict[str, int]:
        return {l: vals.index(0.0) for l, vals in db.level_values.items() if 0.0 in vals}

