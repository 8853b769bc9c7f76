#!/usr/bin/env bash
# Tune the omniglot-cpu recipe without looking at its test alphabets.
#
# The recipe holds out 5 background alphabets (val_alphabets = 5, seed 0) as its test set. A
# tuning run leaves those 5 out entirely (exclude_alphabets) and splits the other 25 again with
# seed 1: 20 alphabets train, 5 validate. Pre-training is scored after every epoch on 20-way
# 1-shot validation episodes (cosine nearest-centroid), the harder of the recipe's goals.
#
#   scripts/omniglot-cpu/tune.sh OUT [--set key=value ...]
#
# Each run writes OUT/metrics.jsonl (train and validation accuracy per epoch) and OUT/time.txt.
set -euo pipefail
out=${1:?usage: tune.sh OUT [--set key=value ...]}
shift
cli=${MTL_EDGE_CLI:-mtl-edge}
test_alphabets='["Blackfoot_(Canadian_Aboriginal_Syllabics)", "Burmese_(Myanmar)", "Greek", "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Malay_(Jawi_-_Arabic)"]'
mkdir -p "$out"
/usr/bin/time -v -o "$out/time.txt" "$cli" train pretrain --recipe omniglot-cpu --out "$out" \
    --set "data.options={val_alphabets = 5, seed = 1, rotations = true, exclude_alphabets = $test_alphabets}" \
    --set pretrain.val_episodes=300 --set pretrain.val_ways=20 --set pretrain.val_shots=1 \
    --set runtime.time_budget=\"\" "$@"
