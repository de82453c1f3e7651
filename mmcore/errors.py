"""Errors a user can act on: the CLI prints their message, one line each, and exits non-zero."""

import difflib


class MmcoreError(Exception):
    """An error whose message is meant for the user, not a traceback."""

    exit_code = 1


class RecipeError(MmcoreError):
    """A recipe problem; ``problems`` holds one line per problem (file: key.path: message)."""

    exit_code = 2

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class DataError(MmcoreError):
    """A data problem (CSV or image); one line per problem, naming the file and row."""

    exit_code = 3

    def __init__(self, problems):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class RunError(MmcoreError):
    """A problem with a run directory or checkpoint."""

    exit_code = 4


def closest(word, choices):
    """The choice a user most likely meant: an abbreviation (``lr`` -> ``learning_rate``),
    a prefix, or the closest spelling; None when nothing is close."""
    choices = list(choices)
    word = str(word)
    for choice in choices:
        initials = "".join(part[0] for part in choice.split("_") if part)
        if len(choice.split("_")) > 1 and word == initials:
            return choice
    prefixed = [c for c in choices if c.startswith(word) and len(word) >= 3]
    if len(prefixed) == 1:
        return prefixed[0]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word, choices):
    """Return ``" (did you mean X?)"`` for the closest choice, or ``""``."""
    match = closest(word, choices)
    return f" (did you mean {match}?)" if match else ""


#: errno -> (what happened, what to do); the words of :func:`os_error_line`
_OS_REASONS = {
    "EACCES": ("permission denied", "check its permissions or choose another path"),
    "EPERM": ("operation not permitted", "check its permissions or choose another path"),
    "EROFS": ("read-only file system", "choose a path on a writable disk"),
    "ENOSPC": ("no space left on device", "free some space or choose another disk"),
    "EDQUOT": ("disk quota exceeded", "free some space or choose another disk"),
    "ENAMETOOLONG": ("file name too long", "shorten the path"),
    "EISDIR": ("is a directory", "name a file, not a directory"),
    "ENOTDIR": ("a part of the path is not a directory", "check the path"),
    "ENOENT": ("not found", "check the path"),
    "ELOOP": ("too many levels of symbolic links", "check the links in the path"),
    "EIO": ("input/output error", "check the disk"),
    "ENXIO": ("no such device", "check that the disk is mounted"),
    "ENODEV": ("no such device", "check that the disk is mounted"),
}


def os_error_reason(exc):
    """``OSError`` -> ``(reason, what to do)`` in plain words (no errno numbers, no traceback)."""
    import errno as _errno

    name = _errno.errorcode.get(getattr(exc, "errno", None) or -1, "")
    if name in _OS_REASONS:
        return _OS_REASONS[name]
    reason = (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).strip()
    return reason[:1].lower() + reason[1:], "check the path"


def os_error_line(path, exc, *, what="", hint=None):
    """One line for an ``OSError`` on a path the user gave: ``PATH: [what: ]reason; what to do``.

    ``what`` says what the path is for ("feature cache", "recipe"); ``hint`` replaces the
    generic advice. Shared by every place that touches user paths so they read alike.
    """
    reason, advice = os_error_reason(exc)
    prefix = f"{what}: " if what else ""
    return f"{path}: {prefix}{reason}; {hint or advice}"


def not_regular_line(path, *, what="", hint="name a regular file"):
    """The line for a path that exists but is not a regular file (a directory, a device, a FIFO)."""
    import os as _os
    import stat as _stat

    try:
        mode = _os.stat(path).st_mode
    except OSError as exc:
        return os_error_line(path, exc, what=what)
    kind = "is a directory" if _stat.S_ISDIR(mode) else "not a regular file"
    prefix = f"{what}: " if what else ""
    return f"{path}: {prefix}{kind}; {hint}"
