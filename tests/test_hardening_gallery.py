"""Regression tests of issue 15 for galleries: damaged zips, zip bombs, crafted content with a
valid checksum, the lock file, restore, reextract's source rule and pre-0.2 galleries."""

from __future__ import annotations

import io
import json
import os
import struct
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hostile import gallery_zip, read_gallery_parts

from mtl_edge.atomicio import file_lock
from mtl_edge.errors import GalleryError, MtlEdgeError
from mtl_edge.fewshot.fc import HeadRecipe
from mtl_edge.gallery import Gallery, edit_gallery, lock_path, prev_path, restore_previous
from mtl_edge.npyfile import npy_bytes

DIM = 8


def _gallery(classes: tuple[str, ...] = ("a", "b", "c")) -> Gallery:
    rng = np.random.default_rng(0)
    g = Gallery("model-a", DIM, HeadRecipe(steps=10, lr=0.5), variant="fp32")
    for name in classes:
        g.add_class(name, rng.normal(size=(2, DIM)))
    return g


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "g.gallery"
    with edit_gallery(path, new=_gallery(("a", "b"))):
        pass
    with edit_gallery(path) as g:
        g.add_class("c", np.ones((2, DIM)))
    return path


def _metadata_offsets(data: bytes) -> list[int]:
    """Byte offsets of every zip structure (local headers, central directory, end record)."""
    offsets: list[int] = []
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            start = info.header_offset
            offsets += range(start, start + 30 + len(info.filename))
    central = data.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack("<II", data[central + 12 : central + 20])
    offsets += range(cd_offset, cd_offset + cd_size)
    offsets += range(central, len(data))
    return offsets


def test_every_one_byte_flip_in_zip_metadata_is_one_gallery_error(saved: Path) -> None:
    data = saved.read_bytes()
    prev = prev_path(saved).read_bytes()
    offsets = _metadata_offsets(data)
    assert len(offsets) > 500
    for pos in offsets:
        for xor in (0x01, 0x80, 0xFF):
            saved.write_bytes(data[:pos] + bytes([data[pos] ^ xor]) + data[pos + 1 :])
            try:
                Gallery.load(saved)
            except GalleryError as e:
                assert "\n" not in str(e) and str(saved) in str(e)
    assert prev_path(saved).read_bytes() == prev
    saved.write_bytes(data)
    assert Gallery.load(saved).class_names == ["a", "b", "c"]


def _zip_with(name: str, payload: bytes, method: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo(name), payload, compress_type=method)
        zf.writestr("CHECKSUM", "0" * 64 + "\n")
    return buf.getvalue()


def test_deflated_member_is_refused_before_any_member_is_read(tmp_path: Path, monkeypatch) -> None:
    bomb = _zip_with("features.npy", bytes(256 << 20), zipfile.ZIP_DEFLATED)
    assert len(bomb) < 1 << 20  # 256 MiB of zeros in well under 1 MiB
    path = tmp_path / "bomb.gallery"
    path.write_bytes(bomb)

    def never(*args, **kwargs):
        raise AssertionError("a member was read")

    monkeypatch.setattr(zipfile.ZipFile, "read", never)
    tracemalloc.start()
    with pytest.raises(GalleryError, match="compressed"):
        Gallery.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 32 << 20


def test_member_sizes_beyond_the_file_are_refused(tmp_path: Path) -> None:
    data = bytearray(_zip_with("features.npy", b"x" * 100, zipfile.ZIP_STORED))
    central = data.rfind(b"PK\x01\x02")  # first central directory entry: features.npy
    data[central + 20 : central + 28] = struct.pack("<II", 1 << 31, 1 << 31)
    path = tmp_path / "big.gallery"
    path.write_bytes(bytes(data))
    with pytest.raises(GalleryError, match="larger than the file|impossible size|corrupt"):
        Gallery.load(path)


def test_encrypted_and_future_version_members_are_refused(saved: Path) -> None:
    data = bytearray(saved.read_bytes())
    central = data.find(b"PK\x01\x02")
    for offset, value, needle in ((8, 0x01, "encrypted"), (6, 99, "zip file version|zip version")):
        damaged = bytearray(data)
        damaged[central + offset] = value
        saved.write_bytes(bytes(damaged))
        with pytest.raises(GalleryError, match=needle):
            Gallery.load(saved)


def _craft(path: Path, edit=None, members=None, raw_json: bytes | None = None) -> None:
    doc, parts = read_gallery_parts(path)
    if edit is not None:
        edit(doc)
    if members is not None:
        members(parts)
    path.write_bytes(gallery_zip(doc, parts, raw_json))


