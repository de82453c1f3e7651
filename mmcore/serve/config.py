"""What a server process needs to build the app; workers receive it as JSON in the environment."""

from __future__ import annotations

import json
import os

import attrs

CONFIG_ENV = "MMCORE_SERVE_CONFIG"
#: the default memory budget of images decoding at once (``--decode-memory-mb``)
DEFAULT_DECODE_MEMORY_MB = 1024


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
    #: bytes of decoded images in flight at once (each image counts DECODED_BYTES_PER_PIXEL a pixel)
    decode_memory_bytes: int = DEFAULT_DECODE_MEMORY_MB * 1024 * 1024
    #: None: the recipe's data.ocr engine (if any); "" turns OCR off
    ocr: str | None = None
    ocr_lang: str | None = None
    #: None | "required" | "optional": rows without text when no OCR reads them (mmcore.textsource)
    text: str | None = None
    #: "cpu", "cuda" (several workers spread over ``gpus`` devices) or "cuda:N"
    device: str = "cpu"
    gpus: int = 0
    #: "text" (uvicorn's lines), "json" (one JSON object per request) or "off"
    access_log: str = "text"
    log_level: str = "info"
    #: with several workers: the supervisor's pid (workers die with it) and where they take
    #: their worker numbers (lock files)
    supervisor_pid: int | None = None
    slots_dir: str | None = None

    def to_environment(self):
        """Put this config where :func:`from_environment` (in each worker) finds it."""
        os.environ[CONFIG_ENV] = json.dumps(attrs.asdict(self))

    @classmethod
    def from_environment(cls):
        """The config :meth:`to_environment` put in ``$MMCORE_SERVE_CONFIG``."""
        return cls(**json.loads(os.environ[CONFIG_ENV]))
