"""Evaluator throughput: candidate evaluations/s, tokens/s per GPU, MFU, Ray Tune overhead,
1 -> 2 evaluator scaling, object-store memory vs evaluators, streamed == resident fitness.

    python bench/throughput.py --model smollm2-135m --data text:PATH        # on a GPU machine
    python bench/throughput.py --model gemma3-270m --generations 6
    python bench/throughput.py --model smollm2-135m --device cpu --generations 2 --quick   # smoke test

What runs (one SparseGPT level database, built once, served from Ray's object store):
  * fitness check: the same configs scored by a resident, a streamed and (GPU) a device_map
    evaluator at the largest stage size -> max relative difference;
  * throughput rows: an EvoPress search (same seed, same candidates) driven through
      raw      a raw pool of evaluator actors (ray.remote(Evaluator)): the searcher hands each idle
               actor the next candidate; no Tune;
      tune     Ray Tune exactly as raypress.tune_loop.run_tune builds it (one candidate per trial);
      tune-b   the same with evaluator.candidates_per_trial=auto (several candidates per trial);
    evaluations/s and tokens/s are taken over generations 1..G-1 (generation 0 carries actor start,
    model load and Tune set-up); Tune overhead = 1 - rate(tune) / rate(raw) on the same evaluators;
  * MFU = 2 * P * tokens/s / (GPUs * bf16 peak), P = parameters of all linear layers + LM head
    (the matmul weights a token passes through), tokens = candidate tokens only (the teacher's dense
    forward, one per stage, is not counted: MFU is a floor);
  * object store: bytes used after the database is put, then while 1 and 2 evaluators hold it.
A 1 -> 2 GPU row needs a 2-GPU machine; without one it says so, and a labeled extra row runs two
evaluators on one GPU (num_gpus=0.5 each). Timings go to this table and --out JSON, never to tests.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raypress.compress import get_method  # noqa: E402
from raypress.compress.swap import WeightSwapApplier  # noqa: E402
from raypress.data import load_tokens, make_splits  # noqa: E402
from raypress.database import build_database  # noqa: E402
from raypress.evaluator import Evaluator, EvaluatorSpec  # noqa: E402
from raypress.families import dense_levels  # noqa: E402
from raypress.models import get_adapter, load_model, resolve_model  # noqa: E402
from raypress.search.evolution import EvoPressSearcher  # noqa: E402
from raypress.space import SearchSpace  # noqa: E402

# dense bf16 tensor-core peaks (datasheets, SXM parts), TFLOP/s
PEAKS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}

# architectures for --random-init (throughput only: no weights needed)
RANDOM_CONFIGS = {
    "gemma3-270m": ("gemma3_text", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048,
                                        num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=256, sliding_window=512, max_position_embeddings=32768,
                                        query_pre_attn_scalar=256, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5)),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def random_model(name: str, root: Path) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    mtype, kw = RANDOM_CONFIGS[name]
    out = root / f"random-{name}"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(mtype, **kw), dtype=torch.float32)
        model.save_pretrained(str(out))
    return str(out)


def gpu_info():
    if not torch.cuda.is_available():
        return "cpu", float("nan"), 0
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAKS.items() if k in name), float("nan"))
    return name, peak, torch.cuda.device_count()


def store_bytes(ray) -> int:
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    addr = ray.get_runtime_context().gcs_address
    return int(get_memory_info_reply(get_state_from_address(addr)).store_stats.object_store_bytes_used)


def matmul_params(model) -> int:
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    return n


def make_searcher(space, args, stages):
    return EvoPressSearcher(space, generations=args.generations, offspring=args.offspring, stages=stages,
                            max_mutations=3, seed=args.seed, three_way=0.25)


def rates(history) -> dict:
    """Evaluations/s and tokens/s over generations 1..G-1 (the searcher's own clock)."""
    h = history
    if len(h) < 2:
        h0 = {"evaluations": 0, "tokens": 0, "wall_time": 0.0}
        h = [h0] + list(h)
    dt = h[-1]["wall_time"] - h[0]["wall_time"]
    ev = h[-1]["evaluations"] - h[0]["evaluations"]
    tok = h[-1]["tokens"] - h[0]["tokens"]
    return {"evals_per_s": ev / dt, "tokens_per_s": tok / dt, "evaluations": ev, "seconds": dt,
            "best_fitness": h[-1].get("best_fitness")}


# ----------------------------------------------------------------------------- drivers
def drive_raw(ray, actors, searcher) -> None:
    """A raw actor pool: each idle actor gets the searcher's next candidate."""
    from ray.tune.search import Searcher

    idle, inflight, n, finished = list(actors), {}, 0, False
    while True:
        while idle and not finished:
            tid = f"raw{n}"
            cfg = searcher.suggest(tid)
            if cfg == Searcher.FINISHED:
                finished = True
                break
            if cfg is None:
                break
            n += 1
            a = idle.pop()
            inflight[a.score_config.remote(cfg)] = (a, tid)
        if not inflight:
            if finished:
                return
            raise RuntimeError("searcher waits for results but none is in flight")
        done, _ = ray.wait(list(inflight), num_returns=1)
        a, tid = inflight.pop(done[0])
        searcher.on_trial_complete(tid, ray.get(done[0]))
        idle.append(a)


def start_actors(ray, spec, k: int, gpu_frac: float, cpus: int):
    remote = ray.remote(Evaluator).options(num_cpus=cpus, num_gpus=gpu_frac, max_concurrency=1)
    actors = [remote.remote(spec) for _ in range(k)]
    ray.get([a.ping.remote() for a in actors])
    return actors


def run_raw(ray, spec, space, args, stages, k, gpu_frac):
    actors = start_actors(ray, spec, k, gpu_frac, args.cpus_per_evaluator)
    try:
        mem = store_bytes(ray)
        s = make_searcher(space, args, stages)
        drive_raw(ray, actors, s)
        stats = ray.get([a.get_stats.remote() for a in actors])
        memory = ray.get(actors[0].memory.remote())
    finally:
        for a in actors:
            ray.kill(a)
    return {**rates(s.history), "store_bytes": mem, "stats": stats, "memory": memory}


def run_tune(ray, spec, space, args, stages, k, gpu_frac, batched: bool, storage: Path):
    from ray import tune

    from raypress import tune_loop
    from raypress.config import load_config
    from raypress.pool import EvaluatorPool
    from raypress.search import get_searcher

    mem = {"bytes": 0, "at": 0.0}

    class StoreProbe(tune.Callback):
        # a probe is a GCS query of every raylet (~6 ms on 2 busy cores) inside Tune's loop, counted as
        # Tune overhead: at most one per 5 s
        def on_trial_complete(self, iteration, trials, trial, **info):
            if time.time() - mem["at"] >= 5.0:
                mem["bytes"], mem["at"] = max(mem["bytes"], store_bytes(ray)), time.time()

    cfg = load_config(None, [f"evaluator.num_evaluators={k}", f"searcher.offspring={args.offspring}",
                             f"evaluator.candidates_per_trial={'auto' if batched else 1}"])
    with EvaluatorPool(spec, k, {"cpu": args.cpus_per_evaluator, "gpu": gpu_frac}) as pool:
        s = make_searcher(space, args, stages)
        t0 = time.time()
        tune_loop.run_tune(cfg, get_searcher("evopress"), pool, s, space, [StoreProbe()],
                           f"bench-{k}-{int(batched)}-{int(t0)}")
    return {**rates(s.history), "store_bytes": mem["bytes"], "wall_s": time.time() - t0}


def fitness_check(ray, spec_of, space, args, modes, n_tokens):
    """The same configs (uniform + mutated) scored by each mode's evaluator actor."""
    rng = np.random.default_rng(args.seed)
    u = space.uniform()
    configs = [u] + [space.mutate(u, rng, n_switches=4, three_way=0.25) for _ in range(args.check_configs - 1)]
    out = {}
    for mode in modes:
        a = start_actors(ray, spec_of(mode), 1, 1.0 if torch.cuda.is_available() else 0, args.cpus_per_evaluator)[0]
        try:
            out[mode] = [ray.get(a.score.remote(c, n_tokens, args.seed, 0, 9))["fitness"] for c in configs]
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
            out[mode] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
        finally:
            ray.kill(a)
    return out


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-init", action="store_true",
                   help=f"random weights in the --model alias's architecture ({', '.join(RANDOM_CONFIGS)})")
    p.add_argument("--data", default="random", help="text:PATH, brown, or random (uniform token ids)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--n-eval", type=int, default=8)
    p.add_argument("--target", type=float, default=0.6)
    p.add_argument("--stages", default="256:4,1024:1",
                   help="EvoPress stages tokens:survivors,...; several sets separated by ';'")
    p.add_argument("--offspring", type=int, default=12)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--kl-topk", type=int, default=None)
    p.add_argument("--modes", default="resident,streamed,device_map", help="evaluator modes to bench")
    p.add_argument("--paths", default="raw,tune,tune-b")
    p.add_argument("--check-configs", type=int, default=4)
    p.add_argument("--cpus-per-evaluator", type=int, default=2)
    p.add_argument("--cache", default=None, help="database cache root (default: a temp dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fitness check + resident raw/tune rows only (smoke test)")
    p.add_argument("--out", default=None, help="write all numbers as JSON here")
    args = p.parse_args(argv)

    import ray

    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    gpu_name, peak, n_gpus = gpu_info()
    device = "cuda" if args.device == "auto" and n_gpus else ("cpu" if args.device == "auto" else args.device)
    work = Path(args.cache or tempfile.mkdtemp(prefix="raypress-bench-"))
    report = {"gpu": gpu_name, "gpus": n_gpus, "peak_tflops": peak, "args": vars(args), "rows": [], "checks": {}}

    # model, tokens, database ------------------------------------------------------------------
    t = time.time()
    spec_model = random_model(args.model, work) if args.random_init else resolve_model(args.model)
    label = f"{args.model}{' (random init)' if args.random_init else ''}"
    model, tok = load_model(spec_model, tokenizer=args.data != "random")
    adapter = get_adapter(model)
    P = matmul_params(model)
    log(f"{label}: {type(model).__name__}, {adapter.num_blocks()} blocks, {P / 1e6:.1f}M matmul params "
        f"({time.time() - t:.1f} s)")
    if args.data == "random":
        rng = np.random.default_rng(args.seed)
        tokens = rng.integers(0, model.config.vocab_size, args.seq_len * (args.n_calib + args.n_eval + 4))
    else:
        tokens = load_tokens(args.data, tok, args.seq_len * (args.n_calib + args.n_eval) * 4)
    splits = make_splits(tokens, args.seq_len, args.n_calib, args.n_eval, args.seed)
    t = time.time()
    db = build_database(spec_model, model, adapter, get_method("sparsegpt"), splits.calib,
                        cache_root=work / "db", device=device, progress=False)
    log(f"database {db.total_bytes / 2**20:.0f} MiB ({len(db.layers)} layers) in {time.time() - t:.1f} s")
    space = SearchSpace.for_database(db, args.target)
    del model

    ctx = ray.init(address="local", include_dashboard=False, logging_level="ERROR",
                   runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                       [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}})
    base_store = store_bytes(ray)
    refs = db.put()
    calib_ref, eval_ref = ray.put(splits.calib), ray.put(splits.eval)
    db_store = store_bytes(ray)
    report["store_db_bytes"] = db_store - base_store
    log(f"object store: {db_store / 2**20:.0f} MiB after putting the database ({db.total_bytes / 2**20:.0f} MiB on disk)")

    def spec_of(mode):
        return EvaluatorSpec(model=spec_model, applier=WeightSwapApplier(refs, dense_levels(db)), calib=calib_ref,
                             eval=eval_ref, device=device, dtype=args.dtype, batch_size=args.batch_size,
                             kl_topk=args.kl_topk, mode=mode)

    modes = [m for m in args.modes.split(",") if m and (m != "device_map" or device.startswith("cuda"))]
    row_modes = ["resident"] if args.quick else modes
    stage_sets = [[tuple(int(x) for x in st.split(":")) for st in ss.split(",")] for ss in args.stages.split(";")]
    gfrac = 1.0 if device.startswith("cuda") else 0.0
    storage = work / "tune"

    # streamed / device_map == resident ----------------------------------------------------------
    check_tokens = max(st[-1][0] for st in stage_sets)
    if len(modes) > 1:
        t = time.time()
        fit = fitness_check(ray, spec_of, space, args, modes, check_tokens)
        ref = fit.get("resident")
        for m, v in fit.items():
            if isinstance(v, list) and isinstance(ref, list):
                rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(v, ref))
                report["checks"][m] = {"fitness": v, "max_rel_diff_vs_resident": rel}
            else:
                report["checks"][m] = {"fitness": v}
        log(f"fitness check ({check_tokens} tokens, {args.check_configs} configs) in {time.time() - t:.1f} s")

    # throughput rows ----------------------------------------------------------------------------
    def row(mode, k, gpus, path, stages, note=""):
        r = {"model": label, "gpu": gpu_name, "mode": mode, "evaluators": k, "gpus_used": gpus, "path": path,
             "stages": " ".join(f"{a}:{b}" for a, b in stages), "note": note}
        report["rows"].append(r)
        return r

    def fill(r, res):
        r.update(res)
        ngpu = max(r["gpus_used"], 1)
        r["tokens_per_s_per_gpu"] = res["tokens_per_s"] / ngpu
        r["mfu"] = 2 * P * res["tokens_per_s"] / (ngpu * peak * 1e12) if math.isfinite(peak) else float("nan")
        log(f"  {r['mode']:<10} k={r['evaluators']} {r['path']:<6} {r['stages']:<14} {res['evals_per_s']:8.1f} evals/s "
            f"{res['tokens_per_s']:10.0f} tok/s  store {res['store_bytes'] / 2**20:.0f} MiB {r['note']}")

    def blank(r, note=None):  # a row that did not run
        r.update({k: float("nan") for k in ("evals_per_s", "tokens_per_s", "tokens_per_s_per_gpu", "mfu",
                                            "store_bytes")}, **({"note": note} if note else {}))

    paths = ["raw", "tune"] if args.quick else [p_ for p_ in args.paths.split(",") if p_]
    for stages in stage_sets:
        for mode in row_modes:
            for path in (paths if mode == "resident" else ["raw"]):
                r = row(mode, 1, int(gfrac > 0), path, stages)
                res = (run_raw(ray, spec_of(mode), space, args, stages, 1, gfrac) if path == "raw" else
                       run_tune(ray, spec_of(mode), space, args, stages, 1, gfrac, path == "tune-b", storage))
                fill(r, res)
        if args.quick:
            continue
        # scaling 1 -> 2 evaluators
        for path in [p_ for p_ in paths if p_ in ("raw", "tune-b")]:
            if n_gpus >= 2:
                fill(row("resident", 2, 2, path, stages),
                     run_raw(ray, spec_of("resident"), space, args, stages, 2, 1.0) if path == "raw" else
                     run_tune(ray, spec_of("resident"), space, args, stages, 2, 1.0, True, storage))
            else:
                r = row("resident", 2, 2, path, stages, "not run: no 2-GPU machine lent")
                blank(r)
            if gfrac > 0:  # extra, labeled: two evaluators sharing one GPU
                r = row("resident", 2, 1, path, stages, "simulated: 2 evaluators on 1 GPU")
                try:
                    fill(r, run_raw(ray, spec_of("resident"), space, args, stages, 2, 0.5) if path == "raw" else
                         run_tune(ray, spec_of("resident"), space, args, stages, 2, 0.5, True, storage))
                except Exception as e:  # noqa: BLE001 - e.g. two teachers' logits do not fit one GPU
                    blank(r, f"{r['note']}: failed ({str(e).splitlines()[-1][:60]})")

    # derived: Tune overhead, scaling efficiency ----------------------------------------------------
    def find(**kw):
        return next((r for r in report["rows"] if all(r.get(k) == v for k, v in kw.items())), None)

    for r in report["rows"]:
        raw = find(mode=r["mode"], evaluators=r["evaluators"], gpus_used=r["gpus_used"], path="raw",
                   stages=r["stages"])
        r["tune_overhead_pct"] = (100 * (1 - r["evals_per_s"] / raw["evals_per_s"])
                                  if r["path"] != "raw" and raw and raw["evals_per_s"] > 0 else float("nan"))
        one = find(mode="resident", evaluators=1, path=r["path"], stages=r["stages"])
        if r["evaluators"] == 2 and one and one["evals_per_s"] > 0:
            r["scaling_eff"] = r["evals_per_s"] / (2 * one["evals_per_s"])
    ray.shutdown()

    # table -----------------------------------------------------------------------------------------
    print()
    print(f"device: {gpu_name} x{n_gpus} | model: {label}, {P / 1e6:.0f}M matmul params | bf16 peak "
          f"{peak} TFLOP/s | database {db.total_bytes / 2**20:.0f} MiB, object store with it "
          f"{report['store_db_bytes'] / 2**20:.0f} MiB")
    hdr = (f"{'model':<22} {'GPU':<22} {'mode':<10} {'path':<6} {'evals':>5} {'stage tokens':<13} {'evals/s':>8} "
           f"{'tokens/s/GPU':>12} {'MFU':>6} {'Tune ovh':>8} {'scal.eff':>8} {'store MiB':>9}  note")
    print(hdr)
    print("-" * len(hdr))
    for r in report["rows"]:
        def f(v, fmt):
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)
        print(f"{r['model'][:22]:<22} {r['gpu'][:22]:<22} {r['mode']:<10} {r['path']:<6} {r['evaluators']:>5} "
              f"{r['stages']:<13} {f(r['evals_per_s'], '8.1f'):>8} {f(r['tokens_per_s_per_gpu'], '12.0f'):>12} "
              f"{f(100 * r['mfu'] if r['mfu'] == r['mfu'] else float('nan'), '5.2f'):>5}% "
              f"{f(r.get('tune_overhead_pct'), '7.1f'):>7}% {f(r.get('scaling_eff'), '8.2f'):>8} "
              f"{f(r['store_bytes'] / 2**20 if r['store_bytes'] == r['store_bytes'] else float('nan'), '9.0f'):>9}  "
              f"{r['note']}")
    if report["checks"]:
        print(f"\nfitness at {check_tokens} tokens, {args.check_configs} configs (uniform + mutated):")
        for m, c in report["checks"].items():
            fit = c["fitness"]
            shown = ", ".join(f"{x:.6f}" for x in fit) if isinstance(fit, list) else fit
            rel = c.get("max_rel_diff_vs_resident")
            print(f"  {m:<10} {shown}" + ("" if rel is None else f"   max rel diff vs resident {rel:.2e}"))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
