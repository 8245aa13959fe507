"""Search folders: the resume state, finished results, export of the best config, evaluation of an export.

A search folder (`raypress_runs/<name>-<time>/`) holds `raypress_state.json` (config + searcher
state, rewritten atomically at most every second and when the search ends) and, once finished, `result.json` (best
config, perplexities).
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import RayPressError

STATE_FILE = "raypress_state.json"
RESULT_FILE = "result.json"


def check_writable_folder(path, key: str) -> None:
    """`path` (config key `key`) is, or is made now, a folder this process can write: checked before any
    model is loaded, so a typo costs one line, not a traceback minutes later."""
    import tempfile

    p = Path(path).expanduser()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RayPressError(f"{key} '{path}' {'is' if probe == p else 'lies under'} the file '{probe}', not a folder; "
                            f"set {key} to a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise RayPressError(f"{key} '{path}' cannot be written ({e.strerror or e}); set {key} to a folder you can "
                            "write") from None


def read_state(run_dir) -> dict:
    """The resume state of an output folder; missing or unreadable -> RayPressError."""
    out_dir = Path(run_dir)
    f = out_dir / STATE_FILE
    if not out_dir.is_dir():
        raise RayPressError(
            f"resume folder '{out_dir}' does not exist; pass the output folder of the interrupted search "
            "(printed at its start, under output: e.g. raypress_runs/<run name>-<time>)"
        )
    if not f.is_file():
        raise RayPressError(f"nothing to resume in {out_dir}: no {STATE_FILE} (was the search started there?)")
    try:
        state = json.loads(f.read_text())
        if not (isinstance(state["run_name"], str) and isinstance(state["config"], dict)):
            raise TypeError("run_name/config")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RayPressError(
            f"{f} is unreadable ({type(e).__name__}: {str(e)[:80]}); it is written atomically, so it was "
            "edited or damaged afterwards: restore it or start a new search"
        ) from None
    return state


def check_owner(run_dir, state: dict) -> None:
    """A resume may only reopen the MLflow run that this folder owns: a copy of a run folder names
    the original's run, and resuming it would rewrite (or fail) the original's run. A folder that was
    moved (its recorded place is gone) still owns its run."""
    from mlflow.tracking import MlflowClient

    here = Path(run_dir).resolve()
    try:
        tags = MlflowClient(state["tracking_uri"]).get_run(state["run_id"]).data.tags
    except Exception:  # noqa: BLE001 - a missing run or store is reported when the run is reopened
        return
    owner = tags.get("raypress.output_dir")
    if owner and Path(owner).resolve() != here and (Path(owner) / STATE_FILE).is_file():
        raise RayPressError(
            f"{here} is a copy of the search folder {owner}, whose MLflow run {state['run_id']} it names; resume "
            f"{owner} itself (a resume of the copy would rewrite that run), or start a new search")


def load_run(run_dir) -> tuple[object, dict]:
    """(Config, best config) of a finished search folder."""
    from .config import config_from_dict

    d = Path(run_dir)
    state = read_state(d)
    res = d / RESULT_FILE
    if not res.is_file():
        raise RayPressError(f"{d} has no {RESULT_FILE}: the search did not finish; "
                            f"resume it with `raypress search --resume {d}`")
    try:
        best = json.loads(res.read_text())["best_config"]
        if not isinstance(best, dict):
            raise TypeError("best_config is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RayPressError(f"{res} is unreadable ({type(e).__name__}: {str(e)[:80]}); it is written atomically, so "
                            f"it was edited or damaged afterwards: restore it, or delete it and resume the search "
                            f"with `raypress search --resume {d}`") from None
    return config_from_dict(state["config"], state.get("explicit", [])), best


def check_export_target(out_dir, overwrite: bool, run_dir, model_spec: str) -> None:
    """Refuse, before anything is loaded, an export folder that would destroy what the user owns:
    one that is, contains or lies inside the model being read or a search folder; `--overwrite`
    replaces only a previous RayPress export (a folder with raypress.json)."""
    from .export import INFO_FILE

    out = Path(out_dir).expanduser().resolve()
    protected = [(Path(run_dir).resolve(), "the search folder being exported")]
    local = Path(model_spec).expanduser()
    if local.exists():
        protected.append((local.resolve() if local.is_dir() else local.resolve().parent, "the model being read"))
    for p, what in protected:
        if out == p or p.is_relative_to(out) or out.is_relative_to(p):
            raise RayPressError(f"--out {out} would overwrite or sit inside {what} ({p}); export to a folder "
                                "outside it, e.g. --out exported/<name>")
    for parent in [out, *out.parents]:
        if (parent / STATE_FILE).is_file():
            raise RayPressError(f"--out {out} is inside the search folder {parent}; export to a folder outside it")
    if out.exists():
        if not overwrite:
            raise RayPressError(f"export folder {out} already exists; choose another --out or pass --overwrite")
        if not out.is_dir() or not (out / INFO_FILE).is_file():
            raise RayPressError(f"--overwrite replaces only a previous RayPress export, and {out} is not one (no "
                                f"{INFO_FILE}); choose another --out")


def parse_size(text, what: str = "--budget") -> int:
    """Bytes of '3.2GB', '800MiB', '123456' (decimal and binary units)."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?)?[bB]?\s*", str(text))
    if not m:
        raise RayPressError(f"{what} {text!r} is not a size; give bytes, e.g. 60MB, 57.2MiB or 60000000")
    unit = (m.group(2) or "").lower()
    base = 1024 if unit.endswith("i") else 1000
    return int(float(m.group(1)) * base ** ("kmgt".index(unit[0]) + 1 if unit else 0))


