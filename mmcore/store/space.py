"""Disk space: a feature pass that would not fit the cache's disk stops before it writes anything."""

from __future__ import annotations

import shutil
from pathlib import Path

from mmcore.errors import RunError
from mmcore.store.chunks import INDEX_DTYPE


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
