"""Serve model folders with vLLM on a GPU and measure what a deployment sees: load, generate, decode
tokens/s (batch 1 and batch 32), the weights' GPU memory, and perplexity from vLLM's own prompt
logprobs on held-out text. Each model runs in its own process (vLLM holds the GPU until exit).

    python bench/vllm_serve.py --model fp16=DIR --model w8=DIR --model mix=DIR --model w4=DIR \\
        --text /tmp/valid.txt --out vllm.json

A folder is a plain Hugging Face model or a `raypress export --format compressed-tensors` folder.
Prints a table and writes every number as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def one(path: str, text: str, seq_len: int, n_eval: int, new_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(model=path, dtype="float16", gpu_memory_utilization=0.4, max_model_len=max(2048, seq_len + 8),
              seed=0)
    load_s = time.time() - t0
    tok = llm.get_tokenizer()
    ids = tok(Path(text).read_text())["input_ids"]
    # generation works: greedy continuation of a fixed prompt
    sample = llm.generate(["The history of the city"], SamplingParams(max_tokens=24, temperature=0))[0].outputs[0].text
    out = {"load_s": load_s, "sample": sample}
    for batch in (1, 32):
        prompts = [{"prompt_token_ids": ids[i * 64:(i + 1) * 64]} for i in range(batch)]
        sp = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        llm.generate(prompts, sp)  # warm-up (graphs, caches)
        t = time.time()
        res = llm.generate(prompts, sp)
        dt = time.time() - t
        out[f"decode_tok_s_b{batch}"] = sum(len(r.outputs[0].token_ids) for r in res) / dt
    # perplexity from vLLM's prompt logprobs over n_eval held-out windows (from the end of the text)
    chunks = [ids[len(ids) - (i + 1) * seq_len:len(ids) - i * seq_len] for i in range(n_eval)]
    res = llm.generate([{"prompt_token_ids": c} for c in chunks],
                       SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))
    nll, n = 0.0, 0
    for r, c in zip(res, chunks):
        for pos, lp in enumerate(r.prompt_logprobs[1:], start=1):
            nll -= lp[c[pos]].logprob
            n += 1
    out["ppl"] = math.exp(nll / n)
    out["eval_tokens"] = n
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--text", required=True, help="held-out text file (perplexity and prompts)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child: one model, JSON on the last line
    a = ap.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a.text, a.seq_len, a.n_eval, a.new_tokens)))
        return 0
    rows = {}
    for spec in a.model:
        name, path = spec.split("=", 1)
        p = subprocess.run([sys.executable, __file__, "--one", path, "--text", a.text, "--seq-len", str(a.seq_len),
                            "--n-eval", str(a.n_eval), "--new-tokens", str(a.new_tokens)],
                           capture_output=True, text=True, env=os.environ)
        log = p.stdout + p.stderr
        if p.returncode != 0:
            err = [l for l in log.splitlines() if "Error" in l or "error" in l][-3:]
            rows[name] = {"error": " | ".join(err) or log[-500:]}
        else:
            rows[name] = json.loads(p.stdout.strip().splitlines()[-1])
            m = re.search(r"Model loading took ([\d.]+) ?GiB", log)
            rows[name]["weights_gib"] = float(m.group(1)) if m else None
        rows[name]["bytes"] = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        print(name, json.dumps(rows[name])[:300], flush=True)
    print(f"\n{'model':8} {'MiB files':>9} {'GiB GPU':>8} {'tok/s b1':>9} {'tok/s b32':>10} {'ppl':>8}")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:8} {r['bytes'] / 2**20:9.1f}  failed: {r['error'][:200]}")
            continue
        print(f"{name:8} {r['bytes'] / 2**20:9.1f} {r['weights_gib'] or float('nan'):8.3f} "
              f"{r['decode_tok_s_b1']:9.1f} {r['decode_tok_s_b32']:10.1f} {r['ppl']:8.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
