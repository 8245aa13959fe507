"""The original EvoPress code (IST-DASLab/EvoPress, evo_prune_search.py) on a random-weight model of a
real architecture, for the comparison issue 15 asks for: its evaluations/s against RayPress's
(bench/scale.py) on the same shape, the same stage sizes and the same number of offspring.

    git clone https://github.com/IST-DASLab/EvoPress /path/EvoPress      # (no download here: fetch it)
    python bench/evopress_original.py --evopress /path/EvoPress --arch llama-3-8b --blocks 8 --out evo.json
    python bench/scale.py --model random:llama-3-8b@8 --levels 0.5,0.6,0.7 --target 0.6 ...   # RayPress, same shape

What runs is EvoPress's own code where the time goes: its `selection` (for every candidate:
`load_layers`, which torch.load()s each changed layer's variant from its database folder, then
`compute_kl_div` against full-vocabulary teacher logits kept on the host), called with its
mutation and stage loop from `main` (copied: main also parses arguments and loads datasets,
which need the Hub). The model is saved as a Hugging Face folder and loaded with EvoPress's own
from_pretrained call; its database is written in EvoPress's layout (<db>/<layer>/<level>.pth,
levels -1, 0, 1 = magnitude 50/60/70%, uniform 60% at level 0). Calibration sequences are EvoPress's
default length for the model (min(max_position_embeddings, 8192)); the per-stage token counts are
RayPress's bench defaults (512/2048/8192, 16 offspring, survivors 4/2/1), so both score the same
number of tokens per candidate. The database files were just written: they are read from the page
cache, the best case for EvoPress's per-variant loads.

Random weights: time and memory are real; quality numbers are meaningless.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NOTE = "random weights: time and memory are real; quality numbers are meaningless"


def import_evopress(path: str):
    """EvoPress's evo_prune_search module. Its data loader imports `datasets` at module level (for
    Hub datasets this benchmark does not use): a stub stands in when the package is absent."""
    sys.path.insert(0, str(Path(path).resolve()))
    try:
        import datasets  # noqa: F401
    except ImportError:
        stub = types.ModuleType("datasets")

        def load_dataset(*a, **k):
            raise RuntimeError("no datasets here: bench/evopress_original.py feeds token ids itself")

        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub
    import evo_prune_search

    return evo_prune_search


def save_random_model(arch: str, blocks: int, folder: Path, dtype, device: str) -> dict:
    """A Hugging Face folder of the bundled config `arch` cut to `blocks` blocks, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(ROOT / "raypress" / "model_configs" / f"{arch}.json")
    cfg.num_hidden_layers = blocks
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    model.save_pretrained(folder)
    info = {"params": sum(p.numel() for p in model.parameters()), "max_position_embeddings": cfg.max_position_embeddings,
            "vocab": cfg.vocab_size}
    del model
    torch.cuda.empty_cache()
    return info


def write_database(model, layer_names: list[str], db: Path, sparsities: dict[int, float]) -> int:
    """EvoPress's layout: <db>/<layer>/<level>.pth, one pruned copy of the weight per level."""
    total = 0
    for name in layer_names:
        w = model.get_submodule(name).weight.data
        (db / name).mkdir(parents=True, exist_ok=True)
        for level, s in sparsities.items():
            k = int(w.numel() * s)
            thresh = w.abs().flatten().float().kthvalue(k).values if k else -1
            pruned = torch.where(w.abs() > thresh, w, torch.zeros_like(w)).cpu()
            torch.save(pruned, db / name / f"{level}.pth")
            total += pruned.numel() * pruned.element_size()
    return total