def front_point(run_dir, budget) -> dict:
    """The pareto.json point a `--budget` export takes: the best held-out perplexity among the points
    whose bytes fit the budget."""
    import json

    from .pareto_report import FILE

    path = Path(run_dir) / FILE
    if not path.is_file():
        raise RayPressError(f"{run_dir} has no {FILE}: --budget picks a point of a pareto search's front "
                            "(searcher.name=pareto); export this search without --budget")
    doc = json.loads(path.read_text())
    pts = [p for p in doc["points"] if "bytes" in p]
    if not pts:
        raise RayPressError(f"the front in {path} is in {doc.get('value_kind')}, not bytes; --budget needs a joint "
                            "(bytes) front; export without --budget")
    limit = parse_size(budget)
    fits = [p for p in pts if p["bytes"] <= limit]
    if not fits:
        small = min(pts, key=lambda p: p["bytes"])
        raise RayPressError(f"no point of the front fits {limit:,} bytes (the smallest is {small['bytes']:,} bytes at "
                            f"{small['value']:g} bits per weight); raise --budget")
    return min(fits, key=lambda p: p["ppl"])


def export_run(run_dir, out_dir, overwrite: bool = False, fmt: str = "hf", report: dict | None = None,
               budget=None) -> Path:
    """Write the best config of a finished search as a Hugging Face folder (its family's export), or
    in a serving format the family writes (`fmt`, e.g. compressed-tensors; `report` gets its sizes).
    budget: bytes (or '60MB'): a pareto search's best front point that fits (pareto.json)."""
    import dataclasses

    from .data import load_tokens, make_splits
    from .families import get_family
    from .models import get_adapter, load_model

    cfg, best = load_run(run_dir)
    point = front_point(run_dir, budget) if budget is not None else None
    check_export_target(out_dir, overwrite, run_dir, cfg.model)
    family = get_family(cfg.family)
    if fmt not in family.formats:
        raise RayPressError(f"a {cfg.family} search exports as {' or '.join(family.formats)}, not {fmt!r}; "
                            f"use --format {family.formats[0]}")
    model, tok = load_model(cfg.model)
    adapter = get_adapter(model)
    splits = make_splits(load_tokens(cfg.data.source, tok, cfg.data.max_tokens), cfg.data.seq_len,
                         cfg.data.n_calib, cfg.data.n_eval, cfg.data.seed)
    prep = family.prepare(cfg, model, adapter, splits.calib, serve=False)
    info = {"search_dir": str(Path(run_dir).resolve())}
    if point is not None:  # a front point: its own budget's space
        from .search.pareto import at_target

        prep = dataclasses.replace(prep, space=at_target(prep.space, point["budget"]))
        best = point["config"]
        info["front_point"] = {k: v for k, v in point.items() if k != "config"}
    if fmt != "hf":
        out, sizes = family.export_as(fmt, model, adapter, best, prep, out_dir, tokenizer=tok, source=cfg.model,
                                      overwrite=overwrite, extra_info=info)
        if report is not None:
            report.update(sizes)
    else:
        out = family.export(model, adapter, best, prep, out_dir, tokenizer=tok, source=cfg.model,
                            overwrite=overwrite, extra_info=info)
        sizes = {"bytes": sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))}
    log_export(read_state(Path(run_dir)), fmt, out, sizes)
    return out