def _set_class(i: int, **fields):
    return lambda d: d["classes"][i].update(fields)


CRAFTED = {
    "gallery.json is a list": dict(raw_json=b"[1, 2]"),
    "model_id is a number": dict(edit=lambda d: d.update(model_id=7)),
    "duplicate class names": dict(edit=_set_class(1, name="a")),
    "newline in a class name": dict(edit=_set_class(0, name="a\nforged\t9")),
    "unicode line break in a class name": dict(edit=_set_class(0, name="a\u2028forged")),
    "NEL in the backbone name": dict(edit=lambda d: d.update(backbone="x\x85y")),
    "class named unknown": dict(edit=_set_class(0, name="Unknown")),
    "NaN threshold": dict(raw_json=b'{"schema": "mtl-edge.gallery", "threshold": NaN}'),
    "threshold above 1": dict(edit=lambda d: d["threshold"].update(value=2.0)),
    "threshold is text": dict(edit=lambda d: d["threshold"].update(value="0.5")),
    "recipe steps 1e9": dict(edit=lambda d: d["recipe"].update(steps=1e9)),
    "recipe steps 10**9": dict(edit=lambda d: d["recipe"].update(steps=10**9)),
    "recipe unknown key": dict(edit=lambda d: d["recipe"].update(evil=1)),
    "count disagrees": dict(edit=_set_class(0, count=5)),
    "feature_dim huge": dict(edit=lambda d: d.update(feature_dim=10**9)),
    "relative source path": dict(
        edit=_set_class(0, sources=[{"path": "x", "sha256": "0" * 64}] * 2)
    ),
    "generation negative": dict(edit=lambda d: d.update(generation=-1)),
    "variant with a slash": dict(edit=lambda d: d.update(variant="../fp32")),
    "NaN feature": dict(
        members=lambda m: m.update(
            {"features.npy": npy_bytes(np.full((6, DIM), np.nan, np.float16))}
        )
    ),
    "features of another shape": dict(
        members=lambda m: m.update({"features.npy": npy_bytes(np.zeros((6, 3), np.float16))})
    ),
    "labels out of order": dict(
        members=lambda m: m.update({"labels.npy": npy_bytes(np.zeros(6, np.int32))})
    ),
    "object array": dict(
        members=lambda m: m.update({"labels.npy": npy_bytes(np.zeros(6, np.int64))})
    ),
    "head of another shape": dict(
        members=lambda m: m.update({"head_weight.npy": npy_bytes(np.zeros((2, DIM), np.float32))})
    ),
    "extra member": dict(members=lambda m: m.update({"evil.py": b"import os"})),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_gallery_with_a_valid_checksum_is_refused(saved: Path, case: str) -> None:
    _craft(saved, **CRAFTED[case])
    with pytest.raises(GalleryError) as err:
        Gallery.load(saved)
    message = str(err.value)
    assert str(saved) in message and "\n" not in message
    assert "restore" in message or "not an mtl-edge gallery" in message


def test_npy_header_claiming_a_huge_array_costs_no_memory(saved: Path) -> None:
    header = b"{'descr': '<f2', 'fortran_order': False, 'shape': (1000000000000, 8), }"
    header += b" " * (118 - len(header)) + b"\n"
    huge = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\0" * 64
    _craft(saved, members=lambda m: m.update({"features.npy": huge}))
    tracemalloc.start()
    with pytest.raises(GalleryError, match="needs"):
        Gallery.load(saved)
    assert tracemalloc.get_traced_memory()[1] < 32 << 20
    tracemalloc.stop()


def test_duplicate_name_no_longer_drops_a_class_at_the_next_enroll(saved: Path) -> None:
    _craft(saved, edit=_set_class(1, name="a"))
    with pytest.raises(GalleryError, match="appears twice"), edit_gallery(saved) as g:
        g.add_class("d", np.ones((1, DIM)))
    assert Gallery.load(prev_path(saved)).class_names == ["a", "b"]


def test_non_regular_gallery_and_lock_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "g.gallery"
    os.mkfifo(path)
    with pytest.raises(GalleryError, match="FIFO"):
        Gallery.load(path)
    path.unlink()
    lock_path(path).mkdir()
    with (
        pytest.raises(MtlEdgeError, match="directory, not a lock file"),
        file_lock(lock_path(path)),
    ):
        pass
    with pytest.raises(MtlEdgeError, match="g.gallery.lock"), edit_gallery(path, new=_gallery()):
        pass
    lock_path(path).rmdir()
    lock_path(path).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(MtlEdgeError, match="symlink"), edit_gallery(path, new=_gallery()):
        pass
    assert not (tmp_path / "elsewhere").exists()
    assert not path.exists()


def test_writes_refuse_what_a_load_would_refuse() -> None:
    g = _gallery()
    with pytest.raises(GalleryError):
        g.add_class("d", np.ones((1, DIM)), sources=[{"path": "relative.jpg", "sha256": "0" * 64}])
    with pytest.raises(GalleryError):
        Gallery("model\nid", DIM)
    with pytest.raises(GalleryError):
        Gallery("m", DIM, meta_init=(np.ones((2, DIM + 1)), np.ones(2)))
    with pytest.raises(GalleryError, match="NaN"):
        g.predict(np.full((1, DIM), np.nan))


# ------------------------------------------------------------------------------- restore


def test_restore_refuses_a_healthy_gallery_without_force(saved: Path) -> None:
    before = saved.read_bytes()
    with pytest.raises(GalleryError, match="is healthy.*--force"):
        restore_previous(saved)
    assert saved.read_bytes() == before
    aside = restore_previous(saved, force=True)
    assert aside.read_bytes() == before and ".replaced-" in aside.name
    assert Gallery.load(saved).class_names == ["a", "b"]


@pytest.mark.parametrize("damaged", [False, True])
def test_two_restores_in_one_second_lose_no_generation(saved: Path, damaged: bool) -> None:
    if damaged:
        saved.write_bytes(saved.read_bytes()[:-40])
    newest = saved.read_bytes()
    first = restore_previous(saved, force=True)
    second = restore_previous(saved, force=True)
    assert first != second and first.read_bytes() == newest
    assert Gallery.load(saved).generation == Gallery.load(prev_path(saved)).generation
    files = [p.read_bytes() for p in saved.parent.iterdir() if p.name.startswith(saved.name)]
    assert newest in files


# ------------------------------------------------------------------ reextract and sources


def _with_source(saved: Path, path: str, sha256: str) -> None:
    _craft(saved, edit=_set_class(0, sources=[{"path": path, "sha256": sha256}] * 2))


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("/dev/zero", "character device"),
        ("/proc/self/environ", "kernel file"),
        ("/etc/passwd", "changed since it was enrolled"),
        ("/nonexistent/x.jpg", "no such file"),
    ],
)
def test_reextract_never_opens_special_or_mismatched_sources(
    saved: Path, tmp_path: Path, source: str, needle: str
) -> None:
    pytest.importorskip("onnxruntime")
    from device_fixtures import make_bundle

    from mtl_edge.enroller import Enroller

    if not Path(source).exists() and "no such" not in needle:
        pytest.skip(f"{source} does not exist here")
    _with_source(saved, source, "0" * 64)
    enroller = Enroller(make_bundle(tmp_path / "b", feature_dim=DIM).root, saved, "onnxruntime-cpu")
    before = saved.read_bytes()
    with pytest.raises(MtlEdgeError, match=needle) as err:
        enroller.reextract()
    assert "\n" not in str(err.value) and saved.read_bytes() == before


