"""The loaded model behind the routes: loading, the warm-up, each row's image and text, scoring.

States (``GET /ready``): ``loading`` (the scorer opens in a thread; ``/health`` answers
meanwhile), ``warming up`` (a synthetic image and text are scored once, so the first client
does not pay for lazy initialisation), ``ready``, or ``failed`` (the process stays up to say why).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time

from mmcore.serve.batching import Batcher, Item
from mmcore.serve.memory import DecodeBudget, release_memory
from mmcore.serve.metrics import ServeMetrics
from mmcore.serve.requests import ClientError

log = logging.getLogger("mmcore.serve")

#: seconds without a request after which the server gives freed memory back (once per burst)
IDLE_RELEASE_S = 2.0
WARM_UP_TEXT = "warm-up"


class Service:
    """The loaded model, its batcher, OCR, memory budget and metrics: what the routes use."""

    def __init__(self, config, *, device=None):
        self.config = config
        self.device = device or config.device
        self.scorer = None
        self.rule = None
        self.model_version = None
        self.state = "loading"
        self.load_error = None
        self.ocr_engine = None
        self.ocr_name = None
        self.ocr_lang = None
        self.metrics = ServeMetrics()
        self.budget = DecodeBudget(config.decode_memory_bytes)
        self.batcher = Batcher(self._score, max_batch=config.max_batch, max_wait=config.max_wait_ms / 1000.0,
                               on_batch=self.metrics.batch)
        self.last_request = None

    @property
    def ready(self):
        return self.state == "ready"

    # -- loading ------------------------------------------------------------------------

    def load(self):
        """Open the run or bundle, the OCR engine and the text rule, then warm up (in a thread)."""
        try:
            self._open()
            self.state = "warming up"
            started = time.perf_counter()
            self.warm_up()
            warm = time.perf_counter() - started
        # plugins and the runtimes (onnxruntime, torch) raise their own kinds: whatever it is,
        # /ready says it in one line and the process stays up to say it
        except Exception as exc:  # noqa: BLE001
            self.load_error = " ".join(str(exc).split()) or type(exc).__name__
            self.state = "failed"
            log.error("mmcore serve: cannot serve %s: %s", self.config.source, self.load_error)
            return
        placement = self.scorer.metadata()
        self.state = "ready"
        log.info("mmcore serve: ready: %s (%s, %s) on %s [%s], model_version %s, text: %s; warm-up %.2f s",
                    self.config.source, self.scorer.kind, self.scorer.modality, placement.get("device"),
                    ", ".join(placement.get("providers") or []), self.model_version, self.rule.describe(), warm)

    def _open(self):
        from mmcore.scoring.scorers import open_scorer

        scorer = open_scorer(self.config.source, device=self.device)
        engine_name = self.config.ocr if self.config.ocr is not None else (scorer.ocr or {}).get("engine")
        self.rule = scorer.text_rule(ocr=bool(engine_name), mode=self.config.text)
        if engine_name and scorer.uses_text:
            from mmcore.ocr.engines import build_engine, check_engine

            self.ocr_lang = self.config.ocr_lang or (scorer.ocr or {}).get("lang") or "eng"
            self.ocr_engine = build_engine(engine_name)
            self.ocr_name = engine_name
            check_engine(self.ocr_engine, self.ocr_lang)
        self.model_version = scorer.model_version
        self.metrics.model_loaded(self.model_version)
        self.scorer = scorer

    def warm_up(self):
        """Score one synthetic row (a grey image, a short text) straight through the scorer."""
        from PIL import Image

        scorer = self.scorer
        vision = None
        if scorer.uses_vision:
            size = scorer.preprocessing.target_size if scorer.preprocessing is not None else None
            height, width = size or (64, 64)
            vision = [scorer.preprocess(Image.new("RGB", (width, height), (127, 127, 127)))]
        scorer.logits(vision, [WARM_UP_TEXT] if scorer.uses_text else None)

    @property
    def max_image_pixels(self):
        return self.config.max_image_pixels or self.scorer.max_image_pixels

    # -- scoring ------------------------------------------------------------------------

    def _score(self, items):
        vision = [item.vision for item in items] if self.scorer.uses_vision else None
        texts = [item.text or "" for item in items] if self.scorer.uses_text else None
        return self.scorer.logits(vision, texts)

    def prepare(self, image_bytes, text, field):
        """Decode + preprocess one image and settle its text (runs in a worker thread): the scorer's
        own ``load_image`` and ``preprocess``, as the row scorer calls them."""
        from mmcore.data.images import BadImageError, open_checked

        scorer, rule = self.scorer, self.rule
        ocr = self.ocr_engine is not None and rule.wants_ocr(text)
        if image_bytes is None or not (scorer.uses_vision or ocr):
            return self._settle(None, text, field)
        try:
            # the header first: the decode waits until its pixels fit the memory budget
            pixels = _pixels(open_checked(io.BytesIO(image_bytes), max_pixels=self.max_image_pixels,
                                          formats=scorer.image_formats))
            with self.budget.reserve(pixels):
                image = scorer.load_image(image_bytes, max_pixels=self.max_image_pixels)
                vision = scorer.preprocess(image) if scorer.uses_vision else None
                item, source = self._settle(image if ocr else None, text, field)
                del image
        except BadImageError as exc:
            status = 413 if str(exc).startswith("image too large") else 422
            raise ClientError(status, f"{field}image", str(exc)) from None
        item.vision = vision
        return item, source

    def _settle(self, image, text, field):
        """The row's Item (without vision inputs) and its text source, by the text rule."""
        from mmcore.textsource import MissingTextError

        read = None
        if image is not None:
            from mmcore.ocr.engines import normalize_text

            def read():
                return normalize_text(self.ocr_engine.read(image, self.ocr_lang))

        try:
            text, source = self.rule.settle(text, read)
        except MissingTextError as exc:
            raise ClientError(422, f"{field}text", str(exc)) from None
        return Item(vision=None, text=text), source

    async def predict_rows(self, rows):
        """[(image bytes | None, text | None, field prefix)] -> one answer dict per row."""
        from starlette.concurrency import run_in_threadpool

        self.last_request = time.monotonic()
        prepared = [await run_in_threadpool(self.prepare, image, text, prefix) for image, text, prefix in rows]
        logits = await self.batcher.submit([item for item, _ in prepared])
        raw, calibrated, predicted = self.scorer.decide(logits)
        self.metrics.scored(self.model_version, calibrated, predicted)
        threshold = float(self.scorer.decision["threshold"])
        self.last_request = time.monotonic()
        return [
            {"score": float(raw[k]), "calibrated_score": float(calibrated[k]), "prediction": bool(predicted[k]),
             "threshold": threshold, "text": item.text, "text_source": source}
            for k, (item, source) in enumerate(prepared)
        ]

    async def release_when_idle(self):
        """Give freed memory back once after each burst of requests, when none came for a while."""
        loop = asyncio.get_running_loop()
        released = None
        while True:
            await asyncio.sleep(IDLE_RELEASE_S / 2)
            last = self.last_request
            if last is not None and last != released and time.monotonic() - last >= IDLE_RELEASE_S:
                released = last
                await loop.run_in_executor(None, release_memory)


def _pixels(image):
    width, height = image.size
    return width * height
