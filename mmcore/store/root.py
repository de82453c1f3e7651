"""Where the cache directory is, whether it can be used, and how its failures are said.

The directory is ``cache.dir``, else ``$MMCORE_CACHE_DIR``, else ``~/.cache/mmcore``. One that
cannot be written (full, read-only, a missing disk) raises :class:`CacheUnavailable`, one line
naming it; the pipeline then continues without the cache, or stops with that line when
``cache.required = true``. Damage is never fatal: a damaged file is dropped with one warning
line naming it (:func:`drop_damaged`) and its entries are computed again.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from mmcore.errors import RunError, os_error_line, os_error_reason
from mmcore.io import temp_name

#: the directory of the tenants that share one layout version (``<cache>/v1/...``)
FORMAT = "v1"


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


def short_error(exc):
    """An exception's message on one line of at most 120 characters (for a problem line)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:120]


def drop_damaged(paths, line):
    """Remove damaged cache files (best effort: a read-only cache keeps them) and say so once."""
    for path in paths:
        with contextlib.suppress(OSError):
            Path(path).unlink()
    warn(line)


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
