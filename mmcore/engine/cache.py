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
did not. A killed fill keeps every chunk it completed. On a filesystem without ``flock``
(some network and FUSE mounts answer ENOSYS/EOPNOTSUPP) the lock is an ``O_EXCL`` lock file
holding the PID and host instead, taken over when its process is gone.

The cache verifies what it maps and never lets damage fail a run: each committed chunk's data
file is checked against its index (readable header, float16, the file size its header
implies, every indexed row inside it) and each file-hash record against the sha1 in its name.
A damaged chunk or record is dropped with one warning line naming the file, and its entries
are recomputed. ``mmcore cache verify [--repair]`` (:func:`verify_cache`) checks a whole
cache, including what a run ignores (orphaned data files and temporary files of killed
writes). A cache directory that cannot be written (full, read-only, missing disk) raises
:class:`CacheUnavailable`, one line naming the directory; the pipeline then continues
without the cache, or stops with that line when ``cache.required = true``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from mmcore.errors import RunError, os_error_line, os_error_reason
from mmcore.io import atomic_write, file_sha1, temp_name
from mmcore.store.leftovers import is_leftover, old_enough, sweep_leftovers
from mmcore.store.locks import file_lock

FORMAT = "v1"
INDEX_DTYPE = np.dtype([("key", "S20"), ("offset", "<i8"), ("length", "<i4")])
FILE_DTYPE = np.dtype([("stat", "S20"), ("sha1", "S20")])
#: flush a chunk when it holds this many samples or bytes (a killed fill loses at most one)
CHUNK_ROWS = 2048
CHUNK_BYTES = 128 * 2**20
#: merge the file-hash records when there are more record files than this
MAX_FILE_RECORDS = 16
_DIGEST_NAME = re.compile(r"^[0-9a-f]{40}$")


class CacheUnavailable(RunError):
    """The cache directory cannot be used (full, read-only or missing disk): one line naming it."""

    def __init__(self, root, exc):
        self.root = Path(root)
        self.reason = os_error_reason(exc)[0]
        super().__init__(os_error_line(root, exc, what="feature cache"))


@contextlib.contextmanager
def cache_io(root):
    """Turn an ``OSError`` of cache I/O under ``root`` into :class:`CacheUnavailable`."""
    try:
        yield
    except CacheUnavailable:
        raise
    except OSError as exc:
        raise CacheUnavailable(root, exc) from exc


_warned = set()


def warn(line):
    """Print a cache warning once per process (a damaged file is named once, not per split)."""
    if line not in _warned:
        _warned.add(line)
        print(line, file=sys.stderr, flush=True)


def probe_cache(root):
    """Check that ``root`` can hold cache files (create, write, fsync, remove a probe file).

    Raises :class:`CacheUnavailable`; a disk that fills up later is caught where it is written.
    """
    root = Path(root)
    with cache_io(root):
        directory = root / FORMAT
        directory.mkdir(parents=True, exist_ok=True)
        probe = temp_name(directory / "probe")
        try:
            with open(probe, "wb") as handle:
                handle.write(b"mmcore")
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()


def cache_root(configured=""):
    """The cache directory: ``configured``, else ``$MMCORE_CACHE_DIR``, else ``~/.cache/mmcore``."""
    if configured:
        return Path(os.path.expanduser(configured))
    env = os.environ.get("MMCORE_CACHE_DIR")
    if env:
        return Path(os.path.expanduser(env))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmcore"


def human_bytes(n):
    """``1.6 GiB``: a byte count for people (binary units)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(root):
    """Free bytes on the filesystem that holds (or will hold) ``root``: ``shutil.disk_usage`` of
    its nearest existing ancestor (tests replace this function to inject a figure)."""
    path = Path(root).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


class CacheTooSmall(RunError):
    """A feature pass that would not fit the cache's free space (it stops before writing)."""


