"""The run directory: its layout and its rules, in one place.

A run directory is the unit of everything (``run``, ``eval``, ``predict``, ``compare``, sweeps
and ``--resume`` take one and need nothing else)::

    recipe.toml              the resolved recipe, written once when the run starts
    status.json              running | completed | failed | interrupted
    last.ckpt                the full training state (resume)
    checkpoint_best.ckpt     the selected epoch's weights (and, once finished, the decision)
    results.json             metrics, decision, history
    test_predictions.json    one record per test row
    test_report.md, report.html, plots, TensorBoard logs
    .lock                    pid and host of the live process writing here (absent otherwise)

:class:`RunDir` knows these names and rules; :class:`RunLock` is the advisory lock that keeps
two processes from writing one run directory at once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import time
from pathlib import Path

from mmcore.errors import RunError
from mmcore.io import write_json, write_text

STATUS_FILE = "status.json"
RECIPE_FILE = "recipe.toml"
BEST = "checkpoint_best.ckpt"
LAST = "last.ckpt"
RESULTS_FILE = "results.json"
PREDICTIONS_FILE = "test_predictions.json"
REPORT_MD = "test_report.md"
REPORT_HTML = "report.html"
SWEEP_FILE = "sweep.json"
LOCK_FILE = ".lock"
#: sub-folder of a run directory where ``mmcore eval`` writes by default
EVAL_DIR = "eval"

#: what mmcore.io.atomic_open leaves behind when killed mid-write: ``.<name>.<random>.tmp``
TEMP_FILE_RE = re.compile(r"^\..+\..+\.tmp\Z")


def require_same_recipe(saved, current, *, where, said, then="", added_ok=False):
    """The drift check: raise ``<where>: <said> (differs at a.b, c.d)<then>`` when the recipes differ.

    ``added_ok``: for two records of the same run (its checkpoint and its ``recipe.toml``),
    keys the saved one lacks are not drift: an older mmcore wrote it, and the current one
    reads the run's recipe with those keys at their defaults. A run trained before a key
    existed stays usable by eval, predict, export, serve and resume.
    """
    from mmcore.recipe import recipe_diff

    if saved == current:
        return
    differing = recipe_diff(saved or {}, current, added_ok=added_ok and bool(saved))
    if differing:
        raise RunError(f"{where}: {said} (differs at {', '.join(differing[:5])}){then}")


TRACEBACK_FILE = "traceback.txt"


def first_line(exc):
    """An error in one line: its first, and how many more there were."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return lines[0] + (f" (and {len(lines) - 1} more lines)" if len(lines) > 1 else "")


def failure_message(exc, directory):
    """One line for a sweep point or trial that failed with ``exc`` (call it in the ``except``).

    A user's mistake (an :class:`~mmcore.errors.MmcoreError`) is its own message; a crash (out of
    memory, a bug) is prefixed with its type and its traceback is kept in
    ``directory/traceback.txt``, beside the run's status."""
    import traceback

    from mmcore.errors import MmcoreError

    message = first_line(exc)
    if isinstance(exc, MmcoreError):
        return message
    make_directory(directory)
    write_text(Path(directory) / TRACEBACK_FILE, traceback.format_exc())
    return f"{type(exc).__name__}: {message}"


def _read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


#: why an OSError stopped a directory from being made, and what to do about it
_OS_REASONS = {
    errno.EROFS: ("the file system is read-only", "give --out a folder on a writable disk"),
    errno.EACCES: ("permission denied", "give --out a folder you can write to"),
    errno.EPERM: ("permission denied", "give --out a folder you can write to"),
    errno.ENOSPC: ("no space left on the device", "free some space or give --out a folder on another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or give --out a folder on another disk"),
    errno.ENAMETOOLONG: ("the name is too long", "give --out a shorter path"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "give --out a path whose parents are folders"),
    errno.EEXIST: ("a file of that name exists", "give --out a folder, not a file"),
}


def _cannot_create(path, exc, what):
    reason, todo = _OS_REASONS.get(exc.errno, (exc.strerror or str(exc), "give --out another folder"))
    return RunError(f"{path}: cannot create the {what}: {reason}; {todo}")


