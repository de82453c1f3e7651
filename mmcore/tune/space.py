"""A search space in TOML, keyed by recipe paths, checked against the recipe before any trial.

::

    "train.learning_rate" = { log_uniform = [1e-5, 1e-2] }
    "train.batch_size" = { choice = [16, 32, 64] }
    "pooling.name" = { choice = ["mean", "attention"] }
    "fusion.params.dim" = { int = [64, 512], step = 64 }
    "train.modality_dropout" = { uniform = [0.0, 0.5] }

Nested tables (``[train]`` / ``learning_rate = {...}``) mean the same dotted paths. For the grid
sampler a continuous key needs ``points = N`` (evenly spaced; log-spaced for ``log_uniform``);
a grid is counted before it is built and refused past :data:`MAX_GRID_POINTS`. The file is read
as recipes are (a regular file of at most 1 MiB, nested at most 32 levels). Every problem is one
line naming the space file and the key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import attrs
import tomllib

from mmcore.bounded import FileRules, NestingError, loads_toml, read_regular_file
from mmcore.errors import RecipeError

KINDS = ("log_uniform", "uniform", "int", "choice")
#: the options each kind takes besides its range / values
OPTIONS = {"log_uniform": {"points"}, "uniform": {"points", "step"}, "int": {"step"}, "choice": set()}
PRIMITIVE = (bool, int, float, str)
#: the most trials a grid may have: counted from the keys before any list is built (a grid of
#: 10^9 points, or a step of 1e-12, would otherwise fill the memory before any check)
MAX_GRID_POINTS = 100_000
#: a search space is a small TOML file, read as a recipe is
MAX_SPACE_BYTES = 1 << 20
SPACE_FILE = FileRules("search space file", "a TOML search space file", MAX_SPACE_BYTES, "a search space is a small TOML file")


@attrs.frozen
class Param:
    """One searched key: ``kind`` with its range (``low``, ``high``, ``step``, ``points``) or ``choices``."""

    key: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    points: int | None = None
    choices: tuple = ()

    @property
    def encoded(self):
        """Choices that are tables or arrays travel through Optuna as their JSON text."""
        return self.kind == "choice" and not all(isinstance(c, PRIMITIVE) for c in self.choices)

    def distribution(self):
        """The Optuna distribution of this key."""
        import optuna.distributions as d

        if self.kind == "choice":
            return d.CategoricalDistribution([self._encode(c) for c in self.choices])
        if self.kind == "int":
            return d.IntDistribution(self.low, self.high, step=self.step or 1)
        return d.FloatDistribution(self.low, self.high, log=self.kind == "log_uniform", step=self.step)

    def grid_count(self):
        """How many values :meth:`grid` gives, by arithmetic (None: continuous without ``points``)."""
        if self.kind == "choice":
            return len(self.choices)
        if self.kind == "int":
            return (self.high - self.low) // (self.step or 1) + 1
        if self.step is not None:
            return int(round((self.high - self.low) / self.step)) + 1
        return self.points

    def grid(self):
        """The finite set the grid sampler walks (None when the key is continuous without ``points``).

        Call :meth:`grid_count` first: this builds the whole list."""
        if self.kind == "choice":
            return [self._encode(c) for c in self.choices]
        if self.kind == "int":
            return list(range(self.low, self.high + 1, self.step or 1))
        if self.step is not None:
            count = int(round((self.high - self.low) / self.step))
            return [self.low + i * self.step for i in range(count + 1)]
        if self.points is None:
            return None
        if self.points == 1:
            return [self.low]
        if self.kind == "log_uniform":
            ratio = math.log(self.high / self.low)
            return [self.low * math.exp(ratio * i / (self.points - 1)) for i in range(self.points)]
        return [self.low + (self.high - self.low) * i / (self.points - 1) for i in range(self.points)]

    def value(self, sampled):
        """The recipe value of what Optuna sampled."""
        return json.loads(sampled) if self.encoded else sampled

    def override(self, value):
        """``key=value`` (TOML) as ``--set`` takes it."""
        return f"{self.key}={toml_value(value)}"

    def examples(self):
        """Values the key must accept: both ends of a range, every choice."""
        if self.kind == "choice":
            return list(self.choices)
        return [self.low, self.high]

    def _encode(self, choice):
        return json.dumps(choice, sort_keys=True) if self.encoded else choice


@attrs.frozen
class Space:
    """The parsed space file: its path and one :class:`Param` per key, in file order."""

    path: str
    params: tuple[Param, ...]

    @property
    def keys(self):
        return [p.key for p in self.params]

    def distributions(self):
        """``{key: optuna distribution}`` for ``study.ask``."""
        return {p.key: p.distribution() for p in self.params}

    def grid(self):
        """``{key: values}`` for the grid sampler, built once :meth:`grid_size` has counted it."""
        self.grid_size()
        return {p.key: p.grid() for p in self.params}

    def grid_size(self):
        """The grid's points, counted without building it; one line per key that is not finite,
        one line naming the keys when the grid has more than :data:`MAX_GRID_POINTS` points."""
        counts, problems = {}, []
        for p in self.params:
            counts[p.key] = p.grid_count()
            if counts[p.key] is None:
                problems.append(f"{self.path}: {p.key}: the grid sampler needs a finite set: add points = N or use choice")
        if problems:
            raise RecipeError(problems)
        size = math.prod(counts.values())
        if size > MAX_GRID_POINTS:
            largest = sorted(counts.items(), key=lambda item: -item[1])
            keys = " x ".join(f"{key} ({_count(n)})" for key, n in largest if n > 1)
            raise RecipeError(
                f"{self.path}: the grid has {_count(size)} points ({keys}), more than {MAX_GRID_POINTS}; "
                f"give fewer points or a larger step, or use --sampler tpe or random with --trials"
            )
        return size

    def overrides(self, sampled):
        """``--set`` strings for one trial's sampled params (recipe values, in file order)."""
        return [p.override(p.value(sampled[p.key])) for p in self.params if p.key in sampled]

    def to_dict(self):
        """Plain data (``tune.json``; a restarted study must have the same space)."""
        return {p.key: {k: v for k, v in attrs.asdict(p).items() if k != "key" and v not in (None, ())} for p in self.params}


