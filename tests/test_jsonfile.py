"""`read_json_document`: one-line errors of the caller's class, naming the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mtl_edge.errors import DatasetError
from mtl_edge.jsonfile import read_json_document


def read(path: Path) -> dict:
    return read_json_document(
        path,
        DatasetError,
        what="test file",
        schema="mtl-edge.test",
        version=2,
        missing="no such test file; write one",
        fix="write it again",
    )


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "t.json: no such test file; write one$"),
        (b"{", "t.json: not valid JSON .*; write it again$"),
        (b"\xff\xfe", "t.json: not valid JSON .*; write it again$"),
        (b"[]", r"t.json: not an mtl-edge test file \(schema mtl-edge.test\)$"),
        (b'{"schema": "other", "version": 2}', "not an mtl-edge test file"),
        (
            b'{"schema": "mtl-edge.test", "version": 1}',
            "t.json: test file schema version 1, this mtl-edge reads 2; write it again$",
        ),
    ],
)
def test_errors_name_the_file_and_the_fix(
    tmp_path: Path, content: bytes | None, needle: str
) -> None:
    path = tmp_path / "t.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DatasetError, match=needle) as info:
        read(path)
    assert "\n" not in str(info.value)


def test_reads_a_matching_document(tmp_path: Path) -> None:
    doc = {"schema": "mtl-edge.test", "version": 2, "items": [1, 2]}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    assert read(tmp_path / "t.json") == doc
