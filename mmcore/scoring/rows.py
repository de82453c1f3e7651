"""The one streaming row scorer: rows of images and texts -> logits, in input order, memory flat.

:func:`score_rows` drives any :class:`~mmcore.scoring.base.Scorer` over any rows that look like
a :class:`~mmcore.data.split.Split` (``paths``: image sources, ``texts``, ``rows``: the numbers
messages name, ``csv``: where the rows come from, ``len()``). For each stretch of rows it

1. settles each row's text by the scorer's text rule: the row's own text, else OCR of its image
   when the run (or the caller) names an engine (read through the OCR cache, engines in
   parallel processes), else empty (a CSV row may have no text, as in training);
2. decodes and preprocesses the images in a thread pool (Pillow and torch release the GIL while
   they work), at most a few batches ahead of the model, so memory stays flat;
3. applies the bad-image policy (``data.on_bad_image``: ``error`` stops with one line per row,
   ``skip`` leaves the row out and says so);
4. scores full batches (:meth:`~mmcore.scoring.base.Scorer.logits`, or
   :meth:`~mmcore.scoring.base.Scorer.embed` with ``embed=True``) and yields each as a
   :class:`ScoredBatch`, in input order.

``shard=(index, count)`` scores only every ``count``-th row from ``index`` (one process of
several; each yields its rows' positions, the caller gathers). ``mmcore predict``, ``mmcore eval``,
the end of a training run and the export parity gate score through it; ``mmcore serve`` batches
requests itself and calls the same scorer methods.
"""

from __future__ import annotations

import collections
import contextlib
from concurrent.futures import ThreadPoolExecutor

import attrs
import numpy as np

from mmcore.data.images import DEFAULT_MAX_IMAGE_BYTES, BadImageError
from mmcore.engine.policies import BadImages
from mmcore.progress import progress_bar
from mmcore.textsource import UNUSED

#: rows whose texts are settled (OCR) at once: OCR engines start once per stretch that needs them
STRETCH_ROWS = 1024
#: rows decoded ahead of the model, in batches (each decoded image waits for its batch)
BATCHES_AHEAD = 2


@attrs.frozen
class ScoredBatch:
    """One batch of scored rows, in input order."""

    #: the rows' positions in the input (int64)
    positions: np.ndarray
    #: their logits (float64; None with ``embed=True``)
    logits: np.ndarray | None
    #: the text each row was scored with (its own, or what OCR read)
    texts: tuple
    #: where each text came from (:data:`mmcore.textsource.TEXT_SOURCES`)
    text_sources: tuple
    #: ``embed=True``: ``{"vision": [B, Dv], "text": [B, Dt]}`` (float32)
    embeddings: dict | None = None
    #: rows left out since the previous batch (unreadable images, ``on_bad_image = "skip"``): one line each
    bad: tuple = ()


@attrs.frozen
class Scored:
    """Every scored row of an input (:func:`collect`)."""

    positions: np.ndarray
    logits: np.ndarray
    texts: tuple
    text_sources: tuple
    bad: tuple

    @property
    def skipped(self):
        return len(self.bad)


def score_rows(scorer, rows, *, batch_size=None, workers=None, ocr=None, fill_text=True, on_bad_image=None,
               shard=None, embed=False, registry=None, progress=False, desc=None, model_lock=None):
    """Score ``rows`` with ``scorer`` -> an iterator of :class:`ScoredBatch` (see the module docstring).

    ``batch_size``: the scorer's (the recipe's ``eval.batch_size``) by default. ``workers``: decoding
    threads (default: the cores this process may use). ``ocr``: ``{"engine", "lang"}`` to read rows
    without text (default: the recipe's ``data.ocr``); ``fill_text=False`` scores the texts as given.
    ``on_bad_image``: ``error`` or ``skip`` (default: the recipe's). ``registry``: where OCR engines
    are looked up (the installed plugins by default). ``model_lock``: held around each model call
    (decoding stays parallel), so threads sharing one scorer take turns at the model (the Python
    API's ``Model`` shares one: a tokenizer, for one, may not be called from two threads at once).
    """
    from mmcore.data.dataset import default_num_workers

    batch_size = int(batch_size or scorer.batch_size)
    policy = BadImages(on_bad_image or scorer.on_bad_image)
    ocr = (ocr if ocr is not None else scorer.ocr) if fill_text and scorer.uses_text else None
    start, step = shard or (0, 1)
    positions = range(start, len(rows), step)
    bar = progress_bar(progress, total=len(positions), desc=desc or "score", unit="row")
    bad = []  # unreadable rows since the last batch scored

    def scored(batch):
        policy.check({"errors": bad}, "score")  # "error": stops here, one line per row
        with model_lock or contextlib.nullcontext():
            done = _score(scorer, batch, embed, tuple(bad))
        bad.clear()
        return done

    try:
        with ThreadPoolExecutor(max_workers=workers or default_num_workers()) as pool:
            for first in range(0, len(positions), STRETCH_ROWS):
                stretch = positions[first:first + STRETCH_ROWS]
                texts, sources = _settle_texts(scorer, rows, stretch, ocr, registry=registry, progress=progress)
                batch = []
                prepared = _ordered(pool, lambda i: _prepare(scorer, rows, i), stretch, window=BATCHES_AHEAD * batch_size)
                for k, (i, item, error) in enumerate(prepared):
                    bar.update(1)
                    if error is not None:
                        bad.append(error)
                        continue
                    batch.append((i, item, texts[k], sources[k]))
                    if len(batch) == batch_size:
                        yield scored(batch)
                        batch = []
                if batch:
                    yield scored(batch)
            if bad:  # unreadable rows after the last one scored
                yield scored([])
    finally:
        bar.close()


