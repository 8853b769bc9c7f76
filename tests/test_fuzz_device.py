"""Property-based fuzzing of the device's inputs (Hypothesis): image bytes, bundle manifests,
gallery files (damaged bytes, and crafted content with a valid checksum). Every example keeps
the contract of `fuzz_strategies`: used with finite results, or one MtlEdgeError line.

Bounded for CI: derandomized (the same examples on every run), a fixed number of examples per
property and a per-example deadline; the whole file takes well under a minute on 2 cores.
`python tests/fuzz_report.py` runs the same properties longer and reports the figures.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")

from device_fixtures import make_bundle  # noqa: E402
from fuzz_strategies import (  # noqa: E402
    check_gallery,
    check_image,
    check_manifest,
    crafted_gallery,
    edited_document,
    image_bytes,
    mutated_bytes,
    seed_gallery,
)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(
    max_examples=300,
    deadline=timedelta(seconds=5),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SEED_GALLERY = seed_gallery()


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = make_bundle(tmp_path_factory.mktemp("fuzz") / "bundle", meta_ways=3).root
    return root, json.loads((root / "manifest.json").read_text())


@FUZZ
@given(data=image_bytes, mode=st.sampled_from(["RGB", "L"]))
def test_any_image_bytes_decode_or_give_one_image_error(data: bytes, mode: str) -> None:
    check_image(data, mode)


def test_manifest_edits_load_or_give_one_bundle_error(bundle_root) -> None:
    root, manifest = bundle_root
    pristine = (root / "manifest.json").read_bytes()

    @FUZZ
    @given(doc=edited_document(manifest))
    def prop(doc: dict) -> None:
        check_manifest(root, doc)

    try:
        prop()
    finally:
        (root / "manifest.json").write_bytes(pristine)
    assert check_manifest(root, manifest) == "ok"


def test_manifest_bytes_damage_loads_or_gives_one_bundle_error(bundle_root) -> None:
    root, manifest = bundle_root
    pristine = (root / "manifest.json").read_bytes()

    @FUZZ
    @given(data=mutated_bytes(pristine))
    def prop(data: bytes) -> None:
        check_manifest(root, data)

    try:
        prop()
    finally:
        (root / "manifest.json").write_bytes(pristine)


@FUZZ
@given(data=mutated_bytes(SEED_GALLERY))
def test_damaged_gallery_bytes_load_or_give_one_gallery_error(data: bytes) -> None:
    check_gallery(data)


@FUZZ
@given(data=crafted_gallery(SEED_GALLERY))
def test_crafted_galleries_with_valid_checksums_load_or_give_one_gallery_error(
    data: bytes,
) -> None:
    check_gallery(data)


def test_the_seeds_themselves_are_used() -> None:
    assert check_gallery(SEED_GALLERY) == "ok"
    from fuzz_strategies import IMAGE_SEEDS

    assert all(check_image(data) == "ok" for data in IMAGE_SEEDS.values())
