"""A forked child that idles: what a DataLoader worker forked while a lock is held looks like."""

import contextlib
import os
import signal
import time


@contextlib.contextmanager
def idle_forked_child(seconds=3):
    """Fork a child that runs its fork hooks, says it is running and idles ``seconds``; yield its pid
    once it runs, kill and reap it on the way out."""
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the forked "worker": running (its fork hooks done), then idle
        os.write(ready_w, b"1")
        time.sleep(seconds)
        os._exit(0)
    os.read(ready_r, 1)
    os.close(ready_r)
    os.close(ready_w)
    try:
        yield child
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
