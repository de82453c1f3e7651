"""Reading a request into rows, every input bounded and checked before any row joins a batch.

A row is ``(image bytes | None, text | None, field prefix)``; the prefix (``""`` or
``"items[3]."``) makes each refusal name its field. Every client mistake is a
:class:`ClientError` (a 4xx naming the field); nothing a client sends reaches the scorer
unchecked, so one client's request cannot fail another's batch.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid

#: deepest JSON nesting accepted: a body is at most {"items": [{"image": ..., "text": ...}]}
MAX_JSON_DEPTH = 8
#: an incoming X-Request-ID kept as it is (else one is made)
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


class ClientError(Exception):
    """A request the client got wrong: an HTTP status, the field, and the reason."""

    def __init__(self, status, field, reason):
        super().__init__(f"{field}: {reason}")
        self.status, self.field, self.reason = status, field, reason


def error_body(field, reason, request_id):
    """The JSON body of every error answer."""
    return {"error": {"field": field, "reason": reason}, "detail": f"{field}: {reason}" if field else reason,
            "request_id": request_id}


def request_id(headers):
    """The request's ``X-Request-ID`` when it is well formed (1-128 of ``[A-Za-z0-9._:-]``), else a new one."""
    given = headers.get("x-request-id")
    if given is not None and REQUEST_ID_RE.fullmatch(given):
        return given
    return uuid.uuid4().hex


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


async def parse_rows(request, config, *, batch, uses_vision):
    """The checked (image bytes, text, field prefix) rows of a /predict or /predict/batch request."""
    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind not in ("multipart/form-data", "application/x-www-form-urlencoded", "application/json"):
        raise ClientError(415, "content-type",
                          f"expected multipart/form-data or application/json (got {content_type or 'none'!r})")
    body = await read_body(request, config.max_body_bytes)
    if kind != "application/json":  # a form without files is urlencoded: its image is then missing
        rows = await _multipart_rows(request, config, batch)
    else:
        rows = _json_rows(body, batch)
    if batch and not rows:
        raise ClientError(422, "items", "no rows to score (send at least one image or text)")
    if len(rows) > config.max_batch_items:
        raise ClientError(413, "items", f"{len(rows)} rows is over the limit of {config.max_batch_items} per request")
    for image, text, prefix in rows:
        if text is not None:
            check_text(text, f"{prefix}text", config.max_text_chars)
        if image is None and uses_vision:
            how = "a file field 'image'" if kind.startswith("multipart") else "a base64 string under 'image'"
            raise ClientError(422, f"{prefix}image", f"missing (send {how})")
    return rows


def check_text(text, field, max_chars):
    """Refuse a text that is too long or not encodable as UTF-8 (an unpaired surrogate from JSON's ``\\ud800``)."""
    if len(text) > max_chars:
        raise ClientError(422, field, f"{len(text)} characters is over the limit of {max_chars} (--max-text-chars)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ClientError(422, field, f"not valid Unicode (an unpaired surrogate at character {exc.start}); "
                                      f"send UTF-8 text") from None


async def _multipart_rows(request, config, batch):
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=config.max_batch_items + 1, max_fields=2 * config.max_batch_items + 8,
                                  max_part_size=config.max_body_bytes)
    # starlette turns its parser's errors into a 400 HTTPException; python-multipart's are ValueErrors
    except (HTTPException, MultiPartException, ValueError) as exc:
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


def json_depth(body):
    """The deepest nesting of arrays and objects in a JSON body, strings skipped (no parsing)."""
    import numpy as np

    outside_strings = _JSON_STRING.sub(b"", body)
    step = np.zeros(256, dtype=np.int8)
    step[[ord("["), ord("{")]] = 1
    step[[ord("]"), ord("}")]] = -1
    depth = np.cumsum(step[np.frombuffer(outside_strings, dtype=np.uint8)], dtype=np.int64)
    return int(depth.max()) if depth.size else 0


def _json_rows(body, batch):
    depth = json_depth(body)  # json.loads recurses: bound the nesting before it reads
    if depth > MAX_JSON_DEPTH:
        raise ClientError(400, "body", f"JSON nested {depth} levels deep, over the limit of {MAX_JSON_DEPTH}")
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
