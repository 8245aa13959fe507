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

from ..errors import RayPressError
from .weights import WeightFamily


def size_to_bits(size, n_params: int, what: str) -> float:
    """A byte budget as stored bits per weight: '25%' of the fp16 size, or bytes ('55MB', 55000000)."""
    from ..rundir import parse_size

    text = str(size).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            share = -1.0
        if not 0 < share <= 100:
            raise RayPressError(f"{what} {size!r} is not a share of the fp16 size; give e.g. 25% (or bytes: 55MB)")
        return 16.0 * share / 100.0
    return 8.0 * parse_size(text, what) / n_params


class JointFamily(WeightFamily):
    name = "joint"
    methods = ("sparsegpt-gptq", "magnitude-rtn")
    keys = WeightFamily.keys + ("target_bytes", "database.group_size", "database.symmetric")
    schedules = ("uniform", "dp")
    value_kind = "bits_per_weight"

    def check_config(self, cfg, explicit=None) -> None:
        super().check_config(cfg, explicit)
        sizes = [b for b in (cfg.searcher.budgets or []) if isinstance(b, str)]
        if cfg.target_bytes is None and not sizes:
            return
        # a byte budget becomes bits per weight of the compressed layers (the meta model: shapes only)
        from ..models import get_adapter, meta_model

        n = sum(int(m.weight.numel()) for m in get_adapter(meta_model(cfg.model)).linear_layers().values())
        if cfg.target_bytes is not None:
            cfg.target = size_to_bits(cfg.target_bytes, n, "target_bytes")
        if sizes:
            cfg.searcher.budgets = [size_to_bits(b, n, "searcher.budgets entry") if isinstance(b, str) else b
                                    for b in cfg.searcher.budgets]

    def target_note(self, cfg) -> str:
        if cfg.target_bytes is None:
            return ""
        return f"target_bytes {cfg.target_bytes} is {cfg.target:g} stored bits per weight"

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
