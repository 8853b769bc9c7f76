"""The model card of the mini-cpu bundle, from the meta-test report of `train evaluate --json`.

    python scripts/mini-cpu/card.py METATEST.json CARD.json [--also METATEST2.json]
        [--commands FILE] [--note TEXT]

Writes one JSON object (`mtl-edge export --card CARD.json` puts it in the manifest): what the
model is, the training commands, the deploy head's accuracy (the headline), every head's table,
and the terms of the images it was trained on. `--also` adds the settings of more meta-tests
(e.g. 20-way: what the device's head gives with more classes than the meta-learned init's 5),
with their episode counts in `protocol.also`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DATA_TERMS = (
    "Trained on the 64 miniImageNet train classes (Vinyals et al. 2016, split of Ravi & "
    "Larochelle 2017), which are ImageNet images: ImageNet's terms of access apply (non-"
    "commercial research and educational use). The weights are shipped for evaluation and "
    "research; check those terms before any commercial use."
)


def _tables(metatest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(accuracy of the deploy head, every head) by "N-way K-shot", rounded to 0.01."""
    ways = metatest["ways"]
    rounded = {
        f"{ways}-way {shots}-shot": {
            head: {"mean": round(r["mean"], 2), "ci95": round(r["ci95"], 2)}
            for head, r in table.items()
        }
        for shots, table in metatest["results"].items()
    }
    return {setting: heads["mtl"] for setting, heads in rounded.items()}, rounded


def card(
    metatest: dict[str, Any],
    commands: list[str],
    note: str,
    also: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The card; `accuracy` holds the deploy ("mtl") head per setting, `heads` every head, over
    `metatest` and then each of `also`."""
    accuracy, heads = _tables(metatest)
    for extra in also or []:
        more_accuracy, more_heads = _tables(extra)
        accuracy |= more_accuracy
        heads |= more_heads
    return {
        "name": "mini-cpu",
        "summary": (
            "ResNet-12 (48-96-192-384) at 64x64, pre-trained on the miniImageNet base classes "
            "and meta-transferred (SS + FC base-learner, hard-task meta-batch) on 2 CPU cores "
            "(recipes/mini-cpu.toml). A general-purpose starting point for enrolling new "
            "classes from a few photos; not trained on any user's classes."
        ),
        "accuracy": accuracy,
        "heads": heads,
        "protocol": {
            "split": metatest["split"],
            "episodes": metatest["episodes"],
            "queries": metatest["queries"],
            "seed": metatest["seed"],
            "head": "mtl = the deploy head of the manifest ([head] of the recipe)",
            "also": [{"ways": m["ways"], "episodes": m["episodes"]} for m in also or []],
        },
        "commands": commands,
        "note": note,
        "data_terms": DATA_TERMS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metatest", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--also", type=Path, action="append", default=[], help="More meta-tests.")
    parser.add_argument("--commands", type=Path, help="File with one command per line.")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    doc, *also = [_read(path) for path in [args.metatest, *args.also]]
    lines = args.commands.read_text().splitlines() if args.commands else []
    commands = [c for c in lines if c]
    args.out.write_text(json.dumps(card(doc, commands, args.note, also), indent=1))


def _read(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    return doc.get("with_ht", doc)  # `train evaluate --json` of a meta run, or a bare result


if __name__ == "__main__":
    main()
