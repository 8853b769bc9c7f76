"""The FastAPI application: the /v1 JSON API, /metrics, and the web page at /.

The OpenAPI description is at /v1/openapi.json. FastAPI's interactive docs pages are off: they
load their scripts from a CDN, and nothing the server sends may load anything from outside the
box.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from mtl_edge import __version__
from mtl_edge.errors import MtlEdgeError
from mtl_edge.serve import schemas
from mtl_edge.serve.errors import error_body, status_of
from mtl_edge.serve.guard import Guard
from mtl_edge.serve.service import Service, Upload

STATIC = Path(__file__).with_name("static")
FILES_HELP = "Image files (JPEG, PNG, ...), as multipart field 'files', repeated."


async def _uploads(files: list[UploadFile]) -> list[Upload]:
    return [Upload(f.filename or f"image {i + 1}", await f.read()) for i, f in enumerate(files)]


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = " ".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc}: {err.get('msg', 'invalid')}".strip(": "))
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MtlEdgeError)
    async def _user_error(_: Request, exc: MtlEdgeError) -> JSONResponse:
        status, code = status_of(exc)
        headers = {"retry-after": "1"} if status == 503 else None
        return JSONResponse(error_body(status, str(exc), code), status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), exc.status_code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(400, _validation_message(exc)), 400)


def _api(service: Service) -> APIRouter:
    # Documents the bearer token in the OpenAPI description; the Guard middleware enforces it.
    bearer = HTTPBearer(auto_error=False, description="The token mtl-edge serve printed.")
    api = APIRouter(prefix="/v1", dependencies=[Depends(bearer)], responses=schemas.ERRORS)

    @api.get("/health", response_model=schemas.Health, tags=["server"])
    async def health() -> dict[str, Any]:
        """Liveness, batching counters and the limits in force."""
        return service.health()

    @api.get("/bundle", tags=["server"])
    async def bundle() -> dict[str, Any]:
        """The model bundle and what runs it (backend, provider, precision)."""
        return service.bundle_info()

    @api.get("/gallery", tags=["gallery"])
    async def gallery() -> dict[str, Any]:
        """The gallery's summary: classes and counts, head recipe, threshold, calibration."""
        return await service.gallery_info()

    @api.get("/classes", response_model=schemas.ClassList, tags=["gallery"])
    async def classes() -> dict[str, Any]:
        """The enrolled classes, their image counts and thumbnail URLs."""
        return await service.classes()

    @api.post(
        "/classes/{name}/images",
        response_model=schemas.EnrollResult,
        status_code=201,
        tags=["gallery"],
    )
    async def enroll(
        name: str,
        response: Response,
        files: list[UploadFile] = File(..., description=FILES_HELP),
        append: bool = Query(False, description="Add to an enrolled class instead of creating."),
    ) -> dict[str, Any]:
        """Enroll images as a new class (201), or add them to an enrolled one (append=true, 200)."""
        result = await service.enroll(name, await _uploads(files), append)
        if append:
            response.status_code = 200
        return result

    @api.patch("/classes/{name}", response_model=schemas.RenameResult, tags=["gallery"])
    async def rename(name: str, body: schemas.RenameRequest) -> dict[str, Any]:
        """Rename a class (the head needs no refit)."""
        return await service.rename(name, body.name)

    @api.delete("/classes/{name}", response_model=schemas.RemoveResult, tags=["gallery"])
    async def remove(name: str) -> dict[str, Any]:
        """Remove a class and its images' features; the head is refitted on the rest."""
        return await service.remove(name)

    @api.get(
        "/classes/{name}/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}},
        tags=["gallery"],
    )
    async def thumbnail(name: str) -> Response:
        """A small JPEG of the class (made from its first uploaded image)."""
        return Response(await service.thumbnail(name), media_type="image/jpeg")

    @api.put("/threshold", response_model=schemas.ThresholdResult, tags=["gallery"])
    async def threshold(body: schemas.ThresholdRequest) -> dict[str, Any]:
        """Fix the rejection threshold, or null to calibrate it on the enrolled images."""
        return await service.set_threshold(body.value)

    @api.post("/predict", response_model=schemas.PredictResult, tags=["predict"])
    async def predict(
        files: list[UploadFile] = File(..., description=FILES_HELP),
        top_k: int = Query(1, description="How many (class, probability) pairs per image."),
        threshold: float | None = Query(
            None, description="Override the gallery's rejection threshold for this request."
        ),
    ) -> dict[str, Any]:
        """Classify images: the best class, or 'unknown' under the rejection threshold."""
        uploads = await _uploads(files)
        preds = await service.predict(uploads, top_k, threshold)
        return {
            "predictions": [
                {"image": u.name, **p.to_dict()} for u, p in zip(uploads, preds, strict=True)
            ]
        }

    return api


def create_app(service: Service) -> FastAPI:
    """The ASGI application around `service` (started and stopped with the app's lifespan)."""
    cfg = service.config

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="mtl-edge serve",
        version=__version__,
        description="Few-shot enrollment and recognition on the device (docs/serve.md).",
        docs_url=None,
        redoc_url=None,
        openapi_url="/v1/openapi.json",
        lifespan=lifespan,
    )
    _install_error_handlers(app)
    app.include_router(_api(service))

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(
        Guard,
        token=cfg.token,
        token_for_reads=cfg.token_for_reads,
        max_request_bytes=cfg.limits.max_request_bytes,
        metrics=service.metrics,
    )
    if cfg.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cfg.cors_origins),
            allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app
