"""What a server runs with: bundle, gallery, address, token policy, limits and batching."""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from mtl_edge.errors import ConfigError

#: Environment variable holding the API token (preferred to a command-line option, which other
#: users of the machine can read in the process list).
TOKEN_ENV = "MTL_EDGE_SERVE_TOKEN"
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask of the server.

    Attributes:
        max_request_bytes: largest request body (413 above it).
        max_images: most images in one enroll or predict request (413 above it).
        max_pixels: largest image, width * height (413 above it; also guards against
            decompression bombs).
        max_queue: most images waiting for the backend before new requests get 503.
    """

    max_request_bytes: int = 32 * 2**20
    max_images: int = 64
    max_pixels: int = 40_000_000
    max_queue: int = 512

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_images", "max_pixels", "max_queue"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be at least 1")


@dataclass(frozen=True)
class Batching:
    """Dynamic batching as in Triton: a batch runs when it is full or its first image has
    waited `max_delay_ms`; whatever queued while the backend was busy joins at once.

    Attributes:
        enabled: False runs every image alone (the baseline of `mtl-edge bench serve`).
        max_batch: most images per backend run.
        max_delay_ms: longest wait for more images once one is queued.
    """

    enabled: bool = True
    max_batch: int = 16
    max_delay_ms: float = 2.0

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch {self.max_batch}: must be at least 1")
        if not 0.0 <= self.max_delay_ms <= 1000.0:
            raise ConfigError(f"--max-delay-ms {self.max_delay_ms}: use 0 to 1000")


@dataclass(frozen=True)
class ServeConfig:
    """Everything `mtl_edge.serve.server.serve` needs.

    Attributes:
        token: the API token; required for every state-changing request, and for every API
            request when `host` is beyond loopback.
        token_generated: the token was made up at start (loopback only) and is printed.
        cors_origins: origins allowed to call the API from a browser (none by default).
        lock_timeout_s: how long a gallery edit waits for the file lock before answering 503.
    """

    bundle: Path
    gallery: Path
    host: str = "127.0.0.1"
    port: int = 8080
    token: str = ""
    token_generated: bool = False
    backend: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    decode_threads: int = 2
    batching: Batching = field(default_factory=Batching)
    limits: Limits = field(default_factory=Limits)
    cors_origins: tuple[str, ...] = ()
    lock_timeout_s: float = 10.0
    feature_dtype: str = "float16"
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    @property
    def token_for_reads(self) -> bool:
        """Reads need the token too when other machines can reach the server."""
        return not self.loopback


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"; anything else may be reachable from outside."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token_file: Path | None) -> tuple[str, bool]:
    """The token from `token_file` or $MTL_EDGE_SERVE_TOKEN; on loopback a fresh one if neither.

    Returns:
        (token, generated).

    Raises:
        ConfigError: no token for an address beyond loopback, an unreadable file, a short token.
    """
    token = ""
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(f"--token-file {token_file}: cannot read it ({e.strerror})") from None
        where = f"--token-file {token_file}"
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
        where = f"${TOKEN_ENV}"
    if not token:
        if not is_loopback(host):
            raise ConfigError(
                f"--host {host} is reachable beyond this machine: set a token in ${TOKEN_ENV} or "
                "--token-file FILE (every request must then carry it), or bind 127.0.0.1"
            )
        return secrets.token_urlsafe(24), True
    if len(token) < MIN_TOKEN_LENGTH or any(c.isspace() for c in token):
        raise ConfigError(
            f"{where}: the token needs at least {MIN_TOKEN_LENGTH} characters and no spaces; "
            "make one with `python -c 'import secrets; print(secrets.token_urlsafe(24))'`"
        )
    return token, False
