"""``mmcore serve``."""

from __future__ import annotations

from pathlib import Path

import click

from mmcore.commands.serve import DEFAULT_DECODE_MEMORY_MB, serve_model
from mmcore.textsource import TEXT_MODES


@click.command("serve")
@click.argument("source", metavar="RUN_DIR|BUNDLE_DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes, each with its own copy of the model (the server is stateless); they end with "
                   "the supervisor, even when it is killed.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda|cuda:N",
              help="Where the model runs. auto: the GPU when one can be used, else the CPU; cuda: refused in "
                   "one line when CUDA cannot be had, several workers spread over the visible GPUs.")
@click.option("--text", "text", type=click.Choice(TEXT_MODES), default=None,
              help="A model that reads text needs a source of it: required (clients send it; a request "
                   "without is a 422), OCR (--ocr, or the run's data.ocr), or optional (empty text is scored, "
                   "and the answer says text_source 'none-optional').")
@click.option("--ocr", "ocr", default=None, metavar="ENGINE",
              help="OCR engine reading the text of images sent without text [default: the run's data.ocr; '' = off].")
@click.option("--ocr-lang", default=None, help="OCR language(s) [default: the run's data.ocr.lang, else eng].")
@click.option("--while-training", is_flag=True,
              help="Serve a run that is still training from its best checkpoint so far (as it is at start-up).")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most rows scored in one forward pass (1 = no dynamic batching).")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long the first waiting request waits for others to join its batch.")
@click.option("--max-body-mb", type=click.FloatRange(min=0.001), default=20.0, show_default=True,
              help="Largest request body.")
@click.option("--max-text-chars", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Longest text accepted per row.")
@click.option("--max-batch-items", type=click.IntRange(min=1), default=64, show_default=True,
              help="Most rows in one /predict/batch request.")
@click.option("--max-image-pixels", type=click.IntRange(min=1), default=None,
              help="Largest image (width x height) [default: the recipe's data.max_image_pixels].")
@click.option("--decode-memory-mb", type=click.IntRange(min=16), default=DEFAULT_DECODE_MEMORY_MB, show_default=True,
              help="Memory for images decoding at once (12 bytes a pixel); larger images wait their turn.")
@click.option("--access-log", type=click.Choice(["text", "json", "off"]), default="text", show_default=True,
              help="One line per request: uvicorn's text, one JSON object (method, path template, status, "
                   "duration, request id, model version), or none.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
def serve_command(source, host, port, workers, device, text, ocr, ocr_lang, while_training, max_batch, max_wait_ms,
                  max_body_mb, max_text_chars, max_batch_items, max_image_pixels, decode_memory_mb, access_log,
                  log_level):
    """Serve a finished run or an export bundle over HTTP.

    \b
    mmcore serve bundles/demo --text required --port 8000
    curl -F image=@ad.jpg -F text="50% OFF" http://127.0.0.1:8000/predict

    POST /predict, /predict/batch; GET /health, /ready, /metadata, /metrics, /docs, /redoc.
    SIGTERM (or Ctrl-C) lets requests in flight finish, then exits 0.
    """
    serve_model(source, host=host, port=port, workers=workers, device=device, text=text, ocr=ocr, ocr_lang=ocr_lang,
                while_training=while_training, access_log=access_log, log_level=log_level, max_batch=max_batch,
                max_wait_ms=max_wait_ms, max_body_mb=max_body_mb, max_text_chars=max_text_chars,
                max_batch_items=max_batch_items, max_image_pixels=max_image_pixels, decode_memory_mb=decode_memory_mb,
                echo=click.echo)
