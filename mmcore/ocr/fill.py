"""OCR as a stage of a run: empty ``text_info`` filled from the image (recipe key ``data.ocr``).

:func:`ocr_stage` runs before datasets are built (``run``, ``eval`` and ``predict`` call it), so
the texts the model, the text-feature cache and the reports see are the filled ones. Results
are cached as one JSON file per (image content, engine identity, language) under
``<cache dir>/ocr/`` (the cache's OCR tenant, :mod:`mmcore.store.ocr`), so each image is read
once across runs. Images are keyed by the sha1 of their bytes, the feature cache's content
key, taken from the run's shared hashes.
"""

from __future__ import annotations

import contextlib
import os
import sys

import attrs

from mmcore.data.images import DEFAULT_MAX_IMAGE_BYTES
from mmcore.data.memo import ImageHashes
from mmcore.errors import MmcoreError
from mmcore.ocr.engines import ImageReader, build_engine, check_engine, read_images
from mmcore.store.ocr import OcrTexts
from mmcore.store.root import cache_root


def ocr_stage(splits, recipe, *, registry=None, hashes=None, progress=True):
    """``{name: Split}`` with empty texts filled by the recipe's ``data.ocr`` engine.

    Does nothing without ``data.ocr``, for ``vision_only`` runs (no text branch) and for splits
    whose texts are all there. ``hashes`` are the run's shared image keys
    (:class:`~mmcore.data.memo.ImageHashes`; by default one for this recipe).
    """
    ocr = recipe.data.ocr
    if ocr is None or recipe.train.modality == "vision_only":
        return dict(splits)
    if all(text.strip() for split in splits.values() for text in split.texts):
        return dict(splits)
    if hashes is None:
        hashes = ImageHashes.for_recipe(recipe)

    filled = {}
    for name, split in splits.items():
        texts = ocr_fill(
            split.paths, split.texts, ocr.engine, ocr.lang, cache_root(recipe.cache.dir),
            registry=registry, hashes=hashes, progress=progress, max_image_bytes=recipe.data.max_image_bytes,
        )
        filled[name] = attrs.evolve(split, texts=tuple(" ".join(t.split()) for t in texts))
    return filled


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
    hashes=None,
    progress=True,
    on_error=None,
    max_image_bytes=DEFAULT_MAX_IMAGE_BYTES,
):
    """Return ``texts`` with every empty entry filled by OCR of the matching image.

    Identical images (duplicates are common in ad data) are read once. Unreadable images keep
    "" and are reported through ``on_error(path, message)`` (default: one line on stderr); they
    are not cached, so a fixed file is read next time. ``hashes(paths)`` gives the images'
    content keys (default :func:`mmcore.data.checks.hash_files`). A file over ``max_image_bytes``
    (``data.max_image_bytes``) is unreadable, and not read.
    """
    texts = ["" if t is None else str(t) for t in texts]
    paths = list(paths)
    if len(paths) != len(texts):
        raise ValueError(f"ocr_fill: {len(paths)} paths but {len(texts)} texts")
    todo = [i for i, text in enumerate(texts) if not text.strip()]
    if not todo:
        return texts
    on_error = on_error or (lambda path, message: print(f"{path}: {message}", file=sys.stderr))
    if hashes is None:
        from mmcore.data.checks import hash_files as hashes

    engine = build_engine(engine_name, engine_params, registry=registry, source="data.ocr")
    identity = engine.identity
    cached_texts = OcrTexts(cache_dir)
    keys = dict(zip(todo, hashes([paths[i] for i in todo])))
    jobs, seen = [], set()
    for i in todo:
        key = keys[i]
        if key is not None:
            cached = cached_texts.get(key, identity, lang)
            if cached is not None:
                texts[i] = cached
                continue
            if key in seen:
                continue  # a copy of an image already queued: it gets that image's text
            seen.add(key)
        jobs.append((i, paths[i]))  # an unreadable file too: reading it names the reason
    if not jobs:
        return texts

    check_engine(engine, lang)
    by_key = {}
    workers = workers or os.cpu_count() or 1
    reader = ImageReader(engine, lang, max_bytes=max_image_bytes)
    results = read_images(jobs, reader, workers, progress=progress, desc="ocr (fill)")
    with contextlib.closing(results):
        for result in results:
            if result.fatal:
                raise MmcoreError(result.error)
            if result.error is not None:
                on_error(paths[result.key], result.error)
                continue
            key = keys[result.key]
            if key is None:  # became readable after hashing: use the text, do not cache it
                texts[result.key] = result.text
                continue
            by_key[key] = result.text
            cached_texts.put(key, identity, lang, result.text)
    for i in todo:
        if keys[i] in by_key:
            texts[i] = by_key[keys[i]]
    return texts
