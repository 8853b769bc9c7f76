#!/usr/bin/env bash
# The mini-cpu model from scratch to the built-in bundle on this machine (docs/mini-cpu-notes.md).
#
#   scripts/mini-cpu/run.sh [RUNS] [RESULTS]
#
# RUNS (default runs/mini-cpu) gets the run folders and the bundle; RESULTS (default
# bench/results/<today>-cpu-mini) the reports people read. Data: $MTL_EDGE_DATA (default
# ../shared/data) with miniimagenet/{train,val,test}. Budgets: PRE_BUDGET (76m) and META_BUDGET
# (22m) of wall time for the two training stages; every later step is evaluation. NOTE: a line
# for the model card (for example the training times).
# To skip training, set PRETRAINED=FILE (a pre-training checkpoint) or META=FILE; PRETRAINED_BY
# (the command that made PRETRAINED) then goes into commands.txt and the card, not run.
set -euo pipefail
RUNS=${1:-runs/mini-cpu}
RESULTS=${2:-bench/results/$(date -u +%F)-cpu-mini}
DATA=${MTL_EDGE_DATA:-../shared/data}
MINI=$DATA/miniimagenet
CLI=${CLI:-mtl-edge}
mkdir -p "$RUNS" "$RESULTS"
# record CMD...: the command in RESULTS/commands.txt (and the model card), named `mtl-edge`
# whatever $CLI is.
record() { local line="$*"; line=${line/#"$CLI"/mtl-edge}; echo "$line" >> "$RESULTS/commands.txt"; echo "+ $line" >&2; }
log() { record "$@"; "$@"; }
# timed NAME CMD...: `log`, with /usr/bin/time's report in RESULTS/time-NAME.txt.
timed() { local name=$1; shift; record "$@"; /usr/bin/time -v -o "$RESULTS/time-$name.txt" "$@"; }
: > "$RESULTS/commands.txt"

if [ -n "${PRETRAINED_BY:-}" ]; then record "$PRETRAINED_BY"; fi
if [ -z "${META:-}" ]; then
  if [ -z "${PRETRAINED:-}" ]; then
    timed pretrain $CLI train pretrain --recipe mini-cpu --out "$RUNS/pre" \
      --time-budget "${PRE_BUDGET:-76m}"
    PRETRAINED=$RUNS/pre/best.pt
  fi
  timed meta $CLI train meta --recipe mini-cpu --out "$RUNS/meta" \
    --pretrained "$PRETRAINED" --time-budget "${META_BUDGET:-22m}"
  META=$RUNS/meta/best.pt
fi
timed metatest $CLI train evaluate --checkpoint "$META" --split test --episodes 2000 \
  --heads mtl,mtl-paper,centroid,logreg --json > "$RESULTS/metatest.json"
# Users enroll any number of classes, the meta-learned FC init is 5-way: 20 classes (all the test
# classes) show what the device's head gives then.
log $CLI train evaluate --checkpoint "$META" --split test --ways 20 --episodes 600 \
  --heads mtl,mtl-paper,centroid,logreg --json > "$RESULTS/metatest-20way.json"
export_cmd=(export "$META" --out "$RUNS/bundle" --force --int8 --int8-variants int8-cpu
  --calib "$MINI/train" --calib-images 300 --eval "$MINI/test" --eval-per-class 60
  --quant-episodes 2000 --card "$RUNS/card.json" --json)
record $CLI "${export_cmd[@]}"  # before the card, so that the card lists it
python "$(dirname "$0")/card.py" "$RESULTS/metatest.json" "$RUNS/card.json" \
  --also "$RESULTS/metatest-20way.json" --commands "$RESULTS/commands.txt" --note "${NOTE:-}"
/usr/bin/time -v -o "$RESULTS/time-export.txt" $CLI "${export_cmd[@]}" > "$RESULTS/export.json"
cp "$RUNS/bundle/manifest.json" "$RESULTS/manifest.json"
for precision in fp32 int8-cpu; do
  log $CLI bench enroll --bundle "$RUNS/bundle" --images "$MINI/test" --precision "$precision" \
    --backend onnxruntime-cpu --out "$RESULTS/enroll-$precision" --json > /dev/null
done
log $CLI bench openset --bundle "$RUNS/bundle" --data "$MINI" --precisions int8-cpu,fp32 \
  --out "$RESULTS/openset" --json > /dev/null
echo "done: $RUNS/bundle, reports in $RESULTS" >&2
