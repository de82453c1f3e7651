"""``mmcore serve``: a run directory or an export bundle behind HTTP (FastAPI + uvicorn).

- ``POST /predict``: multipart (``image`` file, optional ``text``) or JSON
  (``{"image": "<base64>", "text": "..."}``) -> score, calibrated_score, prediction, threshold, text;
- ``POST /predict/batch``: multipart (``image`` repeated, ``text`` repeated in the same order)
  or JSON ``{"items": [{"image": ..., "text": ...}, ...]}`` -> ``{"predictions": [...]}``;
- ``GET /health`` (the process answers), ``/ready`` (the model is loaded), ``/metadata``,
  ``/metrics`` (Prometheus text), ``/docs`` (OpenAPI).

Every client mistake is a 4xx JSON body ``{"error": {"field": ..., "reason": ...}}`` naming the
field; a 500 means a server fault. The process keeps no state between requests (no cache,
no session), so any number of workers or machines can share the traffic.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import os
import time

import attrs
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from mmcore.serve.batching import Batcher, Item

log = logging.getLogger("mmcore.serve")
CONFIG_ENV = "MMCORE_SERVE_CONFIG"


@attrs.frozen(kw_only=True)
class ServeConfig:
    """Everything a worker process needs to build the app (passed to workers as JSON)."""

    source: str
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_body_bytes: int = 20 * 1024 * 1024
    max_text_chars: int = 10_000
    max_batch_items: int = 64
    #: None: the recipe's data.max_image_pixels
    max_image_pixels: int | None = None
    #: None: the recipe's data.ocr engine (if any); "" turns OCR off
    ocr: str | None = None
    ocr_lang: str | None = None
    device: str | None = None


class ClientError(Exception):
    """A request the client got wrong: an HTTP status, the field, and the reason."""

    def __init__(self, status, field, reason):
        super().__init__(f"{field}: {reason}")
        self.status, self.field, self.reason = status, field, reason


def error_body(field, reason):
    """The JSON body of every error answer."""
    return {"error": {"field": field, "reason": reason}, "detail": f"{field}: {reason}" if field else reason}


class Service:
    """The loaded model, its batcher, OCR and metrics: what the routes use."""

    def __init__(self, config):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.config = config
        self.scorer = None
        self.load_error = None
        self.ocr_engine = None
        self.batcher = Batcher(self._score, max_batch=config.max_batch, max_wait=config.max_wait_ms / 1000.0,
                               on_batch=self._on_batch)
        self.metrics = CollectorRegistry()
        self.requests = Counter("mmcore_requests", "HTTP requests answered", ["endpoint", "status"],
                                registry=self.metrics)
        self.errors = Counter("mmcore_request_errors", "Requests refused, by field", ["endpoint", "field"],
                              registry=self.metrics)
        self.latency = Histogram("mmcore_request_latency_seconds", "Request latency", ["endpoint"],
                                 registry=self.metrics,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_sizes = Histogram("mmcore_batch_size", "Rows per forward pass", registry=self.metrics,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batch_seconds = Histogram("mmcore_batch_seconds", "Seconds per forward pass", registry=self.metrics)

    # -- loading ------------------------------------------------------------------------

    def load(self):
        """Open the run or bundle (in a thread: /health answers meanwhile), and the OCR engine."""
        from mmcore.export.scoring import open_scorer

        try:
            scorer = open_scorer(self.config.source, device=self.config.device)
            engine_name = self.config.ocr if self.config.ocr is not None else (scorer.ocr or {}).get("engine")
            if engine_name and scorer.uses_text:
                from mmcore.ocr.batch import build_engine, check_engine

                self.ocr_lang = self.config.ocr_lang or (scorer.ocr or {}).get("lang") or "eng"
                self.ocr_engine = build_engine(engine_name)
                check_engine(self.ocr_engine, self.ocr_lang)
            self.scorer = scorer
        except Exception as exc:  # /ready says why; the process stays up to say it
            self.load_error = " ".join(str(exc).split()) or type(exc).__name__
            log.error("mmcore serve: cannot load %s: %s", self.config.source, self.load_error)

    @property
    def max_image_pixels(self):
        return self.config.max_image_pixels or self.scorer.max_image_pixels

    # -- scoring ------------------------------------------------------------------------

    def _score(self, items):
        vision = [item.vision for item in items] if self.scorer.uses_vision else None
        texts = [item.text or "" for item in items] if self.scorer.uses_text else None
        return self.scorer.logits(vision, texts)

    def _on_batch(self, size, seconds):
        self.batch_sizes.observe(size)
        self.batch_seconds.observe(seconds)

    def prepare(self, image_bytes, text, field):
        """Decode + preprocess one image and settle its text (runs in a worker thread)."""
        from mmcore.data.images import BadImageError, load_rgb

        scorer = self.scorer
        vision = image = None
        source = "request" if text is not None and text.strip() else "none"
        if image_bytes is not None and (scorer.uses_vision or (source == "none" and self.ocr_engine is not None)):
            target = scorer.preprocessing.target_size if scorer.preprocessing is not None else None
            try:
                image = load_rgb(io.BytesIO(image_bytes), target_size=target, max_pixels=self.max_image_pixels)
            except BadImageError as exc:
                status = 413 if str(exc).startswith("image too large") else 422
                raise ClientError(status, f"{field}image", str(exc)) from None
            if scorer.uses_vision:
                vision = scorer.preprocess(image)
        if source == "none" and scorer.uses_text and self.ocr_engine is not None and image is not None:
            from mmcore.ocr.batch import normalize_text

            text, source = normalize_text(self.ocr_engine.read(image, self.ocr_lang)), "ocr"
        if scorer.modality == "text_only" and source == "none":
            why = "missing (this text_only model needs text" + (
                "; send an image to read it by OCR)" if self.ocr_engine is not None else "; no OCR engine configured)")
            raise ClientError(422, f"{field}text", why)
        return Item(vision=vision, text=text or ""), source

    async def predict_rows(self, rows):
        """[(image bytes | None, text | None, field prefix)] -> one answer dict per row."""
        from starlette.concurrency import run_in_threadpool

        prepared = [await run_in_threadpool(self.prepare, image, text, prefix) for image, text, prefix in rows]
        logits = await self.batcher.submit([item for item, _ in prepared])
        raw, calibrated, predicted = self.scorer.decide(logits)
        threshold = float(self.scorer.decision["threshold"])
        return [
            {"score": float(raw[k]), "calibrated_score": float(calibrated[k]), "prediction": bool(predicted[k]),
             "threshold": threshold, "text": item.text, "text_source": source}
            for k, (item, source) in enumerate(prepared)
        ]


# -- reading requests -----------------------------------------------------------------------


async def read_body(request, limit):
    """The whole body, refused with 413 beyond ``limit`` bytes (by header, or while streaming)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ClientError(400, "content-length", f"not a number ({length!r})") from None
        if declared > limit:
            raise ClientError(413, "body", f"{declared} bytes is over the limit of {limit} bytes (--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, "body", f"over the limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # starlette's own cache: request.form() parses it from here
    return body


async def parse_rows(request, service, *, batch):
    """The (image bytes, text, field prefix) rows of a /predict or /predict/batch request."""
    config = service.config
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded", "application/json"):
        raise ClientError(415, "content-type",
                          f"expected multipart/form-data or application/json (got {content_type or 'none'!r})")
    await read_body(request, config.max_body_bytes)
    if kind != "application/json":  # a form without files is urlencoded: its image is then missing
        rows = await _multipart_rows(request, config, batch)
    else:
        rows = _json_rows(request._body, batch)
    if batch and not rows:
        raise ClientError(422, "items", "no rows to score (send at least one image or text)")
    if len(rows) > config.max_batch_items:
        raise ClientError(413, "items", f"{len(rows)} rows is over the limit of {config.max_batch_items} per request")
    for image, text, prefix in rows:
        if text is not None and len(text) > config.max_text_chars:
            raise ClientError(422, f"{prefix}text",
                              f"{len(text)} characters is over the limit of {config.max_text_chars} (--max-text-chars)")
        uses_vision = service.scorer.uses_vision
        if image is None and uses_vision:
            how = "a file field 'image'" if kind.startswith("multipart") else "a base64 string under 'image'"
            raise ClientError(422, f"{prefix}image", f"missing (send {how})")
    return rows


async def _multipart_rows(request, config, batch):
    from starlette.datastructures import UploadFile

    try:
        form = await request.form(max_files=config.max_batch_items + 1, max_fields=2 * config.max_batch_items + 8,
                                  max_part_size=config.max_body_bytes)
    except Exception as exc:  # malformed multipart: python-multipart / starlette raise several kinds
        reason = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise ClientError(400, "body", f"malformed multipart/form-data ({reason})") from None
    images, texts = form.getlist("image"), form.getlist("text")
    for value in texts:
        if not isinstance(value, str):
            raise ClientError(422, "text", "must be a plain form field, not a file")
    data = []
    for i, value in enumerate(images):
        field = f"image[{i}]" if batch else "image"
        if not isinstance(value, UploadFile):
            raise ClientError(422, field, "must be a file upload (multipart file field), not a text value")
        data.append(await value.read())
    await form.close()
    if not batch:
        if len(images) > 1 or len(texts) > 1:
            raise ClientError(422, "image" if len(images) > 1 else "text", "given more than once (use /predict/batch)")
        return [(data[0] if data else None, texts[0] if texts else None, "")]
    if texts and images and len(texts) != len(images):
        raise ClientError(422, "text", f"{len(texts)} texts for {len(images)} images (give one per image, or none)")
    count = max(len(data), len(texts))
    return [(data[i] if data else None, texts[i] if texts else None, f"items[{i}].") for i in range(count)]


def _json_rows(body, batch):
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClientError(400, "body", f"not valid JSON ({exc})") from None
    if batch:
        if not isinstance(payload, dict) or "items" not in payload:
            raise ClientError(422, "items", "missing (send {\"items\": [{\"image\": ..., \"text\": ...}, ...]})")
        if not isinstance(payload["items"], list):
            raise ClientError(422, "items", f"must be a list (got {type(payload['items']).__name__})")
        return [_json_row(entry, f"items[{i}].") for i, entry in enumerate(payload["items"])]
    return [_json_row(payload, "")]


def _json_row(entry, prefix):
    if not isinstance(entry, dict):
        raise ClientError(422, prefix.rstrip(".") or "body", f"must be a JSON object (got {type(entry).__name__})")
    image, text = entry.get("image"), entry.get("text")
    if text is not None and not isinstance(text, str):
        raise ClientError(422, f"{prefix}text", f"must be a string (got {type(text).__name__})")
    if image is None:
        return None, text, prefix
    if not isinstance(image, str):
        raise ClientError(422, f"{prefix}image", f"must be a base64 string (got {type(image).__name__})")
    if image.startswith("data:") and "," in image:  # a data URL
        image = image.split(",", 1)[1]
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(422, f"{prefix}image", "not valid base64") from None
    return data, text, prefix


# -- the app ------------------------------------------------------------------------------


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "binary"}, "text": {"type": "string"}}}},
            "application/json": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "byte", "description": "base64 (or a data URL)"},
                "text": {"type": "string"}}}},
        },
    }
}
_BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "text": {"type": "array", "items": {"type": "string"}}}}},
            "application/json": {"schema": {"type": "object", "required": ["items"], "properties": {
                "items": {"type": "array", "items": _PREDICT_BODY["requestBody"]["content"]["application/json"]["schema"]}}}},
        },
    }
}


