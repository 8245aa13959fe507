"""Finished (or interrupted) search folders: export the best config, evaluate an export.

A search folder (`raypress_runs/<name>-<time>/`) holds `raypress_state.json` (config + searcher
state) and, once finished, `result.json` (best config, perplexities).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import RayPressError


def load_run(run_dir) -> tuple[object, dict]:
    """(Config, best config) of a finished search folder."""
    from .config import Config, _build, validate
    from .runner import read_state

    d = Path(run_dir)
    state = read_state(d)
    res = d / "result.json"
    if not res.is_file():
        raise RayPressError(f"{d} has no result.json: the search did not finish; "
                            f"resume it with `raypress search --resume {d}`")
    return validate(_build(Config, state["config"])), json.loads(res.read_text())["best_config"]


def export_run(run_dir, out_dir, overwrite: bool = False) -> Path:
    """Write the best config of a finished search as a Hugging Face folder."""
    from .data import load_tokens, make_splits
    from .families import prepare
    from .models import get_adapter, load_model

    cfg, best = load_run(run_dir)
    model, tok = load_model(cfg.model)
    adapter = get_adapter(model)
    splits = make_splits(load_tokens(cfg.data.source, tok, cfg.data.max_tokens), cfg.data.seq_len,
                         cfg.data.n_calib, cfg.data.n_eval, cfg.data.seed)
    prep = prepare(cfg, model, adapter, splits.calib, cfg.model, serve=cfg.family == "width")
    info = {"search_dir": str(Path(run_dir).resolve())}
    if cfg.family == "width":
        from .compress.width import export_width

        return export_width(model, adapter, best, out_dir, applier=prep.applier, tokenizer=tok,
                            overwrite=overwrite, extra_info=info)
    from .export import export_model

    return export_model(model, out_dir, family=cfg.family, levels=best, space=prep.space, db=prep.db,
                        tokenizer=tok, source=cfg.model, overwrite=overwrite, extra_info=info)


def load_any(path):
    """Load a model folder: a width export, any other RayPress export, or a plain HF folder."""
    p = Path(path)
    info = p / "raypress.json"
    if info.is_file():
        meta = json.loads(info.read_text())
        if str(meta.get("format", "")).startswith("raypress-width"):
            from .compress.width import load_width_model

            return load_width_model(p)
        from .export import load_exported

        return load_exported(p)[0]
    from .models import load_model

    return load_model(str(p))[0]


def eval_folder(path, data_source: str, seq_len: int = 256, n_eval: int = 32, n_calib: int = 64,
                seed: int = 0) -> float:
    """Held-out perplexity of a model folder on the same evaluation split a search uses."""
    from transformers import AutoTokenizer

    from .data import load_tokens, make_splits
    from .fitness import perplexity

    model = load_any(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    splits = make_splits(load_tokens(data_source, tok), seq_len, n_calib, n_eval, seed)
    return perplexity(model, splits.eval)
