"""The tables of bench/joint_budgets.sh, from its run folders: held-out perplexity at equal bytes.

Reads result.json (one-budget runs and compare children) and pareto.json (fronts) below
raypress_runs/joint_budgets, prints markdown tables and writes bench/results/joint_budgets.json:
  1. budgets x methods (joint / quant-only / sparsity-only searches and schedules, one pair everywhere);
  2. the 8-point front next to the same budget searched alone (same seed, and seed 1 for noise);
  3. seed noise of the joint and quant-only EvoPress at one budget (phase seeds).
Phases run at different times add up: entries the folder lacks are kept from the previous JSON and
listed under "carried".
    .venv/bin/python bench/joint_table.py [folder]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

root = Path(sys.argv[1] if len(sys.argv) > 1 else "raypress_runs/joint_budgets")
table: dict[float, dict[str, float]] = {}
alone: dict[str, dict] = {}
front8: list[dict] = []
seeds: dict[str, dict[int, float]] = {}  # "joint 5.25" -> {seed: held-out ppl}
dense = set()


def put(budget: float, column: str, ppl: float) -> None:
    table.setdefault(round(float(budget), 4), {})[column] = round(float(ppl), 2)


for res in sorted(root.glob("*/**/result.json")):
    r = json.loads(res.read_text())
    cfg = json.loads((res.parent / "raypress_state.json").read_text())["config"]
    group = res.relative_to(root).parts[0]
    dense.add(round(r["ppl_dense"], 2))
    if group.startswith("uniform_"):
        (s, b), = cfg["levels"]
        put(cfg["target"], f"pair {s:g} + {b} bit", r["ppl_best"])
    elif group.startswith("dp_"):
        put(cfg["target"], f"{group[3:]}-only {cfg['searcher']['name']}".replace("joint-only", "joint"), r["ppl_best"])
    elif group.startswith("evo_") and "_seed" in group:  # phase seeds: evo_<family>_<budget>_seed<n>
        fam = group.split("_")[1]
        seeds.setdefault(f"{fam} {cfg['target']:g}", {})[cfg["searcher"]["seed"]] = round(r["ppl_best"], 2)
        if cfg["searcher"]["seed"] == 0:  # a budget searched alone: the pareto run's point, had it included it
            put(cfg["target"], f"{fam}{'' if fam == 'joint' else '-only'} evopress", r["ppl_best"])
    elif group.startswith("alone"):
        alone[group] = {"budget": cfg["target"], "seed": cfg["searcher"]["seed"], "ppl": r["ppl_best"],
                        "kl": r["kl_best"], "evaluations": r["evaluations"]}
for pj in sorted(root.glob("*/**/pareto.json")):
    group = pj.relative_to(root).parts[0]
    points = json.loads(pj.read_text())["points"]
    if group == "front8":
        front8 = [{k: p[k] for k in ("budget", "bytes", "ppl", "kl", "uniform_ppl", "front")} for p in points]
    else:  # evo_joint, evo_quant
        for p in points:
            put(p["budget"], f"{group[4:]}{'' if group == 'evo_joint' else '-only'} evopress", p["ppl"])
            seeds.setdefault(f"{group[4:]} {p['budget']:g}", {})[0] = round(p["ppl"], 2)

# phases run on different days add up: what this folder lacks is kept from the previous results file,
# and listed under "carried" (so a number's run is always traceable)
out = Path(__file__).parent / "results" / "joint_budgets.json"
carried: list[str] = []
if out.is_file():
    prev = json.loads(out.read_text())
    for b, row in prev.get("table", {}).items():
        for col, v in row.items():
            if col not in table.get(round(float(b), 4), {}):
                put(float(b), col, v)
                carried.append(f"{b} {col}")
    if not front8 and prev.get("front8"):
        front8, carried = prev["front8"], carried + ["front8"]
    for k, v in prev.get("alone", {}).items():
        if k not in alone:
            alone[k], carried = v, carried + [f"alone {k}"]
    dense |= set(prev.get("dense", []))

cols = sorted({c for r in table.values() for c in r}, key=lambda c: (not c.startswith("joint"), "pair" in c, c))
print("| bits/weight (share of fp16) | " + " | ".join(cols) + " |")
print("|---|" + "---|" * len(cols))
for b in sorted(table):
    vals = [table[b].get(c) for c in cols]
    best = min(v for v in vals if v is not None)
    cells = ["-" if v is None else (f"**{v:.2f}**" if v == best else f"{v:.2f}") for v in vals]
    print(f"| {b:g} ({b / 16:.1%}) | " + " | ".join(cells) + " |")
print(f"dense: {sorted(dense)}")
if front8:
    print("\n| budget | bytes | front8 ppl | uniform mix ppl | on the front |")
    print("|---|---|---|---|---|")
    for p in front8:
        print(f"| {p['budget']:g} | {p['bytes']:,} | {p['ppl']:.2f} | {p['uniform_ppl']:.2f} | {p['front']} |")
for name, a in sorted(alone.items()):
    print(f"{name}: budget {a['budget']:g} seed {a['seed']}: ppl {a['ppl']:.2f} KL {a['kl']:.4f} "
          f"({a['evaluations']} evaluations)")
seeds = {k: v for k, v in seeds.items() if len(v) > 1}  # budgets the seeds phase ran
for key, by_seed in sorted(seeds.items()):
    v = [by_seed[k] for k in sorted(by_seed)]
    mean = sum(v) / len(v)
    sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5
    print(f"{key} bits, EvoPress over seeds {sorted(by_seed)}: ppl {', '.join(f'{x:.2f}' for x in v)}; "
          f"mean {mean:.2f} +- {sd:.2f} (sd)")
if carried:
    print(f"kept from the previous {out.name} (not in {root}): {', '.join(carried)}")
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps({"table": {str(k): v for k, v in sorted(table.items())}, "dense": sorted(dense),
                           "front8": front8, "alone": alone, "carried": carried,
                           "seeds": {k: {str(s): p for s, p in v.items()} for k, v in seeds.items()}}, indent=1))
print("wrote", out)