def toml_value(value):
    """A Python value as an inline TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _count(n):
    """A point count as a reader takes it in: ``1000000000`` -> ``10^9`` (exact powers of ten), else the digits."""
    digits = str(n)
    if len(digits) > 4 and digits.strip("0") == "1":
        return f"10^{len(digits) - 1}"
    return digits


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _entries(data, prefix=""):
    """(dotted key, spec table or bad value) pairs; a table naming a kind is a spec, others nest."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not set(value) & set(KINDS) and value:
            yield from _entries(value, path + ".")
        else:
            yield path, value


def _param(key, spec):
    """A :class:`Param` from one spec table, or the problem with it (without the file prefix)."""
    if not isinstance(spec, dict):
        return f"expected a table such as {{ uniform = [0.0, 1.0] }} (one of {', '.join(KINDS)}), got {spec!r}"
    kinds = [k for k in KINDS if k in spec]
    if len(kinds) != 1:
        return f"give exactly one of {', '.join(KINDS)} (got {', '.join(kinds) or 'none'})"
    kind = kinds[0]
    unknown = sorted(set(spec) - {kind} - OPTIONS[kind])
    if unknown:
        allowed = ", ".join(sorted(OPTIONS[kind])) or "nothing"
        return f"{kind}: unknown option {', '.join(unknown)} (allowed beside {kind}: {allowed})"
    values = spec[kind]
    if kind == "choice":
        if not isinstance(values, list) or not values:
            return "choice: expected a non-empty array of values"
        encoded = [json.dumps(v, sort_keys=True) for v in values]
        if len(set(encoded)) != len(encoded):
            return "choice: a value is listed twice"
        return Param(key, kind, choices=tuple(values))
    if not isinstance(values, list) or len(values) != 2 or not all(_number(v) for v in values):
        return f"{kind}: expected [low, high], two numbers (got {values!r})"
    low, high = values
    if not low < high:
        return f"{kind}: low must be below high (got [{low}, {high}])"
    step, points = spec.get("step"), spec.get("points")
    if points is not None and (not isinstance(points, int) or isinstance(points, bool) or points < 1):
        return f"points: expected a positive integer (got {points!r})"
    if kind == "int":
        if not all(isinstance(v, int) for v in values):
            return f"int: low and high must be integers (got [{low}, {high}])"
        if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 1):
            return f"step: expected a positive integer (got {step!r})"
        if step and (high - low) % step:
            return f"int: high - low ({high - low}) is not a multiple of step ({step})"
        return Param(key, kind, low, high, step=step)
    if kind == "log_uniform" and low <= 0:
        return f"log_uniform: low must be above 0 (got {low})"
    if step is not None:
        if not _number(step) or step <= 0:
            return f"step: expected a positive number (got {step!r})"
        ratio = (high - low) / step
        if not math.isfinite(ratio):
            return f"step: {step} is too small to count the values of [{low}, {high}]"
        if abs(ratio - round(ratio)) > 1e-9:
            return f"uniform: high - low ({high - low}) is not a multiple of step ({step})"
        step = float(step)
    return Param(key, kind, float(low), float(high), step=step, points=points)


