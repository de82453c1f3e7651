"""The on-disk feature cache: frozen-encoder outputs computed once, shared by every run.

Layout under the cache directory (``cache.dir``, ``$MMCORE_CACHE_DIR`` or ``~/.cache/mmcore``)::

    v1/files/<uuid>.npy              (file stat key -> sha1 of the bytes) records
    v1/features/<space>/meta.json    what this feature space is: encoder identity, stored form
    v1/features/<space>/<uuid>.npy         one chunk of features (float16), memory-mapped
    v1/features/<space>/<uuid>.index.npy   that chunk's sample keys, offsets and lengths

A *feature space* is everything that decides an encoder output except the input: the
encoder identity (name, weights, revision, preprocessing), a fingerprint of its actual
weights, the autocast dtype, and what is stored (a vector pooled by a given pooling, or the
token sequence). Inside a space, entries are per sample, keyed by the input's content: the
sha1 of an image file's bytes, or of a text. Two CSVs that share images share entries.

Image content keys: hashing every file on every run would read the whole dataset, so a
file's sha1 is remembered under its stat key (absolute path, size, mtime_ns, ctime_ns). A
changed stat key means the file is hashed again: if the bytes are the same (a copy, a
``touch``) the entries are reused, if not they are recomputed. ctime cannot be set by a
user, so even a rewrite that restores size and mtime is detected.

Writes are crash- and concurrency-safe: a chunk's data file is written to a temporary name
and ``os.replace``d, then its index (the commit marker) the same way; readers only see
chunks whose index exists. Fillers of one space serialize on an ``fcntl.flock`` and re-read
the index once they hold it, so a second run started alongside computes only what the first
did not. A killed fill keeps every chunk it completed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np

from mmcore.io import file_sha1

FORMAT = "v1"
INDEX_DTYPE = np.dtype([("key", "S20"), ("offset", "<i8"), ("length", "<i4")])
FILE_DTYPE = np.dtype([("stat", "S20"), ("sha1", "S20")])
#: flush a chunk when it holds this many samples or bytes (a killed fill loses at most one)
CHUNK_ROWS = 2048
CHUNK_BYTES = 128 * 2**20
#: merge the file-hash records when there are more record files than this
MAX_FILE_RECORDS = 16


def cache_root(configured=""):
    """The cache directory: ``configured``, else ``$MMCORE_CACHE_DIR``, else ``~/.cache/mmcore``."""
    if configured:
        return Path(os.path.expanduser(configured))
    env = os.environ.get("MMCORE_CACHE_DIR")
    if env:
        return Path(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmcore"


def text_key(text):
    """A text's content key (20 bytes)."""
    return hashlib.sha1(text.encode("utf-8")).digest()


def _key(stored):
    """A 20-byte key read back from an ``S20`` field: numpy drops its trailing NUL bytes, so a
    key ending in 0x00 (1 in 256) would otherwise never match again."""
    return stored.ljust(20, b"\0")


def _stat_key(path):
    st = os.stat(path)
    blob = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    return hashlib.sha1(blob.encode("utf-8", "surrogateescape")).digest()


def weights_fingerprint(module):
    """sha1 over a module's state dict (names, dtypes, shapes, bytes): catches same-named
    encoders whose weights differ (random init with another seed, a moved ``main`` revision)."""
    import torch

    digest = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def space_key(description):
    """The directory name of a feature space from its description dict."""
    blob = json.dumps(description, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:24]


