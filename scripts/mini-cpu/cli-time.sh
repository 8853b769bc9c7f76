#!/usr/bin/env bash
# Wall time of the CLI with process start: `mtl-edge enroll` of 5 classes x 5 JPEGs and
# `mtl-edge predict` of one JPEG, RUNS times each, INT8 and FP32 (issue 16, must 7).
#
#   scripts/mini-cpu/cli-time.sh [OUT] [RUNS]
#
# OUT (default runs/cli-time) gets cli-time.md; the bundle is $MTL_EDGE_BUNDLE or the built-in
# one. Photos: the first 5 classes x 5 JPEGs of $MTL_EDGE_DATA/miniimagenet/test (default
# ../shared/data); the predicted photo is the 10th of the first class. One untimed run of each
# command first writes the bytecode and warms the file cache, as on a device where pip compiled
# the installed wheel (PYTHONDONTWRITEBYTECODE is unset for these commands).
set -euo pipefail
unset PYTHONDONTWRITEBYTECODE
OUT=${1:-runs/cli-time}
RUNS=${2:-5}
MINI=${MTL_EDGE_DATA:-../shared/data}/miniimagenet/test
CLI=${CLI:-mtl-edge}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$OUT"
for c in $(ls "$MINI" | head -5); do
  mkdir -p "$work/enroll/$c"
  for f in $(ls "$MINI/$c" | head -5); do cp "$MINI/$c/$f" "$work/enroll/$c/"; done
done
query=$MINI/$(ls "$MINI" | head -1)/$(ls "$MINI/$(ls "$MINI" | head -1)" | sed -n 10p)

median() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
seconds() { /usr/bin/time -f %e -o "$work/t" "$@" > /dev/null 2>&1; cat "$work/t"; }
{
  echo "# CLI wall time, process start included"
  echo
  echo "- $(date -u +%FT%TZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- bundle: ${MTL_EDGE_BUNDLE:-built-in}; $RUNS runs each after one untimed run (bytecode written, files cached); \`/usr/bin/time -f %e\`"
  echo
  echo "| command | precision | runs (s) | median s |"
  echo "|---|---|---|---|"
  for precision in int8 fp32; do
    enroll=(enroll --gallery "$work/g.gal" --from-folder "$work/enroll" --precision "$precision")
    rm -f "$work/g.gal"*
    $CLI "${enroll[@]}" > /dev/null 2>&1  # warm-up
    $CLI predict --gallery "$work/g.gal" --precision "$precision" "$query" > /dev/null 2>&1
    times=()
    for _ in $(seq "$RUNS"); do
      rm -f "$work/g.gal"*
      times+=("$(seconds $CLI "${enroll[@]}")")
    done
    echo "| enroll 5 x 5 JPEGs | $precision | ${times[*]} | $(median "${times[@]}") |"
    times=()
    for _ in $(seq "$RUNS"); do
      times+=("$(seconds $CLI predict --gallery "$work/g.gal" --precision "$precision" "$query")")
    done
    echo "| predict 1 JPEG | $precision | ${times[*]} | $(median "${times[@]}") |"
  done
} | tee "$OUT/cli-time.md"
