"""A process killed (SIGKILL) in the middle of saving a gallery leaves the old one readable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.gallery import SAVE_PAUSE_ENV, Gallery, edit_gallery

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
