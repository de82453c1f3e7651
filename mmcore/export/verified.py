"""Bundles this machine has verified: digests once per bundle and machine, sizes every time.

Hashing a full-size bundle (several GB) at every start of every serve worker costs more than
loading it. A bundle whose every file's sha256 matched its manifest is remembered in a small
record under the user's cache directory (``$MMCORE_CACHE_DIR`` or ``~/.cache/mmcore``, in
``verified-bundles/``): the bundle's resolved path, the sha256 of its manifest, and the size
and modification time (ns) of every file it lists. While all of these stay the same, opening
the bundle checks sizes only; ``--verify`` hashes again whatever the record says. A record that
cannot be written (a read-only cache) only means the next start hashes again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mmcore.errors import RunError

RECORD_DIR = "verified-bundles"
#: a record lists a bundle's files: small, but bounded when read back like any file
MAX_RECORD_BYTES = 4 << 20


def records_dir():
    """``verified-bundles/`` under the user's cache directory (created when a record is written)."""
    configured = os.environ.get("MMCORE_CACHE_DIR")
    if configured:
        return Path(os.path.expanduser(configured)) / RECORD_DIR
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmcore" / RECORD_DIR


def fingerprint(folder, manifest_bytes, files):
    """What a record remembers of the bundle in ``folder``: path, manifest digest, each file's size and mtime."""
    folder = Path(folder).resolve()
    stats = {}
    for rel in sorted(files):
        info = os.stat(folder / rel)
        stats[rel] = [info.st_size, info.st_mtime_ns]
    return {"path": str(folder), "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(), "files": stats}


def _record_path(fingerprint_):
    return records_dir() / f"{hashlib.sha256(fingerprint_['path'].encode()).hexdigest()[:32]}.json"


def is_verified(fingerprint_):
    """True when this machine verified the bundle's digests and nothing listed changed since."""
    path = _record_path(fingerprint_)
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            return False
        return json.loads(path.read_text(encoding="utf-8")) == fingerprint_
    except (OSError, ValueError):
        return False


def remember(fingerprint_):
    """Record the bundle as verified (atomically); a cache that cannot be written is left alone."""
    from mmcore.io import write_json

    try:
        write_json(_record_path(fingerprint_), fingerprint_)
    except (RunError, OSError):
        pass  # the next start hashes again: slower, never wrong
