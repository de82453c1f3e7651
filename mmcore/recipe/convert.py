"""ONE strict cattrs converter: unknown keys and wrong types are errors, each one line with its path."""

from __future__ import annotations

import math
import typing
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from mmcore.errors import RecipeError, did_you_mean
from mmcore.recipe.legacy import legacy_hint
from mmcore.validators import FieldError


class StrictTypeError(TypeError):
    pass


def _type_name(value):
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _strict(expected, name):
    def hook(value, _type):
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if type(value) is not expected:
            raise StrictTypeError(f"must be {name} (got {_type_name(value)} {value!r})")
        if expected is float and not math.isfinite(value):  # nan passes every `value <= 0` check
            raise StrictTypeError(f"must be a finite number (got {value!r})")
        return value

    return hook


def _is_plain_union(tp):
    return typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType"))


def _make_converter():
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(bool, _strict(bool, "a boolean"))
    conv.register_structure_hook(int, _strict(int, "an integer"))
    conv.register_structure_hook(float, _strict(float, "a number"))
    conv.register_structure_hook(str, _strict(str, "a string"))
    conv.register_structure_hook(Any, lambda value, _t: value)

    def structure_union(value, tp):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        errors = []
        for member in members:
            if member is type(None):
                continue
            try:
                return conv.structure(value, member)
            except Exception as exc:  # try the next member
                errors.append(exc)
        if len(errors) == 1 and isinstance(value, dict):
            raise errors[0]  # `X | None` given a table: X's own problems, with their key paths
        names = " or ".join(_union_member_name(m) for m in members if m is not type(None))
        raise StrictTypeError(f"must be {names} (got {_type_name(value)} {value!r})")

    conv.register_structure_hook_func(_is_plain_union, structure_union)
    conv.register_unstructure_hook(tuple, list)
    return conv


def _union_member_name(tp):
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if attrs.has(tp):
        return "a table"
    return getattr(tp, "__name__", str(tp))


converter = _make_converter()


def _problems(exc, path):
    """Yield (key_path, message) for every leaf of a cattrs error tree."""
    if isinstance(exc, ForbiddenExtraKeysError):
        known = [a.name for a in attrs.fields(exc.cl)]
        for key in sorted(exc.extra_fields):
            hint = legacy_hint(_join(path, key))
            yield _join(path, key), f"unknown key{hint or did_you_mean(key, known)}"
        return
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            yield from _problems(sub, _join(path, str(getattr(note, "name", getattr(note, "index", "")))))
        for sub in without:
            yield from _problems(sub, path)
        return
    if isinstance(exc, FieldError):
        yield _join(path, exc.field), str(exc)
        return
    if isinstance(exc, KeyError):
        key = str(exc.args[0])
        yield (path if path.rpartition(".")[2] == key else _join(path, key)), "missing required key"
        return
    if isinstance(exc, ValueError) and len(exc.args) > 1 and isinstance(exc.args[1], attrs.Attribute):
        yield _join(path, exc.args[1].name), str(exc.args[0])  # an attrs validator's (message, attribute, ...)
        return
    if isinstance(exc, (StrictTypeError, ValueError, TypeError)):
        message = str(exc)
        if isinstance(exc, TypeError) and "unexpected keyword" in message:
            message = "unknown key"
        if not isinstance(exc, StrictTypeError) and type(exc) is TypeError:
            message = f"wrong type ({message})"
        yield path, message
        return
    yield path, f"{type(exc).__name__}: {exc}"


def _join(path, key):
    return f"{path}.{key}" if path else key


def structure(data, cls, *, source, path=""):
    """Structure ``data`` into ``cls`` or raise a :class:`RecipeError` naming each key path."""
    try:
        return converter.structure(data, cls)
    except Exception as exc:
        problems = [f"{src(source, p)}: {p}: {m}" for p, m in _problems(exc, path)]
        raise RecipeError(problems or [f"{source}: {path}: {exc}"]) from None


def unstructure(obj):
    """attrs -> plain dict (None values dropped: TOML has no null)."""
    return _drop_none(converter.unstructure(obj, unstructure_as=type(obj)))


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    if attrs.has(type(value)):
        return _drop_none(converter.unstructure(value, unstructure_as=type(value)))
    return value


class Source:
    """Where each key came from: the recipe file, or a --set override."""

    def __init__(self, path, override_keys=()):
        self.path = str(path)
        self.override_keys = set(override_keys)

    def __call__(self, key_path):
        for key in self.override_keys:
            if key_path == key or key_path.startswith(key + ".") or key.startswith(key_path + "."):
                return f"{self.path} (--set {key})"
        return self.path


def src(source, key_path):
    return source(key_path) if callable(source) else str(source)
