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


def did_you_mean(word, choices):
    """Return ``" (did you mean X?)"`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
