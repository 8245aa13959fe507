"""Width family speed/memory benchmark: dense vs physically smaller (exported) SmolLM2.

    python bench/width_speed.py                       # CPU here; the lead runs it on the GPU
    python bench/width_speed.py --device cuda --dtype bfloat16 --keep 0.8 0.7

Per model: parameters, weight memory, prefill throughput (batch × seq forward, tokens/s),
decode throughput (greedy generate with KV cache, new tokens/s), peak memory (CUDA: max
weights + the most allocated during one prefill + one decode run; nan on CPU) and held-out perplexity. Timings are taken
round-robin over the models (best of --repeats rounds) so a noisy host hurts all alike. The pruned models use the
most uniform exactly-feasible config (`SearchSpace.uniform()`: importance masks + least-squares
reformation, no search), so perplexities are a floor for what a search finds — the point here is
speed. Exported models are loaded back with `load_width_model` (what a user deploys) and checked
against the in-place masked model (WidthApplier) on one batch.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raypress import data as rp_data  # noqa: E402
from raypress.compress import width as W  # noqa: E402
from raypress.models import get_adapter, load_model  # noqa: E402
from raypress.space import SearchSpace  # noqa: E402

# SmolLM2-135M's architecture, for --random-init (speed only: no weights needed, e.g. on a GPU box)
SMOLLM2_CONFIG = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                      max_position_embeddings=8192, rms_norm_eps=1e-5)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def prefill_time(model, x, device):
    sync(device)
    t0 = time.perf_counter()
    model(x, use_cache=False)
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def decode_time(model, x, device, new_tokens):
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    sync(device)
    t0 = time.perf_counter()
    model.generate(x, **kw)
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def perplexity(model, ids, device, bs=4):
    nll, n = 0.0, 0
    for i in range(0, len(ids), bs):
        x = torch.as_tensor(ids[i:i + bs], device=device)
        lo = model(x, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(lo.reshape(-1, lo.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        n += x[:, 1:].numel()
    return float(np.exp(nll / n))


def measure_all(models: dict, args, splits, device) -> list[dict]:
    """Round-robin timing (every model once per round, best round kept): fair under a noisy host."""
    xp = torch.as_tensor(splits.eval[: args.batch, : args.seq], device=device)
    xd = torch.as_tensor(splits.eval[: args.decode_batch, : args.prompt], device=device)
    for m in models.values():  # warm-up at the measured shapes
        prefill_time(m, xp, device)
        decode_time(m, xd, device, 2)
    pre = {k: float("inf") for k in models}
    dec = {k: float("inf") for k in models}
    for _ in range(args.repeats):
        for k, m in models.items():
            pre[k] = min(pre[k], prefill_time(m, xp, device))
            dec[k] = min(dec[k], decode_time(m, xd, device, args.new_tokens))
    rows = []
    for k, m in models.items():
        params = list({id(p): p for p in m.parameters()}.values())
        wmib = sum(p.numel() * p.element_size() for p in params) / 2**20
        peak = float("nan")
        if str(device).startswith("cuda"):  # this model's weights + its working memory (others stay resident)
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            prefill_time(m, xp, device)
            decode_time(m, xd, device, args.new_tokens)
            peak = wmib + (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append(dict(model=k, params_M=sum(p.numel() for p in params) / 1e6, weights_MiB=wmib,
                         prefill_tok_s=xp.numel() / pre[k], decode_tok_s=xd.shape[0] * args.new_tokens / dec[k],
                         peak_MiB=peak, ppl=perplexity(m, splits.eval, device)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--keep", type=float, nargs="+", default=[0.8, 0.7], help="kept fractions of block params")
    ap.add_argument("--data", default=f"text:{ROOT.parent / 'shared/data/wikitext-2/valid.txt'}")
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="prefill batch")
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reform", default="lstsq", choices=W.REFORMS)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    ap.add_argument("--random-init", action="store_true",
                    help="random SmolLM2-shaped model and random tokens: timings/memory only (ppl meaningless)")
    args = ap.parse_args(argv)
    device = args.device
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    torch.manual_seed(0)

    # calibration + Hessians + database on the float32 model (then cast for timing)
    if args.random_init:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_CONFIG)).to(device).eval()
        args.model = "random-init SmolLM2-135M shape"
        toks = np.random.default_rng(0).integers(0, SMOLLM2_CONFIG["vocab_size"], (args.n_calib + 16) * args.seq * 2)
    else:
        model, tok = load_model(args.model, dtype=torch.float32, device=device)
        toks = rp_data.load_tokens(args.data, tok, max_tokens=(args.n_calib + 16) * args.seq * 2)
    ad = get_adapter(model)
    splits = rp_data.make_splits(toks, args.seq, args.n_calib, max(args.batch, 8), 0)
    t0 = time.perf_counter()
    lv = W.width_levels(ad)
    H = W.width_hessians(model, ad, splits.calib, device=device)
    db = W.build_width_database(model, ad, H, lv, reform=args.reform)
    del H
    print(f"# width database: {len(lv.units)} units, attention mode {lv.attn_mode}, exact costs {lv.exact}, "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    model = model.to(dtype)
    models = {"dense": model}
    checks = {}
    applier = W.WidthApplier(db)
    applier.attach(model, ad)
    with tempfile.TemporaryDirectory() as tmp:
        for keep in args.keep:
            target, exact = W.width_target(lv, 1 - keep)
            space = SearchSpace(layers=lv.names, n_params=[u.n_params for u in lv.units],
                                level_values=lv.values(), target=target)
            cfg = space.uniform()
            applier.apply(cfg)
            with torch.no_grad():
                x = torch.as_tensor(splits.eval[:2], device=device)
                masked = model(x, use_cache=False).logits.float()
            out = W.export_width(model, ad, cfg, Path(tmp) / f"keep{keep}", applier=applier)
            applier.reset()
            small = W.load_width_model(out, dtype=dtype, device=device)
            with torch.no_grad():
                diff = (small(x, use_cache=False).logits.float() - masked).abs().max().item()
            name = f"width keep {1 - target:.3f}"
            models[name] = small
            checks[name] = (W.kept_params(lv, cfg) / lv.total_params(), diff, exact)
    gc.collect()
    rows = measure_all(models, args, splits, device)
    d = rows[0]
    hdr = ("model", "params_M", "weights_MiB", "prefill_tok_s", "decode_tok_s", "peak_MiB", "ppl")
    print(f"\n{args.model} on {device} ({str(dtype).replace('torch.', '')}); prefill {args.batch}x{args.seq}, "
          f"decode batch {args.decode_batch} x {args.new_tokens} new tokens, best of {args.repeats}")
    print("| " + " | ".join(hdr) + " | prefill x | decode x |")
    print("|" + "---|" * (len(hdr) + 2))
    for r in rows:
        cells = [r["model"]] + [f"{r[k]:.1f}" if k != "ppl" else f"{r[k]:.2f}" for k in hdr[1:]]
        cells += [f"{r['prefill_tok_s'] / d['prefill_tok_s']:.2f}", f"{r['decode_tok_s'] / d['decode_tok_s']:.2f}"]
        print("| " + " | ".join(cells) + " |")
    for name, (kept, diff, exact) in checks.items():
        print(f"# {name}: kept block params {kept:.3f}{'' if exact else ' (nearest reachable)'}, "
              f"max |exported - masked| logits {diff:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        main()