def check_space(root, *, rows, row_bytes, what, options):
    """Refuse a pass of ``rows`` new entries of ``row_bytes`` each when the disk cannot hold them.

    One line: how much it needs, how much is free, and ``options`` (what to change instead).
    A pass that fits returns the projected bytes.
    """
    need = int(rows * (row_bytes + INDEX_DTYPE.itemsize))
    if need <= 0:
        return 0
    try:
        free = free_bytes(root)
    except OSError:  # the directory's problem is reported by the probe and the writes
        return need
    if need > free:
        raise CacheTooSmall(
            f"feature cache {root}: {what} needs {human_bytes(need)} ({rows} entries x {human_bytes(row_bytes)}), "
            f"{human_bytes(free)} free; options: {options}"
        )
    return need


def text_key(text):
    """A text's content key (20 bytes)."""
    return hashlib.sha1(text.encode("utf-8")).digest()


def _key(stored):
    """A 20-byte key read back from an ``S20`` field: numpy drops its trailing NUL bytes, so a
    key ending in 0x00 (1 in 256) would otherwise never match again."""
    return stored.ljust(20, b"\0")


def stat_key(path, st=None):
    """A file's stat key (20 bytes): its absolute path, size, mtime and ctime; ``os.stat`` only
    (none when the caller already has the file's ``st``)."""
    st = os.stat(path) if st is None else st
    blob = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    return hashlib.sha1(blob.encode("utf-8", "surrogateescape")).digest()


_stat_key = stat_key  # the name tests and older callers use


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


def save_array(path, array):
    """``np.save`` atomically (:func:`mmcore.io.atomic_write`; an ``OSError`` reaches the caller)."""
    with atomic_write(path, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


# ---------------------------------------------------------------- image content keys


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
                        _drop([path], f"warning: feature cache: dropped damaged {self.what} {path} "
                                      f"({problem}); those images are {self.again}")
                    continue
                files.append(path)
                parts.append(records)
        records = np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)
        return records, files

    @staticmethod
    def lookup(records):
        """stat key -> position in ``records`` (the last record of a key wins)."""
        return dict(zip(map(_key, records["stat"].tolist()), range(len(records))))

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
        self.dir = self.root / FORMAT / "files"
        self.records = StatRecords(self.dir, FILE_DTYPE, "file-hash records", "hashed again")

    def known(self):
        """stat key -> sha1 of every remembered file."""
        records, _ = self.records.load()
        return dict(zip(map(_key, records["stat"].tolist()), map(_key, records["sha1"].tolist())))

    def keys(self, paths):
        """The sha1 of each file's bytes (None for a file that cannot be read)."""
        records, files = self.records.load()
        known = dict(zip(map(_key, records["stat"].tolist()), map(_key, records["sha1"].tolist())))
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
        return None, f"unreadable: {_short(exc)}"
    if records.dtype != dtype or records.ndim != 1:
        return None, f"unexpected contents ({records.dtype}, shape {records.shape})"
    stem = Path(path).stem
    if _DIGEST_NAME.match(stem) and hashlib.sha1(records.tobytes()).hexdigest() != stem:
        return None, "contents do not match the checksum in its name"
    return records, None


def _short(exc):
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:120]


def _drop(paths, line):
    """Remove damaged cache files (best effort: a read-only cache keeps them) and say so once."""
    for path in paths:
        with contextlib.suppress(OSError):
            Path(path).unlink()
    warn(line)


# ---------------------------------------------------------------- feature spaces


def row_dtype(description):
    """The numpy dtype of a space's rows: ``description["row_dtype"]`` (default float16)."""
    return np.dtype((description or {}).get("row_dtype", "float16"))


