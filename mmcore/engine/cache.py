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
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path

import numpy as np

from mmcore.errors import RunError, os_error_line, os_error_reason
from mmcore.io import file_sha1

FORMAT = "v1"
INDEX_DTYPE = np.dtype([("key", "S20"), ("offset", "<i8"), ("length", "<i4")])
FILE_DTYPE = np.dtype([("stat", "S20"), ("sha1", "S20")])
#: flush a chunk when it holds this many samples or bytes (a killed fill loses at most one)
CHUNK_ROWS = 2048
CHUNK_BYTES = 128 * 2**20
#: merge the file-hash records when there are more record files than this
MAX_FILE_RECORDS = 16
#: errnos of a filesystem without ``flock``: fall back to ``O_EXCL`` lock files
NO_FLOCK = frozenset(e for e in (errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", None), errno.ENOLCK) if e)
#: an ``O_EXCL`` lock file of another host is taken over after this long without change
FOREIGN_LOCK_STALE_S = 24 * 3600
#: ``cache verify --repair`` removes orphaned and temporary files older than this (a live fill's are newer)
STALE_FILE_S = 600
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
        probe = _tmp_name(directory / "probe")
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


def _tmp_name(path):
    """``.<name>~<host>~<pid>~<uuid>.tmp`` beside ``path``: whose it is, so a dead writer's can be swept."""
    return path.with_name(f".{path.name}~{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex}.tmp")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's, alive
        return True
    return True


def is_leftover(tmp, now=None):
    """True for a temporary file of a killed write: its writer (this host) is dead, or it is old."""
    parts = tmp.name.removesuffix(".tmp").split("~")
    if len(parts) == 4 and parts[1] == socket.gethostname() and parts[2].isdigit():
        return not _pid_alive(int(parts[2]))
    now = time.time() if now is None else now
    return _old_enough(tmp, now)


def sweep_leftovers(directory):
    """Remove the temporary files of killed writes in ``directory`` (best effort) -> how many."""
    removed = 0
    for tmp in Path(directory).glob(".*.tmp"):
        if is_leftover(tmp):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed


def _write_atomic(path, array):
    """``np.save`` to a temporary name in the same directory, then ``os.replace``."""
    tmp = _tmp_name(path)
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
    tmp = _tmp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def file_lock(path, on_wait=None):
    """Hold an exclusive lock on ``path``: an ``flock`` (released by the kernel if the process
    dies), or, where the filesystem has none, an ``O_EXCL`` lock file (:func:`_exclusive_file_lock`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in NO_FLOCK:
                raise
            locked = False
        else:
            locked = True
        if locked:
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
            return
    with _exclusive_file_lock(path.with_name(path.name + ".excl"), on_wait):
        yield


def _lock_owner():
    return f"{os.getpid()} {socket.gethostname()}"


def _stale(lock):
    """True when the lock file's holder is gone: a dead PID on this host, or no change for a day elsewhere."""
    try:
        text = lock.read_text(encoding="utf-8")
        age = time.time() - lock.stat().st_mtime
    except (OSError, UnicodeDecodeError):
        return False, None
    pid, _, host = text.strip().partition(" ")
    if host != socket.gethostname():
        return age > FOREIGN_LOCK_STALE_S, text
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True, text
    except (ValueError, PermissionError):
        return False, text
    return False, text


@contextlib.contextmanager
def _exclusive_file_lock(lock, on_wait=None, poll=0.05):
    """A lock file created with ``O_CREAT | O_EXCL`` holding ``PID host``; removed on release.

    A stale one (its process is gone) is taken over: renamed away atomically, and put back if
    what was renamed turns out to be a fresh lock another process took meanwhile.
    """
    waited = False
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            stale, text = _stale(lock)
            if stale:
                away = lock.with_name(f"{lock.name}.{uuid.uuid4().hex}.stale")
                with contextlib.suppress(OSError):
                    os.rename(lock, away)
                    if away.read_text(encoding="utf-8") != text:  # not the one judged stale: give it back
                        with contextlib.suppress(OSError):
                            os.link(away, lock)
                    away.unlink()
                continue
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            time.sleep(poll)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(_lock_owner())
        break
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()


# ---------------------------------------------------------------- image content keys


class FileHashes:
    """Content keys of image files, remembered under their stat keys.

    Each record file is named by the sha1 of its contents, so a damaged one (cut short, bytes
    changed) is recognised, dropped with a warning and its images hashed again.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.dir = self.root / FORMAT / "files"

    def _records(self):
        known, files = {}, []
        if self.dir.is_dir():
            for path in sorted(self.dir.glob("*.npy")):
                records, problem = read_records(path)
                if records is None:
                    if problem is not None:
                        _drop([path], f"warning: feature cache: dropped damaged file-hash records {path} "
                                      f"({problem}); those images are hashed again")
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
            with cache_io(self.root):
                self._save(new, known, files)
        return out

    def _save(self, new, known, files):
        self.dir.mkdir(parents=True, exist_ok=True)
        sweep_leftovers(self.dir)
        if len(files) >= MAX_FILE_RECORDS:  # merge everything into one record file
            with file_lock(self.dir / ".merge.lock"):
                merged = {**known, **new}
                written = self._write(merged)
                for path in files:
                    if path != written:
                        with contextlib.suppress(FileNotFoundError):
                            path.unlink()
        else:
            self._write(new)

    def _write(self, records):
        array = np.array(sorted(records.items()), dtype=FILE_DTYPE)
        path = self.dir / f"{hashlib.sha1(array.tobytes()).hexdigest()}.npy"
        _write_atomic(path, array)
        return path


def read_records(path):
    """``(records, None)`` for a sound file-hash record file, else ``(None, problem)``.

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
    if records.dtype != FILE_DTYPE or records.ndim != 1:
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
                _write_text_atomic(
                    meta, json.dumps({"created": time.time(), **self.description}, indent=1, default=str)
                )

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
        row = np.ascontiguousarray(row, dtype=self.store.row_dtype)
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
    expected = row_dtype(description)
    if dtype != expected or len(shape) != 2:
        return None, (data_path, f"expected {expected} rows, found {dtype} of shape {shape}")
    dim = (description or {}).get("dim")
    if isinstance(dim, int) and shape[1] != dim:
        return None, (data_path, f"rows of {shape[1]} values, the encoder gives {dim}")
    if len(records):
        offsets, lengths = records["offset"], records["length"]
        end = int((offsets + lengths).max())
        if offsets.min() < 0 or lengths.min() < 1 or end > shape[0]:
            return None, (data_path, f"{shape[0]} rows, its index needs {end}")
    return records, None


def _old_enough(path, now):
    try:
        return now - path.stat().st_mtime > STALE_FILE_S
    except OSError:
        return False


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
            if _old_enough(data, now):
                problem(f"{data}: data file without an index (a fill killed before its commit)", data)
    files = root / FORMAT / "files"
    for path in sorted(files.glob("*.npy")) if files.is_dir() else []:
        records, bad = read_records(path)
        if records is not None:
            report["records"] += 1
        elif bad is not None:
            problem(f"{path}: damaged file-hash records ({bad})", path)
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
