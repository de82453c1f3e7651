"""One chunk of a feature space: a data file of rows and its index (sample key, offset, length).

A chunk is committed in two steps, each atomic (:func:`mmcore.io.atomic_write`): its data file
``<chunk>.npy`` first, then its index ``<chunk>.index.npy``, the commit marker: readers only
see chunks whose index exists, and a killed fill keeps every chunk it completed.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from mmcore.store.arrays import npy_header, payload_bytes, save_array
from mmcore.store.root import short_error
from mmcore.store.tokens import INT8_EXTRA

INDEX_DTYPE = np.dtype([("key", "S20"), ("offset", "<i8"), ("length", "<i4")])
#: flush a chunk when it holds this many samples or bytes (a killed fill loses at most one)
CHUNK_ROWS = 2048
CHUNK_BYTES = 128 * 2**20
INDEX_SUFFIX = ".index.npy"


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
    """Commit ``data`` (rows of every sample, concatenated) as a new chunk of ``directory`` -> its id.

    ``OSError`` (a full disk) reaches the caller; what was half-written is removed.
    """
    index = np.zeros(len(keys), dtype=INDEX_DTYPE)
    index["key"] = keys
    index["offset"] = offsets
    index["length"] = lengths
    chunk = uuid.uuid4().hex
    index_path, data_path = chunk_files(directory, chunk)
    save_array(data_path, data)
    save_array(index_path, index)  # the commit
    return chunk


def check_chunk(directory, chunk, description=None):
    """Verify one committed chunk -> ``(index records, None)``, or ``(None, (file, problem))``.

    The index must be an index; the data file a ``.npy`` of the space's stored dtype (float16
    features, int8 tokens, uint8 pixels) exactly as long as its header says, as wide as the
    space's ``dim``, with every indexed row inside it. ``(None, None)``: the chunk vanished
    meanwhile (another process dropped it).
    """
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
        shape, dtype, offset, size = npy_header(data_path)
    except FileNotFoundError:
        return None, (data_path, "data file missing")
    except (OSError, ValueError, EOFError) as exc:
        return None, (data_path, f"unreadable: {short_error(exc)}")
    need = offset + payload_bytes(shape, dtype)
    if size != need:
        return None, (data_path, f"{size} bytes, its header needs {need}")
    expected = stored_dtype(description)
    if dtype != expected or len(shape) != 2:
        return None, (data_path, f"expected {expected.name} rows, found {dtype} of shape {shape}")
    dim = (description or {}).get("dim")
    int8 = expected == np.int8
    if isinstance(dim, int) and shape[1] != dim + (INT8_EXTRA if int8 else 0):
        return None, (data_path, f"rows of {shape[1]} values, the encoder gives {dim}")
    if len(records):
        offsets, lengths = records["offset"], records["length"]
        end = int((offsets + lengths).max())
        if offsets.min() < 0 or lengths.min() < 1 or end > shape[0]:
            return None, (data_path, f"{shape[0]} rows, its index needs {end}")
    return records, None