class FeatureStore:
    """One feature space: per-sample float16 vectors ([D]) or token sequences ([T, D]).

    A space whose description says ``row_dtype = "uint8"`` holds flat uint8 rows instead:
    the decoded-image cache (resized pixels, see :func:`mmcore.engine.features.decoded_store`).
    """

    def __init__(self, root, description):
        self.description = dict(description)
        #: what each row is stored as: float16 features, or uint8 pixels (the decoded-image cache)
        self.row_dtype = row_dtype(self.description)
        self.key = space_key(self.description)
        self.root = Path(root)
        self.dir = self.root / FORMAT / "features" / self.key
        self._index = None
        self._checked = {}  # chunk id -> (index records, None): verified once per process

    def ensure(self):
        """Create the space's directory and ``meta.json`` (:class:`CacheUnavailable` if it cannot)."""
        with cache_io(self.root):
            self.dir.mkdir(parents=True, exist_ok=True)
            meta = self.dir / "meta.json"
            if not meta.exists():
                with atomic_write(meta, "w", encoding="utf-8") as handle:
                    handle.write(json.dumps({"created": time.time(), **self.description}, indent=1, default=str))

    @contextlib.contextmanager
    def lock(self, shard=(0, 1), on_wait=None):
        """The fill lock; ranks of a sharded fill each take their own (their parts are disjoint)."""
        rank, world = shard
        name = "fill.lock" if world == 1 else f"fill-{rank}-of-{world}.lock"
        with contextlib.ExitStack() as stack:
            with cache_io(self.root):
                stack.enter_context(file_lock(self.dir / name, on_wait=on_wait))
            sweep_leftovers(self.dir)  # temporary files of fills killed mid-write
            yield

    def index(self, refresh=False):
        """sample key -> (chunk id, offset, length) for every committed chunk that is sound.

        A chunk whose data file does not match its index (:func:`check_chunk`) is dropped with
        one warning naming the file; its samples then count as missing and are recomputed.
        """
        if self._index is None or refresh:
            index = {}
            checked = self._checked  # committed chunks never change: each is checked once
            if self.dir.is_dir():
                for path in sorted(self.dir.glob("*.index.npy")):
                    chunk = path.name[: -len(".index.npy")]
                    records, problem = checked.get(chunk) or check_chunk(self.dir, chunk, self.description)
                    if records is None:
                        if problem is not None:
                            bad, why = problem
                            _drop(
                                [path, self.dir / f"{chunk}.npy"],
                                f"warning: feature cache: dropped damaged chunk {bad} ({why}); "
                                f"its entries are recomputed",
                            )
                        continue
                    checked[chunk] = (records, None)
                    for key, offset, length in zip(
                        records["key"].tolist(), records["offset"].tolist(), records["length"].tolist()
                    ):
                        index[_key(key)] = (chunk, offset, length)
            self._checked = checked
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
        return FeatureView(self.dir, entries, tokens=self.tokens, storage=self.storage)

    @property
    def tokens(self):
        return self.description.get("stored") == "tokens"

    @property
    def storage(self):
        """How token sequences are stored: ``fp16`` (as computed), ``int8`` or ``pooled`` (:data:`TOKEN_STORAGES`)."""
        return self.description.get("token_storage", "fp16") if self.tokens else "fp16"

    def encode(self, row):
        """One computed output as it is stored in this space (float16, or the compact token form)."""
        row = np.asarray(row)
        if self.tokens and self.storage == "pooled":
            row = pool_tokens(row)
        if self.tokens and self.storage == "int8":
            return quantize_int8(row)
        return np.ascontiguousarray(row, dtype=self.row_dtype)


#: the largest finite float16: a feature above it would be stored as inf
FLOAT16_MAX = 65504.0


class FeatureOverflow(RunError):
    """An encoder output does not fit the cache's float16."""


def as_float16(values, store):
    """``values`` (a tensor, on its device) cast to float16 for ``store``; refuses values float16 cannot hold.

    A bf16 or fp32 activation above 65504 would silently become inf in the cache, so the
    fill stops with one line naming the encoder and the largest value instead.
    """
    peak = float(values.detach().abs().amax()) if values.numel() else 0.0
    if peak > FLOAT16_MAX:  # NaN compares False: a NaN output is the loss check's business
        description = store.description
        raise FeatureOverflow(
            f"{description.get('kind', 'feature')} encoder {description.get('encoder', '?')!r} outputs values up to "
            f"{peak:.4g}, above float16's maximum {FLOAT16_MAX:.0f}, which the feature cache stores; "
            "scale its output down or set cache.enabled = false"
        )
    return values.half()


