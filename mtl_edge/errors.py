"""Errors a user can cause. The CLI prints them as one line, never as a traceback."""

from __future__ import annotations


class MtlEdgeError(Exception):
    """A user-facing error: the message names the thing that is wrong and how to fix it.

    Args:
        message: one line, e.g. "images/cat/01.jpg: truncated JPEG; re-export or remove it".
        exit_code: process exit code the CLI uses (1 for bad input, 2 for unavailable features).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ImageError(MtlEdgeError):
    """An image file that cannot be decoded or is out of bounds."""


class DatasetError(MtlEdgeError):
    """A dataset folder or file in the wrong layout, or too small for the request."""


class BundleError(MtlEdgeError):
    """A model bundle that is missing, incomplete, tampered with or of another schema."""


class GalleryError(MtlEdgeError):
    """An enrollment gallery that is missing, corrupt or built with another bundle."""


class ConfigError(MtlEdgeError):
    """A recipe or option with an unknown key, a wrong type or an out-of-range value."""


class UnavailableError(MtlEdgeError):
    """A feature whose dependency (TensorRT, CUDA, torch) is not present here. Exit code 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


def shown(value: object, limit: int = 40) -> str:
    """`value` for an error message: its repr (control characters escaped, so a crafted value
    cannot forge lines), cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: object, limit: int = 160) -> str:
    """A third-party message on one line: whitespace runs collapsed, other control characters
    escaped, cut to `limit` characters."""
    flat = " ".join(str(text).split())
    flat = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in flat)
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
