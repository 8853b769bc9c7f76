"""Run the service: bind the socket, say where it listens, hand it to uvicorn.

The socket is bound here rather than by uvicorn so that `--port 0` works (the kernel picks a
free port, which the first line printed names) and so that a port already in use is one clear
error line.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from mtl_edge.errors import ConfigError
from mtl_edge.serve.config import ServeConfig

#: The first line `serve` prints starts with this, then the URL (tests and bench parse it).
LISTENING = "mtl-edge serve: listening on "


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one).

    Raises:
        ConfigError: the address cannot be used (in use, not on this machine, ...).
    """
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise ConfigError(f"--host {host}: not an address of this machine ({e})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OverflowError:
        sock.close()
        raise ConfigError(f"--port {port}: use 0 to 65535") from None
    except OSError as e:
        sock.close()
        raise ConfigError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror}); pick another "
            "--port, or stop what uses it"
        ) from None
    sock.set_inheritable(True)
    return sock


def url_of(config: ServeConfig, port: int) -> str:
    host = f"[{config.host}]" if ":" in config.host else config.host
    scheme = "https" if config.ssl_certfile else "http"
    return f"{scheme}://{host}:{port}/"


def serve(config: ServeConfig, echo: Callable[[str], None] = print) -> None:
    """Load the bundle and gallery, start the backend and serve until SIGINT / SIGTERM.

    Raises:
        MtlEdgeError: a bad bundle or gallery, an unusable address, a missing backend.
    """
    import uvicorn

    from mtl_edge.serve.app import create_app
    from mtl_edge.serve.service import Service

    service = Service(config)
    app = create_app(service)
    sock = bind(config.host, config.port)
    url = url_of(config, sock.getsockname()[1])
    x, b = service.extractor, config.batching
    batching = f"on (up to {b.max_batch}, {b.max_delay_ms:g} ms)" if b.enabled else "off"
    echo(
        f"{LISTENING}{url} (gallery {config.gallery}; {x.name} on {x.provider}, {x.precision}; "
        f"batching {batching})"
    )
    if config.token_generated:
        echo(f"open {url}#token={config.token} (API token for this run: {config.token})")
    uv = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_graceful_shutdown=5,
        ssl_certfile=str(config.ssl_certfile) if config.ssl_certfile else None,
        ssl_keyfile=str(config.ssl_keyfile) if config.ssl_keyfile else None,
    )
    uvicorn.Server(uv).run(sockets=[sock])
