"""The file-facts tenant: what the checks before a run learned about each image file, by stat key.

Layout: ``<cache>/v1/files/`` (file hashes, :class:`~mmcore.store.records.FileHashes`) and
``<cache>/v1/checks/<formats>/`` (image checks: the sha1, and the header's format and size or
why it is unusable, per image allow-list). This module stores and finds them; what a header
says is decided in :mod:`mmcore.data.memo`, which reads images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from mmcore.store.records import FILE_DTYPE, FILES_DIR, FileHashes, StatRecords, verify_records
from mmcore.store.root import FORMAT, cache_io

CHECK_DTYPE = np.dtype(
    [("stat", "S20"), ("sha1", "S20"), ("format", "S8"), ("width", "<i8"), ("height", "<i8"), ("problem", "S200")]
)
#: the image-check records' directory under the cache root (one folder per image allow-list)
CHECKS_DIR = f"{FORMAT}/checks"
#: bytes of a remembered problem line (longer ones are cut)
PROBLEM_BYTES = 200


def formats_key(formats):
    """The directory name of one image allow-list's records."""
    names = ",".join(sorted({f.upper() for f in formats}))
    return hashlib.sha1(names.encode()).hexdigest()[:16]


class RememberedFacts:
    """stat key -> ``(sha1, format, width, height, problem)`` over loaded records: the columns become
    lists once (C speed), each tuple is made only when its key is asked for."""

    def __init__(self, records=None, files=()):
        self.records, self.files = records, list(files)
        self.index = StatRecords.lookup(records) if records is not None and len(records) else {}
        if self.index:
            self.sha1 = records["sha1"].tolist()
            self.format = records["format"].tolist()
            self.width = records["width"].tolist()
            self.height = records["height"].tolist()
            self.problem = records["problem"].tolist()

    def get(self, key):
        """The remembered facts of stat key ``key``, or None."""
        i = self.index.get(key)
        if i is None:
            return None
        problem = self.problem[i].decode("utf-8", "replace") or None
        return self.sha1[i].ljust(20, b"\0"), self.format[i].decode(), self.width[i], self.height[i], problem


class FactRecords:
    """The image-check records of one image allow-list under ``root``, and the file hashes they feed."""

    def __init__(self, root, formats):
        self.root = Path(root)
        directory = self.root / CHECKS_DIR / formats_key(formats)
        self.records = StatRecords(directory, CHECK_DTYPE, "image-check records", "checked again")
        self.hashes = FileHashes(self.root)

    def load(self):
        """The :class:`RememberedFacts` (none when the records cannot be read)."""
        try:
            return RememberedFacts(*self.records.load())
        except OSError:
            return RememberedFacts()

    def save(self, facts, remembered):
        """Remember ``{stat key: (sha1, format, width, height, problem)}``, merged with what ``remembered``
        holds, and the hashes for the feature cache (:class:`~mmcore.store.root.CacheUnavailable` if it cannot)."""
        rows = np.array(
            [(key, sha1, fmt.encode(), width, height, (problem or "").encode("utf-8")[:PROBLEM_BYTES])
             for key, (sha1, fmt, width, height, problem) in facts.items()],
            dtype=CHECK_DTYPE,
        )
        with cache_io(self.root):
            self.records.save(rows, remembered.records, remembered.files)
        self.hashes.remember({key: fact[0] for key, fact in facts.items()})


def verify_file_facts(root, checkup):
    """The tenant's check: every record file readable and matching the checksum in its name."""
    root = Path(root)
    checkup.count("file_hash_records", verify_records(root / FILES_DIR, FILE_DTYPE, "file-hash records", checkup))
    checks = root / CHECKS_DIR
    for directory in sorted(d for d in checks.iterdir() if d.is_dir()) if checks.is_dir() else []:
        checkup.count("image_check_records", verify_records(directory, CHECK_DTYPE, "image-check records", checkup))
