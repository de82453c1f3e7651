"""What killed writes leave behind: temporary files of :func:`mmcore.io.atomic_write` whose writer is gone.

A temporary file names its writer (``.<name>~<host>~<pid>~<token>.tmp``): on this host it is a
leftover once that process is gone; another host's, or one of an older version that names no
writer, once it has not changed for ``STALE_FILE_S`` (a live writer's is newer).
"""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

from mmcore.io import temp_owner
from mmcore.store.locks import process_alive

#: a temporary or orphaned file that names no live writer is a leftover after this long unchanged
STALE_FILE_S = 600


def old_enough(path, now=None):
    """Whether ``path`` has not changed for ``STALE_FILE_S`` (False when it cannot be looked at)."""
    now = time.time() if now is None else now
    try:
        return now - Path(path).stat().st_mtime > STALE_FILE_S
    except OSError:
        return False


def is_leftover(tmp, now=None):
    """True for a temporary file of a killed write: its writer (this host) is dead, or it is old."""
    owner = temp_owner(Path(tmp).name)
    if owner is not None and owner[0] == socket.gethostname():
        return not process_alive(owner[1])
    return old_enough(tmp, now)


def sweep_leftovers(directory):
    """Remove the temporary files of killed writes in ``directory`` (best effort) -> how many."""
    removed = 0
    for tmp in Path(directory).glob(".*.tmp"):
        if is_leftover(tmp):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed += 1
    return removed
