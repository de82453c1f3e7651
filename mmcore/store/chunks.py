"""One chunk of a feature space: a data file of rows, sealed with what it holds, and its index.

A chunk is committed in two steps, each atomic (:func:`mmcore.io.atomic_write`): its data file
``<chunk>.npy`` first, then its index ``<chunk>.index.npy`` (sample key, offset, length per
sample), the commit marker: readers only see chunks whose index exists, and a killed fill keeps
every chunk it completed.

**What a chunk holds is bound to it, not to its file names.** Two chunks of one space have the
same shapes, so a data file swapped with another, an index swapped or copied, or a chunk moved
into another space's folder used to pass every check and serve one image's features for
another's. The data file therefore ends with a *seal* (:data:`SEAL`, 76 bytes after the
``.npy`` payload, which ``np.load`` ignores): the chunk format, the key of the space it was
written for (its folder's name), the sha1 of its index's records and the sha1 of its rows.

- When a run maps a chunk (once per process, :func:`check_chunk`), it reads the index (a few
  dozen bytes per sample, read anyway to find the rows), the ``.npy`` header and the seal, and
  hashes the index: a few KiB per chunk of up to 128 MiB, however large the cache. A chunk whose
  seal names another space or another index is dropped with one warning and recomputed.
- Hashing the rows themselves would read every cached byte on every run, so the run does not;
  ``mmcore cache verify`` does (``full=True``) and lists a chunk whose rows changed on disk.

Chunks written before the seal (format 1) cannot say what they hold: a run drops them (one
warning line per space) and computes their entries again, once.
"""

from __future__ import annotations

import hashlib
import os
import struct
import uuid
from pathlib import Path

import numpy as np

from mmcore.io import atomic_write
from mmcore.store.arrays import payload_bytes, read_npy_header, save_array
from mmcore.store.root import short_error
from mmcore.store.tokens import INT8_EXTRA

INDEX_DTYPE = np.dtype([("key", "S20"), ("offset", "<i8"), ("length", "<i4")])
#: flush a chunk when it holds this many samples or bytes (a killed fill loses at most one)
CHUNK_ROWS = 2048
CHUNK_BYTES = 128 * 2**20
INDEX_SUFFIX = ".index.npy"
#: the chunk format: 2 = sealed (1: no seal, written before it existed)
CHUNK_FORMAT = 2
#: the seal after a data file's rows: magic, chunk format, space key, sha1 of the index records, sha1 of the rows
SEAL = struct.Struct("<8sI24s20s20s")
SEAL_MAGIC = b"mmcore\0c"
#: why a chunk written before the seal is not used
UNSEALED = "written by an older mmcore without a seal of what it holds"
_READ_BLOCK = 1 << 20


def row_dtype(description):
    """The numpy dtype of a space's rows: ``description["row_dtype"]`` (default float16)."""
    return np.dtype((description or {}).get("row_dtype", "float16"))


def stored_dtype(description):
    """The dtype of a space's data files: int8 for int8-stored tokens, else :func:`row_dtype`."""
    description = description or {}
    if description.get("stored") == "tokens" and description.get("token_storage") == "int8":
        return np.dtype(np.int8)
    return row_dtype(description)


def committed_chunks(directory):
    """The ids of the chunks committed in ``directory`` (those with an index), in order."""
    directory = Path(directory)
    return [p.name[: -len(INDEX_SUFFIX)] for p in sorted(directory.glob(f"*{INDEX_SUFFIX}"))] if directory.is_dir() else []


def chunk_files(directory, chunk):
    """``(index file, data file)`` of ``chunk``."""
    directory = Path(directory)
    return directory / f"{chunk}{INDEX_SUFFIX}", directory / f"{chunk}.npy"


def write_chunk(directory, keys, data, offsets, lengths):
    """Commit ``data`` (rows of every sample, concatenated) as a new sealed chunk of ``directory`` -> its id.

    ``directory`` is the space's folder: its name, the space key, goes into the seal. ``OSError``
    (a full disk) reaches the caller; what was half-written is removed.
    """
    directory = Path(directory)
    index = np.zeros(len(keys), dtype=INDEX_DTYPE)
    index["key"] = keys
    index["offset"] = offsets
    index["length"] = lengths
    data = np.ascontiguousarray(data)
    seal = SEAL.pack(SEAL_MAGIC, CHUNK_FORMAT, directory.name.encode(), hashlib.sha1(index).digest(),
                     hashlib.sha1(data).digest())
    chunk = uuid.uuid4().hex
    index_path, data_path = chunk_files(directory, chunk)
    with atomic_write(data_path, "wb") as handle:
        np.save(handle, data, allow_pickle=False)
        handle.write(seal)
    save_array(index_path, index)  # the commit
    return chunk


