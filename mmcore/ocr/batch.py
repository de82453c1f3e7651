"""OCR: fill the ``text_info`` column from the images themselves.

Two entry points share one reader:

- ``mmcore ocr INPUT -o OUTPUT.csv`` (:func:`run_ocr`, :data:`ocr_command`): a CSV or a folder of
  images in, a CSV out; parallel, resumable (``OUTPUT.csv.partial.jsonl``), atomic.
- :func:`ocr_fill`: fill the empty texts of a list of images on the fly, with an on-disk cache
  keyed by image content, engine identity and language.

Engines come from plugins (hook ``register_ocr_engines``, registry kind ``"ocr"``). An engine
raises :class:`~mmcore.errors.MmcoreError` for problems that affect every image (binary or
language pack missing): the run stops with that message. Any other exception fails only the
image it was reading.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import attrs

from mmcore.errors import DataError, MmcoreError
from mmcore.plugins.manager import get_registry

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
#: longest image side handed to the engine (bigger images are shrunk; OCR gains nothing above it)
MAX_SIDE = 2000
COLUMNS = ("local_image_path", "label", "text_info")


def normalize_text(text):
    """Collapse every whitespace run to one space and strip."""
    return " ".join(str(text).split())


def sha256_bytes(data):
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path):
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


# --------------------------------------------------------------------------- engines


def parse_engine_params(params_cls, pairs):
    """``("psm=6", "timeout=30")`` -> a ``params_cls`` instance (values typed from its fields)."""
    attrs.resolve_types(params_cls)
    fields = {f.name: f for f in attrs.fields(params_cls)}
    kwargs = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            known = ", ".join(fields) or "(none)"
            raise MmcoreError(
                f"--engine-param {pair!r}: expected KEY=VALUE with KEY one of {known}"
            )
        kwargs[key] = _typed(fields[key].type, raw.strip(), key)
    try:
        return params_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        field = getattr(exc, "field", None)
        raise MmcoreError(f"--engine-param {field + ': ' if field else ''}{exc}") from None


def _typed(annotation, raw, key):
    text = str(annotation)
    if raw.lower() in ("none", "") and "None" in text:
        return None
    try:
        if annotation is bool or text == "bool":
            if raw.lower() in ("true", "1", "yes", "on"):
                return True
            if raw.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if annotation is int or text.startswith("int"):
            return int(raw)
        if annotation is float or text.startswith("float"):
            return float(raw)
    except ValueError:
        raise MmcoreError(f"--engine-param {key}: cannot read {raw!r} as {text}") from None
    return raw


def build_engine(name, params=None, *, registry=None):
    """The OCR engine registered as ``name``, built with ``params`` (defaults when None)."""
    registry = registry if registry is not None else get_registry()
    registration = registry.get("ocr", name)
    if params is None:
        params = registration.params_cls()
    elif isinstance(params, dict):
        params = registration.params_cls(**params)
    return registration.factory(params)


def check_engine(engine, lang):
    """Let the engine refuse up front (missing binary, missing language pack)."""
    check = getattr(engine, "check", None)
    if check is not None:
        check(lang)


class OcrResult(NamedTuple):
    """What reading one image gave: ``text`` or ``error`` (``fatal`` = stop the whole run)."""

    key: object
    sha256: str | None
    text: str | None
    error: str | None = None
    fatal: bool = False


@attrs.frozen
class ImageReader:
    """Reads one image file: hash its bytes, decode, OCR, normalize. Picklable."""

    engine: object
    lang: str
    max_side: int = MAX_SIDE

    def __call__(self, key, path):
        from mmcore.data.images import BadImageError

        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            return OcrResult(key, None, None, f"cannot read image: {exc.strerror or exc}")
        digest = sha256_bytes(data)
        try:
            image = decode_image(data, self.max_side)
        except BadImageError as exc:
            return OcrResult(key, digest, None, f"cannot read image: {exc}")
        except Exception as exc:  # Pillow raises many kinds; one bad file must not stop the run
            return OcrResult(key, digest, None, f"cannot read image: {type(exc).__name__}: {exc}")
        try:
            text = self.engine.read(image, self.lang)
        except MmcoreError as exc:
            return OcrResult(key, digest, None, str(exc), fatal=True)
        except Exception as exc:
            return OcrResult(key, digest, None, f"OCR failed: {type(exc).__name__}: {exc}")
        return OcrResult(key, digest, normalize_text(text or ""))


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


# --------------------------------------------------------------------------- files


def write_text_atomic(path, text):
    """Write ``text`` to ``path`` via a temp file in the same folder, fsync, os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _same_file(a, b):
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def load_table(input_path, output_path, base_dir=None):
    """``(frame, base_dir)`` for a CSV or a folder of images; every column read as text."""
    import pandas as pd

    input_path = Path(input_path)
    if input_path.is_dir():
        images = sorted(
            p for p in input_path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not images:
            raise DataError(f"{input_path}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        out_dir = Path(output_path).resolve().parent
        rows = []
        for image in images:
            image = image.resolve()
            # relative to the output CSV when inside its folder, so the CSV moves with the images
            shown = image.relative_to(out_dir) if image.is_relative_to(out_dir) else image
            rows.append({"local_image_path": shown.as_posix(), "label": "", "text_info": ""})
        return pd.DataFrame(rows, columns=list(COLUMNS)), out_dir
    try:
        frame = pd.read_csv(input_path, keep_default_na=False, dtype=str)
    except Exception as exc:
        raise DataError(f"{input_path}: cannot read CSV ({exc})") from None
    if "local_image_path" not in frame.columns:
        have = ", ".join(frame.columns) or "(none)"
        raise DataError(f"{input_path}: no local_image_path column (have: {have})")
    if "text_info" not in frame.columns:
        frame["text_info"] = ""
    return frame, Path(base_dir) if base_dir is not None else input_path.resolve().parent


def resolve_image(base_dir, value):
    """An image path from a CSV cell: absolute as is, relative against ``base_dir``."""
    path = Path(value)
    return path if path.is_absolute() else Path(base_dir) / path


def partial_path(output_path):
    """Where finished rows of an unfinished run are kept: ``OUTPUT.csv.partial.jsonl``."""
    output_path = Path(output_path)
    return output_path.with_name(output_path.name + ".partial.jsonl")


def load_partial(path, engine_identity, lang):
    """``{row: (sha256, text)}`` from a partial file, ignoring other engines/languages.

    A line cut short by a kill is skipped.
    """
    done = {}
    if not Path(path).exists():
        return done
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                if record["engine"] == engine_identity and record["lang"] == lang:
                    done[int(record["row"])] = (record["sha256"], record["text"])
            except (ValueError, KeyError, TypeError):
                continue
    return done


# --------------------------------------------------------------------------- the command


@attrs.frozen
class OcrSummary:
    """What a run did (row numbers are 0-based positions in the table)."""

    rows: int
    read: int
    resumed: int
    skipped: int
    failed: tuple[str, ...]


def run_ocr(
    input_path,
    output_path,
    *,
    engine="tesseract",
    lang="kor+eng",
    only_missing=True,
    workers=None,
    base_dir=None,
    engine_params=(),
    registry=None,
    progress=True,
    echo=None,
):
    """Read the images of ``input_path`` (CSV or folder), write ``output_path`` with ``text_info``.

    Resumable: each finished row is appended to ``OUTPUT.csv.partial.jsonl`` (row, image sha256,
    engine identity, lang, text) and skipped on the next run; the CSV is written atomically and
    the partial file removed only at the end. ``echo(line)`` gets one line per unreadable image.
    """
    input_path, output_path = Path(input_path), Path(output_path)
    echo = echo or (lambda line: print(line, file=sys.stderr))
    if not input_path.exists():
        raise DataError(f"{input_path}: no such file or folder")
    if _same_file(input_path, output_path):
        raise MmcoreError(
            f"-o {output_path} is the input file; mmcore ocr never overwrites its input, "
            f"choose another output path"
        )
    if output_path.is_dir():
        raise MmcoreError(f"-o {output_path} is a folder; give a CSV file name")
    if not output_path.parent.exists():
        raise MmcoreError(f"-o {output_path}: folder {output_path.parent} does not exist")

    registry = registry if registry is not None else get_registry()
    registration = registry.get("ocr", engine)
    params = parse_engine_params(registration.params_cls, engine_params)
    ocr_engine = registration.factory(params)
    check_engine(ocr_engine, lang)
    identity = ocr_engine.identity

    frame, base_dir = load_table(input_path, output_path, base_dir)
    texts = list(frame["text_info"])
    paths = list(frame["local_image_path"])
    wanted = [i for i, text in enumerate(texts) if not only_missing or not text.strip()]

    partial = partial_path(output_path)
    done = load_partial(partial, identity, lang)
    jobs, resumed, failed = [], 0, []

    def fail(row, message):
        line = f"{paths[row]} (row {row + 1}): {message}"
        failed.append(line)
        echo(line)

    for row in wanted:
        image = resolve_image(base_dir, paths[row])
        if row in done:
            try:
                digest = sha256_file(image)
            except OSError:
                digest = None
            if digest == done[row][0]:
                texts[row] = done[row][1]
                resumed += 1
                continue
        jobs.append((row, image))

    reader = ImageReader(ocr_engine, lang)
    workers = workers or os.cpu_count() or 1
    read = 0
    results = read_images(jobs, reader, workers, progress=progress)
    with open(partial, "a", encoding="utf-8") as log, contextlib.closing(results):
        for result in results:
            if result.fatal:
                raise MmcoreError(result.error)
            if result.error is not None:
                fail(result.key, result.error)
                continue
            texts[result.key] = result.text
            read += 1
            record = {
                "row": result.key,
                "sha256": result.sha256,
                "engine": identity,
                "lang": lang,
                "text": result.text,
            }
            log.write(json.dumps(record, ensure_ascii=False) + "\n")
            log.flush()

    frame["text_info"] = texts
    write_text_atomic(output_path, frame.to_csv(index=False))
    partial.unlink(missing_ok=True)
    return OcrSummary(
        rows=len(frame),
        read=read,
        resumed=resumed,
        skipped=len(frame) - len(wanted),
        failed=tuple(failed),
    )


# --------------------------------------------------------------------------- on the fly


def _cache_file(cache_dir, image_sha, identity, lang):
    key = sha256_bytes(f"{identity}\n{lang}".encode())[:16]
    return Path(cache_dir) / "ocr" / f"{image_sha}-{key}.json"


def ocr_fill(
    paths,
    texts,
    engine_name,
    lang,
    cache_dir,
    workers=None,
    *,
    engine_params=None,
    registry=None,
    progress=True,
    on_error=None,
):
    """Return ``texts`` with every empty entry filled by OCR of the matching image.

    Results are cached as one JSON file per (image sha256, engine identity, lang) under
    ``cache_dir/ocr/``, so each image is read once across runs. Unreadable images keep "" and
    are reported through ``on_error(path, message)`` (default: one line on stderr); they are
    not cached, so a fixed file is read next time.
    """
    texts = ["" if t is None else str(t) for t in texts]
    if len(paths) != len(texts):
        raise ValueError(f"ocr_fill: {len(paths)} paths but {len(texts)} texts")
    todo = [i for i, text in enumerate(texts) if not text.strip()]
    if not todo:
        return texts
    on_error = on_error or (lambda path, message: print(f"{path}: {message}", file=sys.stderr))

    engine = build_engine(engine_name, engine_params, registry=registry)
    identity = engine.identity
    hashes, jobs = {}, []
    for i in todo:
        try:
            hashes[i] = sha256_file(paths[i])
        except OSError as exc:
            on_error(paths[i], f"cannot read image: {exc.strerror or exc}")
            continue
        cached = _cache_file(cache_dir, hashes[i], identity, lang)
        if cached.exists():
            try:
                texts[i] = json.loads(cached.read_text(encoding="utf-8"))["text"]
                continue
            except (ValueError, KeyError, OSError):
                pass  # a damaged entry is simply recomputed
        jobs.append((i, paths[i]))
    if not jobs:
        return texts

    check_engine(engine, lang)
    (Path(cache_dir) / "ocr").mkdir(parents=True, exist_ok=True)
    reader = ImageReader(engine, lang)
    # identical images (duplicates are common in ad data) are read once
    seen, unique_jobs = set(), []
    for i, path in jobs:
        if hashes[i] not in seen:
            seen.add(hashes[i])
            unique_jobs.append((i, path))
    texts_by_hash = {}
    workers = workers or os.cpu_count() or 1
    results = read_images(unique_jobs, reader, workers, progress=progress, desc="ocr (fill)")
    with contextlib.closing(results):
        for result in results:
            if result.fatal:
                raise MmcoreError(result.error)
            if result.error is not None:
                on_error(paths[result.key], result.error)
                continue
            texts_by_hash[hashes[result.key]] = result.text
            entry = {
                "image_sha256": result.sha256,
                "engine": identity,
                "lang": lang,
                "text": result.text,
            }
            write_text_atomic(
                _cache_file(cache_dir, result.sha256, identity, lang),
                json.dumps(entry, ensure_ascii=False),
            )
    for i, _ in jobs:
        if hashes[i] in texts_by_hash:
            texts[i] = texts_by_hash[hashes[i]]
    return texts