def collect(batches):
    """Every :class:`ScoredBatch` of :func:`score_rows` as one :class:`Scored` (for inputs that fit in memory)."""
    positions, logits, texts, sources, bad = [], [], [], [], []
    for batch in batches:
        positions.append(batch.positions)
        logits.append(batch.logits)
        texts.extend(batch.texts)
        sources.extend(batch.text_sources)
        bad.extend(batch.bad)
    return Scored(
        positions=np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64),
        logits=np.concatenate(logits) if logits else np.zeros(0),
        texts=tuple(texts), text_sources=tuple(sources), bad=tuple(bad),
    )


def _ordered(pool, fn, items, *, window):
    """``fn`` over ``items`` in ``pool``, results in order, at most ``window`` running or waiting."""
    pending = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _prepare(scorer, rows, i):
    """``(i, the scorer's item or None, the line saying why the image cannot be read or None)``."""
    if not scorer.uses_vision:
        return i, None, None
    try:
        return i, scorer.preprocess(scorer.load_image(rows.paths[i])), None
    except BadImageError as exc:
        return i, None, f"{rows.csv}: row {rows.rows[i]}: {rows.paths[i]}: {exc}"


def _score(scorer, batch, embed, bad):
    if not batch:
        return ScoredBatch(np.zeros(0, dtype=np.int64), None if embed else np.zeros(0), (), (), bad=bad)
    positions = np.asarray([i for i, _, _, _ in batch], dtype=np.int64)
    items = [item for _, item, _, _ in batch] if scorer.uses_vision else None
    texts = tuple(text for _, _, text, _ in batch)
    given = list(texts) if scorer.uses_text else None
    if embed:
        return ScoredBatch(positions, None, texts, tuple(s for *_, s in batch), embeddings=scorer.embed(items, given),
                           bad=bad)
    return ScoredBatch(positions, np.asarray(scorer.logits(items, given), dtype=np.float64), texts,
                       tuple(s for *_, s in batch), bad=bad)


def _settle_texts(scorer, rows, stretch, ocr, *, registry=None, progress=False):
    """The text each row of ``stretch`` is scored with, and where it came from (the scorer's text
    rule, empty text allowed): rows without text are read by ``ocr`` when given."""
    given = [rows.texts[i] if rows.texts is not None else "" for i in stretch]
    if not scorer.uses_text:
        return given, [UNUSED] * len(given)
    rule = scorer.text_rule(ocr=ocr is not None, mode="optional")
    todo = [k for k, text in enumerate(given) if rule.wants_ocr(text)]
    read = {}
    if todo:
        from mmcore.data.memo import ImageHashes
        from mmcore.ocr.fill import ocr_fill
        from mmcore.store.root import cache_root

        filled = ocr_fill(  # images keyed by content (shard samples carry theirs), their facts kept in memory only
            [rows.paths[stretch[k]] for k in todo], ["" for _ in todo], ocr["engine"], ocr.get("lang", "eng"),
            cache_root((scorer.recipe_data.get("cache") or {}).get("dir")), registry=registry, progress=progress,
            hashes=ImageHashes(None, scorer.image_formats),
            max_image_bytes=scorer.data_config.get("max_image_bytes") or DEFAULT_MAX_IMAGE_BYTES,
        )
        read = dict(zip(todo, filled))
    texts, sources = [], []
    for k, text in enumerate(given):
        settled, source = rule.settle(text, (lambda k=k: read[k]) if k in read else None)
        texts.append(settled)
        sources.append(source)
    return texts, sources
