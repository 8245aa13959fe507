"""The table of bench/joint_budgets.sh: held-out perplexity at equal bytes, from its run folders.

Reads result.json (one-budget runs, compare children) and pareto.json (the EvoPress fronts) below
raypress_runs/joint_budgets, prints a markdown table (rows: budgets; columns: methods) and writes
bench/results/joint_budgets.json.   .venv/bin/python bench/joint_table.py [folder]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "raypress_runs/joint_budgets")
rows: dict[float, dict[str, float]] = {}
evals: dict[str, int] = {}


def put(budget: float, column: str, ppl: float) -> None:
    rows.setdefault(round(budget, 4), {})[column] = ppl


for res in sorted(root.glob("*/**/result.json")):
    r = json.loads(res.read_text())
    state = json.loads((res.parent / "raypress_state.json").read_text())
    cfg = state["config"]
    group = res.relative_to(root).parts[0]  # dp_joint, uniform_4.0_s0.3125_b4, evo_quant, ...
    budget = float(cfg["target"])
    if group.startswith("uniform_"):
        (s, b), = cfg["levels"]
        put(budget, f"pair {s:g}+{b}b", r["ppl_best"])
    elif group.startswith("dp_"):
        kind = group[3:]
        put(budget, f"{kind} {cfg['searcher']['name']}", r["ppl_best"])
    put(budget, "dense", r["ppl_dense"])
for pj in sorted(root.glob("*/**/pareto.json")):
    group = pj.relative_to(root).parts[0]
    for p in json.loads(pj.read_text())["points"]:
        put(p["budget"], f"{group[4:]} evopress", p["ppl"])
    evals[group] = json.loads(next(pj.parent.glob("result.json")).read_text())["evaluations"] if list(
        pj.parent.glob("result.json")) else None

cols = sorted({c for r in rows.values() for c in r if c != "dense"})
print("| bits/weight (share of fp16) | " + " | ".join(cols) + " |")
print("|---|" + "---|" * len(cols))
for b in sorted(rows):
    r = rows[b]
    vals = [r.get(c) for c in cols]
    best = min(v for v in vals if v is not None)
    cells = [("-" if v is None else (f"**{v:.2f}**" if v == best else f"{v:.2f}")) for v in vals]
    print(f"| {b:g} ({b / 16:.1%}) | " + " | ".join(cells) + " |")
print("dense:", sorted({r.get('dense') for r in rows.values() if r.get('dense')}), "evaluations:", evals)
out = Path(__file__).parent / "results" / "joint_budgets.json"
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps({"rows": {str(k): v for k, v in sorted(rows.items())}, "evaluations": evals}, indent=1))
print("wrote", out)
