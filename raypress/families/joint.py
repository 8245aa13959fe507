"""Joint sparsity + quantization under a size budget: a level is a (sparsity, bits) pair.

The level value is the bits a layer stores per weight (values, bitmask, scales: compress/joint.py),
so `target` is the average bits per weight of the compressed layers, i.e. a byte budget:
``target = 8 * bytes / n_params`` (16 = their fp16 size; 4.0 = a quarter of it). Everything else
is the weight families' machinery: a level database of every pair, built in one SparseGPT pass
with quantization inside per layer, swapped in by the evaluators, exported as a plain Hugging Face
folder of the dequantized weights (compressed-tensors has no format for an unstructured bitmask
combined with packed integers, so there is no serving export yet).
"""
from __future__ import annotations

from .weights import WeightFamily


class JointFamily(WeightFamily):
    name = "joint"
    methods = ("sparsegpt-gptq", "magnitude-rtn")
    keys = WeightFamily.keys + ("database.group_size", "database.symmetric")
    schedules = ("uniform", "dp")
    value_kind = "bits_per_weight"

    def method_kwargs(self, cfg) -> dict:
        return {"levels": cfg.levels, **self.grid_kwargs(cfg)}

    def dense_levels(self, db) -> dict[str, int]:
        pairs = [tuple(p) for p in ((db.meta.get("method") or {}).get("levels") or [])]
        if (0.0, 16) not in pairs:
            return {}
        k = pairs.index((0.0, 16))
        return {l: k for l in db.level_values}

    def export_info(self, info: dict, method_params: dict) -> dict:
        pairs = method_params.get("levels") or []
        layers = {l: {"sparsity": pairs[v["level"]][0], "bits": pairs[v["level"]][1]} for l, v in info["layers"].items()
                  if v["level"] < len(pairs)}
        return {"joint": layers, "note": "weights are stored dequantized (float) with the pruned entries zero; "
                                         "per-layer sparsity and bits are in 'joint'"}
