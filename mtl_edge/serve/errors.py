"""HTTP status codes for the errors a user can cause; the body is the CLI's one-line message.

Every error answer is JSON: {"error": "<one line naming the thing and the fix>", "code":
"<kind>", "status": <HTTP status>}. Core errors (`ImageError`, `GalleryError`, ...) keep the
message the CLI prints; the service raises `HttpError` where it knows a more precise status
(404 for a missing class, 409 for a name already taken).
"""

from __future__ import annotations

from mtl_edge.errors import (
    BundleError,
    ConfigError,
    GalleryError,
    ImageError,
    MtlEdgeError,
    UnavailableError,
)

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    500: "internal",
    503: "busy",
}


class HttpError(MtlEdgeError):
    """A user error with its HTTP status.

    Args:
        status: the HTTP status code.
        message: one line, as the CLI would print it.
        code: machine-readable kind; defaults to CODES[status].
    """

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or CODES.get(status, "error")


def status_of(error: MtlEdgeError) -> tuple[int, str]:
    """(HTTP status, code) of a user error."""
    if isinstance(error, HttpError):
        return error.status, error.code
    if isinstance(error, ImageError):
        return 400, "bad_image"
    if isinstance(error, ConfigError):
        return 400, "bad_request"
    if isinstance(error, GalleryError):
        # The request does not fit the gallery's state: a name taken, an empty gallery, a
        # gallery of another model or a damaged file (the message says how to restore it).
        return 409, "conflict"
    if isinstance(error, UnavailableError):
        return 503, "unavailable"
    if isinstance(error, BundleError):
        return 500, "bundle"
    # Plain MtlEdgeError: the gallery lock is held too long by another process.
    return 503, "busy"


def error_body(status: int, message: str, code: str | None = None) -> dict[str, object]:
    return {"error": message, "code": code or CODES.get(status, "error"), "status": status}