class ChunkWriter:
    """Buffers computed rows and commits them as chunks (data file first, index last)."""

    def __init__(self, store, *, chunk_rows, chunk_bytes):
        self.store = store
        self.chunk_rows = chunk_rows
        self.chunk_bytes = chunk_bytes
        self.keys, self.rows, self.nbytes = [], [], 0
        self.written = 0

    def add(self, key, row):
        row = self.store.encode(row)
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
        with cache_io(self.store.root):
            save_array(self.store.dir / f"{chunk}.npy", data)
            save_array(self.store.dir / f"{chunk}.index.npy", index)  # the commit
        index_map = self.store.index()
        for key, offset, length in zip(self.keys, offsets.tolist(), lengths.tolist()):
            index_map[key] = (chunk, offset, length)
        self.written += len(self.rows)
        self.keys, self.rows, self.nbytes = [], [], 0


class FeatureView:
    """Per-sample rows read from memory-mapped chunk files (never loaded whole).

    ``view[i]`` is a float16 array ([D], or [T_i, D] for tokens; float32 for int8-stored tokens,
    dequantized); ``lengths`` is the stored token count per sample (None for vectors). Pickles as paths, so loader workers map the files
    themselves.
    """

    def __init__(self, directory, entries, *, tokens, storage="fp16"):
        self.dir = Path(directory)
        self.chunks = np.array([chunk for chunk, _, _ in entries], dtype=object)
        self.offsets = np.array([offset for _, offset, _ in entries], dtype=np.int64)
        self.lengths = np.array([length for _, _, length in entries], dtype=np.int64) if tokens else None
        self.storage = storage
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
        rows = data[offset : offset + int(self.lengths[i])]
        return dequantize_int8(rows) if self.storage == "int8" else rows

    def subset(self, keep):
        """Only the rows at positions ``keep``."""
        view = FeatureView.__new__(FeatureView)
        view.dir, view._maps, view.storage = self.dir, {}, self.storage
        view.chunks, view.offsets = self.chunks[keep], self.offsets[keep]
        view.lengths = self.lengths[keep] if self.lengths is not None else None
        return view


# ---------------------------------------------------------------- compact token storage

#: ``cache.token_storage``: how token sequences (attention pooling) are stored
TOKEN_STORAGES = ("fp16", "int8", "pooled")
#: int8 rows carry their float16 scale in two extra int8 columns
INT8_EXTRA = 2


def quantize_int8(tokens):
    """[T, D] floats -> [T, D + 2] int8: per token, ``round(x / scale)`` with ``scale = max|x| / 127``,
    the scale stored as float16 in the last two columns. Error per value <= max|x| / 254 (+ the
    scale's float16 rounding, 1/2048 relative)."""
    tokens = np.asarray(tokens, dtype=np.float32)
    peak = np.abs(tokens).max(axis=1, keepdims=True) if tokens.size else np.zeros((len(tokens), 1), np.float32)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float16)
    quantized = np.clip(np.rint(tokens / scale.astype(np.float32)), -127, 127).astype(np.int8)
    return np.ascontiguousarray(np.concatenate([quantized, scale.view(np.int8)], axis=1))


def dequantize_int8(rows):
    """[T, D + 2] int8 rows of :func:`quantize_int8` -> [T, D] float32."""
    rows = np.asarray(rows)
    scale = np.ascontiguousarray(rows[:, -INT8_EXTRA:]).view(np.float16).astype(np.float32)
    return rows[:, :-INT8_EXTRA].astype(np.float32) * scale


