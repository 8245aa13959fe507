"""Searcher comparison job: evolution vs TPE vs random vs schedules on one database.

    python jobs/compare_searchers.py [--targets 0.5,0.6,0.7] [--searchers ...] [--set key=value ...]
    ray job submit --working-dir . -- python jobs/compare_searchers.py --targets 0.6,0.7

Prints a table (held-out perplexity, KL, evaluations, wall time) and logs each searcher as a
child MLflow run under one parent, with fitness-vs-evaluations plots.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raypress.cli import main  # noqa: E402
from raypress.data import offline_source  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--config" not in args and "-c" not in args:
        args = ["--config", str(ROOT / "search_spaces/smollm2_sparsity.yaml"), *args]
        if not any(a.startswith("data.source=") for a in args):
            args += ["--set", f"data.source={offline_source(ROOT)}"]
    sys.exit(main(["compare", *args]))
