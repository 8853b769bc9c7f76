#!/usr/bin/env bash
# Issue 20's plan, the GPU-machine side: what each device call runs (docs/gpu-inference.md).
#
#   device.sh receive DIR            copy the parts carried in DIR (of the wheel, of the
#                                    bundle's tar) into the store (it stays while the machine
#                                    is warm) and check their sha256 (parts.py)
#   device.sh versions               machine, driver, Python packages, CUDA libraries ->
#                                    $OUT/versions.txt
#   device.sh compute DIR [--dry-run]
#                                    receive DIR (the last parts); join the wheel and the
#                                    bundle, check their sha256; install the wheel with pip
#                                    --target into its own folder (never beside the CPU
#                                    onnxruntime); find the CUDA/cuDNN of the machine's
#                                    PyTorch; unpack the bundle, add its FP16 variant;
#                                    the smoke check (stops on error); then the benchmark.
#                                    Results flat in $OUT: versions.txt, compute.log,
#                                    steps.json, smoke.json, latency.json/.md/.png (7 files,
#                                    each well under 16 MiB).
#
# --dry-run does every step on a CPU (the tests run it with a fake wheel and a tiny bundle):
# the same files, commands and reports, with the GPU settings run on the CPU provider.
#
# Environment: OUT (the device tool sets it), PYTHON (default python3), MTL_EDGE_ORT_STORE
# (default /tmp/mtl-edge-ort), BENCH_DEADLINE_S / BENCH_TIMEOUT_S (override plan.json's:
# `plan.py deadline HELD_S` gives the deadline that keeps the plan in its 10 minutes).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
HERE="$REPO/scripts/gpu/inference"
PY="${PYTHON:-python3}"
STORE="${MTL_EDGE_ORT_STORE:-/tmp/mtl-edge-ort}"
SITE="$STORE/site"
OUT="${OUT:-$REPO/out/device}"
mkdir -p "$STORE/parts" "$OUT"

say() { echo "[device $(date -u +%H:%M:%S)] $*"; }
die() {
    echo "device: error: $*" >&2
    exit 1
}

# Part files named in DIR/MANIFEST.json: copied (atomically) and checked (parts.py).
cmd_receive() {
    "$PY" "$HERE/parts.py" receive "$STORE" "${1:?usage: device.sh receive DIR}"
}

cmd_versions() {
    {
        echo "# versions ($(date -u +%FT%TZ))"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
        "$PY" --version
        "$PY" -m pip show torch onnxruntime onnx numpy protobuf flatbuffers packaging \
            nvidia-cudnn-cu13 nvidia-cuda-runtime nvidia-cublas 2>/dev/null | grep -E '^(Name|Version|Location):' || true
        "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.is_available())' 2>&1 || true
        "$PY" - <<'EOF' 2>&1 || true
import importlib.util
from pathlib import Path
for name in ("nvidia", "torch"):
    spec = importlib.util.find_spec(name)
    for root in (spec.submodule_search_locations or []) if spec else []:
        for lib in sorted(Path(root).glob("*/lib")) + [Path(root) / "lib"]:
            if lib.is_dir():
                print(lib, " ".join(sorted(p.name for p in lib.glob("lib*.so*"))[:40]))
EOF
        df -h /tmp | tail -1
    } >"$OUT/versions.txt"
    say "versions -> $OUT/versions.txt"
    head -4 "$OUT/versions.txt"
}

