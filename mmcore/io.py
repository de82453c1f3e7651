"""Atomic file writes: temporary file in the same directory, fsync, ``os.replace``.

A reader never sees a half-written checkpoint or result file, and a full disk leaves the
previous version in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from mmcore.errors import RunError


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Open a temporary sibling of ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        kept = "the previous version is kept" if path.exists() else "nothing was written"
        raise RunError(f"{path}: could not write ({exc.strerror or exc}); {kept}") from exc
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


def write_json(path, data):
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
    digest = hashlib.sha1()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(block):
                digest.update(chunk)
    except OSError:
        return None
    return digest.digest()


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
