#!/usr/bin/env bash
# The CPU-sized reproduction of Eshratifar et al. (AAAI-19), docs/joint.md "CPU reproduction":
# trains plain transfer (beta 0), plain Reptile (beta 1) and Reptile + transfer (beta 0.5) with
# recipes/joint-cpu-repro.toml on two cores (one thread each), then evaluates all three on the
# same seeded episodes of the 36 val + test classes.
#
#   scripts/joint_cpu_repro.sh [OUT]          (default runs/joint-cpu-repro)
#   EPISODES=100 KEY_EPISODES=600 MTL_EDGE=.venv/bin/mtl-edge scripts/joint_cpu_repro.sh
#
# Writes OUT/<method>/ (run folders), OUT/grid-*.json and OUT/summary.txt (the tables, times).
set -euo pipefail
OUT=${1:-runs/joint-cpu-repro}
EPISODES=${EPISODES:-100}        # per setting of the full 3 x 3 grid
KEY_EPISODES=${KEY_EPISODES:-600} # 5-way 1-shot, the setting where the methods are closest
MTL_EDGE=${MTL_EDGE:-.venv/bin/mtl-edge}
RECIPE=${RECIPE:-joint-cpu-repro}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
t0=$(date +%s)

train() {  # name beta [--set ...]: skipped when OUT/name already holds a trained run
  [ -f "$OUT/$1/last.pt" ] && return 0
  "$MTL_EDGE" train joint --recipe "$RECIPE" --out "$OUT/$1" --set "joint.beta=$2" "${@:3}" \
    > "$OUT/$1.log" 2>&1
}
grid() {  # out ways shots episodes
  "$MTL_EDGE" train evaluate --grid --split val+test --seed 0 --out "$OUT/$1" \
    --ways "$2" --shots "$3" --episodes "$4" \
    --checkpoint "$OUT/transfer/last.pt" \
    --checkpoint "$OUT/reptile/last.pt" \
    --checkpoint "$OUT/reptile-transfer/last.pt"
}

(train transfer 0.0 && train reptile 1.0) &
first=$!
train reptile-transfer 0.5
wait "$first"
t1=$(date +%s)

(grid grid-5-20way.json 5,20 1,5,100 "$EPISODES" > "$OUT/grid-5-20way.txt" \
  && grid grid-5way-1shot.json 5 1 "$KEY_EPISODES" > "$OUT/grid-5way-1shot.txt") &
first=$!
grid grid-35way.json 35 1,5,100 "$EPISODES" > "$OUT/grid-35way.txt"
wait "$first"
t2=$(date +%s)

{
  cat "$OUT/grid-5-20way.txt" "$OUT/grid-35way.txt" "$OUT/grid-5way-1shot.txt"
  echo "training $((t1 - t0)) s, evaluation $((t2 - t1)) s, total $((t2 - t0)) s"
} | tee "$OUT/summary.txt"
