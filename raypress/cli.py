"""`raypress search | plan | build-db | eval | export | compare | ui`.

User-fixable problems print one line `raypress: error: ...` and exit 2 — never a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from .errors import RayPressError, first_line as _first_line, os_error, user_error, write_crash_log


def _quiet() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see runner.CPU_ENV
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # transformers' per-load "Loading weights" bars (driver and every evaluator actor) drown the
    # output; HF_HUB_DISABLE_PROGRESS_BARS=0 brings them back
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow resets its loggers on import
    if not sys.stderr.isatty():  # libraries' tqdm bars (compressed-tensors, ...) are one endless line in a log
        os.environ.setdefault("TQDM_DISABLE", "1")
    if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and "transformers.utils.logging" in sys.modules:
        sys.modules["transformers.utils.logging"].disable_progress_bar()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("ray", "mlflow", "alembic", "transformers", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="search-space YAML (see search_spaces/)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set searcher.generations=5 (repeatable)")


def cmd_search(args) -> int:
    from .config import load_config
    from .runner import run_search

    if args.resume:
        from .rundir import read_state

        if args.config:
            raise RayPressError("--resume takes its config from the output folder; drop --config")
        state = read_state(args.resume)
        from .rundir import RESULT_FILE

        if (Path(args.resume) / RESULT_FILE).is_file():
            raise RayPressError(f"the search in {args.resume} has finished (its {RESULT_FILE} is written); nothing to "
                                f"resume: export it with `raypress export {args.resume} --out DIR`")
        for item in args.set:  # only settings that do not change what is searched
            key = item.split("=", 1)[0].strip()
            if not key.startswith(RESUMABLE_KEYS):
                raise RayPressError(f"--set {key} cannot change on --resume (it would change the search); "
                                    f"only {', '.join(k.rstrip('.') for k in RESUMABLE_KEYS)} can")
        cfg = load_config(None, args.set, base=state["config"], base_explicit=state.get("explicit", []))
    else:
        cfg = load_config(args.config, args.set)
    result = run_search(cfg, resume=args.resume)
    print(result.summary())
    print(f"MLflow: {result.tracking_uri}  run {result.run_id}  (view: raypress ui)")
    print(f"outputs: {result.experiment_dir}")
    return 0


RESUMABLE_KEYS = ("evaluator.", "ray_address")


def cmd_build_db(args) -> int:
    from .config import load_config
    from .data import load_tokens, make_splits
    from .families import get_family
    from .models import get_adapter, load_model

    cfg = load_config(args.config, args.set)
    family = get_family(cfg.family)
    if not family.has_database:
        raise RayPressError(f"family '{cfg.family}' needs no database; run `raypress search` directly")
    model, tok = load_model(cfg.model, **family.driver_model(cfg))
    tokens = load_tokens(cfg.data.source, tok, cfg.data.max_tokens)
    splits = make_splits(tokens, cfg.data.seq_len, cfg.data.n_calib, cfg.data.n_eval, cfg.data.seed)
    db = family.build_database(cfg, model, get_adapter(model), splits.calib)
    print(f"database {db!r}" if not hasattr(db, "key") else
          f"database {db.key[:12]} at {db.path} ({db.meta.get('total_bytes', 0) / 2**20:.0f} MiB)")
    return 0


def cmd_plan(args) -> int:
    from .config import load_config
    from .models import meta_model
    from .plan import format_plan, format_resources, plan, resources

    cfg = load_config(args.config, args.set)
    targets = _floats(args.targets, "--targets") if args.targets else None
    searchers = [s.strip() for s in args.searchers.split(",") if s.strip()] if args.searchers else None
    model = meta_model(cfg.model)  # one meta-device build serves the checks and the resources
    report = plan(cfg, targets, searchers, model)
    report["resources"] = resources(cfg, args.cluster, model)
    print(json.dumps(report, indent=1) if args.json else format_plan(report) + "\n\n" +
          format_resources(report["resources"]))
    return 0


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise RayPressError(f"{flag} takes comma-separated numbers, e.g. {flag} 0.5,0.6,0.7; got {text!r}") from None


def cmd_compare(args) -> int:
    from .compare import DEFAULT_SEARCHERS, compare
    from .config import load_config

    cfg = load_config(args.config, args.set)
    searchers = args.searchers.split(",") if args.searchers else DEFAULT_SEARCHERS
    targets = _floats(args.targets, "--targets") if args.targets else None
    compare(cfg, searchers, targets)
    return 0


def cmd_export(args) -> int:
    from .rundir import export_run

    sizes: dict = {}
    out = export_run(args.run_dir, args.out, overwrite=args.overwrite, fmt=args.format, report=sizes,
                     budget=args.budget)
    if sizes:
        q, d = sizes["quantized_bytes_predicted"], sizes["dense_bytes"]
        print(f"{args.format}: {sizes['bytes'] / 2**20:.2f} MiB of safetensors (packed arithmetic: quantized layers "
              f"{q / 2**20:.2f} MiB + dense tensors {d / 2**20:.2f} MiB = {(q + d) / 2**20:.2f} MiB); layers per "
              f"bitwidth {sizes['groups']}")
    total = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    print(f"exported to {out}: {total / 2**20:.1f} MiB of safetensors (load with raypress.rundir.load_any or "
          f"`raypress eval {out}`)")
    return 0


def cmd_eval(args) -> int:
    from .rundir import eval_folder

    if args.n_eval < 1 or args.n_calib < 0 or args.seq_len < 8:
        raise RayPressError(f"--n-eval must be >= 1 (held-out sequences), --n-calib >= 0 and --seq-len >= 8; got "
                            f"{args.n_eval}, {args.n_calib}, {args.seq_len}")
    seen: dict = {}
    ppl = eval_folder(args.path, args.data, args.seq_len, args.n_eval, args.n_calib, args.seed, report=seen)
    print(f"{args.path}: held-out perplexity {ppl:.3f} on {seen['source']}: its last {seen['tokens']:,} tokens "
          f"({seen['windows']} windows of {seen['seq_len']})")
    return 0


def cmd_ui(args) -> int:
    import subprocess

    from .tracking import compare_view_url, tracking_uri

    import socket
    from pathlib import Path

    if not 0 <= args.port <= 65535:
        raise RayPressError(f"--port must be a TCP port in 1..65535 (0: any free one), got {args.port}")
    uri = tracking_uri(args.uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise RayPressError(f"no MLflow store at {uri}; run `raypress search` first, or pass --uri / set "
                            "MLFLOW_TRACKING_URI to the store of your searches")
    try:  # a clear line instead of the server's traceback
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as sk:
            sk.bind((args.host, args.port))
    except OSError as e:
        raise RayPressError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another --port "
                            "(or stop what uses it)") from None
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"raypress: warning: the MLflow UI on {args.host} is reachable from the network and has no "
              "authentication", file=sys.stderr)
    base = f"http://{'localhost' if args.host in ('127.0.0.1', '::1') else args.host}:{args.port}"
    print(f"MLflow UI for {uri} on {base}  (Ctrl-C to stop)")
    for name, exp_id in _experiments(uri):  # the runs table with RayPress's columns, one link per experiment
        print(f"  {name}: {compare_view_url(base, exp_id)}")
    sys.stdout.flush()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", str(args.workers)]
    return subprocess.call(cmd)


def _experiments(uri: str) -> list[tuple[str, str]]:
    """(name, id) of the store's experiments that hold RayPress runs."""
    from mlflow.tracking import MlflowClient

    from .tracking import VIEW_KEY

    return [(e.name, e.experiment_id) for e in MlflowClient(uri).search_experiments()
            if f"mlflow.sharedViewState.{VIEW_KEY}" in e.tags]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raypress", description="Ray-based search for non-uniform LLM compression")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="run a search (EvoPress, TPE, random, or a one-shot schedule)")
    _add_config_args(s)
    s.add_argument("--resume", metavar="RUN_DIR", help="resume an interrupted search from its output folder")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress lines (every generation, or every 10 s)")
    s.set_defaults(func=cmd_search)
    pl = sub.add_parser("plan", help="check a config without building anything: for every (target, searcher), "
                                     "whether the search would start and why not")
    _add_config_args(pl)
    pl.add_argument("--targets", help="comma list of targets to check (default: the config's target)")
    pl.add_argument("--searchers", help="comma list of searchers (default: every searcher)")
    pl.add_argument("--cluster", help="NODESxGPUS[xGPU_GB] to size the resources for (default: this machine)")
    pl.add_argument("--json", action="store_true", help="print JSON: {\"checks\": [{target, searcher, ok, message}], ...}")
    pl.set_defaults(func=cmd_plan)
    b = sub.add_parser("build-db", help="build (or find cached) the level database only")
    _add_config_args(b)
    b.set_defaults(func=cmd_build_db)
    c = sub.add_parser("compare", help="run several searchers/schedules on one database (child MLflow runs)")
    _add_config_args(c)
    c.add_argument("--searchers", help="comma list (default: evopress,tpe,random,uniform,owl,hessian,dp)")
    c.add_argument("--targets", help="comma list of budgets, e.g. 0.5,0.6,0.7 (default: the config's target)")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress lines (every generation, or every 10 s)")
    c.set_defaults(func=cmd_compare)
    e = sub.add_parser("export", help="write a finished search's best config as a Hugging Face folder")
    e.add_argument("run_dir", help="the search's output folder (raypress_runs/<name>-<time>)")
    e.add_argument("--out", required=True, help="folder to create")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--format", default="hf", choices=("hf", "compressed-tensors"),
                   help="hf: a plain Hugging Face folder (default); compressed-tensors: packed integer weights, "
                        "one config group per bitwidth (quant searches; vLLM loads it)")
    e.add_argument("--budget", help="a pareto search (joint family): export the front point with the best held-out "
                                    "perplexity that fits this size, e.g. 60MB, 57.2MiB or 60000000 (bytes of the "
                                    "compressed layers)")
    e.set_defaults(func=cmd_export)
    v = sub.add_parser("eval", help="held-out perplexity of a model: an export, any HF folder, or a model spec",
                       description="Perplexity on the held-out split a search reports: the last n_eval x seq_len "
                                   "tokens of the text, scored as n_eval independent windows (the same numbers as "
                                   "a search's ppl_* with the same data settings).")
    v.add_argument("path", help="an export folder, an HF model folder, or any model spec `search` accepts "
                                "(smollm2-135m, a hub id, random:<arch>)")
    v.add_argument("--data", default="default",
                   help="text to score: default (WikiText-2 beside the checkout, else the Brown corpus), "
                        "text:PATH (a file or glob), brown, wikitext2, c4 or fineweb-edu (default: default)")
    v.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256, as data.seq_len)")
    v.add_argument("--n-eval", type=int, default=32, help="held-out windows (default 32, as data.n_eval)")
    v.add_argument("--n-calib", type=int, default=64,
                   help="calibration windows a search would draw before the held-out region (default 64, as "
                        "data.n_calib); only checks the text is long enough")
    v.add_argument("--seed", type=int, default=0, help="data.seed (default 0)")
    v.set_defaults(func=cmd_eval)
    u = sub.add_parser("ui", help="start the MLflow UI on localhost")
    u.add_argument("--uri", default=None, help="tracking URI (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    u.add_argument("--host", default="127.0.0.1", help="bind address (default localhost only)")
    u.add_argument("--port", type=int, default=5000)
    u.add_argument("--workers", type=int, default=1, help="server processes (default 1: a local viewer)")
    u.set_defaults(func=cmd_ui)
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet()
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        logging.getLogger("raypress.progress").setLevel(logging.WARNING)
    from .interrupt import Interrupted
    from .ray_env import shutdown_own_ray

    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        shutdown_own_ray()
        stop = e if isinstance(e, Interrupted) else Interrupted()
        where = stop.resume_dir or "<output dir>"
        print(f"raypress: interrupted ({stop.signal_name}); nothing final was written: resume with "
              f"`raypress search --resume {where}`", file=sys.stderr)
        return stop.exit_code
    except Exception as e:  # noqa: BLE001 - the CLI boundary: one line for every failure
        shutdown_own_ray()
        err = user_error(e) or os_error(e)
        if err is not None:
            print(f"raypress: error: {err}", file=sys.stderr)
            return 2
        print(f"raypress: error: unexpected {type(e).__name__}: {_first_line(e)} (full traceback in "
              f"{write_crash_log(e, _crash_log_dir(), argv)}; please report it)", file=sys.stderr)
        return 1


def _crash_log_dir():
    """The cache's logs folder; the temp folder when the cache itself cannot be named (torch is what broke)."""
    try:
        from .models import cache_dir

        return cache_dir() / "logs"
    except ImportError:
        import tempfile

        return tempfile.gettempdir()


if __name__ == "__main__":
    sys.exit(main())
