"""Memory of the server: a budget on the images decoding at once, and giving freed memory back.

PNG cannot be decoded at a reduced scale (JPEG can, with ``draft``), so a request whose few
hundred KB decode to 90 megapixels really holds a gigabyte while it is decoded, converted and
resized. :class:`DecodeBudget` admits decodes while their estimated bytes fit the budget
(an image larger than the whole budget decodes alone). Once the decodes are done,
:func:`release_memory` collects garbage and asks glibc to return its free pages to the system
(``malloc_trim(0)``): glibc raises its mmap threshold after freeing a large block, so later large
blocks come from the heap and stay with the process after they are freed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import threading

#: peak bytes one decoded pixel costs: the decoded RGBA frame, its RGB copy and the
#: composite of a transparent image on white, before resizing (4 + 4 + 4)
DECODED_BYTES_PER_PIXEL = 12
#: once this many decoded bytes have been freed, memory is given back when no decode runs
TRIM_AFTER_BYTES = 64 * 1024 * 1024


class DecodeBudget:
    """At most ``limit_bytes`` of images decoding at once; ``with budget.reserve(pixels):``."""

    def __init__(self, limit_bytes, *, on_idle=None):
        self.limit = max(1, int(limit_bytes))
        self.in_flight = 0
        self.freed = 0
        self.on_idle = on_idle or release_memory
        self._lock = threading.Condition()

    def cost(self, pixels):
        """The bytes reserved for an image of ``pixels`` (never more than the whole budget)."""
        return min(self.limit, int(pixels) * DECODED_BYTES_PER_PIXEL)

    @contextlib.contextmanager
    def reserve(self, pixels):
        """Wait until the image fits, hold its bytes while the block runs, then give them back."""
        cost = self.cost(pixels)
        with self._lock:
            self._lock.wait_for(lambda: self.in_flight + cost <= self.limit)
            self.in_flight += cost
        try:
            yield cost
        finally:
            with self._lock:
                self.in_flight -= cost
                self.freed += cost
                trim = self.in_flight == 0 and self.freed >= TRIM_AFTER_BYTES
                if trim:
                    self.freed = 0
                self._lock.notify_all()
            if trim:  # outside the lock: decodes may start meanwhile
                self.on_idle()


_libc = None


def _malloc_trim():
    """glibc's ``malloc_trim`` or None (musl, macOS, Windows have none)."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    return getattr(_libc, "malloc_trim", None) if _libc else None


def release_memory():
    """Collect garbage, then return the allocator's free pages to the system (glibc only).

    Returns whether ``malloc_trim`` ran.
    """
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
