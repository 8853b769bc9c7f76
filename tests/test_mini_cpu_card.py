"""scripts/mini-cpu: the model card written into the built-in bundle's manifest, and the chain
script run end to end against a stand-in CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "mini-cpu"


def _card_module():
    spec = importlib.util.spec_from_file_location("mini_cpu_card", SCRIPTS / "card.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


METATEST = {
    "split": "miniimagenet/test",
    "ways": 5,
    "queries": 15,
    "episodes": 2000,
    "seed": 0,
    "results": {
        "1": {"mtl": {"mean": 41.654, "ci95": 0.4175}, "centroid": {"mean": 41.6, "ci95": 0.41}},
        "5": {"mtl": {"mean": 56.151, "ci95": 0.392}, "centroid": {"mean": 55.4, "ci95": 0.38}},
    },
}


def test_card_holds_the_deploy_heads_accuracy_every_head_and_the_terms(tmp_path: Path) -> None:
    src, out, commands = tmp_path / "m.json", tmp_path / "card.json", tmp_path / "c.txt"
    src.write_text(json.dumps({"with_ht": METATEST}))
    wide = tmp_path / "m20.json"
    five = {"mtl": {"mean": 40.004, "ci95": 0.2}, "centroid": {"mean": 38.1, "ci95": 0.2}}
    wide.write_text(json.dumps(METATEST | {"ways": 20, "episodes": 600, "results": {"5": five}}))
    commands.write_text("mtl-edge train meta ...\n\nmtl-edge export ...\n")
    subprocess.run(
        [sys.executable, SCRIPTS / "card.py", src, out, "--also", wide, "--commands", commands,
         "--note", "n"],
        check=True,
    )  # fmt: skip
    card = json.loads(out.read_text())
    assert card["accuracy"] == {
        "5-way 1-shot": {"mean": 41.65, "ci95": 0.42},
        "5-way 5-shot": {"mean": 56.15, "ci95": 0.39},
        "20-way 5-shot": {"mean": 40.0, "ci95": 0.2},
    }
    assert card["heads"]["20-way 5-shot"]["centroid"]["mean"] == 38.1
    assert card["protocol"]["also"] == [{"ways": 20, "episodes": 600}]
    assert card["heads"]["5-way 5-shot"]["centroid"]["mean"] == 55.4
    assert card["commands"] == ["mtl-edge train meta ...", "mtl-edge export ..."]
    assert "ImageNet" in card["data_terms"] and card["protocol"]["episodes"] == 2000
    assert _card_module().card(METATEST, [], "")["name"] == "mini-cpu"


#: Stands in for `mtl-edge`: records its arguments, makes the files the next step reads.
FAKE_CLI = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
out=""; prev=""
for a in "$@"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done
case "$1 $2" in
  "train pretrain"|"train meta") mkdir -p "$out"; touch "$out/best.pt" ;;
  "train evaluate") cat "$FAKE_METATEST" ;;
  export\ *) mkdir -p "$out"; echo '{}' > "$out/manifest.json"; echo '{}' ;;
esac
"""


def test_the_chain_script_runs_every_step_in_order(tmp_path: Path) -> None:
    subprocess.run(["bash", "-n", SCRIPTS / "run.sh"], check=True)
    cli, log, metatest = tmp_path / "mtl-edge", tmp_path / "calls.txt", tmp_path / "m.json"
    cli.write_text(FAKE_CLI)
    cli.chmod(0o755)
    metatest.write_text(json.dumps({"with_ht": METATEST}))
    env = {
        **os.environ,
        "CLI": str(cli),
        "FAKE_LOG": str(log),
        "FAKE_METATEST": str(metatest),
        "MTL_EDGE_DATA": str(tmp_path / "data"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    runs, results = tmp_path / "runs", tmp_path / "results"
    done = subprocess.run(
        ["bash", SCRIPTS / "run.sh", runs, results], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    steps = [" ".join(line.split()[:2]) for line in log.read_text().splitlines()]
    assert steps == [
        "train pretrain",
        "train meta",
        "train evaluate",
        "train evaluate",
        "export " + str(runs) + "/meta/best.pt",
        "bench enroll",
        "bench enroll",
        "bench openset",
    ]
    for name in ("pretrain", "meta", "metatest", "export"):
        assert "Elapsed (wall clock)" in (results / f"time-{name}.txt").read_text()
    card = json.loads((runs / "card.json").read_text())
    assert card["accuracy"]["5-way 1-shot"]["mean"] == 41.65
    # the card names the commands as a user types them, the export included
    assert [c.split()[:3] for c in card["commands"]] == [
        ["mtl-edge", "train", "pretrain"],
        ["mtl-edge", "train", "meta"],
        ["mtl-edge", "train", "evaluate"],
        ["mtl-edge", "train", "evaluate"],
        ["mtl-edge", "export", str(runs / "meta" / "best.pt")],
    ]
    assert "--ways 20" in card["commands"][3]
    assert (results / "commands.txt").read_text().count("\n") == 8
    # from an earlier pre-training: its command is recorded, not run
    log.unlink()
    pre = tmp_path / "pre.pt"
    again = subprocess.run(
        ["bash", SCRIPTS / "run.sh", runs, results],
        env=env | {"PRETRAINED": str(pre), "PRETRAINED_BY": "mtl-edge train pretrain --old"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert [" ".join(line.split()[:2]) for line in log.read_text().splitlines()][:2] == [
        "train meta", "train evaluate",
    ]  # fmt: skip
    assert f"--pretrained {pre}" in log.read_text().splitlines()[0]
    card = json.loads((runs / "card.json").read_text())
    assert card["commands"][0] == "mtl-edge train pretrain --old"


def test_the_cli_timing_script_times_every_command(tmp_path: Path) -> None:
    test = tmp_path / "data" / "miniimagenet" / "test"
    for c in range(6):
        (test / f"n{c}").mkdir(parents=True)
        for i in range(10):
            (test / f"n{c}" / f"{i}.jpg").write_bytes(b"jpeg")
    cli, log = tmp_path / "mtl-edge", tmp_path / "calls.txt"
    cli.write_text('#!/usr/bin/env bash\necho "$*" >> "$FAKE_LOG"\n')
    cli.chmod(0o755)
    env = {**os.environ, "CLI": str(cli), "FAKE_LOG": str(log),
           "MTL_EDGE_DATA": str(tmp_path / "data")}  # fmt: skip
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", SCRIPTS / "cli-time.sh", out, "3"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    rows = [r for r in (out / "cli-time.md").read_text().splitlines() if r.startswith("| ")]
    assert [r.split(" | ")[:2] for r in rows[1:]] == [
        ["| enroll 5 x 5 JPEGs", "int8"],
        ["| predict 1 JPEG", "int8"],
        ["| enroll 5 x 5 JPEGs", "fp32"],
        ["| predict 1 JPEG", "fp32"],
    ]
    assert all(len(r.split(" | ")[2].split()) == 3 for r in rows[1:])
    calls = log.read_text().splitlines()
    assert len(calls) == 16 and calls[5].endswith(str(test / "n0" / "9.jpg"))
