"""``mmcore serve RUN_DIR|BUNDLE_DIR``: a finished run or an export bundle over HTTP (:mod:`mmcore.serve`:
every refusal one line before the port is bound, then uvicorn until SIGTERM)."""

from __future__ import annotations

from mmcore.kit.deps import require_extra
from mmcore.serve.config import DEFAULT_DECODE_MEMORY_MB


def serve_model(source, *, host="127.0.0.1", port=8000, workers=1, device="auto", text=None, ocr=None, ocr_lang=None,
                while_training=False, access_log="text", log_level="info", max_batch=16, max_wait_ms=5.0,
                max_body_mb=20.0, max_text_chars=10_000, max_batch_items=64, max_image_pixels=None,
                decode_memory_mb=DEFAULT_DECODE_MEMORY_MB, echo=print):
    """Serve ``source`` until SIGTERM/SIGINT (see ``mmcore serve --help`` for each option)."""
    require_extra("serve", "mmcore serve")  # before anything: a missing package is one line, exit 1
    from mmcore.serve.launch import serve

    serve(source, host=host, port=port, workers=workers, device=device, text=text, ocr=ocr, ocr_lang=ocr_lang,
          while_training=while_training, access_log=access_log, log_level=log_level, echo=echo,
          max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_bytes=int(max_body_mb * 1024 * 1024),
          max_text_chars=max_text_chars, max_batch_items=max_batch_items, max_image_pixels=max_image_pixels,
          decode_memory_bytes=decode_memory_mb * 1024 * 1024)
