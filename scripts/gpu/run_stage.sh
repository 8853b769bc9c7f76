#!/usr/bin/env bash
# What ONE device call runs on the lent GPU machine (see docs/gpu-pipeline.md for the chain).
#
#   scripts/gpu/run_stage.sh unpack SEND_DIR             copy the shard(s) carried in SEND_DIR
#                                                        (SEND_DIR/<split>/{index.json,*.tar})
#                                                        into the cache, which stays while the
#                                                        machine is warm; verifies sha256
#   scripts/gpu/run_stage.sh restore STATE_DIR RUN       re-join the result parts carried in
#                                                        STATE_DIR into RUN (a fresh machine)
#   scripts/gpu/run_stage.sh stage STAGES RUN RECIPE [--set K=V ...]
#                                                        run pipeline stages (comma list) with
#                                                        --resume, then pack RUN's newest
#                                                        checkpoint, markers and logs into $OUT
#   scripts/gpu/run_stage.sh pack RUN [SINCE_FILE]      only the packing step (files newer than
#                                                        SINCE_FILE count as changed)
#   scripts/gpu/run_stage.sh status RUN                  print what the machine holds
#
# Environment: OUT (results folder, set by the device tool), MTL_EDGE_CACHE (default
# /tmp/mtl-edge-cache), STAGE_TIMEOUT_S (default 540: a stage is stopped in time to pack its
# results inside the 10-minute command limit; it resumes from its last checkpoint next call).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${MTL_EDGE_CACHE:-/tmp/mtl-edge-cache}"
export MTL_EDGE_CACHE="$CACHE" # the pipeline keeps decoded splits in $CACHE/decoded
OUT="${OUT:-$REPO/out/device}"
STAGE_TIMEOUT_S="${STAGE_TIMEOUT_S:-540}"
PART_MIB="${PART_MIB:-15}"
MAX_PARTS="${MAX_PARTS:-7}" # + MANIFEST = 8 result files
PY="${PYTHON:-python3}"

say() { echo "[run_stage $(date -u +%H:%M:%S)] $*"; }
die() {
    echo "run_stage: error: $*" >&2
    exit 1
}

