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
    keys = WeightFamily.keys + ("database.group_size", "database.symmetric")
    schedules = ("uniform", "dp")
    value_kind = "bits"

    def method_kwargs(self, cfg) -> dict:
        kw = self.grid_kwargs(cfg)
        if cfg.levels is not None:
            kw["bits"] = cfg.levels
        return kw


    formats = ("hf", "compressed-tensors")

    def export_as(self, fmt, model, adapter, best, prep, out_dir, *, tokenizer=None, source="", overwrite=False,
                  extra_info=None):
        """compressed-tensors: the database's codes, packed, one config group per bitwidth (ct_export)."""
        from ..ct_export import export_compressed_tensors
        from ..export import base_info, clean_levels
        from . import units

        if fmt not in self.formats or fmt == "hf":
            return super().export_as(fmt, model, adapter, best, prep, out_dir)
        cfg = clean_levels(best, prep.space)
        prep.space.check(cfg)
        layers = units.expand(cfg, prep.context.get("units"))
        method = prep.context["method"]
        info = {**base_info(prep.space, cfg, self.name, source, method.params()), **(extra_info or {}),
                "layers": {l: {"level": k, "value": float(prep.db.level_values[l][k])} for l, k in layers.items()}}
        return export_compressed_tensors(model, adapter, layers, prep.db, method, out_dir, tokenizer=tokenizer,
                                         info=info, overwrite=overwrite)

    def export_info(self, info: dict, method_params: dict) -> dict:
        out = {"bits": {l: v["value"] for l, v in info["layers"].items()},
               "note": "weights are stored dequantized (float); per-layer bits are in 'bits'"}
        gs = method_params.get("group_size")
        if gs:
            out["effective_bits_mean"] = effective_bits(info["mean_value"], gs)
        return out
