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
    wikitext = ROOT.parent / "shared/data/wikitext-2/valid.txt"
    # offline corpus: WikiText-2 beside the checkout when present, else the Brown corpus (npm)
    data = f"text:{wikitext}" if wikitext.is_file() else "brown"
    sys.exit(main(["search", "--config", str(ROOT / "search_spaces/smollm2_sparsity.yaml"),
                   "--set", f"data.source={data}", *sys.argv[1:]]))
