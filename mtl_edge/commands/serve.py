"""`mtl-edge serve`: the enroll / predict HTTP service and its web page (docs/serve.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from mtl_edge.commands.enroll import BACKEND_OPT, BUNDLE_OPT, PRECISION_OPT, THREADS_OPT
from mtl_edge.errors import UnavailableError


def _require_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart)
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UnavailableError(
            f"`mtl-edge serve` needs the serve extra ({e.name} is missing); "
            "pip install 'mtl-edge[cpu,serve]'"
        ) from None


def register(app: typer.Typer, name: str) -> None:
    @app.command(
        name=name,
        help=(
            "Serve enrollment and prediction over HTTP: a versioned JSON API under /v1 "
            "(OpenAPI at /v1/openapi.json), Prometheus metrics at /metrics and a web page at /. "
            "Listens on loopback unless told otherwise; changes need the API token "
            "($MTL_EDGE_SERVE_TOKEN or --token-file, else one is made up and printed)."
        ),
    )
    def serve(
        bundle: Path | None = BUNDLE_OPT,
        gallery: Path = typer.Option(
            ..., "--gallery", "-g", envvar="MTL_EDGE_GALLERY", help="Gallery file (shared)."
        ),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
        port: int = typer.Option(8080, "--port", help="TCP port (0: a free one)."),
        token_file: Path | None = typer.Option(
            None, "--token-file", help="File holding the API token (else $MTL_EDGE_SERVE_TOKEN)."
        ),
        backend: str = BACKEND_OPT,
        precision: str = PRECISION_OPT,
        threads: int | None = THREADS_OPT,
        batching: bool = typer.Option(
            True, "--batching/--no-batching", help="Dynamic batching of concurrent images."
        ),
        max_batch: int = typer.Option(16, "--max-batch", help="Most images per backend run."),
        max_delay_ms: float = typer.Option(
            2.0, "--max-delay-ms", help="Longest wait for a batch to fill, in ms."
        ),
        max_request_mb: float = typer.Option(
            32.0, "--max-request-mb", help="Largest request body, MiB."
        ),
        max_images: int = typer.Option(64, "--max-images", help="Most images per request."),
        max_pixels: int = typer.Option(40_000_000, "--max-pixels", help="Largest image, pixels."),
        max_queue: int = typer.Option(
            512, "--max-queue", help="Images waiting for the backend before 503 busy."
        ),
        decode_threads: int = typer.Option(2, "--decode-threads", help="Image decoding threads."),
        cors_origin: list[str] = typer.Option(
            [], "--cors-origin", help="Allow this browser origin (repeatable; none by default)."
        ),
        feature_dtype: str = typer.Option(
            "float16", "--feature-dtype", help="How a new gallery stores features."
        ),
        ssl_certfile: Path | None = typer.Option(None, "--ssl-certfile", help="TLS certificate."),
        ssl_keyfile: Path | None = typer.Option(None, "--ssl-keyfile", help="TLS private key."),
    ) -> None:
        _require_extra()
        from mtl_edge.bundles import resolve_bundle
        from mtl_edge.errors import ConfigError
        from mtl_edge.serve.config import Batching, Limits, ServeConfig, resolve_token
        from mtl_edge.serve.server import serve as run_server

        if decode_threads < 1:
            raise ConfigError(f"--decode-threads {decode_threads}: must be at least 1")
        if (ssl_certfile is None) != (ssl_keyfile is None):
            raise ConfigError("--ssl-certfile and --ssl-keyfile go together; give both")
        token, generated = resolve_token(host, token_file)
        config = ServeConfig(
            bundle=resolve_bundle(bundle),
            gallery=gallery,
            host=host,
            port=port,
            token=token,
            token_generated=generated,
            backend=backend,
            precision=precision,
            threads=threads,
            decode_threads=decode_threads,
            batching=Batching(batching, max_batch, max_delay_ms),
            limits=Limits(int(max_request_mb * 2**20), max_images, max_pixels, max_queue),
            cors_origins=tuple(cors_origin),
            feature_dtype=feature_dtype,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
        )
        run_server(config, echo=typer.echo)
