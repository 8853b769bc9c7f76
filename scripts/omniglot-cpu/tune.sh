#!/usr/bin/env bash
# Tune the omniglot-cpu recipe without looking at its test alphabets.
#
# The recipe holds out 5 background alphabets (val_alphabets = 5, seed 0) as its test set. A
# tuning run leaves those 5 out entirely (exclude_alphabets) and splits the other 25 again with
# seed 1: 20 alphabets train, 5 validate. Pre-training is scored after every epoch on 20-way
# 1-shot validation episodes (cosine nearest-centroid), the harder of the recipe's goals.
#
#   scripts/omniglot-cpu/tune.sh pretrain OUT [--set key=value ...]
#   scripts/omniglot-cpu/tune.sh meta OUT --pretrained PRE/best.pt [--set key=value ...]
#   mtl-edge train evaluate --checkpoint OUT/best.pt --split val --ways 20 --shots 1
#
# (The checkpoints carry the tuning split, so `evaluate --split val` scores the 5 tuning
# alphabets.) Each stage writes OUT/metrics.jsonl and OUT/time.txt.
set -euo pipefail
stage=${1:?usage: tune.sh pretrain|meta OUT [options]}
out=${2:?usage: tune.sh pretrain|meta OUT [options]}
shift 2
cli=${MTL_EDGE_CLI:-mtl-edge}
test_alphabets='["Blackfoot_(Canadian_Aboriginal_Syllabics)", "Burmese_(Myanmar)", "Greek", "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Malay_(Jawi_-_Arabic)"]'
split="data.options={val_alphabets = 5, seed = 1, rotations = true, exclude_alphabets = $test_alphabets}"
case $stage in
    pretrain) scoring=(--set pretrain.val_episodes=300 --set pretrain.val_ways=20
                       --set pretrain.val_shots=1) ;;
    meta) scoring=() ;;
    *) echo "tune.sh: stage $stage: use pretrain or meta" >&2; exit 2 ;;
esac
mkdir -p "$out"
/usr/bin/time -v -o "$out/time.txt" "$cli" train "$stage" --recipe omniglot-cpu --out "$out" \
    --set "$split" --set runtime.time_budget=\"\" "${scoring[@]}" "$@"