def mutate(parent, layer_names, db: Path, offspring: int):
    """EvoPress's level-switch mutation and duplicate check, as in evo_prune_search.main."""
    out = []
    while len(out) < offspring:
        child = copy.deepcopy(parent)
        for _ in range(min(random.randint(1, 3), random.randint(1, 3))):
            while True:
                d = random.randint(0, len(child) - 1)
                if (db / layer_names[d] / f"{child[d] - 1}.pth").exists():
                    break
            while True:
                u = random.randint(0, len(child) - 1)
                if (db / layer_names[u] / f"{child[u] + 1}.pth").exists():
                    break
            child[d] -= 1
            child[u] += 1
        if child not in out:
            out.append(child)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--evopress", required=True, help="a checkout of IST-DASLab/EvoPress")
    p.add_argument("--arch", default="llama-3-8b", help="a bundled config (raypress/model_configs)")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--work", default="/tmp/evopress-bench")
    p.add_argument("--stages", default="512:4,2048:2,8192:1", help="tokens:survivors per selection step")
    p.add_argument("--offspring", type=int, default=16)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default: EvoPress's, min(max_position_embeddings, 8192)")
    p.add_argument("--calib-seqs", type=int, default=4, help="calibration sequences (each EvoPress's default length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    evo = import_evopress(args.evopress)
    from transformers import AutoModelForCausalLM

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    folder, db = work / "model", work / "db"
    dtype = torch.bfloat16
    t = time.time()
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke test of this script only
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    info = save_random_model(args.arch, args.blocks, folder, dtype, dev)
    save_s = time.time() - t
    # EvoPress's own load (evo_prune_search.main), attention as RayPress's evaluator runs it
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", low_cpu_mem_usage=True,
                                                 torch_dtype=dtype, attn_implementation="sdpa")
    model.config.use_cache = False
    load_s = time.time() - t
    layer_names = sorted(n for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and ".layers." in n)
    t = time.time()
    db_bytes = write_database(model, layer_names, db, {-1: 0.5, 0: 0.6, 1: 0.7})
    db_s = time.time() - t
    seq = args.seq_len or min(info["max_position_embeddings"], 8192)
    calib = [torch.randint(0, info["vocab"], (1, seq)) for _ in range(args.calib_seqs)]
    t = time.time()
    with torch.no_grad():  # EvoPress keeps the teacher's full logits on the host
        target = [model(x.to(dev)).logits.cpu() for x in calib]
    teacher_s = time.time() - t
    stages = [tuple(int(v) for v in s.split(":")) for s in args.stages.split(",")]

    parent = [0] * len(layer_names)
    model.state = [None] * len(layer_names)
    gens = []
    for g in range(args.generations):
        sync()
        t = time.time()
        evo.load_layers(model, layer_names, parent, str(db))
        cands = mutate(parent, layer_names, db, args.offspring)
        evals = tokens = 0
        for survivors, n_tokens in ((s, n) for n, s in stages):
            if survivors == stages[-1][1] and parent not in cands:  # elitist, as main does
                cands.append(parent)
            evals += len(cands)
            tokens += len(cands) * n_tokens
            cands, fits = evo.selection(model=model, layer_names=layer_names, sparse_weights_path=str(db),
                                        candidates=cands, num_survive=survivors, calibration_data=calib,
                                        num_tokens=n_tokens, fitness_fn="kl", target_logits=target)
        parent = cands[0]
        sync()
        dt = time.time() - t
        gens.append({"generation": g, "seconds": dt, "evaluations": evals, "tokens": tokens, "best_kl": fits[0]})
        print(f"gen {g}: {evals} evaluations in {dt:.1f} s ({evals / dt:.2f}/s), best KL {fits[0]:.4g}", flush=True)
    steady = gens[1:] or gens  # generation 0 loads every layer once (start-up), as bench/scale.py skips it
    secs = sum(x["seconds"] for x in steady)
    report = {"note": NOTE, "code": "IST-DASLab/EvoPress evo_prune_search.selection/load_layers/compute_kl_div",
              "arch": args.arch, "blocks": args.blocks, "params": info["params"], "seq_len": seq,
              "stages": stages, "offspring": args.offspring, "layers": len(layer_names),
              "db_bytes": db_bytes, "save_model_s": save_s, "load_model_s": load_s, "db_write_s": db_s,
              "teacher_s": teacher_s, "generations": gens, "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
              "evals_per_s": sum(x["evaluations"] for x in steady) / secs,
              "tokens_per_s": sum(x["tokens"] for x in steady) / secs,
              "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0}
    print(f"EvoPress original, {args.arch}@{args.blocks} ({info['params'] / 1e9:.2f} B params, {NOTE}): "
          f"{report['evals_per_s']:.2f} evals/s, {report['tokens_per_s']:.0f} tok/s over generations 1..{args.generations - 1}; "
          f"database {db_bytes / 2**30:.1f} GiB written in {db_s:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
