"""Request and response bodies of the /v1 API, as they appear in its OpenAPI description."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    error: str = Field(description="One line naming the thing that is wrong and the fix.")
    code: str = Field(description="bad_image, bad_request, unauthorized, forbidden, ...")
    status: int


class ClassRow(BaseModel):
    name: str
    count: int = Field(description="Enrolled images.")
    thumbnail: str | None = Field(description="URL of the class thumbnail, if it has one.")


class ClassList(BaseModel):
    gallery: str
    classes: list[ClassRow]
    threshold: float | None
    threshold_mode: str | None = Field(description="auto (calibrated) or manual.")
    generation: int = Field(description="Saves of the gallery file so far.")


class EnrollResult(BaseModel):
    class_: str = Field(alias="class")
    added: int
    count: int
    classes: int
    threshold: float
    threshold_mode: str
    generation: int


class RenameRequest(BaseModel):
    name: str = Field(description="The new class name.")


class RenameResult(BaseModel):
    class_: str = Field(alias="class")
    renamed_from: str
    generation: int


class RemoveResult(BaseModel):
    removed: str
    classes: int
    generation: int


class ThresholdRequest(BaseModel):
    value: float | None = Field(
        description="Rejection threshold in [0, 1]; null calibrates it automatically."
    )


class ThresholdResult(BaseModel):
    threshold: float
    threshold_mode: str


class TopK(BaseModel):
    label: str
    probability: float


class PredictionOut(BaseModel):
    image: str = Field(description="The uploaded file name.")
    label: str = Field(description="The best class, or 'unknown' when rejected.")
    probability: float
    score: float = Field(
        description="What the threshold was compared with: the top probability under the "
        "'probability' rejection rule, the largest prototype cosine under 'cosine'."
    )
    known: bool
    top_k: list[TopK]


class PredictResult(BaseModel):
    predictions: list[PredictionOut]


class Health(BaseModel):
    status: str
    version: str
    uptime_s: float
    queued_images: int
    batching: dict[str, Any]
    limits: dict[str, int]
    token_for_reads: bool


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (400, "Bad image or bad parameter"),
        (401, "No token"),
        (403, "Wrong token"),
        (409, "Conflicts with the gallery's state"),
        (413, "Too large: body, image count or pixels"),
        (503, "Busy: backend queue full or gallery locked"),
    )
}