def test_pre_0_2_gallery_gets_one_line_and_reextracts(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from device_fixtures import make_bundle, make_class_folders

    from mtl_edge.enroller import Enroller

    bundle = make_bundle(tmp_path / "b").root
    photos = make_class_folders(tmp_path / "p", ("red", "green"), per_class=2)
    path = tmp_path / "old.gallery"
    enroller = Enroller(bundle, path, "onnxruntime-cpu")
    enroller.enroll_folder(photos)

    def as_version_1(doc: dict) -> None:
        doc.update(schema_version=1, model_id=enroller.bundle.legacy_model_id)
        del doc["variant"], doc["model_id_format"]

    _craft(path, edit=as_version_1)
    with pytest.raises(GalleryError, match="older mtl-edge.*gallery reextract") as err:
        enroller.predict([photos / "red" / "0.jpg"])
    assert "\n" not in str(err.value)
    assert Gallery.load(path).class_names == ["green", "red"]  # list/info still read it
    assert enroller.reextract() == 4
    doc, _ = read_gallery_parts(path)
    assert doc["schema_version"] == 2 and doc["model_id"] == enroller.bundle.model_id
    assert enroller.predict([photos / "red" / "0.jpg"], threshold=0.0)[0].label == "red"
    assert json.loads(json.dumps(Gallery.load(path).info()))["variant"] == "fp32"
