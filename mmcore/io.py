"""Atomic file writes, the tree's one writer: a temporary file in the same directory, fsync, ``os.replace``.

A reader never sees a half-written checkpoint, result or cache file, and a full disk leaves the
previous version in place. The temporary file is named ``.<name>~<host>~<pid>~<token>.tmp``:
it says whose it is, so what a killed writer left can be recognised and swept
(:mod:`mmcore.store.leftovers`) while a live writer's file is left alone.

:func:`atomic_write` lets an ``OSError`` reach its caller as it is (the feature cache turns it
into a warning and goes on without the cache); :func:`atomic_open` and the ``write_*`` helpers
turn it into one line naming the file (a :class:`~mmcore.errors.RunError`), the parent folder's
creation included.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import uuid
from pathlib import Path

from mmcore.errors import RunError

#: ``.<name>~<host>~<pid>~<token>.tmp``: the temporary files of :func:`atomic_write`
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)~(?P<host>[^~]*)~(?P<pid>[0-9]+)~(?P<token>[0-9a-f]+)\.tmp$")
#: ``.<name>.<random>.tmp``: what older versions (``tempfile.mkstemp``) left; it names no writer
_OLDER_TEMP_NAME = re.compile(r"^\..+\..+\.tmp$")


def temp_name(path):
    """``.<name>~<host>~<pid>~<token>.tmp`` beside ``path``: whose it is, so a dead writer's can be swept."""
    path = Path(path)
    return path.with_name(f".{path.name}~{socket.gethostname()}~{os.getpid()}~{uuid.uuid4().hex[:16]}.tmp")


def temp_owner(name):
    """``(host, pid)`` of the writer of the temporary file named ``name``; None for any other name."""
    match = _TEMP_NAME.match(name)
    return (match["host"], int(match["pid"])) if match else None


def is_temp_name(name):
    """Whether ``name`` is a temporary file of an atomic write (this version's or an older one's)."""
    return bool(_TEMP_NAME.match(name) or _OLDER_TEMP_NAME.match(name))


@contextlib.contextmanager
def atomic_write(path, mode="wb", **kwargs):
    """Open a temporary sibling of ``path``; when the block ends without an error it is fsync'd and
    replaces ``path`` atomically, otherwise it is removed. An ``OSError`` reaches the caller as it is.

    The file gets the mode ``open()`` would give a new file (0666 less the umask), whoever reads it.
    """
    path = Path(path)
    tmp = temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        handle = os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        _remove(tmp)
        raise
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """:func:`atomic_write`, creating the parent folder, with any ``OSError`` as one line naming the file.

    ``<path>: could not write (<reason>); the previous version is kept`` (or ``nothing was written``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(path, _folder_reason(path.parent, exc)) from exc
    try:
        with atomic_write(path, mode, **kwargs) as handle:
            yield handle
    except OSError as exc:
        raise _write_error(path, exc.strerror or exc) from exc


def _write_error(path, reason):
    kept = "the previous version is kept" if path.exists() else "nothing was written"
    return RunError(f"{path}: could not write ({reason}); {kept}")


def _folder_reason(folder, exc):
    """Why ``folder`` could not be made, in words: a file where a folder must be is the usual case."""
    if exc.errno == errno.EEXIST:
        return f"{folder} is a file, not a folder"
    if exc.errno == errno.ENOTDIR:
        return f"a part of {folder} is a file, not a folder"
    return exc.strerror or str(exc)


def _remove(tmp):
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _fsync_dir(directory):
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path, text):
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_open`)."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_json(path, data):
    """``data`` as indented JSON (no NaN), written atomically."""
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def save_torch(path, obj):
    """``torch.save`` atomically (tensors and plain types only, so weights_only loading works)."""
    import io

    import torch

    buffer = io.BytesIO()  # serialize first: a full disk then fails in a plain write, not inside torch
    torch.save(obj, buffer)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getbuffer())
    return Path(path)


def bytes_sha1(data):
    """sha1 of bytes already read (20 bytes): the same content key :func:`file_sha1` gives for a file."""
    return hashlib.sha1(data).digest()


def file_sha1(path, block=1 << 20):
    """sha1 of a file's bytes (20 bytes), or None when it cannot be read (other checks report that)."""
    try:
        return _sha1_of(path, block).digest()
    except OSError:
        return None


def file_sha1_hex(path, block=1 << 20):
    """sha1 of a file's bytes as 40 hex digits (what a JSON record keeps); OSError when it cannot be read."""
    return _sha1_of(path, block).hexdigest()


def _sha1_of(path, block):
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest


def check_output_path(path, what, *, option="--out", folder=False):
    """Refuse, in one line (:class:`RunError`), an output path that cannot be made: called by a
    command before its work, so a mistyped ``--out`` is said at once, not after the scoring.

    ``what`` names the output ("predictions CSV", "bundle folder"); ``folder``: the path is
    a folder, so an existing file there is refused too. Only ``os.stat``: nothing is made.
    ``path`` None (an option left out) passes.
    """
    import stat

    from mmcore.errors import os_error_reason

    if path is None:
        return None
    path = Path(path)
    advice = f"give {option} a path whose parents are folders"
    for candidate in (path, *path.parents):
        try:
            mode = os.stat(candidate).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue  # not there yet (made by the command), or under a file (found further up)
        except OSError as exc:
            reason, todo = os_error_reason(exc)
            raise RunError(f"{path}: cannot write the {what}: {reason}; {todo}") from None
        if candidate == path:
            if folder and not stat.S_ISDIR(mode):
                raise RunError(f"{path}: cannot write the {what}: it is a file; give {option} a folder")
            continue
        if not stat.S_ISDIR(mode):
            raise RunError(f"{path}: cannot write the {what}: {candidate} is a file, not a folder; {advice}")
        return path
    return path


def existing_parent(path):
    """The nearest ancestor of ``path`` that exists (where its folders will be made)."""
    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent
