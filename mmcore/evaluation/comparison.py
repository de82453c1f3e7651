"""Several runs in one table: their test metrics and the recipe keys that differ (``mmcore compare``,
the comparison a sweep and a tune study write).

Metrics come from each run's ``results.json`` (at the run's tuned threshold); the recipe keys
from its resolved ``recipe.toml``, flattened to ``key.path`` and shown only where the runs
disagree. A run that is not completed (``status.json``) gets a row with its state and no
metrics, never numbers from a half-written directory.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import attrs

from mmcore.errors import MmcoreError
from mmcore.rundir import RESULTS_FILE, STATUS_FILE, RunDir, read_sweep

#: (column, where in results.json)
METRIC_COLUMNS = (
    ("test_auroc", ("test", "at_threshold", "auroc")),
    ("test_auprc", ("test", "at_threshold", "auprc")),
    ("test_f1", ("test", "at_threshold", "f1")),
    ("test_accuracy", ("test", "at_threshold", "accuracy")),
    ("test_precision", ("test", "at_threshold", "precision")),
    ("test_recall", ("test", "at_threshold", "recall")),
    ("test_ece", ("test", "ece_calibrated")),
    ("threshold", ("decision", "threshold")),
    ("selected_epoch", ("selected_epoch",)),
    ("val_metric", ("selection_metric",)),
)
#: the selected epoch's value of ``val_metric``
VAL_VALUE = "val_value"
FIXED_COLUMNS = ("run", "status", *(name for name, _ in METRIC_COLUMNS), VAL_VALUE)


@attrs.frozen
class Comparison:
    """Columns (fixed ones, then the differing recipe keys), one row per run, notes per run."""

    columns: tuple[str, ...]
    rows: tuple[dict, ...]
    notes: tuple[str, ...]
    recipe_keys: tuple[str, ...]


def flatten(data, prefix=""):
    """Nested tables -> ``{"a.b.c": value}`` in file order (lists stay values)."""
    flat = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def _dig(data, path):
    for key in path:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _read_recipe(run_dir):
    """The run's saved recipe, flattened, or None when it has none (or it cannot be read)."""
    try:
        return flatten(RunDir(run_dir).recipe_data())
    except MmcoreError:
        return None


def expand_run_dirs(paths):
    """Run directories as given; a folder of runs (a sweep, an experiment) stands for its runs."""
    out = []
    for path in map(Path, paths):
        if path.is_dir() and not RunDir(path).is_run():
            children = sorted(p for p in path.iterdir() if RunDir(p).is_run())
            if children:
                out.extend(children)
                continue
        out.append(path)
    return out


def sweep_keys(paths):
    """The swept keys of any sweep folder among ``paths`` (its table shows them first)."""
    keys = []
    for path in map(Path, paths):
        record = read_sweep(path)
        if record is not None:
            keys.extend(k for k in record.get("keys", []) if isinstance(k, str))
    return list(dict.fromkeys(keys))


def _run_names(run_dirs):
    """Directory names when they are unique, else the paths as given."""
    names = [p.name for p in run_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(p) for p in run_dirs]


def compare_runs(run_dirs, *, keys=()):
    """Build the :class:`Comparison` of ``run_dirs`` (incomplete runs are rows without metrics).

    ``keys`` (e.g. a sweep's axes) are shown first even where every run agrees.
    """
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise MmcoreError("compare: give at least one run directory")
    rows, notes, recipes, partials = [], [], [], []
    for name, run_dir in zip(_run_names(run_dirs), run_dirs):
        row = dict.fromkeys(FIXED_COLUMNS)
        row["run"] = name
        status = RunDir(run_dir).status() if run_dir.is_dir() else None
        if not run_dir.is_dir():
            row["status"] = "missing"
            notes.append(f"{name}: run directory not found")
        elif status is None:
            row["status"] = "unknown"
            notes.append(f"{name}: not an mmcore run directory (no {STATUS_FILE})")
        else:
            row["status"] = status.get("state", "unknown")
            if row["status"] != "completed":
                error = status.get("error")
                notes.append(f"{name}: {row['status']}" + (f": {error}" if error else ""))
        if row["status"] == "completed":
            results = RunDir(run_dir).results()
            if results is None:
                notes.append(f"{name}: completed but {RESULTS_FILE} is missing or unreadable")
            else:
                for column, path in METRIC_COLUMNS:
                    row[column] = _dig(results, path)
                if row["test_ece"] is None:
                    row["test_ece"] = _dig(results, ("test", "at_threshold", "ece"))
                row[VAL_VALUE] = _dig(results, ("val", row["val_metric"])) if row["val_metric"] else None
        rows.append(row)
        recipe = _read_recipe(run_dir) if run_dir.is_dir() else None
        recipes.append(recipe)
        partials.append(recipe if recipe is not None else _overrides_of(status))

    differing = list(dict.fromkeys([*keys, *_recipe_keys([r for r in recipes if r is not None])]))
    for row, recipe in zip(rows, partials):
        for key in differing:
            row[key] = recipe.get(key) if recipe is not None else None
    return Comparison(
        columns=(*FIXED_COLUMNS, *differing), rows=tuple(rows), notes=tuple(notes), recipe_keys=tuple(differing)
    )


_MISSING = object()


def _overrides_of(status):
    """A run that failed before writing its recipe (a sweep point): the overrides it was given."""
    from mmcore.recipe import parse_override

    overrides = (status or {}).get("overrides")
    if not overrides:
        return None
    partial = {}
    for text in overrides:
        try:
            parts, value = parse_override(text)
        except MmcoreError:
            continue
        partial[".".join(parts)] = value
    return partial


def _recipe_keys(recipes):
    """Keys (in first-seen order) whose value is not the same in every recipe."""
    keys = list(dict.fromkeys(key for recipe in recipes for key in recipe))
    differing = []
    for key in keys:
        values = [json.dumps(r.get(key, _MISSING), sort_keys=True, default=repr) for r in recipes]
        if len(set(values)) > 1:
            differing.append(key)
    return differing


def format_value(value, *, digits=None):
    """A cell: '' for missing, TOML-like booleans and lists, floats rounded when ``digits``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}" if digits is not None else repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def to_markdown(comparison, *, digits=4):
    """A Markdown table, then one line per run that has a note (failed, incomplete, ...)."""

    rounded = set(FIXED_COLUMNS)  # metrics are rounded; recipe values are shown as they are

    def cell(column, value):
        text = format_value(value, digits=digits if column in rounded else None)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(comparison.columns) + " |",
        "|" + "|".join("---" for _ in comparison.columns) + "|",
    ]
    for row in comparison.rows:
        lines.append("| " + " | ".join(cell(c, row[c]) for c in comparison.columns) + " |")
    if comparison.notes:
        lines.append("")
        lines.extend(f"- {note}" for note in comparison.notes)
    return "\n".join(lines) + "\n"


def to_csv(comparison):
    """The table as CSV, full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(comparison.columns)
    for row in comparison.rows:
        writer.writerow([format_value(row[c]) for c in comparison.columns])
    return buffer.getvalue()


def write_comparison(comparison, out_dir):
    """``comparison.md`` and ``comparison.csv`` in ``out_dir`` (written atomically)."""
    from mmcore.io import write_text

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise MmcoreError(f"--out {out_dir}: is a file; give a folder")
    return write_text(out_dir / "comparison.md", to_markdown(comparison)), write_text(
        out_dir / "comparison.csv", to_csv(comparison)
    )
