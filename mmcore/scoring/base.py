"""What every scorer offers the scoring path: the :class:`Scorer` protocol.

A row is scored in four calls, each a method here, so that the streaming row scorer
(:func:`mmcore.scoring.rows.score_rows`), ``mmcore serve`` (which batches requests itself) and the
Python API drive every kind of scorer alike::

    image = scorer.load_image(source)          # a path or bytes -> RGB PIL image (BadImageError)
    item = scorer.preprocess(image)            # -> this scorer's input for one image (any thread)
    logits = scorer.logits(items, texts)       # a batch -> float64 logits [B]
    raw, calibrated, predicted = scorer.decide(logits)

Items are opaque to everything but the scorer that made them. That is the combination point:
a scorer made of scorers (an ensemble of weighted members) is itself a :class:`Scorer` whose
``load_image`` decodes once (at the largest size a member needs), whose ``preprocess`` returns
one item per member and whose ``logits`` combines the members' logits
(:func:`mmcore.evaluation.ensemble` has the weighted combination). A new kind of scorer
subclasses :class:`Scorer`, sets the attributes below, implements :meth:`Scorer.logits` (and
:meth:`Scorer.embed` where it can) and is added to :func:`mmcore.scoring.scorers.open_scorer`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

#: the decision of a run that saved none (scores as they are, at 0.5)
DEFAULT_DECISION = {"threshold": 0.5, "temperature": 1.0, "description": "0.5 (no decision saved)"}


class EmbeddingsUnavailable(NotImplementedError):
    """This kind of scorer cannot give per-modality features (an exported graph outputs the logit only)."""


class Scorer:
    """A model that scores rows of images and texts (see the module docstring)."""

    #: ``run``, ``bundle`` (an ensemble: ``ensemble``)
    kind = ""
    #: where the model was read from (a run directory, a bundle folder)
    source: Path
    #: the resolved recipe as plain data
    recipe_data: dict
    #: ``threshold``, ``temperature`` and ``description`` (the run's decision, fitted on validation)
    decision: dict
    #: the vision encoder's preprocessing (None when the model reads no image)
    preprocessing = None
    #: the training epoch whose weights score (None when unknown)
    selected_epoch = None
    #: where the model runs (``cpu``, ``cuda:0``) and how (onnxruntime's providers, or torch's device type)
    device_name = None
    providers = ()

    # -- what the model reads ------------------------------------------------------------

    @property
    def modality(self):
        """``multimodal``, ``vision_only`` or ``text_only``."""
        return (self.recipe_data.get("train") or {}).get("modality", "multimodal")

    @property
    def uses_vision(self):
        return self.modality != "text_only"

    @property
    def uses_text(self):
        return self.modality != "vision_only"

    @property
    def data_config(self):
        """The recipe's ``[data]`` table as plain data."""
        return self.recipe_data.get("data") or {}

    @property
    def max_image_pixels(self):
        from mmcore.data.images import DEFAULT_MAX_IMAGE_PIXELS

        return int(self.data_config.get("max_image_pixels") or DEFAULT_MAX_IMAGE_PIXELS)

    @property
    def image_formats(self):
        """The image formats the run accepted (``data.image_formats``)."""
        from mmcore.data.images import DEFAULT_FORMATS

        return tuple(self.data_config.get("image_formats") or DEFAULT_FORMATS)

    @property
    def on_bad_image(self):
        """``error`` (an unreadable image stops scoring) or ``skip`` (its row is left out): ``data.on_bad_image``."""
        return self.data_config.get("on_bad_image", "error")

    @property
    def ocr(self):
        """The recipe's ``data.ocr`` table (engine, lang) or None."""
        return self.data_config.get("ocr") or None

    def text_rule(self, *, ocr=None, mode=None, **kwargs):
        """Where a row's text comes from (:func:`mmcore.textsource.text_rule`): the row's own text,
        else OCR (``ocr``: whether an engine reads images; by default whether the recipe names
        one), else empty text when ``mode="optional"``; ``kwargs`` go to ``text_rule``."""
        from mmcore.textsource import text_rule

        return text_rule(self.modality, ocr=bool(self.ocr) if ocr is None else ocr, mode=mode, **kwargs)

    @property
    def batch_size(self):
        """The recipe's ``eval.batch_size``, else its ``train.batch_size``, else 32."""
        return int((self.recipe_data.get("eval") or {}).get("batch_size")
                   or (self.recipe_data.get("train") or {}).get("batch_size") or 32)

    # -- one row, then a batch -----------------------------------------------------------

    def load_image(self, source, *, max_pixels=None):
        """A path, a binary file or bytes -> an upright RGB PIL image at least the size the model
        reads (a large JPEG is decoded at a reduced scale); :class:`~mmcore.data.images.BadImageError`
        says why an image cannot be read. ``max_pixels``: another bound than the recipe's."""
        from mmcore.data.images import load_rgb

        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(source)
        target = self.preprocessing.target_size if self.preprocessing is not None else None
        return load_rgb(source, target_size=target, max_pixels=max_pixels or self.max_image_pixels,
                        formats=self.image_formats)

    def preprocess(self, image):
        """RGB PIL image -> this scorer's input for one image (thread-safe: rows are prepared in parallel)."""
        return self.preprocessing(image)

    def logits(self, vision_items, texts):
        """Items from :meth:`preprocess` (None when the model reads no image) and texts (None when
        it reads none) -> float64 logits [B]."""
        raise NotImplementedError

    def embed(self, vision_items, texts):
        """The pooled per-modality features of a batch: ``{"vision": [B, Dv], "text": [B, Dt]}``
        (float32 numpy; only the modalities the model reads). Raises :class:`EmbeddingsUnavailable`
        where this kind of scorer cannot give them."""
        raise EmbeddingsUnavailable(f"{self.kind or type(self).__name__} scorers give no embeddings")

    def logits_from_features(self, features):
        """The logits of a batch from the features :meth:`embed` returned for it (the model after its
        encoders), so a caller that needs both scores each row once. Raises
        :class:`EmbeddingsUnavailable` where this kind of scorer cannot."""
        raise EmbeddingsUnavailable(f"{self.kind or type(self).__name__} scorers give no embeddings")

    def decide(self, logits):
        """Logits -> (raw score, calibrated score, prediction) arrays at the run's decision."""
        from mmcore.evaluation.calibration import decide_logits

        return decide_logits(np.asarray(logits, dtype=np.float64), temperature=float(self.decision["temperature"]),
                             threshold=float(self.decision["threshold"]))

    # -- what it is ----------------------------------------------------------------------

    @property
    def model_version(self):
        """``sha256:<16 hex>`` of the file that identifies the model (computed once)."""
        version = self.__dict__.get("_model_version")
        if version is None:
            from mmcore.export.bundle import sha256_file

            version = self.__dict__["_model_version"] = f"sha256:{sha256_file(self.identity_file())[:16]}"
        return version

    def identity_file(self):
        """The file whose bytes identify the model (a bundle's manifest, a run's best checkpoint)."""
        raise NotImplementedError

    def metadata(self):
        """Model, recipe summary, decision, device and versions (``GET /metadata``)."""
        from mmcore.export.bundle import versions

        recipe = self.recipe_data
        return {
            "source": str(self.source),
            "kind": self.kind,
            "device": self.device_name,
            "providers": list(self.providers),
            "experiment": recipe.get("experiment"),
            "modality": self.modality,
            "vision": (recipe.get("vision") or {}).get("name") if self.uses_vision else None,
            "text": (recipe.get("text") or {}).get("name") if self.uses_text else None,
            "pooling": (recipe.get("pooling") or {}).get("name") if self.uses_vision else None,
            "fusion": (recipe.get("fusion") or {}).get("name") if self.modality == "multimodal" else None,
            "threshold": float(self.decision["threshold"]),
            "temperature": float(self.decision["temperature"]),
            "threshold_rule": self.decision.get("description"),
            "ocr": self.ocr,
            "versions": versions(),
        }
