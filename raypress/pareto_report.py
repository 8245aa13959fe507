"""A pareto search's front: every budget's elite and uniform mix on held-out text, pareto.json, a plot.

A point is one budget's searched config: its size (the mean level value; for the joint family also
bytes, 8 bits a byte over the compressed layers' weights), the KL the search ranked it by, and its
held-out KL and perplexity, next to the uniform mix at the same budget. `front` marks the points no
other point beats on both size and held-out perplexity (smaller is better on both).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

FILE = "pareto.json"


def non_dominated(points: list[dict], size: str = "value", quality: str = "ppl") -> list[bool]:
    """For each point: True when no other point is at most as large and strictly better, or smaller
    and at least as good."""
    out = []
    for p in points:
        beaten = any((q[size] <= p[size] and q[quality] < p[quality]) or (q[size] < p[size] and q[quality] <= p[quality])
                     for q in points if q is not p)
        out.append(not beaten)
    return out


def report_front(run, searcher, family, tracker, out_dir: Path, title: str) -> list[dict]:
    """Measure, write and log the front of a finished pareto `searcher` (run: the final evaluator)."""
    from .search.pareto import at_target

    progress = logging.getLogger("raypress.progress")
    space = searcher.space
    n_params = space.total_params
    points = []
    for p in searcher.front():
        sp = at_target(space, p["budget"])
        uniform = sp.uniform()
        ppl, kl = run("heldout", p["config"])
        ppl_u, kl_u = run("heldout", uniform)
        value = float(sp.mean_value(p["config"]))
        point = {"budget": p["budget"], "value": value, "value_kind": family.value_kind, "search_kl": p["search_kl"],
                 "kl": kl, "ppl": ppl, "uniform_kl": kl_u, "uniform_ppl": ppl_u,
                 "config": {l: int(k) for l, k in p["config"].items()}}
        if family.value_kind == "bits_per_weight":
            point["bytes"] = int(round(value * n_params / 8))
        points.append(point)
        progress.info("  front: %s %g  held-out perplexity %.2f (uniform %.2f)", family.value_kind, value, ppl, ppl_u)
    for p, keep in zip(points, non_dominated(points)):
        p["front"] = keep
    doc = {"value_kind": family.value_kind, "compressed_params": n_params, "points": points}
    (Path(out_dir) / FILE).write_text(json.dumps(doc, indent=1))
    tracker.log_json(doc, FILE)
    for p in points:
        tracker.log_metrics({"front_ppl": p["ppl"], "front_uniform_ppl": p["uniform_ppl"], "front_kl": p["kl"],
                             "front_value": p["value"]}, step=points.index(p))
    cols = ["budget", "value", "bytes", "ppl", "uniform_ppl", "kl", "uniform_kl", "search_kl", "front"]
    tracker.log_table({c: [p.get(c) for p in points] for c in cols}, "pareto_table.json")
    tracker.log_figure(front_plot(points, family.value_kind, title, n_params), "pareto_front.png")
    return points


def front_plot(points: list[dict], value_kind: str, title: str, n_params: int | None = None):
    """Held-out perplexity vs size: the searched points (front joined), and the uniform mix at each budget;
    a joint front also gets its size in MB on a second axis (n_params weights at `value` bits each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    pts = sorted(points, key=lambda p: p["value"])
    ax.plot([p["value"] for p in pts if p["front"]], [p["ppl"] for p in pts if p["front"]], marker="o", label="searched (front)")
    off = [p for p in pts if not p["front"]]
    if off:
        ax.scatter([p["value"] for p in off], [p["ppl"] for p in off], marker="x", label="searched (dominated)")
    ax.plot([p["value"] for p in pts], [p["uniform_ppl"] for p in pts], linestyle="--", marker=".", label="uniform mix")
    ax.set_xlabel({"bits_per_weight": "stored bits per weight"}.get(value_kind, f"mean {value_kind}"))
    ax.set_ylabel("held-out perplexity")
    if value_kind == "bits_per_weight" and n_params:
        mb = n_params / 8e6  # MB per bit per weight
        top = ax.secondary_xaxis("top", functions=(lambda b: b * mb, lambda m: m / mb))
        top.set_xlabel("MB of the compressed layers")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
