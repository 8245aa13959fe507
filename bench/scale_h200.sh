#!/usr/bin/env bash
# The scale measurements of issue 15 on one H200 (staged with bench/device_setup.sh), phase by phase so
# that each fits one device call:  bash bench/scale_h200.sh 8b | sgpt66 | 70b | opt66b | ktopk | evo8 | smol
# (T=seconds caps a phase, GENS=generations, PATHS=raw,tune, KTOPK=top-k KL (8b), STATS=1 times the statistics pass (8b),
#  KEEP=1 keeps the 8b database for the next call)
# Random weights of real architectures: time and memory are real, quality numbers are meaningless.
# The device has 64 GiB of disk: ladders are cut to 2-3 stored levels (the plan scales by levels) and
# each phase deletes its database when it is done. Outputs go to $OUT (JSON, logs, measured_costs.json).
set -o pipefail
export PYTHONPATH=/tmp/site:$PWD RAYPRESS_CACHE=/tmp/rpcache PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
O=${OUT:-/tmp/out}; mkdir -p "$O"
[ -f /tmp/valid.txt ] || cp .dev/data/valid.txt /tmp/valid.txt
data=text:/tmp/valid.txt
case "${1:-}" in
  8b)  # every block of Llama-3-8B, EvoPress's stage sizes, database held on the GPU
    timeout ${T:-560} python3 bench/scale.py --model random:llama-3-8b --levels 0.5,0.7 --target 0.6 --data $data \
      --generations ${GENS:-3} --paths ${PATHS:-raw,tune} ${KTOPK:+--kl-topk $KTOPK} ${STATS:+--stats} --cache /tmp/sc8 --out "$O/r8b${PATHS:+-${PATHS//,/-}}.json" 2>&1 | grep -v Warning \
      | tee "$O/r8b${PATHS:+-${PATHS//,/-}}.log" | tail -25
    [ -n "${KEEP:-}" ] || rm -rf /tmp/sc8 ;;  # KEEP=1: the next call reuses the database (same warm machine)
  sgpt66)  # SparseGPT's build cost per OPT-66B block (build only; the plan extrapolates to 64 blocks)
    timeout 130 python3 bench/scale.py --model random:opt-66b@1 --method sparsegpt --levels 0.6,0.7,0.8 \
      --target 0.7 --data $data --paths "" --cache /tmp/sg --out "$O/sgpt66.json" 2>&1 | tail -3
    rm -rf /tmp/sg ;;
  70b)  # bigger than the GPU memory it may use: streamed under a 10 GiB cap
    timeout ${T:-500} python3 bench/scale.py --model random:llama-3.1-70b@8 --mode streamed --max-gpu-memory 10 \
      --levels 0.5,0.7 --target 0.6 --data $data --batch-size 4 --kl-topk 64 --generations ${GENS:-3} --paths raw \
      --cache /tmp/sc70 --out "$O/r70.json" 2>&1 | grep -v Warning | tee "$O/r70.log" | tail -20
    rm -rf /tmp/sc70 ;;
  opt66b)  # the cluster job at true width, BLOCKS (8) of 64 blocks, SEARCHERS (evopress,tpe,hessian)
    RAYPRESS_HOME=/tmp/rph timeout ${T:-560} /usr/bin/time -v python3 jobs/prune_opt66b.py --searchers ${SEARCHERS:-evopress,tpe,hessian} \
      --set model=random:opt-66b@${BLOCKS:-8} --set method=magnitude --set "levels=[0.6, 0.7, 0.8]" --set data.source=$data \
      --set data.n_calib=32 --set data.n_eval=8 --set searcher.generations=4 --set searcher.offspring=8 \
      --set "searcher.stages=[[4096, 2], [16384, 1]]" --set evaluator.mode=resident \
      --set evaluator.gpus_per_evaluator=1 --set database.parallel=false --set database.cache_dir=/tmp/db66 \
      > "$O/opt66b.log" 2>&1; echo "rc $?"
    grep -vE "Warning|it/s\]|s/it\]" "$O/opt66b.log" | grep -E "resources|model param|level data|driver|evaluator|evaluators|time|searcher|evopress|tpe|hessian|held-out|built|Maximum resident|Elapsed|rror" | tail -40
    [ -n "${KEEP:-}" ] || rm -rf /tmp/db66 ;;  # KEEP=1: a second call on the warm machine finds the database built
  ktopk)  # full-vocabulary KL vs top-k KL (KTOPK, default 256) on one database: Llama-3-8B width, BLOCKS blocks
    for k in full ${KTOPK:-256}; do
      [ $k = full ] && topk="" || topk="--kl-topk $k"
      timeout ${T:-250} python3 bench/scale.py --model random:llama-3-8b@${BLOCKS:-8} --levels 0.5,0.6,0.7 --target 0.6 \
        --data $data --generations ${GENS:-4} --paths raw --no-record $topk \
        --cache /tmp/sck --out "$O/ktopk-$k.json" 2>&1 | grep -v Warning | tee "$O/ktopk-$k.log" | tail -6
    done
    rm -rf /tmp/sck ;;
  evo8)  # the original EvoPress code (git clone github.com/IST-DASLab/EvoPress .dev/evopress; carry it) vs RayPress: Llama-3-8B width, BLOCKS blocks, same stages
    timeout ${T:-240} python3 bench/evopress_original.py --evopress .dev/evopress --arch llama-3-8b --blocks ${BLOCKS:-8} \
      --generations ${GENS:-4} --out "$O/evo-orig.json" 2>&1 | grep -vE "it/s\]|s/it\]|Warning" | tee "$O/evo-orig.log" | tail -8
    rm -rf /tmp/evopress-bench
    timeout ${T2:-330} python3 bench/scale.py --model random:llama-3-8b@${BLOCKS:-8} --levels 0.5,0.6,0.7 --target 0.6 \
      --data $data --generations ${GENS:-4} --paths raw,tune --no-record --cache /tmp/sce --out "$O/evo-raypress.json" 2>&1 \
      | grep -v Warning | tee "$O/evo-raypress.log" | tail -14
    rm -rf /tmp/sce ;;
  smol)  # SmolLM2-135M's shape (random weights), the whole model: throughput and where the time goes
    timeout ${T:-200} python3 bench/scale.py --model random:smollm2-135m --levels 0.5,0.6,0.7 --target 0.6 --data $data \
      --generations ${GENS:-8} --paths raw,tune --no-record --cache /tmp/scs --out "$O/smol.json" 2>&1 | grep -v Warning \
      | tee "$O/smol.log" | tail -14
    rm -rf /tmp/scs ;;
  *) echo "usage: $0 8b | sgpt66 | 70b | opt66b | ktopk | evo8 | smol" >&2; exit 2 ;;
esac
cp raypress/measured_costs.json "$O/" 2>/dev/null || true
