"""The one file lock of everything on disk that outlives a run, and the one "is this process alive" check.

A :class:`FileLock` is one lock file holding its holder's record (JSON: ``pid``, ``host``,
``started``). The feature cache's fills, a run directory (:class:`mmcore.rundir.RunLock`, which
adds its own policy on top) and a tuning study take it.

- Where the file system has ``flock``, the holder ``flock``\\ s the lock file: the kernel releases
  it when the process dies, so a killed holder's lock is simply taken, and its leftover record
  says whose it was. The holder removes the file while still holding it, so a process that
  opened the old file sees another inode and tries again.
- Where ``flock`` fails with ENOSYS, EOPNOTSUPP, ENOTSUP or ENOLCK (some NFS, FUSE and SMB
  mounts), the lock file itself is created with ``O_CREAT | O_EXCL``. Its holder is judged by
  the record: a dead PID on this host is stale; on another host, whose processes cannot be
  seen, a lock file unchanged for ``foreign_stale_s`` (a day by default; never for a run
  directory, whose run may last longer) is. A stale lock is broken by one process at a time
  (``<lock>.break``, itself made with ``O_EXCL``) and taken over.
- A forked child (a DataLoader worker) closes the ``flock`` descriptors it inherited, so it
  never keeps a killed holder's lock alive.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import socket
import time
from pathlib import Path

from mmcore.errors import RunError

#: errnos of a file system without ``flock``: fall back to ``O_EXCL`` lock files
NO_FLOCK = frozenset(e for e in (errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", None), errno.ENOLCK) if e)
#: an ``O_EXCL`` lock file of another host is taken over after this long without change
FOREIGN_LOCK_STALE_S = 24 * 3600
#: how often a waiter looks at an ``O_EXCL`` lock file again
POLL_S = 0.05
#: a stale lock's breaker that holds ``<lock>.break`` longer than this is taken as dead
BREAKER_STALE_S = 10


def process_alive(pid):
    """Whether process ``pid`` of this host exists (someone else's counts): the one check of the tree."""
    try:
        pid = int(pid)
    except (TypeError, ValueError, OverflowError):
        return False
    if pid <= 0:  # 0 and negative numbers name process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def describe_holder(holder):
    """``pid 123 on host``: a lock holder in words."""
    holder = holder or {}
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


def parse_holder(data):
    """A lock file's bytes -> its holder record (a dict with ``pid`` and ``host``), or None.

    Reads this version's JSON record and the ``PID host`` line older versions wrote.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        pid, _, host = text.strip().partition(" ")
        return {"pid": int(pid), "host": host} if pid.isdigit() and host else None
    return record if isinstance(record, dict) else None


def holder_record():
    """This process's record, as a lock file holds it."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return (json.dumps(record) + "\n").encode()


class LockBusy(RunError):
    """Another live process holds the lock; ``holder`` is its record."""

    def __init__(self, path, holder):
        self.path, self.holder = Path(path), holder or {}
        super().__init__(f"{path}: locked by {describe_holder(self.holder)}; wait for it to end or stop it first")


#: id(lock) -> (lock, device, inode) of every ``flock`` this process holds (closed in forked children)
_FLOCKS = {}


class FileLock:
    """An exclusive lock on ``path`` (see the module docstring); ``mode`` is ``"flock"`` or ``"excl"`` while held."""

    def __init__(self, path, *, foreign_stale_s=FOREIGN_LOCK_STALE_S):
        self.path = Path(path)
        #: how long another host's ``O_EXCL`` lock file may stay unchanged before it is stale (None: forever)
        self.foreign_stale_s = foreign_stale_s
        self.fd = None
        self.mode = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    # -- taking and giving back ---------------------------------------------------------------

    def acquire(self, *, wait=True, on_wait=None):
        """Take the lock -> the record a dead holder left (None when there was none).

        ``wait``: block until it is free (``on_wait()`` is called once first); otherwise raise
        :class:`LockBusy` naming the live holder. ``OSError`` (the folder cannot be written)
        reaches the caller.
        """
        previous = self._acquire_flock(wait, on_wait)
        if previous is _NO_FLOCK:
            previous = self._acquire_excl(wait, on_wait)
        return previous

    def release(self):
        """Give the lock back and remove the lock file."""
        _FLOCKS.pop(id(self), None)
        if self.mode == "flock":
            with contextlib.suppress(OSError):  # unlinked while still held: see the module docstring
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None
        elif self.mode == "excl":
            holder = self._read_holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        self.mode = None

    def _acquire_flock(self, wait, on_wait):
        waited = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not wait:
                        raise LockBusy(self.path, self._read_holder(wait=True)) from None
                    if not waited and on_wait is not None:
                        on_wait()
                    waited = True
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                os.close(fd)
                if exc.errno in NO_FLOCK:
                    return _NO_FLOCK
                raise
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed that file while we opened it: take the new one
        previous = parse_holder(os.pread(fd, 4096, 0))
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder_record(), 0)
        st = os.fstat(fd)
        self.fd, self.mode = fd, "flock"
        _FLOCKS[id(self)] = (self, st.st_dev, st.st_ino)
        return previous

    def _acquire_excl(self, wait, on_wait):
        previous, waited = None, False
        for attempt in itertools.count():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read_holder(wait=True)
                if self.is_live(holder):
                    if not wait:
                        raise LockBusy(self.path, holder) from None
                    if not waited and on_wait is not None:
                        on_wait()
                    waited = True
                    time.sleep(POLL_S)
                    continue
                previous = holder or previous
                self._break_stale(holder)
                if not wait and attempt >= 50:
                    raise RunError(f"{self.path}: could not take the lock (it keeps changing); try again") from None
                continue
            try:
                os.write(fd, holder_record())
                os.fsync(fd)
            finally:
                os.close(fd)
            self.mode = "excl"
            return previous

    def _break_stale(self, holder):
        """Remove a dead holder's lock file, one breaker at a time (``<lock>.break``, made with ``O_EXCL``)."""
        guard = self.path.with_name(self.path.name + ".break")
        try:
            os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > BREAKER_STALE_S:  # its breaker died
                    guard.unlink()
            time.sleep(POLL_S)
            return
        try:
            if self._read_holder() == holder:  # still the stale one, not a lock taken meanwhile
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            with contextlib.suppress(OSError):
                guard.unlink()

    # -- asking -------------------------------------------------------------------------------

    def _read_holder(self, wait=False):
        """The lock file's record; ``wait``: give a holder that just created it a moment to write it."""
        for _ in range(20 if wait else 1):
            try:
                holder = parse_holder(self.path.read_bytes())
            except OSError:
                return None
            if holder or not wait:
                return holder
            time.sleep(POLL_S)
        return None

    def is_live(self, holder):
        """Whether the holder an ``O_EXCL`` lock file names still runs (see the module docstring)."""
        if not holder or "pid" not in holder:
            return False
        if holder.get("host") != socket.gethostname():
            if self.foreign_stale_s is None:
                return True
            try:
                return time.time() - self.path.stat().st_mtime <= self.foreign_stale_s
            except OSError:
                return False
        return process_alive(holder["pid"])

    def live_holder(self):
        """The record of the live process holding this lock (``{}`` when it wrote none yet), or None."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError:
            fd = None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._read_holder(wait=True) or {}
            except OSError as exc:
                if exc.errno not in NO_FLOCK:
                    raise
            else:
                return None  # nobody holds it: a killed holder's leftover file
            finally:
                os.close(fd)
        holder = self._read_holder()
        return holder if self.is_live(holder) else None


_NO_FLOCK = object()


@contextlib.contextmanager
def file_lock(path, on_wait=None):
    """Hold the :class:`FileLock` of ``path`` for the block, waiting for it (``on_wait()`` once first)."""
    lock = FileLock(path)
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    lock.acquire(on_wait=on_wait)
    try:
        yield lock
    finally:
        lock.release()


def _close_in_child():
    """A forked child shares the parent's flocked files: it must not keep a killed parent's lock alive."""
    for lock, device, inode in list(_FLOCKS.values()):
        if lock.fd is None:
            continue
        with contextlib.suppress(OSError):
            st = os.fstat(lock.fd)
            if (st.st_dev, st.st_ino) == (device, inode):  # still the lock file, not a number reused
                os.close(lock.fd)
        lock.fd, lock.mode = None, None
    _FLOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)
