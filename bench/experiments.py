"""Acceptance experiments on SmolLM2-135M: every family, searcher vs baselines, one table each.

    python bench/experiments.py [sparsity quant depth width] [--gpu] [--targets 0.7,0.6]
                                [--searchers evopress,dp] [--set key=value ...]

Each part is `raypress compare` on one database (child MLflow runs under one parent). On a GPU
(`--gpu`) the selection uses EvoPress-sized token stages; on CPU the YAML's smaller stages.
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raypress.cli import _quiet  # noqa: E402
from raypress.compare import compare, format_table  # noqa: E402
from raypress.config import load_config  # noqa: E402
from raypress.data import offline_source  # noqa: E402

PARTS = {
    # name: (yaml, [(extra overrides, searchers, targets)])
    "sparsity": ("smollm2_sparsity.yaml", [([], ["evopress", "tpe", "random", "uniform", "owl", "hessian", "dp"],
                                            [0.5, 0.6, 0.7])]),
    "quant": ("smollm2_quant.yaml", [([], ["evopress", "uniform"], [3.0, 2.5])]),
    "depth": ("smollm2_depth.yaml", [([], ["evopress", "shortgpt"], [0.25])]),
    "width": ("smollm2_width.yaml", [(["method=none"], ["uniform"], [0.2, 0.3]),
                                     ([], ["evopress", "uniform"], [0.2, 0.3])]),
}
# on a GPU a candidate scores in milliseconds: batch candidates per Tune trial (auto: EvoPress's
# offspring, random's likewise; 1 for TPE, which should see every result before its next suggestion)
GPU = ["evaluator.device=cuda", "evaluator.candidates_per_trial=auto", "searcher.generations=60", "searcher.offspring=16",
       "searcher.stages=[[512, 4], [2048, 2], [8192, 1]]", "data.n_calib=128", "data.n_eval=64"]


def main() -> int:
    _quiet()
    ap = argparse.ArgumentParser()
    ap.add_argument("parts", nargs="*", default=list(PARTS))
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--targets", help="comma list overriding every part's targets")
    ap.add_argument("--searchers", help="comma list: run only these of each part's searchers")
    args = ap.parse_args()
    data = f"data.source={offline_source(ROOT)}"
    all_rows = []
    for part in args.parts:
        yaml, runs = PARTS[part]
        for extra, searchers, targets in runs:
            t0 = time.time()
            cfg = load_config(ROOT / "search_spaces" / yaml, [data, *(GPU if args.gpu else []), *extra, *args.set])
            if args.targets:
                targets = [float(t) for t in args.targets.split(",")]
            if args.searchers:
                # in the order given: cheap schedules first when a run may be cut short
                searchers = [s for s in args.searchers.split(",") if s in searchers]
                if not searchers:
                    continue
            rows = compare(cfg, searchers, targets)
            for r in rows:
                r["part"] = f"{part}{'/' + cfg.method}"
            all_rows += rows
            print(f"[{part} {' '.join(extra)}] {time.time() - t0:.0f}s", flush=True)
    print("\n=== all experiments ===")
    for part in dict.fromkeys(r["part"] for r in all_rows):
        print(f"\n{part}")
        print(format_table([r for r in all_rows if r["part"] == part]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