def pool_tokens(tokens):
    """A token sequence on a square grid (optionally after one CLS token) -> the grid 2x2 mean-pooled
    (an odd side keeps its last row/column as smaller windows); any other length: groups of 4 in order.
    About 4x fewer tokens to store; the CLS token is kept as it is."""
    tokens = np.asarray(tokens, dtype=np.float32)
    count, dim = tokens.shape
    cls = 0
    side = math.isqrt(count)
    if side * side != count and count > 1 and math.isqrt(count - 1) ** 2 == count - 1:
        cls, side = 1, math.isqrt(count - 1)
    grid = tokens[cls:]
    if side >= 2 and side * side == len(grid):
        half = (side + 1) // 2
        sums = np.zeros((half * 2, half * 2, dim), np.float32)
        counts = np.zeros((half * 2, half * 2, 1), np.float32)
        sums[:side, :side] = grid.reshape(side, side, dim)
        counts[:side, :side] = 1
        sums = sums.reshape(half, 2, half, 2, dim).sum(axis=(1, 3))
        counts = counts.reshape(half, 2, half, 2, 1).sum(axis=(1, 3))
        pooled = (sums / counts).reshape(half * half, dim)
    else:
        groups = (len(grid) + 3) // 4
        pooled = np.stack([grid[4 * g : 4 * g + 4].mean(axis=0) for g in range(groups)]) if groups else grid
    return np.concatenate([tokens[:cls], pooled], axis=0)


def stored_row_bytes(description, tokens_per_row=None):
    """Bytes one entry of a space takes on disk (``tokens_per_row``: the encoder's output length)."""
    dim = int(description.get("dim") or 0)
    if description.get("stored") != "tokens":
        return dim * 2
    count = int(tokens_per_row or 1)
    storage = description.get("token_storage", "fp16")
    if storage == "pooled":
        count = len(pool_tokens(np.zeros((count, 1), np.float32)))
    if storage == "int8":
        return count * (dim + INT8_EXTRA)
    return count * dim * 2


# ---------------------------------------------------------------- verification


