#!/usr/bin/env bash
# Re-join the result parts of a device call into a run folder, checking the sha256 first.
#
#   scripts/gpu/restore.sh PARTS_DIR RUN
#
# PARTS_DIR holds MANIFEST and run-<stamp>.tar.partNN (what run_stage.sh wrote into $OUT).
# Files are extracted into RUN (created), replacing older copies, so restoring the calls'
# results in order rebuilds the run; then `--resume` continues it.
set -euo pipefail

parts_dir="${1:?usage: restore.sh PARTS_DIR RUN}"
run="${2:?usage: restore.sh PARTS_DIR RUN}"
manifest="$parts_dir/MANIFEST"
[[ -f "$manifest" ]] || {
    echo "restore: error: $manifest: no such file; pass the folder of one call's results" >&2
    exit 1
}
want="$(awk 'NR == 3 {print $1}' "$manifest")"
name="$(awk 'NR == 3 {print $2}' "$manifest")"
count="$(awk '$1 == "parts" {print $2}' "$manifest")"
shopt -s nullglob
parts=("$parts_dir/$name".part*)
if [[ ${#parts[@]} -ne $count ]]; then
    echo "restore: error: $parts_dir: ${#parts[@]} of $count parts of $name; fetch them all" >&2
    exit 1
fi
got="$(cat "${parts[@]}" | sha256sum | awk '{print $1}')"
if [[ "$got" != "$want" ]]; then
    echo "restore: error: $parts_dir/$name parts: sha256 differs from MANIFEST; fetch them again" >&2
    exit 1
fi
mkdir -p "$run"
cat "${parts[@]}" | tar -C "$run" -xf -
echo "restore: $name ($count part(s)) -> $run"
