"""The /v1 API against a real uvicorn on a loopback port: every endpoint, every error status."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from device_fixtures import COLOURS, make_bundle, make_class_folders, make_image
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from serve_helpers import TOKEN, ThreadServer, auth, files  # noqa: E402

from mtl_edge.gallery import Gallery  # noqa: E402
from mtl_edge.serve.config import Batching, Limits, ServeConfig  # noqa: E402


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    return {
        "bundle": make_bundle(tmp_path / "bundle").root,
        "photos": make_class_folders(tmp_path / "photos", ("red", "green", "blue"), per_class=4),
        "gallery": tmp_path / "shop.gallery",
    }


def config(env: dict[str, Path], **overrides: object) -> ServeConfig:
    args: dict[str, object] = {
        "bundle": env["bundle"],
        "gallery": env["gallery"],
        "token": TOKEN,
        "backend": "onnxruntime-cpu",
        "threads": 1,
    }
    args.update(overrides)
    return ServeConfig(**args)  # type: ignore[arg-type]


def photos(env: dict[str, Path], name: str) -> list[Path]:
    return sorted((env["photos"] / name).glob("*.jpg"))


def enroll(
    c: httpx.Client, env: dict[str, Path], name: str, append: bool = False
) -> httpx.Response:
    query = "?append=true" if append else ""
    return c.post(
        f"/v1/classes/{name}/images{query}", files=files(*photos(env, name)), headers=auth()
    )


def jpeg_bytes(size: tuple[int, int], colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels and holds almost none (a decompression bomb's
    header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def assert_error(r: httpx.Response, status: int, needle: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "code", "status"} and body["status"] == status
    assert needle in body["error"] and "\n" not in body["error"]
    return body


def test_enroll_list_predict_rename_remove_threshold(env: dict[str, Path], tmp_path: Path) -> None:
    with ThreadServer(config(env)) as server, server.client() as c:
        for name in ("red", "green", "blue"):
            r = enroll(c, env, name)
            assert r.status_code == 201, r.text
            assert r.json()["class"] == name and r.json()["added"] == 4
        r = enroll(c, env, "red", append=True)
        assert r.status_code == 200 and r.json()["count"] == 8

        listed = c.get("/v1/classes").json()
        assert [(row["name"], row["count"]) for row in listed["classes"]] == [
            ("red", 8), ("green", 4), ("blue", 4),
        ]  # fmt: skip
        thumb = c.get(listed["classes"][0]["thumbnail"])
        assert thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).size == (96, 96)

        queries = [
            make_image(tmp_path / "q" / f"{n}.jpg", COLOURS[n], seed=900 + i)
            for i, n in enumerate(("red", "green", "blue"))
        ]
        r = c.post("/v1/predict?top_k=2&threshold=0", files=files(*queries))
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [p["label"] for p in preds] == ["red", "green", "blue"]
        assert all(len(p["top_k"]) == 2 and p["known"] for p in preds)
        r = c.post("/v1/predict?threshold=1", files=files(queries[0]))
        assert r.json()["predictions"][0]["label"] == "unknown"

        r = c.patch("/v1/classes/red", json={"name": "crimson"}, headers=auth())
        assert r.status_code == 200 and r.json()["renamed_from"] == "red"
        assert c.get("/v1/classes/crimson/thumbnail").status_code == 200  # the thumb follows
        r = c.delete("/v1/classes/green", headers=auth())
        assert r.status_code == 200 and r.json()["classes"] == 2
        assert c.get("/v1/classes/green/thumbnail").status_code == 404
        r = c.put("/v1/threshold", json={"value": 0.42}, headers=auth())
        assert r.json() == {"threshold": 0.42, "threshold_mode": "manual"}
        r = c.put("/v1/threshold", json={"value": None}, headers=auth())
        assert r.json()["threshold_mode"] == "auto"

        info = c.get("/v1/gallery").json()
        assert [x["name"] for x in info["classes"]] == ["crimson", "blue"]
        bundle = c.get("/v1/bundle").json()
        assert bundle["backbone"] == "tiny-test" and bundle["provider"] == "CPUExecutionProvider"
        health = c.get("/v1/health").json()
        assert health["status"] == "ok" and health["batching"]["images"] > 0

    # Everything went through the gallery file, as the CLI sees it.
    saved = Gallery.load(env["gallery"])
    assert saved.class_names == ["crimson", "blue"] and len(saved.classes["crimson"].features) == 8


def test_openapi_describes_the_v1_api(env: dict[str, Path]) -> None:
    with ThreadServer(config(env)) as server, server.client() as c:
        spec = c.get("/v1/openapi.json").json()
        assert c.get("/docs").status_code == 404  # its page would load scripts from a CDN
    paths = spec["paths"]
    assert set(paths) >= {
        "/v1/health", "/v1/bundle", "/v1/gallery", "/v1/classes", "/v1/classes/{name}",
        "/v1/classes/{name}/images", "/v1/classes/{name}/thumbnail", "/v1/threshold",
        "/v1/predict",
    }  # fmt: skip
    enroll_op = paths["/v1/classes/{name}/images"]["post"]
    assert "multipart/form-data" in enroll_op["requestBody"]["content"]
    assert {"400", "401", "403", "409", "413", "503"} <= set(enroll_op["responses"])
    assert any("HTTPBearer" in s for s in spec["components"]["securitySchemes"])


def test_bad_image_gets_the_cli_message(env: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    with ThreadServer(config(env)) as server, server.client() as c:
        assert enroll(c, env, "red").status_code == 201
        r = c.post("/v1/predict", files=files(broken))
        body = assert_error(r, 400, "broken.jpg")
        assert body["code"] == "bad_image"
        r = c.post("/v1/classes/bad/images", files=files(broken), headers=auth())
        assert_error(r, 400, "broken.jpg")
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "mtl_edge.cli",
            "predict",
            str(broken),
            "--bundle",
            str(env["bundle"]),
        ]
        + ["--gallery", str(env["gallery"]), "--backend", "onnxruntime-cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    reason = body["error"].removeprefix("broken.jpg: ")
    assert reason != body["error"] and "image" in reason
    assert cli.stderr.strip() == f"error: {tmp_path / 'broken.jpg'}: {reason}"  # the same line


def test_token_needed_for_changes_and_checked(env: dict[str, Path]) -> None:
    with ThreadServer(config(env)) as server, server.client() as c:
        one = files(photos(env, "red")[0])
        r = c.post("/v1/classes/red/images", files=one)
        assert_error(r, 401, "Authorization: Bearer")
        assert r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/classes/red/images", files=one, headers=auth("x" * 26))
        assert_error(r, 403, "wrong API token")
        assert_error(c.delete("/v1/classes/red"), 401, "token")
        assert_error(c.put("/v1/threshold", json={"value": 0.5}), 401, "token")
        assert not env["gallery"].exists()  # nothing was changed
        assert c.get("/v1/classes").status_code == 200  # reads are open on loopback
        assert c.get("/").status_code == 200
        metrics = c.get("/metrics").text
    assert 'mtl_edge_requests_total{method="POST",route="refused",status="401"}' in metrics


def test_every_request_needs_the_token_beyond_loopback(env: dict[str, Path]) -> None:
    with ThreadServer(config(env, host="0.0.0.0")) as server, server.client() as c:
        for path in ("/v1/classes", "/v1/health", "/v1/openapi.json", "/metrics"):
            assert_error(c.get(path), 401, "token")
            assert c.get(path, headers=auth()).status_code == 200
        assert c.post("/v1/predict", files=files(photos(env, "red")[0])).status_code == 401
        page = c.get("/")  # the page's static files hold no data and need no token
        assert page.status_code == 200 and "<title>mtl-edge</title>" in page.text
        assert c.get("/static/app.js").status_code == 200


def test_conflicts_and_missing_classes(env: dict[str, Path]) -> None:
    with ThreadServer(config(env)) as server, server.client() as c:
        r = c.post("/v1/predict", files=files(photos(env, "red")[0]))
        assert_error(r, 409, "no classes enrolled; enroll some first")
        assert_error(c.delete("/v1/classes/red", headers=auth()), 404, "no such gallery")
        assert enroll(c, env, "red").status_code == 201
        assert enroll(c, env, "green").status_code == 201
        assert_error(enroll(c, env, "red"), 409, "already enrolled")
        assert_error(enroll(c, env, "blue", append=True), 404, "no class 'blue'")
        r = c.patch("/v1/classes/red", json={"name": "green"}, headers=auth())
        assert_error(r, 409, "class 'green' is already enrolled")
        r = c.patch("/v1/classes/nope", json={"name": "x"}, headers=auth())
        assert_error(r, 404, "no class 'nope'")
        assert_error(c.delete("/v1/classes/nope", headers=auth()), 404, "no class 'nope'")
        r = c.post("/v1/classes/unknown/images", files=files(photos(env, "red")[0]), headers=auth())
        assert_error(r, 400, "reserved")
        assert_error(c.put("/v1/threshold", json={"value": 3}, headers=auth()), 400, "[0, 1]")
        r = c.post("/v1/predict?top_k=0", files=files(photos(env, "red")[0]))
        assert_error(r, 400, "top_k=0")
        assert_error(
            c.post("/v1/predict?top_k=abc", files=files(photos(env, "red")[0])), 400, "top_k"
        )
        assert_error(c.post("/v1/predict"), 400, "files")
        assert c.get("/v1/nothing").json()["code"] == "not_found"
    assert Gallery.load(env["gallery"]).class_names == ["red", "green"]


def test_size_count_and_pixel_limits(env: dict[str, Path]) -> None:
    limits = Limits(max_request_bytes=200_000, max_images=3, max_pixels=300 * 300)
    with ThreadServer(config(env, limits=limits)) as server, server.client() as c:
        assert enroll(c, env, "red").status_code == 413  # 4 images > 3
        r = c.post("/v1/classes/red/images", files=files(*photos(env, "red")[:3]), headers=auth())
        assert r.status_code == 201
        big = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, format="PNG")
        assert len(buf.getvalue()) > 200_000
        r = c.post("/v1/predict", files=[("files", ("big.png", buf.getvalue(), "image/png"))])
        assert_error(r, 413, "over the limit of 200000 bytes")
        wide = jpeg_bytes((400, 400))  # small file, too many pixels
        r = c.post("/v1/predict", files=[("files", ("wide.jpg", wide, "image/jpeg"))])
        body = assert_error(r, 413, "wide.jpg: 400x400 pixels is over the limit of 90000")
        assert body["code"] == "too_large"
        r = c.post("/v1/predict", files=files(*photos(env, "green")[:4]))
        assert_error(r, 413, "4 images in one request: the limit is 3")
        r = c.post("/v1/predict", files=[("files", ("bomb.png", png_header(60000, 60000), "x"))])
        assert_error(r, 413, "bomb.png: more pixels than Pillow opens is over the limit")

        def chunks() -> object:  # no Content-Length: the limit is counted while reading
            yield b"--x\r\nContent-Disposition: form-data; name=files; filename=a.jpg\r\n\r\n"
            for _ in range(30):
                yield b"\0" * 10_000

        r = c.post(
            "/v1/predict",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert_error(r, 413, "over the limit")


def test_busy_queue_answers_503(env: dict[str, Path]) -> None:
    with ThreadServer(config(env, limits=Limits(max_queue=2))) as server, server.client() as c:
        r = c.post("/v1/classes/red/images", files=files(*photos(env, "red")[:3]), headers=auth())
        body = assert_error(r, 503, "busy")
        assert r.headers["retry-after"] == "1" and "--max-queue" in str(body["error"])
        r = c.post("/v1/classes/red/images", files=files(*photos(env, "red")[:2]), headers=auth())
        assert r.status_code == 201


def test_no_cors_unless_asked(env: dict[str, Path]) -> None:
    origin = {"Origin": "http://elsewhere.example"}
    with ThreadServer(config(env)) as server, server.client() as c:
        r = c.get("/v1/health", headers=origin)
        assert "access-control-allow-origin" not in r.headers
        assert "default-src 'self'" in r.headers["content-security-policy"]
    allowed = config(env, cors_origins=("http://elsewhere.example",))
    with ThreadServer(allowed) as server, server.client() as c:
        r = c.get("/v1/health", headers=origin)
        assert r.headers["access-control-allow-origin"] == "http://elsewhere.example"
        preflight = c.options(
            "/v1/classes/red",
            headers={**origin, "Access-Control-Request-Method": "DELETE"},
        )
        assert preflight.status_code == 200


def test_metrics_count_requests_stages_and_batches(env: dict[str, Path]) -> None:
    batching = Batching(enabled=True, max_batch=4, max_delay_ms=1.0)
    with ThreadServer(config(env, batching=batching)) as server, server.client() as c:
        assert enroll(c, env, "red").status_code == 201
        assert enroll(c, env, "green").status_code == 201
        c.post("/v1/predict", files=files(*photos(env, "blue")))
        text = c.get("/metrics").text
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    route = (("method", "POST"), ("route", "/v1/classes/{name}/images"), ("status", "201"))
    assert samples[("mtl_edge_requests_total", route)] == 2
    for stage in ("decode", "queue", "extract", "head", "commit"):
        assert samples[("mtl_edge_stage_seconds_count", (("stage", stage),))] > 0
    assert samples[("mtl_edge_batch_size_sum", ())] == 12  # 4 + 4 enrolled + 4 predicted
    assert samples[("mtl_edge_images_total", (("kind", "predicted"),))] == 4
    assert all(
        int(v) <= 4 for (n, labels), v in samples.items() if n == "mtl_edge_batch_size_count"
    )


def test_server_sees_cli_changes_at_once(env: dict[str, Path]) -> None:
    with ThreadServer(config(env)) as server, server.client() as c:
        assert enroll(c, env, "red").status_code == 201
        cli = subprocess.run(
            [sys.executable, "-m", "mtl_edge.cli", "enroll", "--bundle", str(env["bundle"])]
            + ["--gallery", str(env["gallery"]), "--backend", "onnxruntime-cpu", "--json"]
            + ["--class", "green", *map(str, photos(env, "green"))],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["classes"] == 2
        listed = c.get("/v1/classes").json()["classes"]
        assert [(row["name"], row["thumbnail"] is None) for row in listed] == [
            ("red", False), ("green", True),
        ]  # fmt: skip
        assert enroll(c, env, "blue").status_code == 201  # keeps the CLI's class
    assert Gallery.load(env["gallery"]).class_names == ["red", "green", "blue"]


def test_serve_imports_no_torch() -> None:
    code = (
        "import sys; import mtl_edge.serve.app, mtl_edge.serve.server, mtl_edge.commands.serve;"
        "import mtl_edge.serve.service; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
