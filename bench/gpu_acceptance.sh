#!/usr/bin/env bash
# The acceptance experiments (bench/experiments.py --gpu) on a lent GPU machine, after
# `bench/device_setup.sh install` and `wheels`. Caches, the MLflow store and the corpus live under /tmp, which
# survives back-to-back calls, so a later call reuses databases built by an earlier one.
#
#   bash bench/gpu_acceptance.sh quant depth --targets ...   (arguments go to experiments.py)
set -o pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site RAYPRESS_CACHE=/tmp/rpcache RAYPRESS_HOME=/tmp/rphome PYTHONUNBUFFERED=1
mkdir -p /tmp/data "${OUT:-/tmp/out}"
[ -f .dev/data/valid.txt ] && cp .dev/data/valid.txt /tmp/data/
python3 bench/experiments.py "$@" --gpu --set data.source=text:/tmp/data/valid.txt \
  --set tracking.uri=sqlite:////tmp/rp_mlflow.db 2>&1 \
  | grep --line-buffered -v -e 'Warning' -e 'warnings.warn' | tee -a "${OUT:-/tmp/out}/experiments.log"
