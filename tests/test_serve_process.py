"""`mtl-edge serve` as a real process: kill -9 mid-save, restart, the CLI beside it, refusals."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from device_fixtures import make_bundle, make_class_folders

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

from serve_helpers import TOKEN, ProcessServer, auth, files  # noqa: E402

from mtl_edge.gallery import SAVE_PAUSE_ENV, Gallery  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    return {
        "bundle": make_bundle(tmp_path / "bundle").root,
        "photos": make_class_folders(
            tmp_path / "photos", ("red", "green", "blue", "yellow"), per_class=3
        ),
        "gallery": tmp_path / "shop.gallery",
    }


def serve_args(env: dict[str, Path]) -> tuple[str | Path, ...]:
    return ("--bundle", env["bundle"], "--gallery", env["gallery"], "--backend", "onnxruntime-cpu")


def photos(env: dict[str, Path], name: str) -> list[Path]:
    return sorted((env["photos"] / name).glob("*.jpg"))


def cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mtl_edge.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    return errors[0]


def test_kill_9_mid_enrollment_loses_nothing_saved_and_restart_serves_it(
    env: dict[str, Path],
) -> None:
    gallery = env["gallery"]
    slow = ProcessServer(*serve_args(env), env={SAVE_PAUSE_ENV: "3"})
    with slow:
        with slow.client() as c:
            r = c.post("/v1/classes/red/images", files=files(*photos(env, "red")), headers=auth())
            assert r.status_code == 201, r.text

        def enroll_green() -> None:
            with contextlib.suppress(httpx.TransportError):  # the server dies under it
                httpx.post(
                    slow.url + "v1/classes/green/images",
                    files=files(*photos(env, "green")),
                    headers=auth(),
                    timeout=60,
                )

        request = threading.Thread(target=enroll_green)
        request.start()
        deadline = time.monotonic() + 60
        while not list(gallery.parent.glob(f".{gallery.name}.*.tmp")):  # half-written save
            assert time.monotonic() < deadline, "the second save never started"
            time.sleep(0.02)
        slow.kill()
        request.join(timeout=60)

    saved = Gallery.load(gallery)
    assert saved.class_names == ["red"]

    with ProcessServer(*serve_args(env)) as again, again.client() as c:
        listed = c.get("/v1/classes").json()["classes"]
        assert [(row["name"], row["count"]) for row in listed] == [("red", 3)]
        assert c.get(listed[0]["thumbnail"]).status_code == 200
        r = c.post("/v1/predict", files=files(photos(env, "red")[0]))
        assert r.json()["predictions"][0]["top_k"][0]["label"] == "red"
        r = c.post("/v1/classes/green/images", files=files(*photos(env, "green")), headers=auth())
        assert r.status_code == 201, r.text
    assert Gallery.load(gallery).class_names == ["red", "green"]
    assert not list(gallery.parent.glob(f".{gallery.name}.*.tmp"))  # the next save tidied up


def test_cli_and_server_enroll_side_by_side(env: dict[str, Path]) -> None:
    with ProcessServer(*serve_args(env)) as server, server.client() as c:
        enroll = subprocess.Popen(
            [sys.executable, "-m", "mtl_edge.cli", "enroll", *map(str, serve_args(env))]
            + ["--class", "yellow", *map(str, photos(env, "yellow"))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("red", "green", "blue"):
            r = c.post(
                f"/v1/classes/{name}/images", files=files(*photos(env, name)), headers=auth()
            )
            assert r.status_code == 201, r.text
        _, err = enroll.communicate(timeout=120)
        assert enroll.returncode == 0, err
        listed = {row["name"] for row in c.get("/v1/classes").json()["classes"]}
    assert listed == {"red", "green", "blue", "yellow"}
    assert set(Gallery.load(env["gallery"]).class_names) == listed


def test_generated_token_on_loopback_and_stop_on_sigterm(env: dict[str, Path]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "mtl_edge.cli", "serve", "--port", "0", *map(str, serve_args(env))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "MTL_EDGE_SERVE_TOKEN"},
    )
    try:
        assert proc.stdout is not None
        text = ""
        while "#token=" not in text:  # the line after "listening on URL"
            line = proc.stdout.readline()
            assert line, text
            text += line
        url = re.search(r"listening on (\S+)", text)
        token = re.search(r"#token=(\S+)", text)
        assert url and token, text
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url.group(1) + "v1/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        post = url.group(1) + "v1/classes/red/images"
        upload = files(*photos(env, "red"))
        assert httpx.post(post, files=upload, headers=auth(TOKEN)).status_code == 403
        assert httpx.post(post, files=upload, headers=auth(token.group(1))).status_code == 201
    finally:
        proc.terminate()
        # uvicorn shuts down gracefully, then re-raises SIGTERM (systemd counts it as clean).
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


def test_refuses_to_start_beyond_loopback_without_a_token(env: dict[str, Path]) -> None:
    no_token = {"MTL_EDGE_SERVE_TOKEN": ""}
    line = one_error(cli("serve", "--host", "0.0.0.0", *serve_args(env), env=no_token))
    assert "--host 0.0.0.0" in line and "MTL_EDGE_SERVE_TOKEN" in line
    line = one_error(cli("serve", *serve_args(env), env={"MTL_EDGE_SERVE_TOKEN": "short"}))
    assert "at least 16 characters" in line
    missing = env["gallery"].parent / "no-such-token"
    line = one_error(cli("serve", "--token-file", missing, *serve_args(env)))
    assert f"--token-file {missing}" in line


def test_refuses_a_port_in_use_and_a_damaged_gallery(env: dict[str, Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_error(cli("serve", "--port", str(port), *serve_args(env)))
    assert f"--port {port}: cannot listen there" in line
    env["gallery"].write_bytes(b"PK\x03\x04 not a gallery")
    line = one_error(cli("serve", "--port", "0", *serve_args(env)))
    assert "corrupt gallery" in line


def test_without_the_serve_extra_exit_code_2(env: dict[str, Path]) -> None:
    code = (
        "import sys; sys.modules['uvicorn'] = None; from mtl_edge import cli; "
        f"cli.main(['serve', '--bundle', {str(env['bundle'])!r}, '--gallery', 'g.gallery'])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: `mtl-edge serve` needs the serve extra (uvicorn is missing); "
        "pip install 'mtl-edge[cpu,serve]'"
    )
