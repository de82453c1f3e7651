"""Sweeps: ``mmcore run RECIPE --sweep key=a,b --sweep other=x,y`` trains the whole grid.

Every grid point is a normal run (its own run directory, ``status.json``, results) inside one
sweep directory ``<output_dir>/<experiment>/sweep-<timestamp>/<i>-<key=value,...>/``. Points
run one after another in this process; a point that fails (recipe error, data error, a crash)
is recorded as failed and the sweep goes on; Ctrl-C stops the sweep. The sweep ends with the
``mmcore compare`` table of every point, written as ``comparison.md``/``comparison.csv``, and
``sweep.json`` listing each point's overrides, directory and outcome.
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

import attrs

from mmcore.errors import RecipeError, RunError
from mmcore.recipe.load import split_values
from mmcore.rundir import SWEEP_FILE, RunDir, failure_message, first_line, make_directory, read_sweep

#: longest ``key=value,...`` part of a point's directory name
MAX_NAME = 120


@attrs.frozen
class SweepPoint:
    """One grid point: its 1-based number, ``key=value`` overrides and directory."""

    number: int
    overrides: tuple[str, ...]
    directory: Path

    @property
    def label(self):
        return ",".join(self.overrides)


def parse_sweeps(sweeps):
    """``["k=a,b", "m=x"]`` -> ``[("k", ["a", "b"]), ("m", ["x"])]``, one line per problem."""
    axes, problems, seen = [], [], set()
    for text in sweeps:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"--sweep {text}: expected KEY.PATH=VALUE,VALUE,...")
            continue
        values = split_values(raw)
        if any(not v for v in values):
            problems.append(f"--sweep {text}: empty value (expected KEY.PATH=VALUE,VALUE,...)")
            continue
        if key in seen:
            problems.append(f"--sweep {text}: {key} is swept twice; give all its values in one --sweep")
            continue
        seen.add(key)
        axes.append((key, values))
    if problems:
        raise RecipeError(problems)
    return axes


def _safe(text):
    """A directory-name-safe version of ``key=value,...``."""
    text = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text).lstrip(".")
    return text[:MAX_NAME] or "point"


def grid_points(axes, sweep_dir):
    """The cartesian product of the axes, in order (the last axis varies fastest)."""
    combos = list(itertools.product(*[[f"{key}={v}" for v in values] for key, values in axes]))
    width = len(str(len(combos)))
    return [
        SweepPoint(number=i, overrides=combo, directory=Path(sweep_dir) / f"{i:0{width}d}-{_safe(','.join(combo))}")
        for i, combo in enumerate(combos, start=1)
    ]


def _load_points(recipe_path, overrides, points, registry):
    """Each point's recipe, or the RecipeError that fails it alone."""
    from mmcore.recipe import load_recipe

    loaded = {}
    for point in points:
        try:
            loaded[point.number] = load_recipe(recipe_path, [*overrides, *point.overrides], registry=registry)
        except RecipeError as exc:
            loaded[point.number] = exc
    return loaded


def _sweep_dir(recipe_path, overrides, loaded, out, registry):
    """``--out``, else ``<output_dir>/<experiment>/sweep-<timestamp>`` of the first point that loads."""
    if out is not None:
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise RunError(f"{out}: sweep directory exists and is not empty")
        return out
    recipe = next((r for r in loaded.values() if not isinstance(r, Exception)), None)
    if recipe is None:
        from mmcore.recipe import load_recipe

        recipe = load_recipe(recipe_path, overrides, registry=registry)  # raises the base recipe's error
    base = Path(recipe.output_dir) / recipe.experiment
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sweep_dir, n = base / f"sweep-{stamp}", 1
    while sweep_dir.exists():
        n += 1
        sweep_dir = base / f"sweep-{stamp}-{n}"
    return sweep_dir