declare -A STEPS
step_start=0
begin() {
    step_start=$(date +%s.%N)
    say "$1"
}
end() { STEPS[$1]=$(awk -v a="$step_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'); }
write_steps() {
    local rc=$?
    {
        printf '{"rc": %d' "$rc"
        for k in "${!STEPS[@]}"; do printf ', "%s": %s' "$k" "${STEPS[$k]}"; done
        printf '}\n'
    } >"$OUT/steps.json"
    if [[ -f "$OUT/compute.log" ]] && [[ $(stat -c %s "$OUT/compute.log") -gt 15000000 ]]; then
        tail -c 15000000 "$OUT/compute.log" >"$OUT/compute.log.tmp" && mv "$OUT/compute.log.tmp" "$OUT/compute.log"
    fi
}

cmd_compute() {
    local dir="${1:?usage: device.sh compute DIR [--dry-run]}" dry=""
    [[ "${2:-}" == "--dry-run" ]] && dry="--dry-run"
    dir="$(cd "$dir" && pwd)"
    trap write_steps EXIT
    begin "versions" && cmd_versions && end versions
    begin "receive $dir" && cmd_receive "$dir" && end receive

    begin "join and check the wheel and the bundle"
    local wheel bundle_tar sha
    wheel="$("$PY" "$HERE/parts.py" join "$STORE" wheel)"
    bundle_tar="$("$PY" "$HERE/parts.py" join "$STORE" bundle)"
    sha="$(sha256sum "$wheel" | cut -d' ' -f1)"
    end join

    begin "install into $SITE (pip --target, no dependencies, no index)"
    if [[ "$(cat "$SITE/.wheel-sha256" 2>/dev/null)" != "$sha" ]]; then
        rm -rf "$SITE"
        "$PY" -m pip install -q --no-deps --no-index --no-compile --no-cache-dir --target "$SITE" "$wheel"
        echo "$sha" >"$SITE/.wheel-sha256"
    fi
    rm -f "$wheel"
    local system_ort
    system_ort="$("$PY" -c 'import onnxruntime as o; print(o.__file__, o.__version__)' 2>/dev/null || echo none)"
    say "system onnxruntime (left alone): $system_ort"
    end install

    begin "mtl-edge importable"
    # pyproject maps train/, export/, bench/, recipes/ into mtl_edge.*; a tree of links does
    # the same without building or installing anything (no setuptools, no pip, no network).
    local pkg="$STORE/pkg/mtl_edge" f
    rm -rf "$STORE/pkg" && mkdir -p "$pkg"
    for f in "$REPO"/mtl_edge/*; do ln -s "$f" "$pkg/$(basename "$f")"; done
    for f in train export bench recipes; do ln -s "$REPO/$f" "$pkg/$f"; done
    export PYTHONPATH="$SITE:$STORE/pkg${PYTHONPATH:+:$PYTHONPATH}"
    # The repo root (the tool's working folder) holds mtl_edge/ without train/ export/ bench/:
    # Python must not put the working folder first on sys.path, here nor in the workers.
    export PYTHONSAFEPATH=1
    cd "$STORE"
    local where
    where="$("$PY" -c 'import os, mtl_edge.bench.latency as m; print(os.path.realpath(m.__file__))')"
    [[ "$where" == "$(realpath "$REPO")"/* ]] || die "mtl_edge comes from $where, not $REPO"
    if [[ -z "$dry" ]]; then
        local gpu_ort
        gpu_ort="$("$PY" -c 'import onnxruntime as o; print(o.__file__)')"
        [[ "$gpu_ort" == "$SITE"/* ]] || die "onnxruntime comes from $gpu_ort, not $SITE"
        LD_LIBRARY_PATH="$("$PY" -m mtl_edge.backends.cuda_libs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        export LD_LIBRARY_PATH
        say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    fi
    end env

    begin "bundle"
    "$PY" "$HERE/parts.py" unpack "$bundle_tar" "$STORE/bundle"
    rm -f "$bundle_tar"
    end unpack

    begin "FP16 variant"
    "$PY" "$HERE/add_fp16.py" "$STORE/bundle"
    end fp16

    begin "smoke check"
    PYTHONUNBUFFERED=1 timeout 90 "$PY" -m mtl_edge.bench.gpu_smoke --bundle "$STORE/bundle" \
        --out "$OUT/smoke.json" $dry || die "smoke check failed ($OUT/smoke.json); no benchmark"
    end smoke

    begin "bench latency"
    local -a args
    local quoted
    quoted="$("$PY" "$HERE/plan.py" bench-args $dry)"
    eval "args=($quoted)"
    if [[ -n "${BENCH_DEADLINE_S:-}" ]]; then args+=(--deadline "$BENCH_DEADLINE_S"); fi
    local limit
    limit="${BENCH_TIMEOUT_S:-$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["bench"]["timeout_s"])' "$HERE/plan.json")}"
    set +e
    PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=15 "$limit" \
        "$PY" -m mtl_edge.cli bench latency --bundle "$STORE/bundle" "${args[@]}" --out "$OUT" 2>&1
    local rc=$?
    set -e
    end bench
    [[ $rc -eq 0 ]] || die "bench latency exited $rc (124: hit BENCH_TIMEOUT_S=$limit)"
    say "done: $(ls "$OUT" | tr '\n' ' ')"
}

case "${1:-}" in
receive) shift && cmd_receive "$@" ;;
versions) shift && cmd_versions "$@" ;;
compute)
    shift
    mkdir -p "$OUT"
    cmd_compute "$@" 2>&1 | tee "$OUT/compute.log"
    exit "${PIPESTATUS[0]}"
    ;;
*)
    sed -n '2,25p' "$0"
    exit 2
    ;;
esac
