"""``mmcore serve``: a run directory or an export bundle behind HTTP (FastAPI + uvicorn).

- ``POST /predict``: multipart (``image`` file, ``text``) or JSON
  (``{"image": "<base64>", "text": "..."}``) -> score, calibrated_score, prediction, threshold,
  text, text_source, model_version, request_id;
- ``POST /predict/batch``: multipart (``image`` repeated, ``text`` repeated in the same order)
  or JSON ``{"items": [{"image": ..., "text": ...}, ...]}`` -> ``{"predictions": [...], ...}``;
- ``GET /health`` (the process answers), ``/ready`` (loaded and warmed up), ``/metadata``,
  ``/metrics`` (Prometheus text), ``/docs`` and ``/redoc`` (served from local files), ``/openapi.json``.

Every client mistake is a 4xx JSON body ``{"error": {"field": ..., "reason": ...}}`` naming the
field; a 500 means a server fault. Every answer carries ``X-Request-ID`` and, once the model
is loaded, ``X-Model-Version``. The process keeps no state between requests (no cache, no
session), so any number of workers or machines can share the traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mmcore.serve.config import ServeConfig
from mmcore.serve.metrics import route_label
from mmcore.serve.requests import ClientError, error_body, parse_rows, request_id
from mmcore.serve.schemas import ERROR_RESPONSES, BatchPrediction, Health, Metadata, Prediction, Ready
from mmcore.serve.service import Service

log = logging.getLogger("mmcore.serve")
access_log = logging.getLogger("mmcore.serve.access")

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


def create_app(config, *, device=None):
    """The FastAPI app serving ``config.source`` (on ``device``, else ``config.device``)."""
    from fastapi_offline import FastAPIOffline

    from mmcore import __version__

    service = Service(config, device=device)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        loading = asyncio.get_running_loop().run_in_executor(None, service.load)
        releasing = asyncio.get_running_loop().create_task(service.release_when_idle())
        try:
            yield
        finally:
            releasing.cancel()
            await service.batcher.stop()
            await loading

    app = FastAPIOffline(title="mmcore serve", version=__version__, lifespan=lifespan,
                         description="Scores ad images (and their text) with an mmcore run or export bundle.")
    app.state.service = service

    @app.middleware("http")
    async def identify_and_count(request: Request, call_next):
        started = time.perf_counter()
        request.state.request_id = request_id(request.headers)
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - a server fault is one logged traceback and a 500, never a dropped answer
            log.exception("mmcore serve: %s %s failed", request.method, route_label(request))
            response = JSONResponse(error_body(None, "internal server error", request.state.request_id),
                                    status_code=500)
        seconds = time.perf_counter() - started
        route = route_label(request)
        response.headers["X-Request-ID"] = request.state.request_id
        if service.model_version is not None:
            response.headers["X-Model-Version"] = service.model_version
        service.metrics.answered(route, response.status_code, seconds)
        if config.access_log == "json":
            access_log.info(json.dumps({
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "method": request.method, "path": route,
                "status": response.status_code, "duration_ms": round(seconds * 1000, 3),
                "request_id": request.state.request_id, "model_version": service.model_version,
            }))
        return response

    @app.exception_handler(ClientError)
    async def client_error(request: Request, exc: ClientError):
        service.metrics.refused(route_label(request), exc.field)
        return JSONResponse(error_body(exc.field, exc.reason, request.state.request_id), status_code=exc.status)

    def require_ready():
        if not service.ready:
            reason = f"model failed to load: {service.load_error}" if service.load_error else f"model is {service.state}"
            raise ClientError(503, None, reason)

    def answer(request, fields):
        return {**fields, "model_version": service.model_version, "request_id": request.state.request_id}

    @app.get("/health", summary="The process is up", response_model=Health)
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="The model is loaded and has scored its warm-up row", response_model=Ready,
             responses={503: {"model": Ready}})
    async def ready():
        body = {"ready": service.ready, "state": service.state, "error": service.load_error}
        return body if service.ready else JSONResponse(body, status_code=503)

    @app.get("/metadata", summary="Model, recipe summary, threshold, versions, device, serving limits",
             response_model=Metadata, responses={503: ERROR_RESPONSES[503]})
    async def metadata():
        require_ready()
        limits = {"max_batch": config.max_batch, "max_wait_ms": config.max_wait_ms,
                  "max_body_bytes": config.max_body_bytes, "max_text_chars": config.max_text_chars,
                  "max_batch_items": config.max_batch_items, "max_image_pixels": service.max_image_pixels,
                  "decode_memory_bytes": config.decode_memory_bytes}
        ocr = {"engine": service.ocr_name, "lang": service.ocr_lang} if service.ocr_engine else None
        return {**service.scorer.metadata(), "model_version": service.model_version,
                "text_source": service.rule.describe(),
                "serving": {**limits, "ocr": ocr, "device": service.device, "pid": os.getpid()}}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics():
        body, content_type = service.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.post("/predict", summary="Score one image (+ its text)", openapi_extra=_PREDICT_BODY,
              response_model=Prediction, responses=ERROR_RESPONSES)
    async def predict(request: Request):
        require_ready()
        rows = await parse_rows(request, config, batch=False, uses_vision=service.scorer.uses_vision)
        return answer(request, (await service.predict_rows(rows))[0])

    @app.post("/predict/batch", summary="Score several images (+ texts)", openapi_extra=_BATCH_BODY,
              response_model=BatchPrediction, responses=ERROR_RESPONSES)
    async def predict_batch(request: Request):
        require_ready()
        rows = await parse_rows(request, config, batch=True, uses_vision=service.scorer.uses_vision)
        return answer(request, {"predictions": await service.predict_rows(rows)})

    return app


def configure_logging(config):
    """mmcore's own lines (uvicorn's format) and, with ``--access-log json``, one JSON object a request on stdout."""
    from uvicorn.logging import DefaultFormatter

    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(config.log_level.upper())
    if config.access_log == "json" and not access_log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
        access_log.propagate = False
        access_log.setLevel(logging.INFO)  # asked for explicitly: whatever --log-level says


def app_from_environment():
    """The uvicorn factory of each server process: the config comes as JSON in ``$MMCORE_SERVE_CONFIG``."""
    from mmcore.progress import progress_for
    from mmcore.serve.devices import worker_device
    from mmcore.serve.process import claim_worker_number, die_with_supervisor

    config = ServeConfig.from_environment()
    configure_logging(config)
    progress_for(quiet=False)  # no third-party progress bars in a log that is not a terminal
    if config.supervisor_pid is not None:
        die_with_supervisor(config.supervisor_pid)
    number = claim_worker_number(config.slots_dir) if config.slots_dir else 0
    return create_app(config, device=worker_device(config.device, config.gpus, number))
