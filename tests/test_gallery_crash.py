"""A process killed (SIGKILL) in the middle of saving a gallery leaves the old one readable."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from mtl_edge.errors import GalleryError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.gallery import SAVE_PAUSE_ENV, Gallery, edit_gallery, prev_path

WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from mtl_edge.gallery import edit_gallery

    with edit_gallery(sys.argv[1]) as g:
        g.add_class("intruder", np.ones((3, 16)))
        print("saving", flush=True)
    """
)


def _half_written(folder: Path) -> bool:
    temps = [p for p in folder.glob(".g.gallery.*.tmp") if ".prev." not in p.name]
    return any(p.stat().st_size > 0 for p in temps)


def test_kill_during_save_leaves_the_old_gallery(tmp_path: Path) -> None:
    path = tmp_path / "g.gallery"
    rng = np.random.default_rng(0)
    start = Gallery("model-a", 16, HeadRecipe(steps=20, lr=0.5))
    for name in ("a", "b", "c"):
        start.add_class(name, rng.normal(size=(3, 16)))
    with edit_gallery(path, new=start):
        pass
    before = path.read_bytes()
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, SAVE_PAUSE_ENV: "30"}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "saving"
        # wait until half of the new gallery is in its temporary file, then kill the writer
        deadline = time.monotonic() + 60
        while not _half_written(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _half_written(tmp_path), "the writer never started its save"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert Gallery.load(path).class_names == ["a", "b", "c"]
    # the next save (the lock died with the writer) cleans the stale temp file and works
    with edit_gallery(path) as g:
        g.add_class("d", rng.normal(size=(2, 16)))
    assert Gallery.load(path).class_names == ["a", "b", "c", "d"]
    assert not list(tmp_path.glob(".g.gallery.*.tmp"))


#: A zygote: imports once, then forks one writer per line read; each writer enrolls classes
#: "<tag>-<i>" into the gallery in a loop and reports each committed one on stdout.
ZYGOTE = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from mtl_edge.fewshot.fc import HeadRecipe
    from mtl_edge.gallery import Gallery, edit_gallery

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    path = sys.argv[1]

    def writer(tag):
        rng = np.random.default_rng(sum(map(ord, tag)))
        for i in range(10**6):
            new = Gallery("model-a", 16, HeadRecipe(steps=5, lr=0.5))
            with edit_gallery(path, new=new) as g:
                g.add_class(f"{tag}-{i}", rng.normal(size=(2, 16)))
            os.write(1, f"committed {tag}-{i}\\n".encode())

    for line in sys.stdin:
        command, _, tag = line.strip().partition(" ")
        if command == "sync":
            os.write(1, f"sync {tag}\\n".encode())
            continue
        pid = os.fork()
        if pid == 0:
            try:
                writer(tag)
            except BaseException as e:  # a broken gallery: say so rather than go silent
                os.write(1, f"died {tag} {type(e).__name__}\\n".encode())
            finally:
                os._exit(0)
        os.write(1, f"pid {tag} {pid}\\n".encode())
    """
)
#: Rounds of the kill test: at least 50 in CI (tests/fuzz_report.py runs more).
CRASH_ROUNDS = int(os.environ.get("MTL_EDGE_CRASH_ROUNDS", "60"))


class _Zygote:
    """Drives the ZYGOTE script: start writers, kill them, wait for their output."""

    def __init__(self, script: Path, gallery: Path) -> None:
        env = {**os.environ, SAVE_PAUSE_ENV: "0.02", "OPENBLAS_NUM_THREADS": "1"}
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, str(script), str(gallery)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.committed: set[str] = set()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def read_until(self, *prefixes: str) -> str:
        """Read lines (recording commits) until one starts with a prefix; returns it."""
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            if line.startswith("committed "):
                self.committed.add(line.split()[1])
            if line.startswith(prefixes):
                return line.strip()
        raise AssertionError(f"the zygote stopped before {prefixes}")

    def start(self, tag: str) -> int:
        self.send(f"start {tag}")
        return int(self.read_until(f"pid {tag} ").split()[2])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.002)
    raise AssertionError(f"writer {pid} survived SIGKILL")


def crash_rounds(folder: Path, rounds: int, seed: int = 0) -> dict[str, int]:
    """Run `rounds` rounds: two writers enroll into one gallery at once and both are killed with
    SIGKILL: every other round while a save is half written, otherwise at a random moment after
    the round's first commit (so every such round commits at least one class).
    After each round the gallery and its .prev are loaded and compared with every class ever
    reported saved.

    Returns:
        {"rounds", "committed" (classes reported saved), "lost" (of those, missing at some
        check), "unreadable" (checks where the gallery or .prev did not load),
        "mid_save_kills" (rounds that left a half-written temporary file)}.
    """
    path = folder / "g.gallery"
    script = folder / "zygote.py"
    script.write_text(ZYGOTE)
    rng = np.random.default_rng(seed)
    zygote = _Zygote(script, path)
    stats = {"rounds": rounds, "committed": 0, "lost": 0, "unreadable": 0, "mid_save_kills": 0}
    try:
        for r in range(rounds):
            pids = [zygote.start(f"r{r}{w}") for w in "ab"]
            if r % 2 == 0 and path.exists():
                deadline = time.monotonic() + 10
                while not _half_written(folder) and time.monotonic() < deadline:
                    time.sleep(0.001)
            else:
                zygote.read_until(
                    *(
                        f"{what} r{r}{w}{end}"
                        for what, end in (("committed", "-"), ("died", " "))
                        for w in "ab"
                    )
                )
                time.sleep(float(rng.uniform(0.0, 0.1)))
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):  # a writer that died already
                    os.kill(pid, signal.SIGKILL)
            for pid in pids:
                _wait_gone(pid)
            stats["mid_save_kills"] += _half_written(folder)
            zygote.send(f"sync {r}")
            zygote.read_until(f"sync {r}")
            if not path.exists():
                stats["lost"] = max(stats["lost"], len(zygote.committed))
                continue
            try:
                present = set(Gallery.load(path).class_names)
                if prev_path(path).exists():
                    Gallery.load(prev_path(path))
            except GalleryError:
                stats["unreadable"] += 1
                continue
            stats["lost"] = max(stats["lost"], len(zygote.committed - present))
    finally:
        zygote.close()
    stats["committed"] = len(zygote.committed)
    return stats


def test_kill_9_rounds_with_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    stats = crash_rounds(tmp_path, CRASH_ROUNDS)
    assert stats["lost"] == 0 and stats["unreadable"] == 0, stats
    assert stats["committed"] >= CRASH_ROUNDS // 2, stats  # the writers committed between kills
    assert stats["mid_save_kills"] >= CRASH_ROUNDS // 4, stats  # many kills landed mid-save
    path = tmp_path / "g.gallery"
    with edit_gallery(path) as g:  # the next writer cleans up and carries on
        g.add_class("after", np.ones((2, 16)))
    assert not list(tmp_path.glob(".g.gallery.*.tmp"))
    assert len(Gallery.load(path)) >= stats["committed"] + 1