def load_space(path):
    """Parse the space file; every problem at once, one line each (``space.toml: key: problem``).

    Read as a recipe is: a regular file (a FIFO or a device is refused without being opened)
    of at most 1 MiB, nested at most :data:`~mmcore.bounded.MAX_NESTING` levels.
    """
    path = Path(path)
    raw = read_regular_file(path, SPACE_FILE, error=RecipeError)
    try:
        data = loads_toml(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"{path}: invalid TOML: {exc}") from None
    except NestingError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    params, problems = [], []
    for key, spec in _entries(data):
        result = _param(key, spec)
        if isinstance(result, str):
            problems.append(f"{path}: {key}: {result}")
        else:
            params.append(result)
    if not params and not problems:
        problems.append(f"{path}: empty search space (e.g. \"train.learning_rate\" = {{ log_uniform = [1e-5, 1e-2] }})")
    if problems:
        raise RecipeError(problems)
    return Space(str(path), tuple(params))


def check_space(space, recipe_path, overrides=(), *, registry=None):
    """Every key against the recipe schema: each value the key may take is structured with the recipe.

    The base recipe must load by itself (its own errors are raised as they are); then each range
    end and each choice is set into it as ``--set`` would, so an unknown path, a type the key
    cannot take or a component parameter its plugin refuses is one line naming the space file
    and the key. Returns the base recipe.
    """
    from mmcore.recipe import load_recipe

    overrides = list(overrides)
    base = load_recipe(recipe_path, overrides, registry=registry)
    problems = []
    for param in space.params:
        for value in param.examples():
            try:
                load_recipe(recipe_path, [*overrides, param.override(value)], registry=registry)
            except RecipeError as exc:
                reason, text = _reason(exc, param.key), toml_value(value)
                at = "" if text in reason or "unknown key" in reason else f" (at {text})"
                problems.append(f"{space.path}: {param.key}: {reason}{at}")
                break
    if problems:
        raise RecipeError(problems)
    return base


def _reason(exc, key):
    """The recipe's own message without its ``file (--set key): key:`` prefix."""
    line = exc.problems[0] if exc.problems else str(exc)
    marker = f"(--set {key}): "
    if marker in line:
        line = line.split(marker, 1)[1]
    if line.startswith(f"{key}: "):
        line = line[len(key) + 2 :]
    more = len(exc.problems) - 1
    return line + (f" (and {more} more)" if more > 0 else "")
