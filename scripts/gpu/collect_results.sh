#!/usr/bin/env bash
# Copy what a finished GPU run keeps in git into bench/results/<date>-<name>/ (issue 9 item 7):
# the resolved recipe, stage timings, accuracy table (JSON + Markdown), curves, the loader check,
# the export and benchmark reports and the bundle's manifest.json. Never weights or ONNX files.
#
#   scripts/gpu/collect_results.sh RUN [NAME] [COMMANDS_FILE]
#
# NAME defaults to h100-mini; COMMANDS_FILE (the exact device calls made) is copied as
# commands.md when given.
set -euo pipefail
run="${1:?usage: collect_results.sh RUN [NAME] [COMMANDS_FILE]}"
name="${2:-h100-mini}"
commands="${3:-}"
[[ -f "$run/stages.json" ]] || {
    echo "collect: error: $run/stages.json: no such file; pass a run folder of train pipeline" >&2
    exit 1
}
dest="bench/results/$(date -u +%Y-%m-%d)-$name"
mkdir -p "$dest"
copy() { [[ -f "$1" ]] && cp "$1" "$dest/$2" && echo "collect: $2"; return 0; }
copy "$run/recipe.resolved.json" recipe.resolved.json
copy "$run/stages.json" stages.json
copy "$run/loader_check.json" loader_check.json
for f in accuracy.json accuracy.md stages.md curves.png; do
    copy "$run/report/$f" "$f"
done
copy "$run/export/export_report.json" export_report.json
copy "$run/export/bundle/manifest.json" bundle-manifest.json
copy "$run/bench/bench.json" bench.json
for f in "$run"/bench/*.png; do
    [[ -f "$f" ]] && copy "$f" "$(basename "$f")"
done
[[ -n "$commands" ]] && copy "$commands" commands.md
echo "collect: $dest (review, then git add it)"
