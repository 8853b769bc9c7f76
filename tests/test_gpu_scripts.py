"""scripts/gpu: send shards -> unpack on the device -> pack results -> restore, and the
results collector, on a fake device folder (the scripts run here as they would there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mtl_edge.data.registry import open_split

REPO = Path(__file__).resolve().parents[1]


def _sh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, **env}, cwd=REPO, timeout=120
    )


def test_gpu_scripts_send_unpack_in_several_calls(tmp_path: Path) -> None:
    from mtl_edge.data.shards import pack_split

    split = open_split("synthetic", None, "train", size=16, per_class=6, train_classes=4)
    pack_split(split, tmp_path / "shards" / "train", max_mib=0.02)
    n = len(json.loads((tmp_path / "shards" / "train" / "index.json").read_text())["shards"])
    assert n >= 2
    env = {"MTL_EDGE_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable}
    send, cache = tmp_path / "send", tmp_path / "cache"
    for i in range(n):
        sent = _sh(
            "scripts/gpu/send.sh", str(tmp_path / "shards" / "train"), str(i), str(send), env=env
        )
        assert sent.returncode == 0, sent.stderr
        assert len(list((send / "train").glob("*.tar"))) == 1
        got = _sh("scripts/gpu/run_stage.sh", "unpack", str(send), env=env)
        assert got.returncode == 0, got.stderr
        state = "complete" if i == n - 1 else "incomplete"
        assert f"train: {i + 1}/{n} shards, sha256 ok, {state}" in got.stdout
    assert (
        _sh(
            "scripts/gpu/send.sh", str(tmp_path / "shards" / "train"), str(n), str(send), env=env
        ).returncode
        == 3
    )
    back = open_split("shards", cache, "train")
    assert back.labels.tolist() == split.labels.tolist()
    # A shard corrupted on the way is refused with its name.
    tar = next((send / "train").glob("*.tar"))
    tar.write_bytes(tar.read_bytes()[:-600] + b"x" * 600)
    bad = _sh("scripts/gpu/run_stage.sh", "unpack", str(send), env=env)
    assert bad.returncode != 0 and tar.name in bad.stderr and "sha256" in bad.stderr


def _pack_fixture(run: Path, meta_done: bool) -> Path:
    """A run: pretrain finished in an earlier call; meta wrote three checkpoints in this one."""
    (run / "pretrain").mkdir(parents=True)
    (run / "meta").mkdir()
    big = os.urandom(3 * 2**20)

    def put(rel: str, data: bytes, when: float) -> None:
        (run / rel).write_bytes(data)
        os.utime(run / rel, (when, when))

    put("pretrain/last.pt", big, 1000)
    put("pretrain/done.json", b'{"outputs": {"checkpoint": "pretrain/last.pt"}}', 1000)
    put("meta/epoch1.pt", big, 3000)
    put("meta/best.pt", big, 3001)
    put("meta/last.pt", big, 3002)
    put("meta/metrics.jsonl", b'{"step": 1}\n', 3000)
    put("stages.json", b"{}", 3000)
    if meta_done:
        put("meta/done.json", b'{"outputs": {"checkpoint": "meta/best.pt"}}', 3003)
    since = run.parent / "since"
    since.touch()
    os.utime(since, (2000, 2000))
    return since


@pytest.mark.parametrize(
    ("meta_done", "sent"),
    [
        (True, ["meta/best.pt", "meta/done.json"]),
        (False, ["meta/best.pt", "meta/last.pt"]),
    ],
    ids=["finished-stage", "unfinished-stage"],
)
def test_gpu_scripts_pack_and_restore(tmp_path: Path, meta_done: bool, sent: list[str]) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    since = _pack_fixture(run, meta_done)
    # Results of at most 7 x 1 MiB: room for two of the three 3 MiB checkpoints.
    env = {"OUT": str(out), "PYTHON": sys.executable, "PART_MIB": "1", "MAX_PARTS": "7"}
    packed = _sh("scripts/gpu/run_stage.sh", "pack", str(run), str(since), env=env)
    assert packed.returncode == 0, packed.stderr
    assert ("epoch1.pt does not fit" in packed.stderr) is (not meta_done)
    assert (out / "MANIFEST").is_file() and len(list(out.glob("run-*.tar.part*"))) <= 7
    restored = tmp_path / "restored"
    got = _sh("scripts/gpu/restore.sh", str(out), str(restored), env=env)
    assert got.returncode == 0, got.stderr
    files = sorted(str(p.relative_to(restored)) for p in restored.rglob("*") if p.is_file())
    assert files == sorted([*sent, "meta/metrics.jsonl", "pretrain/done.json", "stages.json"])
    assert (restored / "meta" / "best.pt").read_bytes() == (run / "meta" / "best.pt").read_bytes()
    part = next(out.glob("run-*.tar.part*"))
    part.write_bytes(part.read_bytes()[:-10] + b"0" * 10)
    refused = _sh("scripts/gpu/restore.sh", str(out), str(tmp_path / "again"), env=env)
    assert refused.returncode == 1 and "sha256 differs" in refused.stderr


def test_collect_results_copies_no_weights(tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "repo"
    (repo / "scripts" / "gpu").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "gpu" / "collect_results.sh", repo / "scripts" / "gpu")
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "export" / "bundle").mkdir(parents=True)
    (run / "stages.json").write_text("{}")
    (run / "report" / "accuracy.md").write_text("| table |\n")
    (run / "export" / "bundle" / "manifest.json").write_text("{}")
    (run / "export" / "bundle" / "backbone.onnx").write_bytes(b"weights")
    (run / "meta").mkdir()
    (run / "meta" / "best.pt").write_bytes(b"weights")
    got = subprocess.run(
        ["scripts/gpu/collect_results.sh", str(run), "test"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert got.returncode == 0, got.stderr
    (dest,) = (repo / "bench" / "results").iterdir()
    assert dest.name.endswith("-test")
    assert sorted(p.name for p in dest.iterdir()) == [
        "accuracy.md",
        "bundle-manifest.json",
        "stages.json",
    ]
    missing = subprocess.run(
        ["scripts/gpu/collect_results.sh", str(tmp_path)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 1 and "stages.json" in missing.stderr