def make_directory(path, what="run directory"):
    """``mkdir -p`` that turns an OSError into one line naming the path and what to do (exit 4)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_create(path, exc, what) from None
    return path


class RunDir:
    """One run directory: where its files are, its status, its recipe, and the rules about them."""

    def __init__(self, path):
        self.path = Path(path)
        self._recipe_data = None

    def __repr__(self):
        return f"RunDir({str(self.path)!r})"

    def __str__(self):
        return str(self.path)

    def __fspath__(self):
        return str(self.path)

    def __reduce__(self):  # broadcast to other ranks as its path only
        return (RunDir, (self.path,))

    # -- layout -----------------------------------------------------------------------------

    @property
    def status_file(self):
        return self.path / STATUS_FILE

    @property
    def recipe_file(self):
        return self.path / RECIPE_FILE

    @property
    def best(self):
        """``checkpoint_best.ckpt``: the selected epoch (what eval and predict load)."""
        return self.path / BEST

    @property
    def last(self):
        """``last.ckpt``: the full training state (what --resume loads)."""
        return self.path / LAST

    @property
    def results_file(self):
        return self.path / RESULTS_FILE

    @property
    def predictions_file(self):
        return self.path / PREDICTIONS_FILE

    @property
    def lock_file(self):
        return self.path / LOCK_FILE

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def create(cls, recipe, out=None):
        """A new, empty run directory: ``out``, or ``<output_dir>/<experiment>/<timestamp>``."""
        if out is not None:
            path = Path(out)
            try:
                exists, is_dir = path.exists(), path.is_dir()
                empty = not (is_dir and any(path.iterdir()))
            except OSError as exc:  # a name too long, a directory we may not list
                raise _cannot_create(path, exc, "run directory") from None
            if exists and not is_dir:
                raise RunError(f"{path}: is a file; give --out a folder")
            if not empty:
                RunLock(path).refuse_if_live()
                raise RunError(f"{path}: output directory exists and is not empty")
        else:
            base = Path(recipe.output_dir) / recipe.experiment
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path, n = base / stamp, 1
            while path.exists():
                n += 1
                path = base / f"{stamp}-{n}"
        make_directory(path)
        return cls(path)

    # -- status -----------------------------------------------------------------------------

    def status(self):
        """``status.json`` as a dict, or None when it is missing or unreadable."""
        if not self.status_file.is_file():
            return None
        return _read_json(self.status_file)

    def write_status(self, state, **extra):
        """``status.json``: running | completed | failed | interrupted (eval/compare trust only completed)."""
        data = {"state": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
        write_json(self.status_file, data)

    def is_run(self):
        """Whether this looks like a run directory (it has a status file)."""
        return self.status_file.is_file()

    def require_exists(self):
        if not self.path.is_dir():
            raise RunError(f"{self.path}: run directory not found")

    def require_completed(self):
        """The status of a finished run; refuses anything else."""
        self.require_exists()
        status = self.status()
        if status is None:
            raise RunError(f"{self.path}: not an mmcore run directory (no {STATUS_FILE})")
        if status.get("state") != "completed":
            raise RunError(
                f"{self.path}: run is not complete (status: {status.get('state')}); "
                f"resume it with: mmcore run --resume {self.path}"
            )
        return status

    def require_scorable(self):
        """For eval and predict: None for a finished run, or the one line to say about a live one.

        A live run (another process holds its lock) is scored from its last completed
        checkpoint, ``checkpoint_best.ckpt`` as it is now; anything else must be completed.
        """
        self.require_exists()
        status = self.status()
        if status is not None and status.get("state") != "completed":
            holder = RunLock(self.path).live_holder()
            if holder is not None:
                who = _describe(holder)
                if not self.best.is_file():
                    raise RunError(
                        f"{self.path}: run in progress ({who}) and no checkpoint completed yet; "
                        f"wait for its first epoch to end"
                    )
                return f"{self.path}: run in progress ({who}); using its last completed checkpoint, {self.best}"
        self.require_completed()
        return None

    def check_resumable(self, recipe=None):
        """The saved recipe (a dict) of a run that can be resumed; refuses missing, finished or foreign runs."""
        self.require_exists()
        status = self.status()
        if status is None or not self.recipe_file.is_file():
            raise RunError(f"{self.path}: not an mmcore run directory (no {STATUS_FILE} / {RECIPE_FILE})")
        if status.get("state") == "completed":
            raise RunError(f"{self.path}: run already completed; nothing to resume (start a new run instead)")
        if not self.last.is_file():
            raise RunError(
                f"{self.path}: no {LAST} to resume from (the run stopped before its first checkpoint); start it again"
            )
        saved = self.recipe_data()
        if recipe is not None:
            from mmcore.recipe import recipe_to_dict

            require_same_recipe(
                saved, recipe_to_dict(recipe), where=self.path, said="this run was started with another recipe",
                then=f"; resume it without a recipe: mmcore run --resume {self.path}",
            )
        return saved

    # -- recipe -----------------------------------------------------------------------------

    def write_recipe(self, recipe):
        """The resolved recipe as ``recipe.toml`` (written once, when the run starts)."""
        from mmcore.recipe import recipe_to_toml

        write_text(self.recipe_file, recipe_to_toml(recipe))
        self._recipe_data = None

    def recipe_data(self):
        """The saved recipe as plain data (read once); a missing or broken file is one line."""
        if self._recipe_data is None:
            import tomllib

            try:
                self._recipe_data = tomllib.loads(self.recipe_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise RunError(f"{self.recipe_file}: cannot read the run's recipe ({exc})") from None
        return self._recipe_data

    def load_recipe(self, registry=None):
        """The saved recipe as a :class:`mmcore.recipe.Recipe` (components resolved)."""
        from mmcore.recipe import recipe_from_dict

        return recipe_from_dict(self.recipe_data(), source=str(self.recipe_file), registry=registry)

    # -- results ----------------------------------------------------------------------------

    def results(self):
        """``results.json`` as a dict, or None when it is missing or unreadable."""
        return _read_json(self.results_file)

    # -- writing ----------------------------------------------------------------------------

    def lock(self, echo=None):
        """The run-directory lock, as a context manager (a no-op where this process holds it already)."""
        return RunLock(self.path, echo=echo)

    def sweep_temp_files(self):
        """Remove what killed atomic writes left (``.last.ckpt.*.tmp``); call only while holding the lock.

        ``eval/`` is left alone: evaluations do not take the lock and may be writing there now.
        """
        removed = []
        for root, dirs, files in os.walk(self.path):
            if Path(root) == self.path:
                dirs[:] = [d for d in dirs if d != EVAL_DIR]
            for name in files:
                if TEMP_FILE_RE.match(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(root, name))
                        removed.append(Path(root) / name)
        return removed


def read_sweep(path):
    """A sweep folder's ``sweep.json`` as a dict, or None."""
    record = _read_json(Path(path) / SWEEP_FILE) if Path(path).is_dir() else None
    return record if isinstance(record, dict) else None