def _npy_header(path):
    """(shape, dtype, bytes the file must have) from a ``.npy`` header, reading nothing else."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in read_header:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = read_header[version](handle)
        need = handle.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = os.fstat(handle.fileno()).st_size
    return shape, dtype, need, size


def check_chunk(directory, chunk, description=None):
    """Verify one committed chunk -> ``(index records, None)``, or ``(None, (file, problem))``.

    The index must be an index; the data file a float16 ``.npy`` exactly as long as its header
    says, wide as the space's ``dim``, with every indexed row inside it. ``(None, None)``: the
    chunk vanished meanwhile (another process dropped it).
    """
    directory = Path(directory)
    index_path, data_path = directory / f"{chunk}.index.npy", directory / f"{chunk}.npy"
    try:
        records = np.load(index_path, allow_pickle=False)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, EOFError) as exc:
        return None, (index_path, f"unreadable index: {_short(exc)}")
    if records.dtype != INDEX_DTYPE or records.ndim != 1:
        return None, (index_path, f"not a chunk index ({records.dtype}, shape {records.shape})")
    try:
        shape, dtype, need, size = _npy_header(data_path)
    except FileNotFoundError:
        return None, (data_path, "data file missing")
    except (OSError, ValueError, EOFError) as exc:
        return None, (data_path, f"unreadable: {_short(exc)}")
    if size != need:
        return None, (data_path, f"{size} bytes, its header needs {need}")
    int8 = (description or {}).get("stored") == "tokens" and (description or {}).get("token_storage") == "int8"
    expected = np.dtype(np.int8) if int8 else row_dtype(description)
    if dtype != expected or len(shape) != 2:
        return None, (data_path, f"expected {expected.name} rows, found {dtype} of shape {shape}")
    dim = (description or {}).get("dim")
    if isinstance(dim, int) and shape[1] != dim + (INT8_EXTRA if int8 else 0):
        return None, (data_path, f"rows of {shape[1]} values, the encoder gives {dim}")
    if len(records):
        offsets, lengths = records["offset"], records["length"]
        end = int((offsets + lengths).max())
        if offsets.min() < 0 or lengths.min() < 1 or end > shape[0]:
            return None, (data_path, f"{shape[0]} rows, its index needs {end}")
    return records, None


def verify_cache(root, *, repair=False):
    """Check a whole cache -> ``{"spaces", "chunks", "entries", "records", "problems", "repaired", "remaining"}``.

    ``problems`` are lines naming each damaged file (chunks that do not match their index,
    damaged file-hash records, unreadable ``meta.json``) and leftovers (a data file without
    index, temporary files of killed writes, older than ``STALE_FILE_S``). With ``repair``
    they are removed (a run would recompute the entries anyway) and counted in ``repaired``;
    ``remaining`` counts the problems still there afterwards.
    """
    root = Path(root)
    now = time.time()
    report = {"spaces": 0, "chunks": 0, "entries": 0, "records": 0, "problems": [], "repaired": 0}
    remove = []

    def problem(line, *paths):
        report["problems"].append(line)
        remove.extend(paths)

    features = root / FORMAT / "features"
    for directory in sorted(p for p in features.iterdir() if p.is_dir()) if features.is_dir() else []:
        report["spaces"] += 1
        description = None
        try:
            description = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            problem(f"{directory / 'meta.json'}: unreadable ({_short(exc)})", directory / "meta.json")
        committed = set()
        for index_path in sorted(directory.glob("*.index.npy")):
            chunk = index_path.name[: -len(".index.npy")]
            committed.add(chunk)
            records, bad = check_chunk(directory, chunk, description)
            if bad is not None:
                problem(f"{bad[0]}: damaged chunk ({bad[1]})", index_path, directory / f"{chunk}.npy")
            elif records is not None:
                report["chunks"] += 1
                report["entries"] += len(records)
        for data in sorted(directory.glob("*.npy")):
            name = data.name
            if name.endswith(".index.npy") or name[: -len(".npy")] in committed:
                continue
            if old_enough(data, now):
                problem(f"{data}: data file without an index (a fill killed before its commit)", data)
    from mmcore.data.memo import CHECK_DTYPE

    record_dirs = [(root / FORMAT / "files", FILE_DTYPE, "file-hash records")]
    checks = root / FORMAT / "checks"
    record_dirs += [(d, CHECK_DTYPE, "image-check records") for d in sorted(checks.iterdir()) if d.is_dir()] if checks.is_dir() else []
    for directory, dtype, what in record_dirs:
        for path in sorted(directory.glob("*.npy")) if directory.is_dir() else []:
            records, bad = read_records(path, dtype)
            if records is not None:
                report["records"] += 1
            elif bad is not None:
                problem(f"{path}: damaged {what} ({bad})", path)
    for tmp in sorted((root / FORMAT).rglob(".*.tmp")) if (root / FORMAT).is_dir() else []:
        if is_leftover(tmp, now):
            problem(f"{tmp}: temporary file of an interrupted write", tmp)
    report["remaining"] = len(report["problems"])
    if repair:
        failed = []
        for path in dict.fromkeys(remove):
            try:
                path.unlink()
                report["repaired"] += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                failed.append(os_error_line(path, exc, what="cannot remove"))
        report["problems"].extend(failed)
        report["remaining"] = len(failed)
    return report


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
            size = _dir_size(directory)
            spaces.append(
                {
                    "key": directory.name,
                    "encoder": meta.get("encoder", "?"),
                    "identity": meta.get("identity", "?"),
                    "stored": meta.get("stored", "?"),
                    "token_storage": meta.get("token_storage", "fp16") if meta.get("stored") == "tokens" else None,
                    "dtype": meta.get("dtype", "?"),
                    "entries": entries,
                    "bytes": size,
                    "bytes_per_entry": size / entries if entries else 0,
                    "path": str(directory),
                }
            )
    return spaces


def records_info(root):
    """``{"files": bytes, "checks": bytes, "shards": bytes, "spool": bytes}``: what the cache holds beside features."""
    base = Path(root) / FORMAT
    return {name: _dir_size(base / name) if (base / name).is_dir() else 0 for name in ("files", "checks", "shards", "spool")}


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
