#!/usr/bin/env bash
# Runs the README's commands as a new user would, on a fresh clone, and prints one row per command:
# exit code, wall time and the longest silence between two output lines (the progress promise).
#   git clone <repo> /tmp/x && cd /tmp/x && bash scripts/readme_walk.sh      (2 CPU cores: ~25 min)
# The long search is stopped with Ctrl-C (SIGINT) after STOP_S seconds, as a user would, and resumed
# the same way: 130 is the documented exit of an interrupted, resumable search. Logs: readme_walk/.
set -uo pipefail
cd "$(dirname "$0")/.."
L=readme_walk; mkdir -p "$L"; : > "$L/table.md"
STOP_S=${STOP_S:-150}
echo "| # | command | exit | wall s | longest silence s |" >> "$L/table.md"
echo "|---|---|---|---|---|" >> "$L/table.md"
n=0
# step [--stop SECONDS] COMMAND...: run through bash, time-stamp every output line
step() {
  local stop=""; [ "$1" = --stop ] && { stop=$2; shift 2; }
  n=$((n + 1)); local log="$L/$n.log" t0; t0=$(date +%s.%N)
  echo "== $n: $*"
  if [ -n "$stop" ]; then
    setsid bash -c "$*" > >(while IFS= read -r l; do printf '%s %s\n' "$(date +%s.%N)" "$l"; done > "$log") 2>&1 &
    local pid=$!; sleep "$stop"; kill -INT -- -"$pid" 2>/dev/null; wait "$pid"; rc=$?
  else
    bash -c "$*" > >(while IFS= read -r l; do printf '%s %s\n' "$(date +%s.%N)" "$l"; done > "$log") 2>&1; rc=$?
  fi
  sleep 1
  local t1; t1=$(date +%s.%N)
  gap=$(awk -v t0="$t0" -v t1="$t1" 'BEGIN{p=t0; m=0} {if ($1-p>m) m=$1-p; p=$1} END{if (t1-p>m) m=t1-p; printf "%.0f", m}' "$log")
  printf '| %d | `%s` | %d | %.0f | %s |\n' "$n" "$*" "$rc" "$(echo "$t1 - $t0" | bc)" "$gap" >> "$L/table.md"
  tail -2 "$log" | cut -d' ' -f2- | cut -c1-200
}
export PATH="$PWD/.venv/bin:$PATH"   # what `source .venv/bin/activate` does for the commands below
step "bash scripts/setup.sh && .venv/bin/python jobs/quickstart.py"
run=$(ls -dt raypress_runs/*/ 2>/dev/null | head -1); run=${run%/}
step "raypress plan --config search_spaces/smollm2_depth.yaml --targets 0.25,0.33"
step "raypress plan --config search_spaces/opt66b_sparsity.yaml --cluster 4x8x80"
step "raypress build-db --config search_spaces/smollm2_sparsity.yaml"
step "raypress eval smollm2-135m"
step "raypress export $run --out exports/quickstart"
step "raypress eval exports/quickstart"
step "raypress search --resume $run"   # finished: one line pointing to export
step --stop "$STOP_S" "raypress search --config search_spaces/smollm2_sparsity.yaml --set target=0.7 --set searcher.generations=40"
run2=$(ls -dt raypress_runs/*/ | head -1); run2=${run2%/}
step --stop 90 "raypress search --resume $run2"
(sleep 15; curl -s -o /dev/null -w "raypress ui answered HTTP %{http_code}\n" http://127.0.0.1:5000 > "$L/ui_http.txt") &
step --stop 25 "raypress ui"
cat "$L/ui_http.txt" 2>/dev/null
echo; cat "$L/table.md"
