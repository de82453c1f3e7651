"""The features tenant: frozen-encoder outputs computed once, shared by every run.

Layout under the cache directory::

    v1/features/<space>/meta.json          what this feature space is: encoder identity, stored form
    v1/features/<space>/<chunk>.npy        one chunk of rows, memory-mapped (float16 features;
                                           int8 rows for int8-stored tokens; uint8 pixels),
                                           sealed with what it holds (mmcore.store.chunks)
    v1/features/<space>/<chunk>.index.npy  that chunk's sample keys, offsets and lengths

A *feature space* is everything that decides an encoder output except the input: the encoder
identity (name, weights, revision, preprocessing), a fingerprint of its actual weights, the
autocast dtype, and what is stored (a vector pooled by a given pooling, or the token sequence
and its stored form); its directory is named by :func:`~mmcore.store.keys.space_key` of that
description. Inside a space, entries are per sample, keyed by the input's content
(:mod:`mmcore.store.keys`).

Fillers of one space serialize on the store's lock (:mod:`mmcore.store.locks`) and re-read the
index once they hold it, so a second run started alongside computes only what the first did
not. The cache verifies what it maps and never lets damage fail a run: each committed chunk is
checked against its index and its seal when first read in a process
(:func:`~mmcore.store.chunks.check_chunk`); a damaged one is dropped with one warning line
naming the file, and its entries are recomputed. ``meta.json`` must describe the space its
folder is named for (the key is the hash of the description): one that describes another
space (swapped, copied) is written again from the run's description, with one warning line.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np

from mmcore.errors import RunError
from mmcore.io import atomic_write
from mmcore.store.chunks import (
    CHUNK_BYTES,
    CHUNK_ROWS,
    UNSEALED,
    check_chunk,
    chunk_files,
    committed_chunks,
    row_dtype,
    write_chunk,
)
from mmcore.store.keys import read_key, space_key
from mmcore.store.leftovers import sweep_leftovers
from mmcore.store.locks import file_lock
from mmcore.store.root import FORMAT, cache_io, drop_damaged, short_error, warn
from mmcore.store.tokens import INT8_EXTRA, dequantize_int8, pool_tokens, quantize_int8

#: the feature spaces' directory under the cache root
FEATURES_DIR = f"{FORMAT}/features"
META_FILE = "meta.json"
#: the largest finite float16: a feature above it would be stored as inf
FLOAT16_MAX = 65504.0


class FeatureStore:
    """One feature space: per-sample vectors ([D]) or token sequences ([T, D]).

    Rows are float16, or int8 with a per-token scale where the description says
    ``token_storage = "int8"``. A space whose description says ``row_dtype = "uint8"`` holds
    flat uint8 rows instead: the decoded-image cache (resized pixels, see
    :func:`mmcore.engine.features.decoded_store`).
    """

    def __init__(self, root, description):
        self.description = dict(description)
        #: what each row is computed as: float16 features, or uint8 pixels (the decoded-image cache)
        self.row_dtype = row_dtype(self.description)
        self.key = space_key(self.description)
        self.root = Path(root)
        self.dir = self.root / FEATURES_DIR / self.key
        self._index = None
        self._checked = {}  # chunk id -> (index records, None): verified once per process
        self._meta_checked = False

    def ensure(self):
        """Create the space's directory and ``meta.json`` (:class:`CacheUnavailable` if it cannot)."""
        self._check_meta()
        with cache_io(self.root):
            self.dir.mkdir(parents=True, exist_ok=True)
            if not (self.dir / META_FILE).exists():
                self._write_meta()

    def _write_meta(self):
        with atomic_write(self.dir / META_FILE, "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"created": time.time(), **self.description}, indent=1, default=str))

    def _check_meta(self):
        """Once per process: a ``meta.json`` that does not describe this space is written again (one warning)."""
        if self._meta_checked:
            return
        self._meta_checked = True
        _, problem = read_meta(self.dir)
        if problem is not None:
            warn(f"warning: feature cache: {self.dir / META_FILE}: {problem}; written again from this run's description")
            with contextlib.suppress(OSError):  # a read-only cache keeps it; the chunks are checked by their seals
                self._write_meta()

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
            self._check_meta()
            index, unsealed = {}, []
            checked = self._checked  # committed chunks never change: each is checked once
            for chunk in committed_chunks(self.dir):
                records, problem = checked.get(chunk) or check_chunk(self.dir, chunk, self.description)
                if records is None:
                    if problem is not None and problem[1] == UNSEALED:
                        unsealed.append(chunk)
                    elif problem is not None:
                        bad, why = problem
                        drop_damaged(
                            chunk_files(self.dir, chunk),
                            f"warning: feature cache: dropped damaged chunk {bad} ({why}); its entries are recomputed",
                        )
                    continue
                checked[chunk] = (records, None)
                for key, offset, length in zip(records["key"].tolist(), records["offset"].tolist(), records["length"].tolist()):
                    index[read_key(key)] = (chunk, offset, length)
            if unsealed:
                drop_damaged(
                    [path for chunk in unsealed for path in chunk_files(self.dir, chunk)],
                    f"warning: feature cache: {self.dir}: dropped {len(unsealed)} chunks written by an older mmcore "
                    "without a seal of what they hold; their entries are recomputed",
                )
            self._checked = checked
            self._index = index
        return self._index

    def missing(self, keys, refresh=False):
        """Positions of ``keys`` that have no entry (None keys count as missing)."""
        index = self.index(refresh)
        return [i for i, key in enumerate(keys) if key is None or key not in index]

    def writer(self, *, chunk_rows=CHUNK_ROWS, chunk_bytes=CHUNK_BYTES):
        """A :class:`ChunkWriter` committing new entries to this space."""
        self.ensure()
        return ChunkWriter(self, chunk_rows=chunk_rows, chunk_bytes=chunk_bytes)

    def view(self, keys):
        """A memory-mapped :class:`FeatureView` of ``keys`` (all must be present)."""
        index = self.index()
        entries = [index[key] for key in keys]
        return FeatureView(self.dir, entries, tokens=self.tokens, storage=self.storage)

    @property
    def tokens(self):
        """Whether this space holds token sequences (else one vector per sample)."""
        return self.description.get("stored") == "tokens"

    @property
    def storage(self):
        """How token sequences are stored: ``fp16`` (as computed), ``int8`` or ``pooled`` (:data:`TOKEN_STORAGES`)."""
        return self.description.get("token_storage", "fp16") if self.tokens else "fp16"

    def encode(self, row):
        """One computed output as it is stored in this space (float16, or the compact token form)."""
        row = np.asarray(row)
        if self.tokens and self.storage == "pooled":
            row = pool_tokens(row, has_cls_token=self.description["has_cls_token"])
        if self.tokens and self.storage == "int8":
            return quantize_int8(row)
        return np.ascontiguousarray(row, dtype=self.row_dtype)


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
        """Buffer one computed output under ``key``; a full buffer is committed as a chunk."""
        row = self.store.encode(row)
        self.keys.append(key)
        self.rows.append(row)
        self.nbytes += row.nbytes
        if len(self.rows) >= self.chunk_rows or self.nbytes >= self.chunk_bytes:
            self.flush()

    def flush(self):
        """Commit what is buffered as one chunk (:class:`CacheUnavailable` when the disk refuses it)."""
        if not self.rows:
            return
        tokens = self.rows[0].ndim == 2
        lengths = np.array([row.shape[0] if tokens else 1 for row in self.rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        data = np.concatenate(self.rows, axis=0) if tokens else np.stack(self.rows)
        with cache_io(self.store.root):
            chunk = write_chunk(self.store.dir, self.keys, data, offsets, lengths)
        index_map = self.store.index()
        for key, offset, length in zip(self.keys, offsets.tolist(), lengths.tolist()):
            index_map[key] = (chunk, offset, length)
        self.written += len(self.rows)
        self.keys, self.rows, self.nbytes = [], [], 0


class FeatureView:
    """Per-sample rows read from memory-mapped chunk files (never loaded whole).

    ``view[i]`` is a float16 array ([D], or [T_i, D] for tokens; float32 for int8-stored tokens,
    dequantized; uint8 for decoded pixels); ``lengths`` is the stored token count per sample
    (None for vectors). Pickles as paths, so loader workers map the files themselves.
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
            array = self._maps[chunk] = np.load(chunk_files(self.dir, chunk)[1], mmap_mode="r")
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


def stored_row_bytes(description, tokens_per_row=None, *, has_cls_token=False):
    """Bytes one entry of a space takes on disk (``tokens_per_row``: the encoder's output length;
    ``has_cls_token``: whether its first token is a CLS token, which pooling keeps)."""
    dim = int(description.get("dim") or 0)
    if description.get("stored") != "tokens":
        return dim * 2
    count = int(tokens_per_row or 1)
    storage = description.get("token_storage", "fp16")
    if storage == "pooled":
        count = len(pool_tokens(np.zeros((count, 1), np.float32), has_cls_token=has_cls_token))
    if storage == "int8":
        return count * (dim + INT8_EXTRA)
    return count * dim * 2


def read_meta(directory):
    """``(description, None)`` from a space's ``meta.json`` when it describes the space its folder
    is named for; ``(None, problem)`` when it is unreadable or describes another; ``(None, None)``
    when there is none."""
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"unreadable ({short_error(exc)})"
    if not isinstance(meta, dict):
        return None, "not a feature space's description"
    description = {key: value for key, value in meta.items() if key != "created"}
    key = space_key(description)
    if key != Path(directory).name:
        return None, f"describes another feature space ({key})"
    return description, None
