"""Records keyed by a file's stat key (:class:`StatRecords`), and the file hashes kept in them (:class:`FileHashes`).

Layout: ``<cache>/v1/files/<sha1 of the contents>.npy`` (stat key -> sha1 of the file's bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path

import numpy as np

from mmcore.io import file_sha1
from mmcore.store.arrays import save_array
from mmcore.store.keys import read_key, stat_key
from mmcore.store.leftovers import sweep_leftovers
from mmcore.store.locks import file_lock
from mmcore.store.root import FORMAT, cache_io, drop_damaged, short_error

FILE_DTYPE = np.dtype([("stat", "S20"), ("sha1", "S20")])
#: the file-hash records' directory under the cache root
FILES_DIR = f"{FORMAT}/files"
#: merge the records when there are more record files than this
MAX_FILE_RECORDS = 16
_DIGEST_NAME = re.compile(r"^[0-9a-f]{40}$")


class StatRecords:
    """Fixed-size records keyed by a file's stat key, in content-named ``.npy`` files of one directory.

    Each record file is named by the sha1 of its contents, so a damaged one (cut short, bytes
    changed) is recognised, dropped with a warning and its files looked at again. New records
    are added as a new file; past ``MAX_FILE_RECORDS`` files everything is merged into one
    (under a lock), so a warm lookup reads a few files whatever the dataset's size.
    """

    def __init__(self, directory, dtype, what, again="looked at again"):
        self.dir = Path(directory)
        self.dtype = np.dtype(dtype)
        #: how a dropped file is described ("file-hash records") and what then happens to its images
        self.what, self.again = what, again

    def load(self):
        """``(records, files)``: every sound record (one structured array, later files win) and their files."""
        parts, files = [], []
        if self.dir.is_dir():
            for path in sorted(self.dir.glob("*.npy")):
                records, problem = read_records(path, self.dtype)
                if records is None:
                    if problem is not None:
                        drop_damaged([path], f"warning: feature cache: dropped damaged {self.what} {path} "
                                             f"({problem}); those images are {self.again}")
                    continue
                files.append(path)
                parts.append(records)
        records = np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)
        return records, files

    @staticmethod
    def lookup(records):
        """stat key -> position in ``records`` (the last record of a key wins)."""
        return dict(zip(map(read_key, records["stat"].tolist()), range(len(records))))

    def save(self, new, old=None, files=()):
        """Add the structured array ``new``; with many record files, merge them with ``old`` into one."""
        self.dir.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(self.dir)
        if len(files) >= MAX_FILE_RECORDS:
            with file_lock(self.dir / ".merge.lock"):
                merged = np.concatenate([old, new]) if old is not None and len(old) else new
                _, last = np.unique(merged["stat"][::-1], return_index=True)  # one record per stat key, the newest
                written = self._write(merged[::-1][np.sort(last)])
                for path in files:
                    if path != written:
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
        else:
            self._write(new)

    def _write(self, array):
        array = np.ascontiguousarray(np.sort(array, order="stat"))
        path = self.dir / f"{hashlib.sha1(array.tobytes()).hexdigest()}.npy"
        save_array(path, array)
        return path


class FileHashes:
    """Content keys of image files, remembered under their stat keys (:class:`StatRecords`)."""

    def __init__(self, root):
        self.root = Path(root)
        self.dir = self.root / FILES_DIR
        self.records = StatRecords(self.dir, FILE_DTYPE, "file-hash records", "hashed again")

    def known(self):
        """stat key -> sha1 of every remembered file."""
        records, _ = self.records.load()
        return dict(zip(map(read_key, records["stat"].tolist()), map(read_key, records["sha1"].tolist())))

    def keys(self, paths):
        """The sha1 of each file's bytes (None for a file that cannot be read)."""
        records, files = self.records.load()
        known = dict(zip(map(read_key, records["stat"].tolist()), map(read_key, records["sha1"].tolist())))
        out, new = [], {}
        for path in paths:
            try:
                stat = stat_key(path)
            except (OSError, ValueError):
                out.append(None)
                continue
            digest = known.get(stat) or new.get(stat)
            if digest is None:
                digest = file_sha1(path)
                if digest is not None:
                    new[stat] = digest
            out.append(digest)
        if new:
            self.remember(new, records, files)
        return out

    def remember(self, new, records=None, files=None):
        """Add ``{stat key: sha1}`` records (hashes another pass computed)."""
        if records is None:
            records, files = self.records.load()
        with cache_io(self.root):
            self.records.save(np.array(sorted(new.items()), dtype=FILE_DTYPE), records, files)


def read_records(path, dtype=FILE_DTYPE):
    """``(records, None)`` for a sound record file (of ``dtype``: file hashes by default), else ``(None, problem)``.

    ``problem`` is None when the file simply vanished (a concurrent merge removed it).
    Files named by a 40-hex sha1 must match it; older (uuid-named) files are checked for
    their dtype only.
    """
    try:
        records = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, EOFError) as exc:
        return None, f"unreadable: {short_error(exc)}"
    if records.dtype != dtype or records.ndim != 1:
        return None, f"unexpected contents ({records.dtype}, shape {records.shape})"
    stem = Path(path).stem
    if _DIGEST_NAME.match(stem) and hashlib.sha1(records.tobytes()).hexdigest() != stem:
        return None, "contents do not match the checksum in its name"
    return records, None


def verify_records(directory, dtype, what, checkup):
    """Check every record file of ``directory`` (``what``: how a damaged one is named) -> how many are sound."""
    sound = 0
    for path in sorted(Path(directory).glob("*.npy")) if Path(directory).is_dir() else []:
        records, bad = read_records(path, dtype)
        if records is not None:
            sound += 1
        elif bad is not None:
            checkup.problem(f"{path}: damaged {what} ({bad})", path)
    return sound
