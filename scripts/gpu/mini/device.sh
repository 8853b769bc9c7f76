#!/usr/bin/env bash
# Issue 18's plan, the GPU-machine side (docs/gpu-pipeline.md; plan.py lists the calls).
#
#   device.sh receive DIR            copy the train shard(s) carried in DIR into the store
#                                    (kept while the machine is warm), sha256 checked
#   device.sh compute DIR [--dry-run]
#                                    receive DIR (the last shard); install mtl-edge over the
#                                    machine's torch; unpack the shards into class folders;
#                                    the smoke run of every CUDA path (stops on error);
#                                    pre-training + meta-transfer with HT under the time
#                                    budget and the deadline guard; the run packed into $OUT
#                                    (results.py: RESULTS.json + results.tar.partNN, each
#                                    < 16 MiB, checkpoints weights only) + compute.log.
#
# The results are packed whatever happens after the smoke run (a failed or stopped stage
# leaves what it saved). --dry-run does every step on the CPU with plan.json's dry_run recipe
# and settings (tests/test_gpu_mini_plan.py runs it on tiny shards with a fake $OUT).
#
# Environment: OUT (the device tool sets it), PYTHON (default python3), MTL_EDGE_MINI_STORE
# (default /tmp/mtl-edge-mini).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
HERE="$REPO/scripts/gpu/mini"
PY="${PYTHON:-python3}"
STORE="${MTL_EDGE_MINI_STORE:-/tmp/mtl-edge-mini}"
OUT="${OUT:-$REPO/out/device}"
export MTL_EDGE_CACHE="$STORE/cache"
mkdir -p "$STORE/shards" "$OUT"

say() { echo "[device $(date -u +%H:%M:%S)] $*"; }
die() {
    echo "device: error: $*" >&2
    exit 1
}
plan() { "$PY" -c "import json,sys; v=json.load(open('$HERE/plan.json'))$1; print(v if isinstance(v, str) else json.dumps(v))"; }

cmd_receive() {
    "$PY" "$HERE/shards.py" receive "$STORE/shards" "${1:?usage: device.sh receive DIR}"
}

ensure_installed() {
    local where
    where="$("$PY" -c 'import mtl_edge.workflows.pipeline as p; print(p.__file__)' 2>/dev/null || true)"
    [[ "$where" == "$REPO"/* ]] && return
    say "installing mtl-edge (--no-deps, over torch $("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" >/dev/null
}

STEPS="{}"
step_t0=0
begin() {
    step_t0=$(date +%s.%N)
    say "$1"
}
end() {
    local s
    s=$(awk -v a="$step_t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    STEPS=$("$PY" -c "import json,sys; d=json.loads(sys.argv[1]); d[sys.argv[2]]=float(sys.argv[3]); print(json.dumps(d))" "$STEPS" "$1" "$s")
}

pack_results() {
    local run="$1" rc="$2"
    mkdir -p "$run/device"
    echo "$STEPS" >"$run/device/steps.json"
    [[ -f "$WORK/smoke/smoke.json" ]] && cp "$WORK/smoke/smoke.json" "$run/device/"
    [[ -f "$WORK/versions.txt" ]] && cp "$WORK/versions.txt" "$run/device/"
    echo "{\"exit_code\": $rc, \"dry_run\": $DRY}" >"$run/device/exit.json"
    "$PY" "$HERE/results.py" pack "$run" "$OUT" --part-mib "$(plan '["results"]["part_mib"]')" \
        --max-parts "$(plan '["results"]["max_parts"]')"
}

cmd_compute() {
    local dir="${1:?usage: device.sh compute DIR [--dry-run]}"
    compute_steps "$@" 2>&1 | tee -a "$OUT/compute.log"
    return "${PIPESTATUS[0]}"
}

compute_steps() {
    local dir="$1"
    DRY=false
    [[ "${2:-}" == "--dry-run" ]] && DRY=true
    WORK="$STORE/work"
    rm -rf "$WORK" && mkdir -p "$WORK"
    local recipe budget deadline smoke_to
    local -a smoke_set=() budget_set=()
    if $DRY; then
        recipe="$REPO/$(plan '["dry_run"]["recipe"]')"
        budget="$(plan '["dry_run"]["train_budget"]')"
        deadline="$(plan '["dry_run"]["deadline_s"]')"
        smoke_to=600
        mapfile -t smoke_set < <(plan '["dry_run"]["smoke_set"]' | "$PY" -c 'import json,sys; [print(f"--set={s}") for s in json.load(sys.stdin)]')
    else
        recipe="$(plan '["recipe"]')"
        budget="$(plan '["compute"]["train_budget"]')"
        local grace
        grace="$(plan '["compute"]["train_grace_s"]')"
        deadline=$("$PY" -c "import sys; sys.path.insert(0, '$HERE'); from plan import parse_budget; print(int(parse_budget('$budget')) + $grace)")
        smoke_to="$(plan '["compute"]["smoke_timeout_s"]')"
    fi
    [[ -n "$budget" ]] && budget_set=("--set=runtime.time_budget=$budget")

    begin "install"
    $DRY || ensure_installed
    end install
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
        "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())'
    } >"$WORK/versions.txt"
    cat "$WORK/versions.txt"
    begin "receive $dir"
    cmd_receive "$dir"
    end receive
    begin "unpack the train shards"
    "$PY" "$HERE/shards.py" unpack "$STORE/shards" "$STORE/data/miniimagenet/train"
    end unpack

    begin "smoke (limit ${smoke_to}s)"
    set +e
    PYTHONUNBUFFERED=1 timeout --kill-after=10 "$smoke_to" \
        "$PY" "$HERE/compute.py" smoke "$WORK/smoke" "${smoke_set[@]}"
    local rc=$?
    set -e
    end smoke
    if [[ $rc -ne 0 ]]; then
        say "smoke failed (exit $rc): no training; the smoke run's files come back"
        pack_results "$WORK/smoke" "$rc"
        exit "$rc"
    fi

    begin "train $recipe (budget ${budget:-none}, deadline ${deadline}s)"
    set +e
    PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=20 "$((deadline + 30))" \
        "$PY" "$HERE/compute.py" train "$recipe" "$WORK/run" --deadline-s "$deadline" \
        "--set=data.root=$STORE/data/miniimagenet" "${budget_set[@]}"
    rc=$?
    set -e
    end train
    begin "pack the run into \$OUT"
    pack_results "$WORK/run" "$rc"
    end pack
    ls -la "$OUT"
    say "done (train exit $rc)"
    return "$rc"
}

case "${1:-}" in
receive) shift && cmd_receive "$@" ;;
compute) shift && cmd_compute "$@" ;;
*)
    sed -n '2,20p' "$0" >&2
    exit 2
    ;;
esac
