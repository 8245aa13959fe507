"""Quickstart: a small but real EvoPress search on SmolLM2-135M, on CPU, in minutes.

    python jobs/quickstart.py [--set key=value ...]

Prints held-out perplexity of uniform vs searched sparsity and where the MLflow run is.
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raypress.cli import main  # noqa: E402

if __name__ == "__main__":
    # data.source "default": WikiText-2 when shared/ lies beside the checkout, else the Brown corpus
    sys.exit(main(["search", "--config", str(ROOT / "search_spaces/smollm2_sparsity.yaml"), *sys.argv[1:]]))
