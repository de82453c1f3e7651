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

``transfer`` rows (unlabelled) follow the training rows in one dataset (:class:`WithTransferRows`)
with label -1: the step leaves them out of the hard loss. ``online = true`` scores every training
batch as augmented instead (:meth:`Distillation.online_logits`; the loader makes the teacher's
inputs). The teacher also scores the validation rows once, for ``results.json``'s comparison of
teacher and student (:meth:`Distillation.agreement`).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import numpy as np
import torch
from torch.utils.data import Dataset

from mmcore.builtin.distill import DistillationLoss
from mmcore.dist import is_main
from mmcore.engine.features import image_keys
from mmcore.errors import RecipeError
from mmcore.evaluation.metrics import rank_auroc
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
    #: its decision (``threshold``, ``temperature``): where its decisions on validation are taken
    decision: dict = attrs.field(factory=lambda: {"threshold": 0.5, "temperature": 1.0})
    #: its image preprocessing (None when it reads no image): an online teacher's input is made by it
    preprocessing: object = None
    #: ``logits(items, texts) -> float64 [B]``: its forward on a batch of its own inputs (online)
    logits: Callable | None = None


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
        #: unlabelled rows of ``transfer`` the student learns from (after bad images are left out)
        self.transfer_rows = 0
        #: the teacher's logits on the validation rows (:meth:`score_validation`), for :meth:`agreement`
        self.val_logits = None

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
        """float32 logits of the teacher for every row of ``split`` (NaN where it could not read the row:
        such a row teaches through its label only, :class:`~mmcore.engine.step.TrainStep` says how).

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
            if bad and is_main():  # the student's own data.on_bad_image decides about the row itself
                warn(f"warning: train.distill.teacher: the teacher could not read {len(bad)} rows of {split.csv} "
                     f"(first: {bad[0]}); they teach through their labels only")
            rows = [missing[p] for p in np.asarray(positions, dtype=np.int64).tolist()]
            logits[rows] = np.asarray(scored, dtype=np.float64)
            self.counts["scored"] += len(rows)
            if store is not None and is_main():
                self._remember(store, [keys[i] for i in rows], logits[rows])
        return logits.astype(np.float32)

    def score_validation(self, split, image_sha1s):
        """The teacher's logits on the validation rows (from the store, or scored once), kept for :meth:`agreement`."""
        self.val_logits = self.teacher_logits(split, image_sha1s).astype(np.float64)

    def agreement(self, positions, student_logits, labels, decision):
        """results.json's ``distillation.val``: the teacher's and the student's validation AUROC and how
        often their decisions (each at its own temperature and threshold) agree, on the rows both scored."""
        teacher = self.val_logits[np.asarray(positions, dtype=np.int64)]
        both = ~np.isnan(teacher)
        teacher, student, labels = teacher[both], np.asarray(student_logits, dtype=np.float64)[both], np.asarray(labels)[both]
        decided = [_decisions(logits, d) for logits, d in ((teacher, self.teacher.decision), (student, decision))]
        return {"rows": int(both.sum()), "teacher_auroc": rank_auroc(_sigmoid(teacher), labels),
                "student_auroc": rank_auroc(_sigmoid(student), labels),
                "decision_agreement": float(np.mean(decided[0] == decided[1])) if both.any() else None}

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
        self.teacher = attrs.evolve(self.teacher, score=_released, logits=None, preprocessing=None)

    def check_online(self, recipe):
        """``online = true`` needs a student that reads images and an augmentation that changes them."""
        if recipe.train.modality == "text_only" or recipe.augmentation.name == "none":
            raise RecipeError(f"{self.source}: train.distill.online: true needs an image augmentation to teach "
                              f"through (augmentation.name is {recipe.augmentation.name!r}, train.modality "
                              f"{recipe.train.modality!r}); leave online out and the teacher scores each row once")

    def online_logits(self, batch):
        """The teacher's logits of a training batch as augmented (``batch["teacher_vision"]``: its inputs,
        made in the loader from the student's augmented image), float32 [B]; transfer rows alike."""
        items = batch["teacher_vision"] if self.teacher.reads_image else None
        logits = self.teacher.logits(items, batch["text"] if self.teacher.reads_text else None)
        self.counts["scored"] += len(logits)
        return torch.as_tensor(np.asarray(logits), dtype=torch.float32)

    def summary(self, val=None):
        """results.json's ``distillation``: the teacher, the loss's settings, where its logits came from and
        ``val`` (:meth:`agreement`)."""
        return {"teacher": self.teacher.source, "model_version": self.model_version, **({"val": val} if val else {}),
                "temperature": self.config.temperature, "weight": self.config.weight,
                "transfer": self.config.transfer, "transfer_rows": self.transfer_rows,
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


def start_distillation(recipe, pipeline, datasets, loss_fn, *, open_teacher, registry, bad_images, source, echo=None):
    """A training run's distillation (``recipe.train.distill``): open the teacher, give every training
    (and transfer) row its logit — from the store, or scored once — or, online, the loader the teacher's
    preprocessing; score validation for the comparison; drop the teacher when it is done ->
    ``(Distillation, the training dataset)``. ``datasets``: the run's ``{"train": (dataset, split),
    "val": (dataset, split)}``; ``echo``: where the teacher's line goes (None: nowhere, ranks > 0)."""
    config = recipe.train.distill
    transfer = read_transfer_rows(config.transfer, recipe.data, source=source) if config.transfer else None
    if transfer is not None and recipe.train.balanced_sampler:
        raise RecipeError(f"{source}: train.distill.transfer: cannot be combined with train.balanced_sampler "
                          f"(transfer rows have no label to balance)")
    teacher = open_teacher(config.teacher, device=str(pipeline.device), registry=registry, source=source)
    cache_root = pipeline.usable_cache_root
    distillation = Distillation(config, teacher, loss_fn, cache_root=cache_root, source=source)
    parts = [datasets["train"]]
    if transfer is not None:
        dataset, split, errors = pipeline.dataset(transfer, train=True)
        if errors:
            bad_images.check({"errors": errors}, "transfer")
        parts.append((dataset, split))
    if config.online:
        distillation.check_online(recipe)
    val_split = datasets["val"][1]  # the teacher's view of validation: its agreement with the student
    distillation.score_validation(val_split, row_image_keys(cache_root, val_split))
    for dataset, split in parts:
        distillation.check_inputs(split, ocr=recipe.data.ocr)
        if config.online:  # the loader makes the teacher's input from each augmented image
            dataset.teacher_preprocessing = teacher.preprocessing
        else:
            dataset.teacher_logits = distillation.teacher_logits(split, row_image_keys(cache_root, split))
    if not config.online:
        distillation.release()
    if echo is not None:
        counts = distillation.counts
        echo(f"teacher {teacher.source}: " + ("scores every training batch as augmented (online)" if config.online
             else f"{counts['from_cache']} rows from cache, {counts['scored']} scored"))
    if transfer is None:
        return distillation, parts[0][0]
    distillation.transfer_rows = len(parts[1][1])
    return distillation, WithTransferRows(parts[0][0], parts[1][0])


def read_transfer_rows(transfer, data, *, source):
    """``train.distill.transfer``'s rows as a :class:`~mmcore.data.split.Split` without labels (any label
    column is ignored: they teach through the soft term only); a missing CSV or a bad row is one line each."""
    from mmcore.data.csvs import read_split, resolve_csv

    csv = resolve_csv(transfer, data.base_dir)
    if not csv.is_file():
        raise RecipeError(f"{source}: train.distill.transfer: {csv}: not found")
    split = read_split(csv, data.base_dir or csv.parent, require_label=False, require_text=False,
                       max_image_bytes=data.max_image_bytes)
    return attrs.evolve(split, labels=None)


class WithTransferRows(Dataset):
    """The training rows, then the transfer rows, as one dataset for the sampler: a transfer item has
    label -1 (:class:`~mmcore.engine.step.TrainStep` leaves it out of the hard loss) and its place here as index."""

    def __init__(self, train, transfer):
        self.train, self.transfer = train, transfer
        # what the loader and the training run read from a dataset: the two share preprocessing and augmentation
        self.preprocessing = train.preprocessing
        self.augmentation = train.augmentation
        self.needs_image = train.needs_image or transfer.needs_image
        self.needs_workers = train.needs_workers or transfer.needs_workers

    def __len__(self):
        return len(self.train) + len(self.transfer)

    def __getitem__(self, index):
        if index < len(self.train):
            return self.train[index]
        item = self.transfer[index - len(self.train)]
        item["index"] = index
        return item


def _sigmoid(logits):
    return 1.0 / (1.0 + np.exp(-logits))


def _decisions(logits, decision):
    return _sigmoid(logits / float(decision["temperature"])) >= float(decision["threshold"])


def row_image_keys(cache_root, split):
    """Each row's image content hash (sha1 bytes; None when unreadable): remembered in the store's
    file hashes when there is one (the feature cache's keys), else hashed here."""
    if cache_root is not None:
        return image_keys(cache_root, split)
    return [file_sha1(path) for path in split.paths]


def _released(split, *, desc):
    raise RuntimeError("the teacher was released after its logits were computed")