def _mark_failed(point, message):
    """A failed point's directory holds ``status.json`` = failed, whatever stage it failed at."""
    run_dir = RunDir(make_directory(point.directory))
    status = run_dir.status()
    if status is None or status.get("state") != "failed":
        run_dir.write_status("failed", error=message, overrides=list(point.overrides))


def run_sweep(recipe_path, overrides, sweeps, *, out=None, dry_run=False, registry=None, progress=True, echo=print):
    """Train every point of the ``--sweep`` grid; returns the sweep directory."""
    from mmcore.commands.run import run_training
    from mmcore.engine.runtime import release_memory
    from mmcore.evaluation.comparison import compare_runs, to_markdown, write_comparison
    from mmcore.io import write_json

    if registry is None:
        from mmcore.plugins.manager import get_registry

        registry = get_registry()
    overrides = list(overrides or ())
    axes = parse_sweeps(sweeps)
    if not axes:
        raise RecipeError("--sweep: give at least one KEY.PATH=VALUE,VALUE,...")
    placeholder = grid_points(axes, ".")
    loaded = _load_points(recipe_path, overrides, placeholder, registry)
    sweep_dir = _sweep_dir(recipe_path, overrides, loaded, out, registry)
    points = grid_points(axes, sweep_dir)
    total = len(points)

    if dry_run:
        echo(f"sweep of {recipe_path}: {total} runs (nothing trained) -> {sweep_dir}")
        for point in points:
            problem = loaded[point.number]
            note = f"  [recipe error: {first_line(problem)}]" if isinstance(problem, Exception) else ""
            echo(f"  {point.directory.name}{note}")
        return sweep_dir

    make_directory(sweep_dir, "sweep directory")
    record = {
        "recipe": str(recipe_path),
        "overrides": overrides,
        "sweeps": list(sweeps),
        "keys": [key for key, _ in axes],
        "points": [
            {"number": p.number, "overrides": list(p.overrides), "dir": p.directory.name, "state": "pending"}
            for p in points
        ],
    }
    write_json(sweep_dir / SWEEP_FILE, record)
    failed = []
    for point, entry in zip(points, record["points"]):
        echo(f"== sweep {point.number}/{total}: {point.label} -> {point.directory}")
        recipe = loaded[point.number]
        try:
            if isinstance(recipe, Exception):
                raise recipe
            run_training(
                recipe, recipe_path=recipe_path, out=point.directory, registry=registry, progress=progress, echo=echo
            )
            entry["state"] = "completed"
        except KeyboardInterrupt:
            entry["state"] = "interrupted"
            write_json(sweep_dir / SWEEP_FILE, record)
            echo(f"sweep interrupted at point {point.number}/{total}; finished points are in {sweep_dir}")
            raise
        except Exception as exc:  # noqa: BLE001 - one point's failure must not end the sweep
            message = failure_message(exc, point.directory)
            _mark_failed(point, message)
            entry.update(state="failed", error=message)
            failed.append((point, message))
            echo(f"sweep point {point.number}/{total} ({point.label}) failed: {message}")
        finally:
            release_memory()
        write_json(sweep_dir / SWEEP_FILE, record)

    comparison = compare_runs([p.directory for p in points], keys=[key for key, _ in axes])
    write_comparison(comparison, sweep_dir)
    echo("")
    echo(to_markdown(comparison).rstrip("\n"))
    echo("")
    done = total - len(failed)
    echo(f"sweep: {done} of {total} runs completed" + (f", {len(failed)} failed:" if failed else ""))
    for point, message in failed:
        echo(f"  {point.directory.name}: {message}")
    echo(f"wrote {sweep_dir / 'comparison.md'} and {sweep_dir / 'comparison.csv'}")
    return sweep_dir


def sweep_completed(sweep_dir):
    """Whether every point of the sweep in ``sweep_dir`` completed (what failed, and why, was said as it ran)."""
    record = read_sweep(sweep_dir)
    return record is None or all(point.get("state") == "completed" for point in record.get("points", []))
