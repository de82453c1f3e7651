"""The features tenant seen whole: its spaces listed (``mmcore cache info``), removed (``clear``) and checked (``verify``)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np

from mmcore.store.chunks import INDEX_SUFFIX, UNSEALED, check_chunk, chunk_files, committed_chunks
from mmcore.store.features import FEATURES_DIR, META_FILE, read_meta
from mmcore.store.leftovers import old_enough


def _spaces(root):
    features = Path(root) / FEATURES_DIR
    return sorted(p for p in features.iterdir() if p.is_dir()) if features.is_dir() else []


def count_spaces(root, paths=None):
    """How many feature spaces the cache under ``root`` holds (the tenant's count)."""
    return len(_spaces(root))


def feature_spaces(root):
    """One dict per feature space: key, encoder, identity, stored form, entries, bytes."""
    spaces = []
    for directory in _spaces(root):
        meta, problem = read_meta(directory)
        if meta is None:  # unknown, or not to be trusted: shown as such, never cleared as another encoder's
            meta = {"identity": f"? (meta.json: {problem}; see mmcore cache verify)" if problem else "?"}
        entries = 0
        for chunk in committed_chunks(directory):
            with contextlib.suppress(OSError, ValueError):
                entries += len(np.load(chunk_files(directory, chunk)[0], mmap_mode="r"))
        size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
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


def remove_spaces(root, encoder=None):
    """Remove every feature space (of ``encoder`` only, when given) -> how many were removed."""
    removed = 0
    for space in feature_spaces(root):
        if encoder is None or space["encoder"] == encoder:
            shutil.rmtree(space["path"], ignore_errors=True)
            removed += 1
    return removed


def verify_features(root, checkup):
    """The tenant's check: ``meta.json`` describes the space its folder is named for; every committed
    chunk matches its index, the space's description and its seal, its rows hashed in full; no
    data file without an index (a fill killed before its commit)."""
    for directory in _spaces(root):
        checkup.count("spaces")
        description, problem = read_meta(directory)
        if problem is not None:  # the next run writes it again from its own description
            checkup.problem(f"{directory / META_FILE}: {problem}", directory / META_FILE)
        committed = set(committed_chunks(directory))
        for chunk in sorted(committed):
            records, bad = check_chunk(directory, chunk, description, full=True)
            if bad is not None:
                what = "chunk" if bad[1] == UNSEALED else "damaged chunk"
                checkup.problem(f"{bad[0]}: {what} ({bad[1]})", *chunk_files(directory, chunk))
            elif records is not None:
                checkup.count("chunks")
                checkup.count("entries", len(records))
        for data in sorted(directory.glob("*.npy")):
            if data.name.endswith(INDEX_SUFFIX) or data.name[: -len(".npy")] in committed:
                continue
            if old_enough(data, checkup.now):
                checkup.problem(f"{data}: data file without an index (a fill killed before its commit)", data)
