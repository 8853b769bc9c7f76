#!/usr/bin/env bash
# On the workstation: put shard number N of a packed split (plus its index) into the folder a
# device call carries, replacing what the last call carried.
#
#   scripts/gpu/send.sh SHARD_DIR N [SEND_DIR]     (SEND_DIR defaults to .device/send)
#
# SHARD_DIR is a folder written by `mtl-edge data pack ... --max-mib 60`; its split name is the
# folder's name (train, val, test). Prints the shard's name and size; exits 3 when N is past the
# last shard (so a loop can stop).
set -euo pipefail
shards="${1:?usage: send.sh SHARD_DIR N [SEND_DIR]}"
n="${2:?usage: send.sh SHARD_DIR N [SEND_DIR]}"
send="${3:-.device/send}"
[[ -f "$shards/index.json" ]] || {
    echo "send: error: $shards/index.json: no such file; pack the split with 'mtl-edge data pack'" >&2
    exit 1
}
mapfile -t files < <(python3 -c 'import json,sys; [print(s["file"]) for s in json.load(open(sys.argv[1]))["shards"]]' "$shards/index.json")
if [[ $n -ge ${#files[@]} ]]; then
    exit 3
fi
split="$(basename "$shards")"
rm -rf "$send"
mkdir -p "$send/$split"
cp "$shards/index.json" "$send/$split/"
cp "$shards/${files[$n]}" "$send/$split/"
size="$(stat -c %s "$send/$split/${files[$n]}")"
echo "send: $split/${files[$n]} ($((size / 1048576)) MiB)"
