"""The server's processes: the listening socket, workers that die with their supervisor, worker numbers.

- :func:`bind_listener` binds the port in the ``mmcore serve`` process before any worker starts:
  a busy port is one line (exit 1), not uvicorn's ``[Errno 98]`` and its startup-failure exit 3.
- :func:`die_with_supervisor` makes a worker of ``--workers N`` end when its supervisor does,
  even by SIGKILL: Linux delivers SIGTERM on the parent's death (``PR_SET_PDEATHSIG``), and a
  thread polling the parent pid does the same elsewhere. Orphaned workers would otherwise keep
  the port and serve on.
- :func:`claim_worker_number` gives each worker a small number (the first free lock file), which
  spreads workers over GPUs; a restarted worker takes the number its predecessor left.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from mmcore.errors import MmcoreError, os_error_reason

log = logging.getLogger("mmcore.serve")

_PR_SET_PDEATHSIG = 1
#: seconds between two looks at the parent pid
WATCHDOG_INTERVAL = 0.5


class PortError(MmcoreError):
    """The address cannot be listened on (busy, not local, not permitted): exit 1."""


def address(host, port):
    """``host:port`` as a URL writes it (``[::1]:8000`` for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_listener(host, port):
    """A TCP socket bound to ``host:port`` (IPv6 when ``host`` has a colon), inheritable by workers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family=family, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = address(host, port)
        if exc.errno == errno.EADDRINUSE:
            raise PortError(f"mmcore serve: {where}: address already in use; stop what listens there "
                            f"or choose another --port") from None
        reason, _ = os_error_reason(exc)
        raise PortError(f"mmcore serve: {where}: cannot listen ({reason}); check --host and --port") from None
    sock.set_inheritable(True)
    return sock


def die_with_supervisor(supervisor_pid):
    """End this worker (SIGTERM: requests in flight finish) when ``supervisor_pid`` is gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    # the parent may have died before prctl: the watchdog sees it at its first look
    threading.Thread(target=_watch_parent, args=(int(supervisor_pid),), name="mmcore-parent-watchdog",
                     daemon=True).start()


def _watch_parent(supervisor_pid):
    stopped = threading.Event()
    while not stopped.wait(WATCHDOG_INTERVAL):
        if os.getppid() != supervisor_pid:
            log.warning("mmcore serve: the supervisor (pid %d) is gone; worker %d stops", supervisor_pid, os.getpid())
            os.kill(os.getpid(), signal.SIGTERM)
            return


_held_slot = None


def claim_worker_number(slots_dir):
    """The lowest worker number whose lock file in ``slots_dir`` is free, held until this process ends."""
    import fcntl

    global _held_slot
    number = 0
    while True:
        handle = open(Path(slots_dir) / f"worker-{number}.lock", "a+b")  # noqa: SIM115 - held for life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            number += 1
            continue
        _held_slot = handle  # the lock lives as long as the file stays open
        return number