def check_chunk(directory, chunk, description=None, *, full=False):
    """Verify one committed chunk -> ``(index records, None)``, or ``(None, (file, problem))``.

    The index must be an index; the data file a ``.npy`` of the space's stored dtype (float16
    features, int8 tokens, uint8 pixels) exactly as long as its header and seal say, as wide as
    the space's ``dim``, with every indexed row inside it, and sealed for this space (the
    folder's name) and this index. ``full``: also hash its rows against the seal (reads the
    whole file: ``mmcore cache verify``). ``(None, None)``: the chunk vanished meanwhile
    (another process dropped it).
    """
    directory = Path(directory)
    index_path, data_path = chunk_files(directory, chunk)
    try:
        records = np.load(index_path, allow_pickle=False)
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, EOFError) as exc:
        return None, (index_path, f"unreadable index: {short_error(exc)}")
    if records.dtype != INDEX_DTYPE or records.ndim != 1:
        return None, (index_path, f"not a chunk index ({records.dtype}, shape {records.shape})")
    try:
        with open(data_path, "rb") as handle:
            shape, dtype, offset = read_npy_header(handle)
            size = os.fstat(handle.fileno()).st_size
            rows = payload_bytes(shape, dtype)
            need = offset + rows + SEAL.size
            if size == need - SEAL.size:
                return None, (data_path, UNSEALED)
            if size != need:
                return None, (data_path, f"{size} bytes, its header needs {need}")
            seal = os.pread(handle.fileno(), SEAL.size, offset + rows)
            rows_sha1 = _sha1_of(handle, offset, rows) if full else None
    except FileNotFoundError:
        return None, (data_path, "data file missing")
    except (OSError, ValueError, EOFError) as exc:
        return None, (data_path, f"unreadable: {short_error(exc)}")
    expected = stored_dtype(description)
    if dtype != expected or len(shape) != 2:
        return None, (data_path, f"expected {expected.name} rows, found {dtype} of shape {shape}")
    dim = (description or {}).get("dim")
    if isinstance(dim, int) and shape[1] != dim + (INT8_EXTRA if expected == np.int8 else 0):
        return None, (data_path, f"rows of {shape[1]} values, the encoder gives {dim}")
    if len(records):
        offsets, lengths = records["offset"], records["length"]
        end = int((offsets + lengths).max())
        if offsets.min() < 0 or lengths.min() < 1 or end > shape[0]:
            return None, (data_path, f"{shape[0]} rows, its index needs {end}")
    problem = _seal_problem(seal, directory.name, records, rows_sha1)
    return (None, (data_path, problem)) if problem else (records, None)


def _seal_problem(seal, space, records, rows_sha1):
    """Why a chunk's seal does not vouch for it (None when it does)."""
    magic, version, sealed_space, index_sha1, sealed_rows_sha1 = SEAL.unpack(seal)
    if magic != SEAL_MAGIC or version != CHUNK_FORMAT:
        return "its seal is unreadable (not a chunk of this mmcore's format)"
    if sealed_space != space.encode():
        return f"sealed for feature space {sealed_space.decode('ascii', 'replace')}, not {space}"
    if hashlib.sha1(records).digest() != index_sha1:
        return "its index is not the one it was sealed with (chunk files swapped or copied)"
    if rows_sha1 is not None and rows_sha1 != sealed_rows_sha1:
        return "its rows are not the ones it was sealed with (changed on disk)"
    return None


def _sha1_of(handle, offset, length):
    """sha1 of ``length`` bytes of an open file from ``offset`` (read in blocks)."""
    digest = hashlib.sha1()
    handle.seek(offset)
    while length > 0:
        block = handle.read(min(_READ_BLOCK, length))
        if not block:
            break
        digest.update(block)
        length -= len(block)
    return digest.digest()
