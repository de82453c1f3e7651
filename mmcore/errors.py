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
