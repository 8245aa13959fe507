"""Scale benchmark: one model at true width on this machine's GPU, from database build to search
throughput, with where the time goes. Its per-block costs feed `raypress plan`'s time estimates.

    # 8B, every block, EvoPress's stage sizes (database held on the GPU):
    python bench/scale.py --model random:llama-3-8b --levels 0.3,0.5,0.7 --target 0.5 --out r8b.json
    # bigger than the GPU memory it may use: streamed, 16 GiB cap
    python bench/scale.py --model random:llama-3.1-70b@8 --mode streamed --max-gpu-memory 16 --levels 0.5,0.7
    # smoke test on CPU
    python bench/scale.py --model random:smollm2-135m@2 --device cpu --generations 2 --seq-len 64 \\
        --stages 64:2,128:1 --paths raw --no-record

Rows (same searcher, same seed, same candidates):
  raw   a raw pool of evaluator actors (ray.remote(Evaluator)), the EvoPress searcher driving it;
  tune  Ray Tune exactly as a search runs it (evaluator.candidates_per_trial=auto);
evaluations/s and tokens/s over generations 1..G-1 (generation 0 carries start-up). MFU = 2·P·tokens/s /
the GPU's bf16 dense peak (790 TFLOP/s for the H200, as issue 15 defines it), P = matmul weights a token
passes (linear layers + LM head), tokens = candidate tokens only (the teacher's dense forward is
overhead, not counted). Evaluators run with profile=True (the GPU is synchronized between phases), so
their time splits exactly into swap / teacher / forward / KL; "driver" is what the evaluator did not
spend (searcher, Ray, Python between evaluations); Tune overhead = 1 - rate(tune) / rate(raw).

Random weights (random:<arch>): time and memory are real, quality numbers are meaningless.
Each run records its per-block costs in raypress/measured_costs.json (--no-record: not).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from throughput import drive_raw, rates, run_tune  # noqa: E402

from raypress import costs  # noqa: E402
from raypress.compress.swap import WeightSwapApplier  # noqa: E402
from raypress.config import load_config  # noqa: E402
from raypress.data import load_tokens, make_splits, offline_source  # noqa: E402
from raypress.evaluator import PHASES, Evaluator, EvaluatorSpec  # noqa: E402
from raypress.families import get_family  # noqa: E402
from raypress.models import RANDOM_NOTE, get_adapter, is_random, load_model  # noqa: E402
from raypress.placement import serve  # noqa: E402
from raypress.search.evolution import EvoPressSearcher  # noqa: E402
from raypress.space import SearchSpace  # noqa: E402

H200_PEAK = 790.0  # TFLOP/s, bf16, as issue 15 defines MFU on the H200


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def peak_tflops() -> tuple[str, float]:
    if not torch.cuda.is_available():
        return "cpu", float("nan")
    name = torch.cuda.get_device_name(0)
    return name, costs.gpu_peak_tflops(name, default=H200_PEAK if "H200" in name else float("nan"))


def rss_peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:llama-3-8b")
    p.add_argument("--method", default="magnitude")
    p.add_argument("--levels", default="0.3,0.5,0.7")
    p.add_argument("--target", type=float, default=0.5)
    p.add_argument("--data", default=None, help="text:PATH (default: the offline corpus)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--stages", default="512:4,2048:2,8192:1", help="EvoPress stages tokens:survivors")
    p.add_argument("--offspring", type=int, default=16)
    p.add_argument("--generations", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    p.add_argument("--kl-topk", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--mode", default="resident", help="evaluator.mode")
    p.add_argument("--placement", default="auto", help="database.placement")
    p.add_argument("--max-gpu-memory", type=float, default=None, help="evaluator.max_gpu_memory (GiB)")
    p.add_argument("--paths", default="raw,tune")
    p.add_argument("--cache", default=None, help="database cache root (default: a temp dir)")
    p.add_argument("--no-record", action="store_true", help="do not write raypress/measured_costs.json")
    p.add_argument("--stats", action="store_true", help="also time the dense-model statistics pass (OWL / Hessian "
                   "scheduler: calibrate.schedule_inputs without DP's level errors) after the build")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write every number as JSON here")
    p.add_argument("--record-from", default=None, metavar="REPORT.json",
                   help="record the costs of a saved --out report (one cut off by a time limit) and exit")
    args = p.parse_args(argv)
    if args.record_from:
        return record_from(args.record_from)

    import ray

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    gpu, peak = peak_tflops()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    stages = [tuple(int(x) for x in s.split(":")) for s in args.stages.split(",")]
    n_calib = max(-(-t // args.seq_len) for t, _ in stages) * 2
    work = Path(args.cache or tempfile.mkdtemp(prefix="raypress-scale-"))
    cfg = load_config(None, [f"model={args.model}", f"method={args.method}", f"levels=[{args.levels}]",
                             f"target={args.target}", f"searcher.stages={[list(x) for x in stages]}",
                             f"searcher.offspring={args.offspring}", f"searcher.generations={args.generations}",
                             f"data.source={args.data or offline_source(ROOT)}",
                             f"data.seq_len={args.seq_len}", f"data.n_calib={n_calib}", "data.n_eval=2",
                             f"database.device={'cuda' if device.startswith('cuda') else 'cpu'}",
                             f"database.cache_dir={work / 'db'}", f"database.placement={args.placement}"])
    report = {"gpu": gpu, "peak_tflops": peak, "args": vars(args), "rows": [],
              **({"note": RANDOM_NOTE} if is_random(args.model) else {})}

    # database: streamed build, block by block -----------------------------------------------------
    family = get_family(cfg.family)
    t = time.time()
    model, tok = load_model(cfg.model, **family.driver_model(cfg))
    adapter = get_adapter(model)
    tokens = load_tokens(cfg.data.source, tok, None)
    splits = make_splits(tokens, cfg.data.seq_len, cfg.data.n_calib, cfg.data.n_eval, cfg.data.seed)
    arch = costs.arch_of(model, adapter)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    db = family.build_database(cfg, model, adapter, splits.calib)
    build_s = time.time() - t
    n_levels = len(db.meta["level_values_list"])
    report["build"] = {"seconds": build_s, "blocks": arch["blocks"], "levels": n_levels, "method": args.method,
                       "s_per_block": build_s / arch["blocks"], "database_bytes": db.total_bytes,
                       "driver_rss_peak_bytes": rss_peak(), "device": cfg.database.device,
                       "gpu_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
                       "cached": args.cache is not None and build_s < 2.0}  # a reused --cache folder
    log(f"{args.model}: {arch['blocks']} blocks, {arch['matmul_params'] / 1e9:.2f} B matmul params; database "
        f"{db.total_bytes / 2**30:.1f} GiB ({n_levels} levels) in {build_s:.1f} s ({build_s / arch['blocks']:.2f} s/block)")
    space = SearchSpace.for_database(db, args.target)
    if args.stats:  # what `raypress plan` estimates as the statistics pass (costs.record_statistics)
        from raypress.calibrate import schedule_inputs

        t = time.time()
        schedule_inputs(model, adapter, splits.calib, space, None, device=cfg.database.device, progress=False)
        report["stats"] = {"seconds": time.time() - t, "calib_tokens": int(splits.calib.size)}
        log(f"statistics pass: {report['stats']['seconds']:.1f} s ({report['stats']['seconds'] / arch['blocks']:.2f} "
            f"s/block, {splits.calib.size:,} calibration tokens)")
    del model
    log(f"driver RSS peak {rss_peak() / 2**30:.1f} GiB after the build")

    # evaluators ---------------------------------------------------------------------------------
    paths = [x for x in args.paths.split(",") if x]
    transport = None
    if paths:  # a build-only run (--paths "") needs no Ray
        ray.init(address="local", include_dashboard=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                     [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}})
        refs, transport = serve(db, args.placement)
        spec = EvaluatorSpec(model=cfg.model, applier=WeightSwapApplier(refs, family.dense_levels(db)),
                             calib=ray.put(splits.calib), eval=ray.put(splits.eval), device=device, dtype="auto",
                             batch_size=args.batch_size, kl_topk=args.kl_topk, mode=args.mode,
                             db_placement=args.placement, max_gpu_memory=args.max_gpu_memory, profile=True)
    gfrac = 1.0 if device.startswith("cuda") else 0.0
    bargs = argparse.Namespace(generations=args.generations, offspring=args.offspring, seed=args.seed,
                               cpus_per_evaluator=2)
    P = arch["matmul_params"]

    report["arch"] = arch

    def save():  # after every phase: a run cut off by a time limit keeps what it measured (and records it)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        if not args.no_record and device.startswith("cuda"):
            record(report)

    save()

    def searcher():
        return EvoPressSearcher(space, generations=args.generations, offspring=args.offspring, stages=stages,
                                max_mutations=3, seed=args.seed, three_way=0.25)

    def mfu(tok_s):
        return 2 * P * tok_s / (peak * 1e12) if peak == peak else float("nan")

    for path in paths:
        row = {"path": path, "mode": args.mode, "transport": transport}
        if path == "raw":
            actor = ray.remote(Evaluator).options(num_cpus=2, num_gpus=gfrac).remote(spec)
            t = time.time()
            ray.get(actor.ping.remote())
            row["evaluator_start_s"] = time.time() - t
            s = searcher()
            t = time.time()
            drive_raw(ray, [actor], s)
            row["wall_s"] = time.time() - t
            st, mem = ray.get([actor.get_stats.remote(), actor.memory.remote()])
            ray.kill(actor)
            row.update(rates(s.history))
            row["hold"] = st["hold"]
            busy = st["seconds"]
            row["shares"] = {k[:-2]: st[k] / row["wall_s"] for k in PHASES}
            row["shares"]["other_in_evaluator"] = (busy - sum(st[k] for k in PHASES)) / row["wall_s"]
            row["shares"]["driver"] = 1 - busy / row["wall_s"]
            row["forward_mfu"] = mfu(st["tokens"] / st["forward_s"]) if st["forward_s"] else float("nan")
            row["gpu_peak_bytes"] = mem["cuda_peak"]
            row["gpu_params_bytes"] = mem["params"]
            row["evaluator_host_rss_peak"] = mem["host_rss_peak"]
            row["held_bytes"] = mem["held_bytes"]
            row["evaluator_stats"] = st
        else:
            storage = work / "tune"
            row.update(run_tune(ray, spec, space, bargs, stages, 1, gfrac, True, storage))
        row["mfu"] = mfu(row["tokens_per_s"])
        report["rows"].append(row)
        save()
        log(f"  {path:<5} {row['evals_per_s']:7.2f} evals/s {row['tokens_per_s']:9.0f} tok/s  MFU {100 * row['mfu']:.1f}%")
    raw = next((r for r in report["rows"] if r["path"] == "raw"), None)
    tune_row = next((r for r in report["rows"] if r["path"] == "tune"), None)
    if raw and tune_row and raw["evals_per_s"]:
        tune_row["tune_overhead_pct"] = 100 * (1 - tune_row["evals_per_s"] / raw["evals_per_s"])
    if paths:
        ray.shutdown()

    # table ----------------------------------------------------------------------------------------
    print()
    if not report["rows"]:
        args.paths = ""
    print(f"{args.model} · {gpu} · {args.mode} · database {db.total_bytes / 2**30:.1f} GiB, transport "
          f"{transport}, held {raw['hold'] if raw else '?'} · stages {args.stages} x {args.offspring} offspring"
          + (f" · {RANDOM_NOTE}" if is_random(args.model) else ""))
    hdr = (f"{'path':<5} {'evals/s':>8} {'tokens/s':>9} {'MFU':>6} {'fwd MFU':>7} {'swap':>6} {'teacher':>7} "
           f"{'forward':>7} {'KL':>6} {'driver':>6} {'Tune ovh':>8} {'GPU peak':>9}")
    print(hdr)
    print("-" * len(hdr))
    pct = lambda v: "-" if v is None or v != v else f"{100 * v:5.1f}%"  # noqa: E731
    for r in report["rows"]:
        sh = r.get("shares", {})
        print(f"{r['path']:<5} {r['evals_per_s']:8.2f} {r['tokens_per_s']:9.0f} {pct(r['mfu']):>6} "
              f"{pct(r.get('forward_mfu')):>7} {pct(sh.get('swap')):>6} {pct(sh.get('teacher')):>7} "
              f"{pct(sh.get('forward')):>7} {pct(sh.get('kl')):>6} {pct(sh.get('driver')):>6} "
              f"{'-' if 'tune_overhead_pct' not in r else format(r['tune_overhead_pct'], '7.1f') + '%':>8} "
              f"{r.get('gpu_peak_bytes', 0) / 2**30:8.1f}G")
        if "evaluator_host_rss_peak" in r:
            print(f"      evaluator: host RSS peak {r['evaluator_host_rss_peak'] / 2**30:.1f} GiB, variants held "
                  f"({r['hold']}) {r['held_bytes'] / 2**30:.1f} GiB, start {r['evaluator_start_s']:.1f} s, "
                  f"teacher pages computed {r['evaluator_stats'].get('teacher_pages', '?')} "
                  f"({r['evaluator_stats']['teacher_forwards']} forwards)")
    b = report["build"]
    print(f"build: {b['seconds']:.1f} s ({b['s_per_block']:.2f} s/block, {b['levels']} levels, {b['method']} on "
          f"{b['device']}), driver RSS peak {b['driver_rss_peak_bytes'] / 2**30:.2f} GiB, build GPU peak "
          f"{b['gpu_peak_bytes'] / 2**30:.2f} GiB{' (from cache)' if b['cached'] else ''}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


def record(report: dict) -> None:
    """The report's per-block costs into raypress/measured_costs.json (the planner's numbers); a build
    read from a --cache folder measured nothing."""
    b, args = report["build"], report["args"]
    if "stats" in report:
        e = costs.record_statistics(report["arch"], gpu=report["gpu"], seconds=report["stats"]["seconds"],
                                    calib_tokens=report["stats"]["calib_tokens"], source=f"bench/scale.py {args['model']}")
        log(f"recorded the statistics pass in {costs.PATH.name}: {e['key']}")
    if b["cached"]:
        return
    raw = next((r for r in report["rows"] if r["path"] == "raw"), None)
    entry = costs.record(report["arch"], gpu=report["gpu"], method=args["method"], levels=b["levels"],
                         build_s=b["seconds"], build_device=b["device"], mode=args["mode"],
                         evals_per_s=raw and raw["evals_per_s"], tokens_per_s=raw and raw["tokens_per_s"],
                         stages=args["stages"], offspring=args["offspring"])
    log(f"recorded per-block costs in {costs.PATH.name}: {entry['key']}")


def record_from(path: str) -> int:
    """Record a saved report; reports written before the architecture was saved in them get it from
    the model spec (a random: model builds in seconds, without its weights' memory)."""
    report = json.loads(Path(path).read_text())
    if "build" not in report:
        sys.exit(f"{path}: the run stopped before its database build finished: nothing to record")
    if "arch" not in report:
        cfg = load_config(None, [f"model={report['args']['model']}", f"method={report['args']['method']}"])
        model, _ = load_model(cfg.model, **get_family(cfg.family).driver_model(cfg))
        report["arch"] = costs.arch_of(model, get_adapter(model))
    record(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