# Install this package over the machine's own torch: no dependency is resolved or downloaded
# (the machine has no network); the pure-python ones must already be there.
ensure_installed() {
    mkdir -p "$CACHE"
    local where
    where="$("$PY" -c 'import mtl_edge.workflows.pipeline as p; print(p.__file__)' 2>/dev/null || true)"
    if [[ "$where" == "$REPO"/* ]]; then
        return
    fi
    "$PY" - <<'EOF' || die "missing Python packages on this machine (carry them as wheels, see docs/gpu-pipeline.md)"
import importlib, sys
missing = [m for m in ("torch", "numpy", "PIL", "typer", "rich", "onnx", "onnxruntime", "onnxscript", "matplotlib")
           if importlib.util.find_spec(m) is None]
if missing:
    print("missing:", " ".join(missing), file=sys.stderr)
    sys.exit(1)
EOF
    say "installing mtl-edge (--no-deps, keeps torch $("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e "$REPO" >/dev/null
}

cmd_unpack() {
    local send="${1:?usage: run_stage.sh unpack SEND_DIR}"
    [[ -d "$send" ]] || die "$send: no such folder; carry it with the call (carry: [\"$send\"])"
    local n=0
    for index in "$send"/*/index.json; do
        [[ -f "$index" ]] || continue
        local split dest
        split="$(basename "$(dirname "$index")")"
        dest="$CACHE/$split"
        mkdir -p "$dest"
        cp "$index" "$dest/index.json.new" && mv "$dest/index.json.new" "$dest/index.json"
        for shard in "$(dirname "$index")"/*.tar; do
            [[ -f "$shard" ]] || continue
            cp "$shard" "$dest/.$(basename "$shard").tmp"
            mv "$dest/.$(basename "$shard").tmp" "$dest/$(basename "$shard")"
            n=$((n + 1))
        done
    done
    [[ $n -gt 0 ]] || die "$send: holds no <split>/index.json with shards; see scripts/gpu/send.sh"
    ensure_installed
    # Check every shard that has arrived so far (the index lists them all; absent ones are
    # expected until their call comes).
    "$PY" - "$CACHE" <<'EOF'
import json, sys
from pathlib import Path
from mtl_edge.data.shards import INDEX, check_shard, read_index
cache = Path(sys.argv[1])
for index in sorted(cache.glob(f"*/{INDEX}")):
    folder = index.parent
    entries = read_index(folder)["shards"]
    have = [e for e in entries if (folder / e["file"]).is_file()]
    for e in have:
        check_shard(folder, e)
    state = "complete" if len(have) == len(entries) else "incomplete"
    print(f"{folder.name}: {len(have)}/{len(entries)} shards, sha256 ok, {state}")
EOF
    say "unpacked $n shard(s) into $CACHE"
}

cmd_restore() {
    local state="${1:?usage: run_stage.sh restore STATE_DIR RUN}" run="${2:?RUN}"
    "$REPO/scripts/gpu/restore.sh" "$state" "$run"
}

# Pack into tar parts, at most MAX_PARTS x PART_MIB MiB: RUN's small files (markers,
# stages.json, metrics, logs, report, bundle manifest) and the files changed in this call except
# checkpoints, then, while they fit, the checkpoints changed in this call: those a done.json
# names first, then of an unfinished stage the newest of each folder (last.pt: what a resume
# needs), then its other checkpoints. Checkpoints of earlier calls came back with those calls.
pack_results() {
    local run="$1" since="$2" list
    mkdir -p "$OUT"
    list="$(mktemp)"
    "$PY" - "$run" "$since" "$((MAX_PARTS * PART_MIB * 1048576))" >"$list" <<'EOF2'
import json, sys
from pathlib import Path
run, since, budget = Path(sys.argv[1]), Path(sys.argv[2]).stat().st_mtime, int(sys.argv[3])
files = [p for p in run.rglob("*") if p.is_file() and p.suffix not in (".tmp", ".npy")]
new = {p for p in files if p.stat().st_mtime >= since}
keep = {p for p in files if p.stat().st_size < 2**20} | {p for p in new if p.suffix != ".pt"}
named = set()
for done in run.glob("*/done.json"):
    outputs = json.loads(done.read_text()).get("outputs", {})
    paths = [outputs.get("checkpoint")] + list(dict(outputs.get("checkpoints", {})).values())
    named |= {run / n for n in paths if n}
def stage_done(p):
    return (run / p.relative_to(run).parts[0] / "done.json").is_file()
ckpts = sorted((p for p in new if p.suffix == ".pt"), key=lambda p: -p.stat().st_mtime)
newest = {}
for p in ckpts:
    newest.setdefault(p.parent, p)
order = [p for p in ckpts if p in named]
order += [p for p in newest.values() if not stage_done(p) and p not in order]
order += [p for p in ckpts if not stage_done(p) and p not in order]
used = sum(p.stat().st_size for p in keep)
for p in order:
    if p in keep:
        continue
    if used + p.stat().st_size <= budget:
        keep.add(p)
        used += p.stat().st_size
    else:
        print(f"run_stage: warning: {p.relative_to(run)} does not fit the results; not sent",
              file=sys.stderr)
for p in sorted(keep):
    print(p.relative_to(run))
EOF2
    local stamp
    stamp="$(date -u +%Y%m%dT%H%M%S)"
    tar -C "$run" -cf - -T "$list" | split -b "${PART_MIB}m" -d -a 2 - "$OUT/run-$stamp.tar.part"
    local parts
    parts=$(ls "$OUT"/run-"$stamp".tar.part* | wc -l)
    (
        cd "$OUT"
        {
            echo "run $run"
            echo "parts $parts"
            cat run-"$stamp".tar.part* | sha256sum | sed 's/-$/'"run-$stamp.tar"'/'
        } >MANIFEST
    )
    rm -f "$list"
    if [[ $parts -gt $MAX_PARTS ]]; then
        echo "run_stage: warning: $parts parts exceed the $MAX_PARTS that come back; " \
            "lower the checkpoint size or pack fewer files" >&2
    fi
    say "results: $parts part(s) of at most $PART_MIB MiB in \$OUT (restore with scripts/gpu/restore.sh)"
}

cmd_stage() {
    local stages="${1:?usage: run_stage.sh stage STAGES RUN RECIPE [--set K=V ...]}"
    local run="${2:?RUN}" recipe="${3:?RECIPE}"
    shift 3
    ensure_installed
    mkdir -p "$run"
    local since
    since="$(mktemp)"
    local rc=0
    say "stages $stages in $run (limit ${STAGE_TIMEOUT_S}s)"
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
    set +e
    PYTHONUNBUFFERED=1 timeout --signal=INT --kill-after=20 "$STAGE_TIMEOUT_S" \
        "$PY" -m mtl_edge.cli train pipeline --recipe "$recipe" --out "$run" \
        --stages "$stages" --resume "$@" 2>&1 | tee -a "$run/pipeline.log"
    rc=${PIPESTATUS[0]}
    set -e
    if [[ $rc -eq 124 || $rc -eq 130 ]]; then
        say "stopped at the time limit; the next call with the same stages resumes it"
    fi
    pack_results "$run" "$since"
    rm -f "$since"
    return "$rc"
}

cmd_status() {
    local run="${1:-}"
    say "cache $CACHE:"
    ls -la "$CACHE" 2>/dev/null || echo "  (empty: a fresh machine; resend the shards)"
    if [[ -n "$run" && -f "$run/stages.json" ]]; then
        "$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); [print(k, v.get("status"), round(v.get("wall_s", 0), 1)) for k, v in r["stages"].items()]' "$run/stages.json"
    fi
    nvidia-smi 2>/dev/null | head -15 || true
}

case "${1:-}" in
unpack) shift && cmd_unpack "$@" ;;
restore) shift && cmd_restore "$@" ;;
stage) shift && cmd_stage "$@" ;;
status) shift && cmd_status "$@" ;;
pack)
    shift
    since="${2:-}"
    if [[ -z "$since" ]]; then
        since="$(mktemp)" && touch -d @0 "$since"
    fi
    pack_results "${1:?usage: run_stage.sh pack RUN [SINCE_FILE]}" "$since"
    ;;
*)
    sed -n '2,21p' "$0"
    exit 2
    ;;
esac
