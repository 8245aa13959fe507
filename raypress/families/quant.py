"""Weight quantization (GPTQ, RTN): a level is a bitwidth (group-wise min-max grids).

A higher level value means *less* compression here; the budget (average bits) does not mind.
Schedules: uniform and DP (knapsack over per-level reconstruction errors).
"""
from __future__ import annotations

from ..compress.quant import effective_bits
from .weights import WeightFamily


class QuantFamily(WeightFamily):
    name = "quant"
    methods = ("gptq", "rtn")
    keys = WeightFamily.keys + ("database.group_size",)
    schedules = ("uniform", "dp")
    value_kind = "bits"

    def method_kwargs(self, cfg) -> dict:
        kw = {"group_size": cfg.database.group_size}
        if cfg.levels is not None:
            kw["bits"] = cfg.levels
        return kw


    def export_info(self, info: dict, method_params: dict) -> dict:
        out = {"bits": {l: v["value"] for l, v in info["layers"].items()},
               "note": "weights are stored dequantized (float); per-layer bits are in 'bits'"}
        gs = method_params.get("group_size")
        if gs:
            out["effective_bits_mean"] = effective_bits(info["mean_value"], gs)
        return out
