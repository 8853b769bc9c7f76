"""Crash-safe writes and the inter-process lock."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from mtl_edge.atomicio import atomic_write, atomic_write_json, file_lock, staged_dir
from mtl_edge.errors import MtlEdgeError


def test_failed_write_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write_json(target, {"v": 1})

    def explode(f) -> None:
        f.write(b"partial")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, explode)
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_staged_dir_swaps_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with staged_dir(final) as stage:
        (stage / "a").write_text("1")
    with pytest.raises(ValueError), staged_dir(final, force=True) as stage:
        (stage / "a").write_text("2")
        raise ValueError("boom")
    assert (final / "a").read_text() == "1"
    with staged_dir(final, force=True) as stage:
        (stage / "a").write_text("3")
    assert (final / "a").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _hold_lock(path: str, ready, seconds: float) -> None:
    with file_lock(path):
        ready.set()
        time.sleep(seconds)


def test_lock_excludes_another_process(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(str(tmp_path / "g.lock"), ready, 3.0))
    proc.start()
    try:
        assert ready.wait(30)
        with (
            pytest.raises(MtlEdgeError, match="still locked"),
            file_lock(tmp_path / "g.lock", timeout_s=0.2),
        ):
            pass
    finally:
        proc.join()
    with file_lock(tmp_path / "g.lock", timeout_s=1):
        pass


def test_published_files_follow_the_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "f.json", {})
        with staged_dir(tmp_path / "d") as stage:
            (stage / "x").write_text("1")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
