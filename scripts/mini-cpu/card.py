"""The model card of the mini-cpu bundle, from the meta-test report of `train evaluate --json`.

    python scripts/mini-cpu/card.py METATEST.json CARD.json [--commands FILE] [--note TEXT]

Writes one JSON object (`mtl-edge export --card CARD.json` puts it in the manifest): what the
model is, the training commands, the deploy head's accuracy (the headline), every head's table,
and the terms of the images it was trained on.
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


def card(metatest: dict[str, Any], commands: list[str], note: str) -> dict[str, Any]:
    """The card; `accuracy` holds the deploy ("mtl") head per shot, `heads` every head."""
    results = metatest["results"]
    ways, episodes = metatest["ways"], metatest["episodes"]
    accuracy = {
        f"{ways}-way {shots}-shot": {
            "mean": round(table["mtl"]["mean"], 2),
            "ci95": round(table["mtl"]["ci95"], 2),
        }
        for shots, table in results.items()
    }
    heads = {
        f"{ways}-way {shots}-shot": {
            head: {"mean": round(r["mean"], 2), "ci95": round(r["ci95"], 2)}
            for head, r in table.items()
        }
        for shots, table in results.items()
    }
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
            "episodes": episodes,
            "queries": metatest["queries"],
            "seed": metatest["seed"],
            "head": "mtl = the deploy head of the manifest ([head] of the recipe)",
        },
        "commands": commands,
        "note": note,
        "data_terms": DATA_TERMS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metatest", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--commands", type=Path, help="File with one command per line.")
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    doc = json.loads(args.metatest.read_text())
    doc = doc.get("with_ht", doc)  # `train evaluate --json` of a meta run, or a bare result
    commands = args.commands.read_text().splitlines() if args.commands else []
    args.out.write_text(json.dumps(card(doc, [c for c in commands if c], args.note), indent=1))


if __name__ == "__main__":
    main()
