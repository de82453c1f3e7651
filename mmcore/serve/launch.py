"""Starting ``mmcore serve``: every refusal is one line before the port is bound, then uvicorn.

In order: the source (a bundle, or a run: completed, or still training with
``--while-training``), the text source (:func:`mmcore.textsource.text_rule`), the device, the
port. Only then do the server processes start; each builds the app from the
:class:`~mmcore.serve.config.ServeConfig` it finds in its environment.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import tomllib

from mmcore.errors import MmcoreError, RunError
from mmcore.serve.config import ServeConfig

APP_FACTORY = "mmcore.serve.app:app_from_environment"
#: seconds uvicorn lets requests in flight finish after SIGTERM
GRACEFUL_SHUTDOWN_S = 60


def source_recipe(source, *, while_training=False, echo=print):
    """``(kind, recipe data)`` of what ``source`` is; refuses anything that cannot be served, in one line."""
    from mmcore.export.bundle import RECIPE, is_bundle, read_manifest
    from mmcore.rundir import RunDir, RunLock
    from mmcore.scoring.ensemble_dir import is_ensemble, read_ensemble

    source = Path(source)
    if is_bundle(source):
        read_manifest(source, verify=False)  # the worker verifies the digests when it loads
        try:
            return "bundle", tomllib.loads((source / RECIPE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RunError(f"{source / RECIPE}: cannot read the bundle's recipe ({exc})") from None
    if not source.is_dir():
        raise RunError(f"{source}: neither a run directory nor an export bundle (not found)")
    if is_ensemble(source):
        read_ensemble(source, verify=False)  # the record and its members checked here; the worker hashes and loads them
        return "ensemble", RunDir(source).recipe_data()
    run = RunDir(source)
    run.require_exists()
    status = run.status() or {}
    holder = RunLock(run.path).live_holder() if status.get("state") != "completed" else None
    if holder is not None and not while_training:
        raise RunError(f"{source}: still training (pid {holder.get('pid', '?')} on {holder.get('host', '?')}); "
                       f"serve its best checkpoint so far with --while-training, or wait until it completes")
    note = run.require_scorable()  # a live run: its checkpoint_best.ckpt as it is now
    if note:
        echo(note)
    return "run", run.recipe_data()


def serve(source, *, host="127.0.0.1", port=8000, workers=1, device="auto", text=None, ocr=None, ocr_lang=None,
          while_training=False, access_log="text", log_level="info", echo=print, **limits):
    """Check everything a server needs, bind ``host:port``, then serve until SIGTERM/SIGINT.

    ``limits``: the other :class:`~mmcore.serve.config.ServeConfig` fields (max_batch, ...).
    """
    from mmcore.progress import progress_for
    from mmcore.serve.devices import resolve_device
    from mmcore.serve.process import address, bind_listener
    from mmcore.textsource import text_rule

    kind, recipe = source_recipe(source, while_training=while_training, echo=echo)
    data = recipe.get("data") or {}
    engine = ocr if ocr is not None else (data.get("ocr") or {}).get("engine")
    modality = (recipe.get("train") or {}).get("modality", "multimodal")
    text_rule(modality, ocr=bool(engine), mode=text, where=f"mmcore serve {source}")
    if kind == "bundle":  # an int8 graph runs on the CPU: --device cuda is one line, auto is the CPU
        from mmcore.export.bundle import bundle_device, read_manifest

        device = bundle_device(source, device, read_manifest(source, verify=False).precision)
    device, gpus = resolve_device(device, kind)
    progress_for(quiet=False)  # workers inherit the silence of third-party bars in a non-terminal log
    sock = bind_listener(host, port)
    slots = tempfile.mkdtemp(prefix="mmcore-serve-") if workers > 1 else None
    config = ServeConfig(
        source=str(Path(source).resolve()), ocr=ocr, ocr_lang=ocr_lang, text=text, device=device, gpus=gpus,
        access_log=access_log, log_level=log_level,
        supervisor_pid=os.getpid() if workers > 1 else None, slots_dir=slots, **limits,
    )
    config.to_environment()  # worker processes are fresh interpreters: they read it from there
    echo(f"mmcore serve: {source} on http://{address(host, port)} ({workers} worker{'s' if workers > 1 else ''}, device {device})")
    try:
        _run_uvicorn(sock, workers=workers, access_log=access_log, log_level=log_level)
    finally:
        sock.close()
        if slots:
            shutil.rmtree(slots, ignore_errors=True)


def _run_uvicorn(sock, *, workers, access_log, log_level):
    import uvicorn

    settings = dict(factory=True, log_level=log_level, access_log=access_log == "text",
                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    if workers > 1:  # uvicorn's supervisor: N processes on one socket, restarted when they die
        from uvicorn.supervisors import Multiprocess

        Multiprocess(uvicorn.Config(APP_FACTORY, workers=workers, **settings), sockets=[sock]).run()
        return
    server = _graceful_server_class()(uvicorn.Config(APP_FACTORY, **settings))
    server.run(sockets=[sock])
    if not server.started:
        raise MmcoreError("mmcore serve: could not start (see the lines above)")


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
