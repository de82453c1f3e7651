"""OCR engines: build one from the registry (params structured as a recipe's are), let it check
its install, and run it over image files, in this process or a pool.

Engines come from plugins (hook ``register_ocr_engines``, registry kind ``"ocr"``). An engine
raises :class:`~mmcore.errors.MmcoreError` for problems that affect every image (binary or
language pack missing): the run stops with that message. Any other exception fails only the
image it was reading.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import multiprocessing
import signal
import sys
from typing import NamedTuple

import attrs

from mmcore.data.images import DEFAULT_MAX_IMAGE_BYTES
from mmcore.errors import MmcoreError, RecipeError, did_you_mean
from mmcore.plugins.manager import get_registry

#: longest image side handed to the engine (bigger images are shrunk; OCR gains nothing above it)
MAX_SIDE = 2000


def normalize_text(text):
    """Collapse every whitespace run to one space and strip."""
    return " ".join(str(text).split())


def decode_image(data, max_side=MAX_SIDE):
    """Image bytes -> RGB PIL image, longest side at most ``max_side``.

    Raises :class:`mmcore.data.images.BadImageError` for anything Pillow cannot decode.
    """
    from mmcore.data.images import load_rgb

    image = load_rgb(io.BytesIO(data), target_size=(max_side, max_side))
    if max(image.size) > max_side:
        from PIL import Image

        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


# --------------------------------------------------------------------------- building


def parse_engine_params(pairs):
    """``("psm=6", "lang_model=best")`` -> ``{"psm": 6, "lang_model": "best"}``.

    Values are read exactly as ``--set`` reads them (:func:`mmcore.recipe.parse_override`: TOML
    when it parses, else the text as is); :func:`build_engine` then structures them against the
    engine's params class like a recipe's component params.
    """
    from mmcore.recipe import apply_overrides

    for pair in pairs:
        key = pair.partition("=")[0].strip()
        if "=" not in pair or not key or any(not part for part in key.split(".")):
            raise RecipeError(f"--engine-param {pair}: expected KEY=VALUE")
    data, _ = apply_overrides({}, pairs)
    return data


def build_engine(name, params=None, *, registry=None, source="--engine-param"):
    """The OCR engine registered as ``name``, built with ``params``.

    ``params``: None (the defaults), a plain dict (structured against the engine's params class
    by the recipe's converter; problems are :class:`RecipeError` lines starting with ``source``)
    or an instance of that class.
    """
    registry = registry if registry is not None else get_registry()
    registration = registry.get("ocr", name)
    params_cls = registration.params_cls
    if params is None:
        params = {}
    if not isinstance(params, params_cls):
        params = _structure_params(name, params_cls, dict(params), source)
    return registration.factory(params)


def _structure_params(name, params_cls, data, source):
    from mmcore.recipe.convert import structure

    known = [field.name for field in attrs.fields(params_cls)] if attrs.has(params_cls) else []
    unknown = [key for key in data if key not in known]
    if unknown:  # the recipe says "unknown key"; on a command line the list of keys helps more
        takes = ", ".join(known) or "no parameters"
        raise RecipeError(
            [f"{source}: {key}: unknown key{did_you_mean(key, known)}; OCR engine {name!r} takes {takes}" for key in unknown]
        )
    return structure(data, params_cls, source=source)


def check_engine(engine, lang):
    """Let the engine refuse up front (missing binary, missing language pack)."""
    check = getattr(engine, "check", None)
    if check is not None:
        check(lang)


# --------------------------------------------------------------------------- reading


class OcrResult(NamedTuple):
    """What reading one image gave: ``text`` or ``error`` (``fatal`` = stop the whole run)."""

    key: object
    text: str | None
    error: str | None = None
    fatal: bool = False


@attrs.frozen
class ImageReader:
    """Reads one image file: decode, OCR, normalize. Picklable."""

    engine: object
    lang: str
    max_side: int = MAX_SIDE
    #: ``data.max_image_bytes``: a larger file (or a FIFO, a device) is refused from its ``stat``, unread
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def __call__(self, key, path):
        """The :class:`OcrResult` of the image at ``path``, tagged with ``key``."""
        from mmcore.data.images import BadImageError, read_image_bytes

        try:
            data = read_image_bytes(path, self.max_bytes)
            image = decode_image(data, self.max_side)
        except BadImageError as exc:
            return OcrResult(key, None, f"cannot read image: {exc}")
        except Exception as exc:  # Pillow raises many kinds; one bad file must not stop the run
            return OcrResult(key, None, f"cannot read image: {type(exc).__name__}: {exc}")
        try:
            text = self.engine.read(image, self.lang)
        except MmcoreError as exc:
            return OcrResult(key, None, str(exc), fatal=True)
        except Exception as exc:
            return OcrResult(key, None, f"OCR failed: {type(exc).__name__}: {exc}")
        return OcrResult(key, normalize_text(text or ""))


_worker_reader = None


def _init_worker(reader):
    global _worker_reader
    _worker_reader = reader
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _read_in_worker(key, path):
    return _worker_reader(key, path)


def _pool_context():
    # fork: workers inherit the engine (and test fakes) without pickling or re-importing torch
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return None


def read_images(jobs, reader, workers, *, progress=True, desc="ocr"):
    """Yield an :class:`OcrResult` for each ``(key, path)`` job, in completion order.

    ``workers <= 1`` reads in this process; otherwise a process pool with at most
    ``4 * workers`` images in flight. A fatal result is yielded and reading stops.
    """
    from tqdm.auto import tqdm

    jobs = list(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=None if progress else True)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for key, path in jobs:
                result = reader(key, path)
                bar.update()
                yield result
                if result.fatal:
                    return
            return
        pending = iter(jobs)
        executor = cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=_pool_context(),
            initializer=_init_worker,
            initargs=(reader,),
        )
        try:
            in_flight = set()
            while True:
                while len(in_flight) < 4 * workers:
                    job = next(pending, None)
                    if job is None:
                        break
                    in_flight.add(executor.submit(_read_in_worker, *job))
                if not in_flight:
                    break
                done, in_flight = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    result = future.result()
                    bar.update()
                    yield result
                    if result.fatal:
                        return
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