# ---------------------------------------------------------------- the lock


def _describe(holder):
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"


def _pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError, TypeError):
        return False
    return True


def _is_live(holder):
    """Whether a lock file's holder still runs: on this host, by its pid; on another, assume so."""
    if not holder or "pid" not in holder:
        return False
    if holder.get("host") != socket.gethostname():
        return True  # cannot check another machine's processes; its owner must remove the lock
    return _pid_alive(holder["pid"])


def _is_rank0():
    """Under torchrun only rank 0 writes the run directory (RANK is set before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


class RunLocked(RunError):
    """Another live process holds the run directory's lock."""


#: locks this process holds, by run directory: taking one again is a no-op
_HELD = {}
#: flock errors that mean "this file system has no flock": fall back to O_EXCL lock files
_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


class RunLock:
    """An advisory lock file (``.lock``, holding pid and host) in a run directory.

    ``fcntl.flock`` where the file system has it: the kernel releases it when the process dies,
    so a killed run's lock is simply taken over. Elsewhere an ``O_EXCL`` lock file whose holder
    is checked by pid: one whose process is gone on this host is broken and taken over.
    """

    def __init__(self, run_dir, echo=None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.echo = echo
        self.fd = None
        self.mode = None
        self.nested = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    # -- taking and giving back --------------------------------------------------------------

    def acquire(self):
        """Take the lock or raise :class:`RunLocked` naming the holder (ranks > 0 take nothing)."""
        key = str(self.run_dir.resolve())
        if not _is_rank0() or key in _HELD:
            self.nested = True
            return self
        previous = self._acquire_flock()
        if previous is False:
            previous = self._acquire_excl()
        if previous and previous.get("pid") != os.getpid() and self.echo is not None:
            self.echo(f"{self.run_dir}: taking over the lock of {_describe(previous)}, which is no longer running")
        _HELD[key] = self
        return self

    def release(self):
        """Give the lock back and remove the lock file."""
        if self.nested:
            return
        _HELD.pop(str(self.run_dir.resolve()), None)
        if self.mode == "flock":
            # unlink while still holding it: a process that opened the old file sees another inode and retries
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None
        elif self.mode == "excl":
            holder = self._read_holder()
            if holder and holder.get("pid") == os.getpid():
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        self.mode = None

    def _record(self):
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        return (json.dumps(record) + "\n").encode()

    def _acquire_flock(self):
        """flock the lock file; the stale record found in it (or None), or False without flock."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return False
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise RunError(f"{self.path}: cannot take the run directory's lock ({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._locked(self._read_holder(wait=True)) from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in _NO_FLOCK:
                    return False
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed that file while we opened it: take the new one
        previous = _parse(os.pread(fd, 4096, 0))
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._record(), 0)
        self.fd, self.mode = fd, "flock"
        return previous

    def _acquire_excl(self):
        """Create the lock file with O_EXCL; break it first when its holder is gone."""
        previous = None
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read_holder(wait=True)
                if _is_live(holder):
                    raise self._locked(holder) from None
                previous = holder or previous
                self._break_stale(holder)
                continue
            except OSError as exc:
                raise RunError(f"{self.path}: cannot take the run directory's lock ({exc.strerror or exc})") from None
            try:
                os.write(fd, self._record())
                os.fsync(fd)
            finally:
                os.close(fd)
            self.mode = "excl"
            return previous
        raise RunError(f"{self.path}: could not take the run directory's lock (it keeps changing); try again")

    def _break_stale(self, holder):
        """Remove a dead holder's lock file, one breaker at a time (``.lock.break``, made with O_EXCL)."""
        guard = self.path.with_name(LOCK_FILE + ".break")
        try:
            os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > 10:  # a breaker that died: its guard is abandoned
                    guard.unlink()
            time.sleep(0.05)
            return
        try:
            if self._read_holder() == holder:  # still the stale one, not a lock taken meanwhile
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            with contextlib.suppress(OSError):
                guard.unlink()

    # -- asking -----------------------------------------------------------------------------

    def _read_holder(self, wait=False):
        """The lock file's record; ``wait``: give a holder that just created it a moment to write it."""
        for _ in range(20 if wait else 1):
            try:
                holder = _parse(self.path.read_bytes())
            except OSError:
                return None
            if holder or not wait:
                return holder
            time.sleep(0.05)
        return None

    def _locked(self, holder):
        return RunLocked(
            f"{self.run_dir}: in use by a live mmcore run ({_describe(holder or {})}); "
            f"wait for it to end or stop it first"
        )

    def live_holder(self):
        """The record of the live process holding this lock, or None (this process counts as live)."""
        if str(self.run_dir.resolve()) in _HELD:
            return {"pid": os.getpid(), "host": socket.gethostname()}
        if not self.path.exists():
            return None
        try:
            import fcntl

            fd = os.open(self.path, os.O_RDONLY)
        except (ImportError, OSError):
            fcntl = fd = None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._read_holder(wait=True) or {}
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    raise
            else:
                return None  # nobody holds it: a killed run's leftover file
            finally:
                os.close(fd)
        holder = self._read_holder()
        return holder if _is_live(holder) else None

    def refuse_if_live(self):
        """Raise :class:`RunLocked` when a live process holds this run directory."""
        holder = self.live_holder()
        if holder is not None:
            raise self._locked(holder)


def _close_in_child():
    """Forked children (DataLoader workers) share a flocked file; they must not keep the lock alive."""
    for lock in _HELD.values():
        if lock.fd is not None:
            with contextlib.suppress(OSError):
                os.close(lock.fd)
            lock.fd = None
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def _parse(data):
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read_status(path):
    """``status.json`` of the run directory at ``path`` (None when missing or unreadable)."""
    return RunDir(path).status()


def write_status(path, state, **extra):
    """Write ``status.json`` of the run directory at ``path`` (see :meth:`RunDir.write_status`)."""
    RunDir(path).write_status(state, **extra)
