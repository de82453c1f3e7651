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
    mlflow.json              the MLflow run it logs to (``logging.mlflow``): resume continues it, export adds to it
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

from mmcore.bounded import FileRules, NestingError, loads_toml, read_regular_file
from mmcore.errors import MmcoreError, RunError
from mmcore.io import is_temp_name, write_json, write_text
from mmcore.store.locks import FileLock, LockBusy, describe_holder

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
MLFLOW_FILE = "mlflow.json"
#: a run directory is read as data, bounded like every input (see docs/reliability.md, "Threat model")
RUN_RECIPE_RULES = FileRules("run recipe", "the run's recipe.toml", 1 << 20, "a recipe is a small TOML file")
RUN_JSON_RULES = FileRules("run file", "a JSON file of the run", 64 << 20, "mmcore writes it far smaller")
MLFLOW_FILE_RULES = FileRules("MLflow run record", "the run's mlflow.json", 64 << 10, "it holds a tracking URI and a run id")
#: an MLflow run id, as MLflow validates it; a tracking URI is at most this long
_MLFLOW_RUN_ID = re.compile(r"[a-zA-Z0-9][\w\-]{0,255}")
MAX_TRACKING_URI = 4096
#: sub-folder of a run directory where ``mmcore eval`` writes by default
EVAL_DIR = "eval"



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
    """A run's JSON file (status, results, sweep) as data, or None when it is missing or not what
    mmcore writes: a regular file of at most :data:`RUN_JSON_RULES` bytes."""
    try:
        return json.loads(read_regular_file(path, RUN_JSON_RULES))
    except (MmcoreError, ValueError):
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

    @property
    def mlflow_file(self):
        return self.path / MLFLOW_FILE

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
                who = describe_holder(holder)
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

            data = read_regular_file(self.recipe_file, RUN_RECIPE_RULES, error=RunError)  # bounded, regular
            try:
                self._recipe_data = loads_toml(data.decode("utf-8"))
            except (UnicodeDecodeError, tomllib.TOMLDecodeError, NestingError) as exc:
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

    # -- the MLflow run ---------------------------------------------------------------------

    def mlflow_run(self):
        """The MLflow run this run logs to, ``{"tracking_uri": str, "run_id": str}`` from ``mlflow.json``, or
        None when it has none; a record that is not one is one line (:class:`RunError`)."""
        if not self.mlflow_file.exists():
            return None
        data = read_regular_file(self.mlflow_file, MLFLOW_FILE_RULES, error=RunError)
        try:
            record = json.loads(data)
        except ValueError:
            record = None
        if not (
            isinstance(record, dict)
            and isinstance(record.get("tracking_uri"), str) and 0 < len(record["tracking_uri"]) <= MAX_TRACKING_URI
            and isinstance(record.get("run_id"), str) and _MLFLOW_RUN_ID.fullmatch(record["run_id"])
        ):
            raise RunError(f"{self.mlflow_file}: not a record of an MLflow run (a tracking_uri and a run_id)")
        return {"tracking_uri": record["tracking_uri"], "run_id": record["run_id"]}

    def write_mlflow_run(self, tracking_uri, run_id):
        """Record the MLflow run this run logs to (``--resume`` continues it, ``mmcore export`` adds the bundle to it)."""
        write_json(self.mlflow_file, {"tracking_uri": tracking_uri, "run_id": run_id})

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
                if is_temp_name(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(root, name))
                        removed.append(Path(root) / name)
        return removed


def read_sweep(path):
    """A sweep folder's ``sweep.json`` as a dict, or None."""
    record = _read_json(Path(path) / SWEEP_FILE) if Path(path).is_dir() else None
    return record if isinstance(record, dict) else None


# ---------------------------------------------------------------- the lock


def _is_rank0():
    """Under torchrun only rank 0 writes the run directory (RANK is set before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


class RunLocked(RunError):
    """Another live process holds the run directory's lock."""


#: locks this process holds, by run directory: taking one again is a no-op
_HELD = {}


class RunLock:
    """The run directory's advisory lock (``.lock``, holding pid and host): the shared
    :class:`~mmcore.store.locks.FileLock` with a run's policy on top.

    Taking it never waits: a live holder is refused, naming it (:class:`RunLocked`). A killed
    run's lock is taken over and said so (``echo``). Another host's lock file is never judged
    stale (a run may last longer than any timeout; its owner removes it). A process that holds
    it already takes it again as a no-op, and ranks > 0 of a torchrun job take nothing.
    """

    def __init__(self, run_dir, echo=None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.echo = echo
        self.nested = False
        self._lock = FileLock(self.path, foreign_stale_s=None)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False

    @property
    def fd(self):
        """The ``flock``ed descriptor while held that way (None otherwise)."""
        return self._lock.fd

    @property
    def mode(self):
        """``"flock"`` or ``"excl"`` (an ``O_EXCL`` lock file) while held, else None."""
        return self._lock.mode

    # -- taking and giving back --------------------------------------------------------------

    def acquire(self):
        """Take the lock or raise :class:`RunLocked` naming the holder (ranks > 0 take nothing)."""
        key = str(self.run_dir.resolve())
        if not _is_rank0() or key in _HELD:
            self.nested = True
            return self
        try:
            previous = self._lock.acquire(wait=False)
        except LockBusy as busy:
            raise self._locked(busy.holder) from None
        except OSError as exc:
            raise RunError(f"{self.path}: cannot take the run directory's lock ({exc.strerror or exc})") from None
        if previous and previous.get("pid") != os.getpid() and self.echo is not None:
            self.echo(f"{self.run_dir}: taking over the lock of {describe_holder(previous)}, which is no longer running")
        _HELD[key] = self
        return self

    def release(self):
        """Give the lock back and remove the lock file."""
        if self.nested:
            return
        _HELD.pop(str(self.run_dir.resolve()), None)
        self._lock.release()

    # -- asking -----------------------------------------------------------------------------

    def _locked(self, holder):
        return RunLocked(
            f"{self.run_dir}: in use by a live mmcore run ({describe_holder(holder or {})}); "
            f"wait for it to end or stop it first"
        )

    def live_holder(self):
        """The record of the live process holding this lock, or None (this process counts as live)."""
        if str(self.run_dir.resolve()) in _HELD:
            return {"pid": os.getpid(), "host": socket.gethostname()}
        return self._lock.live_holder()

    def refuse_if_live(self):
        """Raise :class:`RunLocked` when a live process holds this run directory."""
        holder = self.live_holder()
        if holder is not None:
            raise self._locked(holder)


def _forget_in_child():
    """A forked child (a DataLoader worker) holds no run directory (the store closes its descriptor)."""
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def read_status(path):
    """``status.json`` of the run directory at ``path`` (None when missing or unreadable)."""
    return RunDir(path).status()


def write_status(path, state, **extra):
    """Write ``status.json`` of the run directory at ``path`` (see :meth:`RunDir.write_status`)."""
    RunDir(path).write_status(state, **extra)
