"""Building per-row structures for many rows at once."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def paused_gc():
    """The cyclic garbage collector paused while a block allocates per-row objects (paths, stats,
    facts) that hold no reference cycles: at 100k rows its full passes over the growing heap
    cost about as much as the work itself (``python bench/scale.py --large``). Reference
    counting still frees everything; the collector runs again on leaving (if it ran before).
    Also a decorator: ``@paused_gc()``."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
