"""The server's answers as pydantic models: what ``/openapi.json`` (and so ``/docs``) documents."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

TextSource = Literal["client", "ocr", "none-optional", "unused"]  # mmcore.textsource.TEXT_SOURCES


class Scored(BaseModel):
    """One scored row."""

    score: float = Field(description="sigmoid of the logit")
    calibrated_score: float = Field(description="sigmoid of the logit over the run's temperature")
    prediction: bool = Field(description="calibrated_score >= threshold")
    threshold: float = Field(description="the run's decision threshold on the calibrated score")
    text: str = Field(description="the text the model read")
    text_source: TextSource = Field(description="where the text came from: client, ocr, none-optional "
                                                "(empty, accepted by --text optional) or unused (vision_only)")


class Answer(BaseModel):
    """What identifies an answer: the model that gave it and the request it answers."""

    model_config = ConfigDict(protected_namespaces=())

    model_version: str = Field(description="bundle: sha256 of its manifest; run: sha256 of checkpoint_best.ckpt")
    request_id: str = Field(description="the request's X-Request-ID, or one made for it (also in the headers)")


class Prediction(Scored, Answer):
    """``POST /predict``."""


class BatchPrediction(Answer):
    """``POST /predict/batch``: one row per image, in order."""

    predictions: list[Scored]


class ErrorDetail(BaseModel):
    field: str | None = Field(description="the request field at fault (items[3].image, text, body, ...)")
    reason: str


class ErrorAnswer(BaseModel):
    """Every refusal (4xx) and server fault (5xx)."""

    error: ErrorDetail
    detail: str = Field(description="'field: reason' in one string")
    request_id: str


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    ready: bool
    state: Literal["loading", "warming up", "ready", "failed"]
    error: str | None = None


class Metadata(BaseModel):
    """The model (as the scorer describes it: modality, encoders, decision, versions, device) and the serving settings."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    source: str
    kind: str
    modality: str
    threshold: float
    temperature: float
    model_version: str
    text_source: str = Field(description="where rows get their text")
    serving: dict


#: the documented error answers of the scoring routes
ERROR_RESPONSES = {status: {"model": ErrorAnswer} for status in (400, 413, 415, 422, 500, 503)}
