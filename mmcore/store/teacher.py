"""The teacher-logits tenant: a distillation teacher's logit for each input it has scored, so a
student's epochs, its resume and the next student of the same teacher never run the teacher again.

Layout: ``<cache>/teacher/<teacher key>/<sha1 of the contents>.npy``, records ``(key, logit)``
(:class:`~mmcore.store.records.StatRecords`: content-named files, merged past a few). The teacher
key is the sha1 of :data:`TEACHER_VERSION` and the teacher's ``model_version`` (the sha256 of its
checkpoint, manifest or ``ensemble.json``), so another teacher — or the same path retrained —
has its own folder and is scored again. A row's key (:func:`row_key`) is the sha1 of what the
teacher reads of it: the image's content hash and the text's, so the same input in another CSV
(or another split) is the same entry, and a changed image or text is a new one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mmcore.store.keys import text_key
from mmcore.store.records import StatRecords, verify_records
from mmcore.store.root import cache_io

#: the tenant's folder under the cache root
TEACHER_DIR = "teacher"
#: part of every teacher's folder name: bump it when what an entry means changes
TEACHER_VERSION = 1
#: ``stat`` is the records' key field (:class:`StatRecords` looks rows up by it): here a row's content key
TEACHER_DTYPE = np.dtype([("stat", "S20"), ("logit", "<f8")])


def teacher_key(model_version):
    """The folder name of a teacher's logits: its ``model_version`` under this tenant's format."""
    return hashlib.sha1(f"{TEACHER_VERSION}\n{model_version}".encode()).hexdigest()[:24]


def row_key(image_sha1, text):
    """A row's content key (20 bytes) from what the teacher reads: the image's sha1 (None when it
    reads no image) and the text (None when it reads none)."""
    digest = hashlib.sha1()
    digest.update(b"image:" + (image_sha1 or b""))
    digest.update(b"\0text:" + (text_key(text) if text is not None else b""))
    return digest.digest()


class TeacherLogits:
    """The logits one teacher (by ``model_version``) gave, under the cache directory ``root``."""

    def __init__(self, root, model_version):
        self.root = Path(root)
        self.dir = self.root / TEACHER_DIR / teacher_key(model_version)
        self.records = StatRecords(self.dir, TEACHER_DTYPE, "teacher logits", "scored by the teacher again")

    def get(self, keys):
        """float64 logits of ``keys`` (row keys), NaN where the teacher has not scored that input."""
        records, _ = self.records.load()
        position = StatRecords.lookup(records)
        logits = records["logit"]
        return np.array([logits[position[key]] if key in position else np.nan for key in keys], dtype=np.float64)

    def put(self, keys, logits):
        """Remember ``logits`` of ``keys`` (one records file; one line if the cache cannot be written)."""
        new = np.array(sorted(zip(keys, np.asarray(logits, dtype=np.float64).tolist())), dtype=TEACHER_DTYPE)
        if not len(new):
            return
        records, files = self.records.load()
        with cache_io(self.root):
            self.records.save(new, records, files)


def verify_teacher(root, checkup):
    """The tenant's check: every records file readable and matching the checksum in its name."""
    folder = Path(root) / TEACHER_DIR
    for teacher in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        checkup.count("teacher_record_files", verify_records(teacher, TEACHER_DTYPE, "teacher logits", checkup))