def _write_atomic(path, array):
    """``np.save`` to a temporary name in the same directory, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text_atomic(path, text):
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def file_lock(path, on_wait=None):
    """Hold an exclusive ``flock`` on ``path`` (released by the kernel if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- image content keys


class FileHashes:
    """Content keys of image files, remembered under their stat keys."""

    def __init__(self, root):
        self.dir = Path(root) / FORMAT / "files"

    def _records(self):
        known, files = {}, []
        if self.dir.is_dir():
            for path in sorted(self.dir.glob("*.npy")):
                try:
                    records = np.load(path, allow_pickle=False)
                except (OSError, ValueError):  # removed by a concurrent merge
                    continue
                files.append(path)
                known.update(zip(map(_key, records["stat"].tolist()), map(_key, records["sha1"].tolist())))
        return known, files

    def keys(self, paths):
        """The sha1 of each file's bytes (None for a file that cannot be read)."""
        known, files = self._records()
        out, new = [], {}
        for path in paths:
            try:
                stat = _stat_key(path)
            except OSError:
                out.append(None)
                continue
            digest = known.get(stat) or new.get(stat)
            if digest is None:
                digest = file_sha1(path)
                if digest is not None:
                    new[stat] = digest
            out.append(digest)
        if new:
            self._save(new, known, files)
        return out

    def _save(self, new, known, files):
        self.dir.mkdir(parents=True, exist_ok=True)
        if len(files) >= MAX_FILE_RECORDS:  # merge everything into one record file
            with file_lock(self.dir / ".merge.lock"):
                merged = {**known, **new}
                self._write(merged)
                for path in files:
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
        else:
            self._write(new)

    def _write(self, records):
        array = np.array(list(records.items()), dtype=FILE_DTYPE)
        _write_atomic(self.dir / f"{uuid.uuid4().hex}.npy", array)


# ---------------------------------------------------------------- feature spaces


class FeatureStore:
    """One feature space: per-sample float16 vectors ([D]) or token sequences ([T, D])."""

    def __init__(self, root, description):
        self.description = dict(description)
        self.key = space_key(self.description)
        self.dir = Path(root) / FORMAT / "features" / self.key
        self._index = None

    def ensure(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            _write_text_atomic(
                meta, json.dumps({"created": time.time(), **self.description}, indent=1, default=str)
            )

    def lock(self, shard=(0, 1), on_wait=None):
        """The fill lock; ranks of a sharded fill each take their own (their parts are disjoint)."""
        rank, world = shard
        name = "fill.lock" if world == 1 else f"fill-{rank}-of-{world}.lock"
        return file_lock(self.dir / name, on_wait=on_wait)

    def index(self, refresh=False):
        """sample key -> (chunk id, offset, length) for every committed chunk."""
        if self._index is None or refresh:
            index = {}
            if self.dir.is_dir():
                for path in sorted(self.dir.glob("*.index.npy")):
                    chunk = path.name[: -len(".index.npy")]
                    try:
                        records = np.load(path, allow_pickle=False)
                    except (OSError, ValueError):
                        continue
                    for key, offset, length in zip(
                        records["key"].tolist(), records["offset"].tolist(), records["length"].tolist()
                    ):
                        index[_key(key)] = (chunk, offset, length)
            self._index = index
        return self._index

    def missing(self, keys, refresh=False):
        """Positions of ``keys`` that have no entry (None keys count as missing)."""
        index = self.index(refresh)
        return [i for i, key in enumerate(keys) if key is None or key not in index]

    def writer(self, *, chunk_rows=CHUNK_ROWS, chunk_bytes=CHUNK_BYTES):
        self.ensure()
        return ChunkWriter(self, chunk_rows=chunk_rows, chunk_bytes=chunk_bytes)

    def view(self, keys):
        """A memory-mapped :class:`FeatureView` of ``keys`` (all must be present)."""
        index = self.index()
        entries = [index[key] for key in keys]
        return FeatureView(self.dir, entries, tokens=self.description.get("stored") == "tokens")


class ChunkWriter:
    """Buffers computed rows and commits them as chunks (data file first, index last)."""

    def __init__(self, store, *, chunk_rows, chunk_bytes):
        self.store = store
        self.chunk_rows = chunk_rows
        self.chunk_bytes = chunk_bytes
        self.keys, self.rows, self.nbytes = [], [], 0
        self.written = 0

    def add(self, key, row):
        row = np.ascontiguousarray(row, dtype=np.float16)
        self.keys.append(key)
        self.rows.append(row)
        self.nbytes += row.nbytes
        if len(self.rows) >= self.chunk_rows or self.nbytes >= self.chunk_bytes:
            self.flush()

    def flush(self):
        if not self.rows:
            return
        tokens = self.rows[0].ndim == 2
        lengths = np.array([row.shape[0] if tokens else 1 for row in self.rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        data = np.concatenate(self.rows, axis=0) if tokens else np.stack(self.rows)
        index = np.zeros(len(self.rows), dtype=INDEX_DTYPE)
        index["key"] = self.keys
        index["offset"] = offsets
        index["length"] = lengths
        chunk = uuid.uuid4().hex
        _write_atomic(self.store.dir / f"{chunk}.npy", data)
        _write_atomic(self.store.dir / f"{chunk}.index.npy", index)  # the commit
        index_map = self.store.index()
        for key, offset, length in zip(self.keys, offsets.tolist(), lengths.tolist()):
            index_map[key] = (chunk, offset, length)
        self.written += len(self.rows)
        self.keys, self.rows, self.nbytes = [], [], 0


class FeatureView:
    """Per-sample rows read from memory-mapped chunk files (never loaded whole).

    ``view[i]`` is a float16 array ([D], or [T_i, D] for tokens); ``lengths`` is the token
    count per sample (None for vectors). Pickles as paths, so loader workers map the files
    themselves.
    """

    def __init__(self, directory, entries, *, tokens):
        self.dir = Path(directory)
        self.chunks = np.array([chunk for chunk, _, _ in entries], dtype=object)
        self.offsets = np.array([offset for _, offset, _ in entries], dtype=np.int64)
        self.lengths = np.array([length for _, _, length in entries], dtype=np.int64) if tokens else None
        self._maps = {}

    def __len__(self):
        return len(self.offsets)

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def _map(self, chunk):
        array = self._maps.get(chunk)
        if array is None:
            array = self._maps[chunk] = np.load(self.dir / f"{chunk}.npy", mmap_mode="r")
        return array

    def __getitem__(self, i):
        data = self._map(self.chunks[i])
        offset = int(self.offsets[i])
        if self.lengths is None:
            return data[offset]
        return data[offset : offset + int(self.lengths[i])]

    def subset(self, keep):
        """Only the rows at positions ``keep``."""
        view = FeatureView.__new__(FeatureView)
        view.dir, view._maps = self.dir, {}
        view.chunks, view.offsets = self.chunks[keep], self.offsets[keep]
        view.lengths = self.lengths[keep] if self.lengths is not None else None
        return view


# ---------------------------------------------------------------- info / clear


def _dir_size(path):
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def cache_info(root):
    """One dict per feature space: key, encoder, identity, stored form, entries, bytes."""
    features = Path(root) / FORMAT / "features"
    spaces = []
    if features.is_dir():
        for directory in sorted(p for p in features.iterdir() if p.is_dir()):
            try:
                meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                meta = {}
            entries = 0
            for path in directory.glob("*.index.npy"):
                with contextlib.suppress(OSError, ValueError):
                    entries += len(np.load(path, mmap_mode="r"))
            spaces.append(
                {
                    "key": directory.name,
                    "encoder": meta.get("encoder", "?"),
                    "identity": meta.get("identity", "?"),
                    "stored": meta.get("stored", "?"),
                    "dtype": meta.get("dtype", "?"),
                    "entries": entries,
                    "bytes": _dir_size(directory),
                    "path": str(directory),
                }
            )
    return spaces


def clear_cache(root, *, encoder=None):
    """Remove every feature space (of ``encoder`` only, when given) -> how many were removed.

    Clearing everything also drops the file-hash records.
    """
    root = Path(root)
    removed = 0
    for space in cache_info(root):
        if encoder is None or space["encoder"] == encoder:
            shutil.rmtree(space["path"], ignore_errors=True)
            removed += 1
    if encoder is None:
        shutil.rmtree(root / FORMAT / "files", ignore_errors=True)
    return removed
