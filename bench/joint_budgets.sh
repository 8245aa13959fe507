#!/usr/bin/env bash
# Issue 19's comparison at equal bytes on SmolLM2-135M (held-out WikiText-2 perplexity): joint search vs
# quant-only and sparsity-only searches vs one (sparsity, bits) pair everywhere, at three budgets in
# stored bits per weight of the linear layers (3.125 = 19.5%, 4.0 = 25%, 5.25 = 32.8% of fp16).
# Every budget is the exact size of a uniform pair, so "uniform" is compared at the same bytes.
#   bash bench/joint_budgets.sh [phase...]   phases: uniform dp (= dp_joint dp_quant dp_sparse) evo (= evo_joint evo_quant) front8 seeds   (default: uniform dp evo; ~70 min on 2 cores)
# then: .venv/bin/python bench/joint_table.py  (the table, and bench/results/joint_budgets.json)
set -euo pipefail
cd "$(dirname "$0")/.."
RP=${RP:-.venv/bin/raypress}
OUT=${OUT:-raypress_runs/joint_budgets}; mkdir -p "$OUT"
Y=search_spaces/smollm2_joint.yaml
BUDGETS=${BUDGETS:-3.125,4.0,5.25}
GENS=${GENS:-12}
# the search settings shared by every EvoPress run (joint and quant-only): cheap stages for 2 CPU cores
ONE=(--set "searcher.init=[uniform, dp]" --set searcher.generations=$GENS --set searcher.offspring=8
     --set "searcher.stages=[[512, 2], [2048, 1]]")   # one budget's evolution
EVO=("${ONE[@]}" --set searcher.name=pareto --set "searcher.budgets=[${BUDGETS}]" --set target=${BUDGETS##*,})
# joint: the default ladder plus 5- and 6-bit dense and the 25% pair 31%+4 bit
JOINT="[[0,16],[0,8],[0.25,8],[0.5,8],[0,6],[0,5],[0,4],[0.25,4],[0.625,8],[0.3125,4],[0.25,3],[0,3],[0.5,4],[0.75,8],[0.5,3],[0.625,4],[0.625,3],[0.75,4],[0.75,3]]"
QUANT="[[0,16],[0,8],[0,6],[0,5],[0,4],[0,3],[0,2]]"
SPARSE="[[0,16],[0.5,16],[0.6,16],[0.7,16],[0.75,16],[0.8,16],[0.85,16],[0.9,16]]"
phases=${*:-uniform dp evo}

run() { local name=$1; shift; echo "== $name: raypress $*"; /usr/bin/time -f "$name %e s" "$RP" "$@" --set output=$OUT/$name \
        --set tracking.experiment=joint_budgets > "$OUT/$name.log" 2>&1 || { tail -3 "$OUT/$name.log"; return 1; }; tail -1 "$OUT/$name.log"; }

for p in $phases; do case $p in
  uniform)  # one pair everywhere, at exactly each budget (one-level ladders)
    for pair in ${PAIRS:-3.125:17/32,4 3.125:3/8,3 3.125:49/64,8 4.0:5/16,4 4.0:21/32,8 5.25:0,5 5.25:1/2,8 5.25:1/3,6}; do
      t=${pair%%:*}; sb=${pair#*:}; s=$(python3 -c "from fractions import Fraction as F; print(float(F('${sb%%,*}')))"); b=${sb##*,}
      run "uniform_${t}_s${s}_b${b}" search --config $Y --set "levels=[[$s,$b]]" --set target=$t --set searcher.name=uniform
    done ;;
  dp) bash "$0" dp_joint dp_quant dp_sparse ;;
  dp_joint) run dp_joint compare --config $Y --set "levels=$JOINT" --searchers dp,uniform --targets $BUDGETS ;;
  dp_quant) run dp_quant compare --config $Y --set "levels=$QUANT" --searchers dp,uniform --targets $BUDGETS ;;
  dp_sparse) run dp_sparse compare --config $Y --set "levels=$SPARSE" --searchers dp --targets $BUDGETS ;;
  evo) bash "$0" evo_joint evo_quant ;;
  evo_joint) run evo_joint search --config $Y --set "levels=$JOINT" "${EVO[@]}" ;;
  evo_quant) run evo_quant search --config $Y --set "levels=$QUANT" "${EVO[@]}" ;;
  front8)  # an 8-point front in one run, then one of its budgets searched alone (same seed; seed 1: noise)
    F=(--set "searcher.init=[uniform, dp]" --set searcher.generations=${GENS8:-4} --set searcher.offspring=8
       --set "searcher.stages=[[512, 2], [2048, 1]]" --set "levels=$JOINT")
    run front8 search --config $Y "${F[@]}" --set searcher.name=pareto --set target=5.25 \
      --set "searcher.budgets=[3.125, 3.5, 3.75, 4.0, 4.25, 4.5, 4.75, 5.25]"
    run alone4.5 search --config $Y "${F[@]}" --set target=4.5
    run alone4.5_seed1 search --config $Y "${F[@]}" --set target=4.5 --set searcher.seed=1 ;;
  seeds)  # seed noise of both searches at one budget (seed 0 is the pareto run's point: same seed, same result);
           # SEED_BUDGET=3.5 SEEDS=0: one more budget searched alone (PAIRS="3.5:7/16,4 3.5:1/4,3 3.5:23/32,8" uniform)
    SB=${SEED_BUDGET:-5.25}
    for seed in ${SEEDS:-1 2}; do
      for fam in joint quant; do
        L=$JOINT; [ $fam = quant ] && L=$QUANT
        run "evo_${fam}_${SB}_seed${seed}" search --config $Y --set "levels=$L" "${ONE[@]}" --set searcher.name=evopress \
          --set target=$SB --set searcher.seed=$seed
      done
    done ;;
  *) echo "unknown phase $p (uniform dp evo front8 seeds)" >&2; exit 2 ;;
esac; done