def log_export(state: dict, fmt: str, out, sizes: dict) -> None:
    """The export's format, folder and bytes on the search's MLflow run (its status untouched)."""
    import logging

    try:
        from mlflow.tracking import MlflowClient

        c = MlflowClient(state["tracking_uri"])
        c.set_tag(state["run_id"], f"raypress.export.{fmt}", str(Path(out).resolve()))
        c.log_metric(state["run_id"], f"export_bytes_{fmt.replace('-', '_')}", float(sizes["bytes"]))
    except Exception as e:  # noqa: BLE001 - the export itself is written; say what was not logged
        logging.getLogger("raypress").warning("export written to %s, but not logged on MLflow run %s: %s",
                                              out, state.get("run_id"), e)


def load_any(path):
    """Load a model folder: a RayPress export (its family's loader) or a plain HF folder."""
    from .models import unreadable_safetensors

    p = Path(path)
    bad = unreadable_safetensors(p)
    if bad is not None:
        raise RayPressError(f"model file {bad[0]} is corrupt or truncated ({bad[1]}); export or copy the folder again")
    info = p / "raypress.json"
    if info.is_file():
        from .families import get_family

        meta = json.loads(info.read_text())
        return get_family(meta.get("family", "sparsity")).load_export(p)
    from .models import load_model

    return load_model(str(p))[0]


def eval_folder(path, data_source: str = "default", seq_len: int = 256, n_eval: int = 32, n_calib: int = 64,
                seed: int = 0, report: dict | None = None) -> float:
    """Held-out perplexity of a model on the same evaluation split a search uses: the last
    n_eval * seq_len tokens of `data_source`, as n_eval windows of seq_len (n_calib only sizes the
    region before it, as in a search). `path`: an export or HF folder, or any model spec `search`
    accepts (alias, hub id, random:<arch>). `report` gets what was scored (source, tokens)."""
    from .data import describe_source, load_tokens, make_splits
    from .fitness import perplexity
    from .models import load_model

    if Path(path).is_dir():
        from transformers import AutoTokenizer

        # float32 as a search computes (exports are stored in the source dtype; bfloat16 matmuls on a CPU are
        # also several times slower)
        model, tok = load_any(path), AutoTokenizer.from_pretrained(str(path))
        if not getattr(model, "is_quantized", False):  # a compressed-tensors model keeps its own dtypes
            model = model.float()
    else:
        model, tok = load_model(str(path))
    splits = make_splits(load_tokens(data_source, tok), seq_len, n_calib, n_eval, seed)
    if report is not None:
        report.update(source=describe_source(data_source), tokens=int(splits.eval.size), windows=n_eval,
                      seq_len=seq_len)
    return perplexity(model, splits.eval)
