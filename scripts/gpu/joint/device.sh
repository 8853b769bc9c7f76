#!/usr/bin/env bash
# Issue 19's lease, the GPU-machine side (docs/joint.md, "The paper-scale run in one 15-minute
# lease"). What each device call runs (`plan.py calls` lists them; N = the number of parts):
#
#   device.sh receive DIR             calls 1 .. N-1: copy the data part carried in DIR into
#                                     the store (it stays while the machine is warm: 30 s
#                                     after a call), check its sha256 and that every earlier
#                                     part is there
#   device.sh versions                call 1, after receive: machine, driver, torch ->
#                                     $OUT/versions.txt
#   device.sh compute DIR [--dry-run] call N: lease.py compute (receive the last part, join
#                                     the N parts, unpack and check the shards, smoke check
#                                     of every CUDA path, the three models trained in the
#                                     time left, checkpoints packed into $OUT); its log in
#                                     $OUT/compute.log
#
# --dry-run runs the same steps on the CPU with plan.json's tiny overrides (the tests do).
# Environment: OUT (the device tool sets it), PYTHON (default python3), MTL_EDGE_JOINT_STORE
# (default /tmp/mtl-edge-joint), DEADLINE_S (the compute deadline in seconds from the start of
# the command; default plan.py's deadline_s; `plan.py deadline --held-s S` gives it).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
HERE="$REPO/scripts/gpu/joint"
PY="${PYTHON:-python3}"
STORE="${MTL_EDGE_JOINT_STORE:-/tmp/mtl-edge-joint}"
export OUT="${OUT:-$REPO/out/device}"
export MTL_EDGE_JOINT_STORE="$STORE"
mkdir -p "$STORE" "$OUT"

# pyproject maps train/, export/, bench/, recipes/ into mtl_edge.*; a tree of links does the
# same on a machine where nothing can be installed (no network, no build).
setup_env() {
    local pkg="$STORE/pkg/mtl_edge" f
    rm -rf "$STORE/pkg" && mkdir -p "$pkg"
    for f in "$REPO"/mtl_edge/*; do ln -s "$f" "$pkg/$(basename "$f")"; done
    for f in train export bench workflows recipes; do ln -s "$REPO/$f" "$pkg/$f"; done
    export PYTHONPATH="$STORE/pkg${PYTHONPATH:+:$PYTHONPATH}"
    # The repo root holds mtl_edge/ without train/ ...: keep the working folder off sys.path.
    export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
    local where
    where="$("$PY" -c 'import os, mtl_edge.train.joint as m; print(os.path.realpath(m.__file__))')"
    [[ "$where" == "$(realpath "$REPO")"/* ]] || {
        echo "device: error: mtl_edge comes from $where, not $REPO" >&2
        exit 1
    }
}

case "${1:-}" in
receive)
    setup_env
    "$PY" "$HERE/lease.py" receive "${2:?usage: device.sh receive DIR}"
    ;;
versions)
    setup_env
    "$PY" "$HERE/lease.py" versions
    ;;
compute)
    shift
    setup_env
    set +e
    "$PY" "$HERE/lease.py" compute "$@" 2>&1 | tee "$OUT/compute.log"
    rc=${PIPESTATUS[0]}
    set -e
    if [[ $(stat -c %s "$OUT/compute.log") -gt 15000000 ]]; then
        tail -c 15000000 "$OUT/compute.log" >"$OUT/compute.log.tmp"
        mv "$OUT/compute.log.tmp" "$OUT/compute.log"
    fi
    exit "$rc"
    ;;
*)
    sed -n '2,24p' "$0"
    exit 2
    ;;
esac