def create_app(config):
    """The FastAPI app serving ``config.source``."""
    service = Service(config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        loading = asyncio.get_running_loop().run_in_executor(None, service.load)
        try:
            yield
        finally:
            await service.batcher.stop()
            await loading

    from mmcore import __version__

    app = FastAPI(title="mmcore serve", version=__version__, lifespan=lifespan,
                  description="Scores ad images (and their text) with an mmcore run or export bundle.")
    app.state.service = service

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        endpoint = request.url.path
        try:
            response = await call_next(request)
        except Exception:
            log.exception("mmcore serve: %s failed", endpoint)
            response = JSONResponse(error_body(None, "internal server error"), status_code=500)
        if endpoint.startswith(("/predict", "/health", "/ready", "/metadata", "/metrics")):
            service.requests.labels(endpoint, str(response.status_code)).inc()
            service.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError):
        service.errors.labels(request.url.path, exc.field).inc()
        return JSONResponse(error_body(exc.field, exc.reason), status_code=exc.status)

    def require_ready():
        if service.scorer is None:
            reason = f"model failed to load: {service.load_error}" if service.load_error else "model is loading"
            raise ClientError(503, None, reason)

    @app.get("/health", summary="The process is up")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="The model is loaded and requests are scored")
    async def ready():
        if service.scorer is None:
            body = {"ready": False, "error": service.load_error}
            return JSONResponse(body, status_code=503)
        return {"ready": True}

    @app.get("/metadata", summary="Model, recipe summary, threshold, versions, serving limits")
    async def metadata():
        require_ready()
        limits = {"max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms,
                  "max_body_bytes": config.max_body_bytes, "max_text_chars": config.max_text_chars,
                  "max_batch_items": config.max_batch_items, "max_image_pixels": service.max_image_pixels}
        ocr = {"engine": getattr(service.ocr_engine, "name", None), "lang": getattr(service, "ocr_lang", None)}
        return {**service.scorer.metadata(), "serving": {**limits, "ocr": ocr if service.ocr_engine else None,
                                                         "pid": os.getpid()}}

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict", summary="Score one image (+ optional text)", openapi_extra=_PREDICT_BODY)
    async def predict(request: Request):
        require_ready()
        rows = await parse_rows(request, service, batch=False)
        return (await service.predict_rows(rows))[0]

    @app.post("/predict/batch", summary="Score several images (+ texts)", openapi_extra=_BATCH_BODY)
    async def predict_batch(request: Request):
        require_ready()
        rows = await parse_rows(request, service, batch=True)
        return {"predictions": await service.predict_rows(rows)}

    return app


def app_from_environment():
    """The uvicorn factory of each worker: the config comes as JSON in ``$MMCORE_SERVE_CONFIG``."""
    return create_app(ServeConfig(**json.loads(os.environ[CONFIG_ENV])))
