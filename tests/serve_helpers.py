"""Real servers for the serve tests: uvicorn in a thread, or `mtl-edge serve` in a process.

Both listen on a free loopback port. The thread server is quick to start and shares the test's
process (its Service is reachable for assertions); the process server is what a user runs, for
the tests that kill it or share the gallery with the CLI.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from mtl_edge.serve.config import ServeConfig
from mtl_edge.serve.server import LISTENING, bind, url_of

TOKEN = "test-token-0123456789abcdef"


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def files(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """httpx multipart fields 'files' for image paths."""
    return [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


class ThreadServer:
    """uvicorn serving `create_app(Service(config))` on 127.0.0.1 in a daemon thread.

    The config's host only sets the token policy; the socket is always on loopback.
    """

    def __init__(self, config: ServeConfig, **service_args: Any) -> None:
        import uvicorn

        from mtl_edge.serve.app import create_app
        from mtl_edge.serve.service import Service

        self.service = Service(config, **service_args)
        self.sock = bind("127.0.0.1", 0)
        self.url = url_of(ServeConfig(config.bundle, config.gallery), self.sock.getsockname()[1])
        uv = uvicorn.Config(create_app(self.service), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(uv)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


class ProcessServer:
    """`python -m mtl_edge.cli serve ... --port 0` in its own process group.

    Args:
        args: options after `serve` (bundle, gallery, backend, ...).
        env: extra environment variables (the token goes in $MTL_EDGE_SERVE_TOKEN).
    """

    def __init__(self, *args: str | Path, env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "mtl_edge.cli", "serve", "--port", "0", *map(str, args)]
        self.env = {**os.environ, "MTL_EDGE_SERVE_TOKEN": TOKEN, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self, timeout: float = 120.0) -> ProcessServer:
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        assert self.proc.stdout is not None
        seen = []
        for line in self.proc.stdout:  # log lines may come first
            seen.append(line)
            match = re.match(re.escape(LISTENING) + r"(\S+)", line)
            if match:
                self.url = match.group(1)
                break
        else:
            self.stop()
            raise RuntimeError("serve did not start:\n" + "".join(seen))
        # Drain the rest of the output so the process never blocks on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "v1/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not answer /v1/health")
            time.sleep(0.1)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ProcessServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
