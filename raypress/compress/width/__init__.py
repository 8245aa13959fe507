"""Structured width compression for Llama-family models: attention heads and MLP channels.

One idea per module: `levels` (units, ladders, the width budget), `importance` (OBS scores of
channels and heads), `database` (kept sets + reformed weights, stored like every database),
`applier` (apply a config to a live model), `export` (a physically smaller HF folder). The family
glue (config -> space, database, applier) is raypress/families/width.py.
"""
from .applier import WidthApplier
from .database import FORMAT, REFORMS, build_width_database, levels_from_database, open_width_database, \
    save_width_database
from .export import count_params, export_width, load_width_model
from .importance import width_hessians, width_importance
from .levels import (ATTN_MODES, BlockGeometry, UnitLadder, WidthLevels, kept_params, width_initial, width_levels,
                     width_space, width_target)

__all__ = [
    "ATTN_MODES", "FORMAT", "REFORMS", "BlockGeometry", "UnitLadder", "WidthLevels", "width_levels", "width_target",
    "width_space", "width_initial", "width_hessians", "width_importance", "build_width_database",
    "levels_from_database", "open_width_database", "save_width_database", "WidthApplier", "export_width",
    "load_width_model", "count_params", "kept_params",
]
