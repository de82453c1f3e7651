"""``mmcore serve``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs
import click

from mmcore.errors import MmcoreError


@click.command("serve")
@click.argument("source", metavar="RUN_DIR|BUNDLE_DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes, each with its own copy of the model (the server is stateless).")
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
@click.option("--ocr", "ocr", default=None, metavar="ENGINE",
              help="OCR engine reading the text of images sent without text [default: the run's data.ocr; '' = off].")
@click.option("--ocr-lang", default=None, help="OCR language(s) [default: the run's data.ocr.lang, else eng].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None,
              help="Where a bundle runs [default: the GPU when there is one]; a run uses its recipe's train.device.")
@click.option("--log-level", type=click.Choice(["critical", "error", "warning", "info", "debug"]), default="info",
              show_default=True)
def serve_command(source, host, port, workers, max_batch, max_wait_ms, max_body_mb, max_text_chars,
                  max_batch_items, max_image_pixels, ocr, ocr_lang, device, log_level):
    """Serve a finished run or an export bundle over HTTP.

    \b
    mmcore serve bundles/demo --port 8000
    curl -F image=@ad.jpg -F text="50% OFF" http://127.0.0.1:8000/predict

    POST /predict, /predict/batch; GET /health, /ready, /metadata, /metrics, /docs.
    SIGTERM (or Ctrl-C) lets requests in flight finish, then exits 0.
    """
    from mmcore.kit.deps import require_extra

    require_extra("serve", "mmcore serve")  # before anything: a missing package is one line, exit 1
    import uvicorn

    from mmcore.export.bundle import is_bundle, read_manifest
    from mmcore.rundir import RunDir
    from mmcore.serve.app import CONFIG_ENV, ServeConfig

    # refuse a wrong folder here, as one line, before any worker starts
    if is_bundle(source):
        read_manifest(source)
    elif not source.is_dir():
        raise MmcoreError(f"{source}: neither a run directory nor an export bundle (not found)")
    else:
        RunDir(source).require_completed()
    config = ServeConfig(
        source=str(source.resolve()), max_batch=max_batch, max_wait_ms=max_wait_ms,
        max_body_bytes=int(max_body_mb * 1024 * 1024), max_text_chars=max_text_chars,
        max_batch_items=max_batch_items, max_image_pixels=max_image_pixels, ocr=ocr, ocr_lang=ocr_lang,
        device=device,
    )
    # workers are fresh processes: they build the app from the environment
    os.environ[CONFIG_ENV] = json.dumps(attrs.asdict(config))
    app = "mmcore.serve.app:app_from_environment"
    if workers > 1:  # uvicorn's supervisor: N processes on one socket
        uvicorn.run(app, factory=True, host=host, port=port, workers=workers, log_level=log_level,
                    timeout_graceful_shutdown=60)
        return
    server = _GracefulServer(uvicorn.Config(app, factory=True, host=host, port=port, log_level=log_level,
                                            timeout_graceful_shutdown=60))
    server.run()
    if not server.started:
        raise MmcoreError(f"mmcore serve: could not start on {host}:{port} (see the lines above)")


def _graceful_server_class():
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM/SIGINT shutdown that went well exits 0.

        uvicorn re-raises the captured signal after its graceful shutdown, so the process would
        end "killed by SIGTERM" (status -15) although every request in flight was answered.
        """

        def capture_signals(self):
            inner = super().capture_signals()

            class Captured:
                def __enter__(_):
                    return inner.__enter__()

                def __exit__(_, *exc):
                    self._captured_signals.clear()  # handled: do not re-raise
                    return inner.__exit__(*exc)

            return Captured()

    return GracefulServer


def _GracefulServer(config):  # noqa: N802 (a class made on first use: uvicorn is imported lazily)
    return _graceful_server_class()(config)
