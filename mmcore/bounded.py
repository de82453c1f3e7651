"""Reading what a user names, bounded before it is read.

A recipe, a search space, a split CSV: each is a regular file under a size cap, and anything
else is one line decided by ``os.stat`` before the file is opened — a directory, a FIFO
(opening it would block until someone writes), a device (``/dev/zero`` reads forever), a file
over its cap. TOML text is bounded in nesting before :mod:`tomllib` sees it: tomllib recurses
once per nested array or inline table (100,000 ``[`` are a ``RecursionError``) and its cost
grows with the square of a dotted key's length (100,000 parts take gigabytes), and mmcore's
own walks over a recipe recurse once per table.
"""

from __future__ import annotations

import os
import re
import stat

import attrs

from mmcore.errors import MmcoreError, os_error_reason

#: deepest nesting of tables, arrays and dotted key parts in a recipe, a ``--set`` value or a
#: search space (the deepest shipped recipe nests 4 levels)
MAX_NESTING = 32


@attrs.frozen
class FileRules:
    """How one kind of input file is named in messages, and how large it may be."""

    #: what it is, as in "recipe file not found"
    what: str
    #: what to name instead of a directory or a FIFO, as in "name a TOML recipe file"
    expected: str
    #: the size cap (None: any size)
    max_bytes: int | None = None
    #: what to say of a file over the cap, as in "a recipe is a small TOML file"
    too_large: str = ""


def read_regular_file(path, rules, *, where=None, error=MmcoreError):
    """The bytes of ``path``, a regular file of at most ``rules.max_bytes``; else ``error(one line)``.

    The line starts with ``PATH:`` or, when ``where`` is given (``PARENT: extends``), with
    ``WHERE:`` and names the path after it. Only a regular file is opened, and at most one
    byte more than the cap is read, so a file growing meanwhile is still refused.
    """
    subject = f"{where}: {path}" if where else f"{path}:"
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = "is a directory" if stat.S_ISDIR(mode) else "is not a regular file"
            raise error(f"{subject} {kind}; name {rules.expected}")
        with open(path, "rb") as handle:
            data = handle.read() if rules.max_bytes is None else handle.read(rules.max_bytes + 1)
    except FileNotFoundError:
        raise error(f"{where}: {rules.what} not found: {path}" if where else f"{path}: {rules.what} not found") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        reason, advice = os_error_reason(exc) if isinstance(exc, OSError) else ("not a valid file name", "check the path")
        raise error(f"{where}: cannot read {path} ({reason}); {advice}" if where else
                    f"{path}: cannot read ({reason}); {advice}") from None
    if rules.max_bytes is not None and len(data) > rules.max_bytes:
        raise error(f"{subject} is larger than {format_bytes(rules.max_bytes)}; {rules.too_large}")
    return data


def format_bytes(size):
    """``1048576`` -> ``"1 MiB"``, ``50000000`` -> ``"50 MB"``, else the number of bytes."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} bytes"


class NestingError(ValueError):
    """TOML nested deeper than :data:`MAX_NESTING`; the message says where (no file: the caller adds it)."""


def loads_toml(text, *, max_depth=MAX_NESTING):
    """``tomllib.loads(text)`` of text nested at most ``max_depth`` levels, else :class:`NestingError`.

    The raw text is scanned first (brackets and braces, and the dots of a dotted key, outside
    strings and comments), so tomllib never recurses or builds keys past the bound; the parsed
    data are then measured, since table headers, dotted keys and brackets add up.
    ``tomllib.TOMLDecodeError`` passes through.
    """
    import tomllib

    line = _raw_nesting_line(text, max_depth)
    if line is not None:
        raise NestingError(f"line {line}: {_too_deep(max_depth)}")
    try:
        data = tomllib.loads(text)
    except RecursionError:  # the scan missed a way to nest: never a traceback
        raise NestingError(_too_deep(max_depth)) from None
    if nesting_depth(data) > max_depth:
        raise NestingError(_too_deep(max_depth))
    return data


def _too_deep(max_depth):
    return f"nested more than {max_depth} levels deep (tables, arrays or dotted keys)"


def nesting_depth(data):
    """How deep tables and arrays nest in parsed data (a scalar is 0, ``{"a": 1}`` is 1); no recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


# outside strings: where strings and comments start, and what nests or separates keys
_TOKEN = re.compile(r"\"\"\"|'''|[\"'#\[\]{}=,.\n]")


def _raw_nesting_line(text, max_depth):
    """The line where brackets/braces or one dotted key first go past ``max_depth`` (None: they never do)."""
    depth = dots = 0
    line, position = 1, 0
    while (match := _TOKEN.search(text, position)) is not None:
        token, position = match.group(), match.end()
        if token == "\n":
            line, dots = line + 1, 0
        elif token in "[{":
            depth, dots = depth + 1, 0
            if depth > max_depth:
                return line
        elif token in "]}":
            depth, dots = max(0, depth - 1), 0
        elif token in "=,":
            dots = 0
        elif token == ".":  # a float has one dot; a dotted key one per level
            dots += 1
            if dots >= max_depth:
                return line
        else:
            end = _string_end(text, position, token)
            line += text.count("\n", position, end)
            position = end
    return None


def _string_end(text, start, opener):
    """Where a string (or a comment) that opened just before ``start`` ends; its end of line when unterminated."""
    if opener == "#":
        end = text.find("\n", start)
        return len(text) if end < 0 else end
    escapes = opener[0] == '"'
    position = start
    while True:
        end = text.find(opener, position)
        newline = text.find("\n", position) if len(opener) == 1 else -1
        if end < 0 or 0 <= newline < end:  # unterminated: tomllib reports it
            return len(text) if newline < 0 else newline
        if escapes and _escaped(text, end):
            position = end + 1
            continue
        end += len(opener)
        extra = 0
        while len(opener) == 3 and extra < 2 and text[end : end + 1] == opener[0]:
            end, extra = end + 1, extra + 1  # up to two quotes may stand right before the closing three
        return end


def _escaped(text, index):
    """Whether the character at ``index`` follows an odd number of backslashes."""
    count = 0
    while index - count - 1 >= 0 and text[index - count - 1] == "\\":
        count += 1
    return count % 2 == 1
