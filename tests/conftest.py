"""Shared fixtures: tiny images made on the fly, and the path of ../shared/data when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def shared_data_root() -> Path:
    """Real benchmark data: $MTL_EDGE_DATA, else ../shared/data beside the repo."""
    return Path(os.environ.get("MTL_EDGE_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_root()
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root} (set MTL_EDGE_DATA)")
    return root


@pytest.fixture
def class_folders(tmp_path: Path) -> Path:
    """A split in the class-folder layout: root/train/<class>/<i>.jpg, 4 classes x 6 images."""
    rng = np.random.default_rng(0)
    for c in range(4):
        folder = tmp_path / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(folder / f"{i}.jpg", quality=90)
    return tmp_path
