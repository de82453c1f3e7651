"""Distillation in a training run (``train.distill``): the teacher's logits on the training rows,
computed once and kept in the store, and the loss the student learns from.

The teacher is any scorer (a run, an ensemble, a bundle): the engine sits below the scoring path,
so the caller hands it a :class:`Teacher` (``mmcore run`` builds one with
:func:`mmcore.scoring.teacher.open_teacher`). Before epoch 1 the training split's rows are
looked up in the teacher-logits tenant (:mod:`mmcore.store.teacher`) by what the teacher reads of
them (image content, text) and the teacher's ``model_version``; only the rows it has never seen
are scored, by the teacher's own forward over raw rows (its preprocessing, its inputs), then
remembered. The training dataset hands each row's teacher logit to the batch
(``batch["teacher_logit"]``) and the step minimises
:class:`~mmcore.builtin.distill.DistillationLoss` of it. The teacher is never wrapped in DDP
and never trained: it scores in eval mode under ``no_grad`` and is dropped once the logits are
known. A checkpoint records the teacher's ``model_version``; resuming with another teacher is
one line.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import numpy as np

from mmcore.builtin.distill import DistillationLoss
from mmcore.dist import is_main
from mmcore.engine.features import image_keys
from mmcore.errors import DataError, RecipeError
from mmcore.io import file_sha1
from mmcore.store.root import CacheUnavailable, warn
from mmcore.store.teacher import TeacherLogits, row_key

#: the checkpoint key holding the teacher's model_version
CHECKPOINT_KEY = "distill_teacher"


@attrs.frozen(kw_only=True)
class Teacher:
    """What training needs of a distillation teacher (the scoring path builds it)."""

    #: the path the recipe named
    source: str
    #: its ``model_version`` (``sha256:...`` of the file that identifies it): the store's key
    model_version: str
    #: what it reads of a row
    reads_image: bool
    reads_text: bool
    #: ``score(split, *, desc) -> (positions, logits, bad lines)``: the teacher's raw logits of the
    #: rows it could read, texts as given (under torchrun every rank gets all of them)
    score: Callable


class Distillation:
    """The distillation of one training run: the loss (:attr:`loss`) and the teacher's logits per row.

    ``config``: the recipe's ``train.distill``; ``hard_loss``: the recipe's loss on the labels;
    ``cache_root``: the store (None: the cache is off, the teacher scores every run once).
    """

    def __init__(self, config, teacher, hard_loss, *, cache_root, source):
        self.config = config
        self.teacher = teacher
        self.source = source
        self.cache_root = cache_root
        self.loss = DistillationLoss(hard_loss, temperature=config.temperature, weight=config.weight)
        #: rows the teacher scored in this process, and rows read from the store (results.json)
        self.counts = {"scored": 0, "from_cache": 0}

    @property
    def model_version(self):
        return self.teacher.model_version

    def check_inputs(self, split, *, ocr):
        """One line when the teacher reads text that the training rows cannot give (no text, no ``data.ocr``)."""
        if self.teacher.reads_text and not ocr and not any(split.texts):
            raise RecipeError(
                f"{self.source}: train.distill.teacher: the teacher reads text, but {split.csv} has no text "
                f"(an empty or absent text_info column) and data.ocr is not set"
            )

    def teacher_logits(self, split, image_sha1s):
        """float32 logits of the teacher for every row of ``split`` (NaN where it could not read the row).

        ``image_sha1s``: each row's image content hash (None when unreadable), as the feature
        cache keys them. Rows the store holds for this teacher are read; the rest are scored and kept.
        """
        teacher = self.teacher
        keys = [row_key(sha1 if teacher.reads_image else None, text if teacher.reads_text else None)
                for sha1, text in zip(image_sha1s, split.texts)]
        store = self._store()
        logits = store.get(keys) if store is not None else np.full(len(keys), np.nan)
        missing = [i for i in range(len(keys)) if np.isnan(logits[i]) and (image_sha1s[i] is not None or not teacher.reads_image)]
        self.counts["from_cache"] += len(keys) - len(missing)
        if missing:
            positions, scored, bad = teacher.score(split.subset(missing), desc=f"teacher {split.csv.name}")
            if bad:  # an image the student reads but the teacher cannot (its own data.max_image_pixels, formats)
                raise DataError([*bad, f"{self.source}: train.distill.teacher: the teacher cannot read these "
                                       f"training rows; remove them from {split.csv}"])
            rows = [missing[p] for p in np.asarray(positions, dtype=np.int64).tolist()]
            logits[rows] = np.asarray(scored, dtype=np.float64)
            self.counts["scored"] += len(rows)
            if store is not None and is_main():
                self._remember(store, [keys[i] for i in rows], logits[rows])
        return logits.astype(np.float32)

    def _store(self):
        if self.cache_root is None:
            return None
        return TeacherLogits(self.cache_root, self.model_version)

    def _remember(self, store, keys, logits):
        try:
            store.put(keys, logits)
        except CacheUnavailable as exc:
            warn(f"warning: {exc}; the teacher's logits are not kept (the next run scores them again)")

    def release(self):
        """Drop the teacher (its model) once every logit is known: training needs only the logits."""
        self.teacher = attrs.evolve(self.teacher, score=_released)

    def summary(self):
        """results.json's ``distillation``: the teacher, the loss's settings and where its logits came from."""
        return {"teacher": self.teacher.source, "model_version": self.model_version,
                "temperature": self.config.temperature, "weight": self.config.weight,
                "teacher_rows_scored": self.counts["scored"], "teacher_rows_from_cache": self.counts["from_cache"]}

    def state_dict(self):
        """What a checkpoint records of the distillation."""
        return {CHECKPOINT_KEY: self.model_version}

    def check_resume(self, state, where):
        """One line when ``state`` (a ``last.ckpt``) was trained with another teacher than this one."""
        saved = state.get(CHECKPOINT_KEY)
        if saved != self.model_version:
            raise RecipeError(
                f"{where}: train.distill.teacher: {self.teacher.source} is {self.model_version}, but this run was "
                f"trained with {saved or 'no teacher'}; resume with that teacher or start a new run"
            )


def row_image_keys(cache_root, split):
    """Each row's image content hash (sha1 bytes; None when unreadable): remembered in the store's
    file hashes when there is one (the feature cache's keys), else hashed here."""
    if cache_root is not None:
        return image_keys(cache_root, split)
    return [file_sha1(path) for path in split.paths]


def _released(split, *, desc):
    raise RuntimeError("the teacher was released after its logits were computed")
