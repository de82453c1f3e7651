"""The ensemble directory: its layout, ``ensemble.json``, and the rules it is read by.

An ensemble directory is what ``mmcore ensemble`` and ``mmcore run --seeds/--folds`` write and
what every command takes where it takes a run directory::

    ensemble.json          what the ensemble is: its members (relative folders under members/) and weights
    decision.json          threshold, rule and temperature of the combined logit (a run's decision keys)
    results.json           the ensemble's metrics on the test split (a run's keys) + each member's
    recipe.toml            the first member's recipe (what compare and show read)
    status.json            completed (compare reads it as a run's)
    test_predictions.json, test_report.md, report.html, plots
    oof_scores.csv         k-fold bags only (mmcore.evaluation.oof)
    members/<name>/        each member: a complete run directory

A directory is data: ``ensemble.json`` may only name folders inside its own ``members/`` (never
an absolute path, ``..``, or a link out), each a completed run directory whose recipe and best
checkpoint still have the sha256 recorded when the ensemble was made; the weights are finite,
non-negative and sum to 1. Anything else is one line naming ``ensemble.json`` and the key (exit 4).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path, PurePosixPath

import attrs

from mmcore.bounded import FileRules, read_regular_file
from mmcore.errors import RunError
from mmcore.io import write_json
from mmcore.rundir import BEST, RECIPE_FILE, RESULTS_FILE, STATUS_FILE, RunDir

ENSEMBLE_FILE = "ensemble.json"
DECISION_FILE = "decision.json"
MEMBERS_DIR = "members"
KIND = "mmcore-ensemble"
FORMAT = 1
#: how the ensemble was made: ``mmcore ensemble``, ``run --seeds``, ``run --folds``
SOURCES = ("runs", "seeds", "folds")
#: what ``ensemble.json`` says of the combination (for readers; the code is evaluation.ensemble)
COMBINE = "weighted mean of sigmoid(member logit); logit(p) clipped to [2**-23, 1 - 2**-23]"
MAX_MEMBERS = 64
#: a member's weights may be off 1 by this much in sum (JSON round-trips floats exactly; this is slack)
WEIGHT_SUM_TOL = 1e-6
ENSEMBLE_RULES = FileRules("ensemble record", "the ensemble's ensemble.json", 4 << 20, "mmcore writes it far smaller")
DECISION_RULES = FileRules("ensemble decision", "the ensemble's decision.json", 64 << 10, "it holds a few numbers")
#: files a member run directory brings into the ensemble (last.ckpt, the optimizer state, is left behind)
MEMBER_FILES = (RECIPE_FILE, BEST, RESULTS_FILE, STATUS_FILE)


@attrs.frozen
class Member:
    """One member: its folder (relative, as recorded, and resolved) and its weight."""

    dir: str
    path: Path
    weight: float
    count: int | None
    checkpoint_sha256: str
    recipe_sha256: str


@attrs.frozen
class Ensemble:
    """An ensemble directory as read (and checked) by :func:`read_ensemble`."""

    path: Path
    source: str
    members: tuple
    selection: dict
    data: dict
    decision: dict

    @property
    def scoring(self):
        """The members of non-zero weight (a member of weight 0 is kept in the record, never loaded)."""
        return tuple(m for m in self.members if m.weight > 0)

    @property
    def record_file(self):
        return self.path / ENSEMBLE_FILE


def is_ensemble(path):
    """Whether ``path`` is an ensemble directory (it holds ``ensemble.json``)."""
    return (Path(path) / ENSEMBLE_FILE).is_file()


def sha256_of(path):
    """The sha256 hex digest of a file's bytes."""
    from mmcore.export.bundle import sha256_file

    return sha256_file(path)


def _fail(where, key, message):
    raise RunError(f"{where}: {key}: {message}")


def _member(base, where, index, entry):
    key = f"members[{index}]"
    if not isinstance(entry, dict):
        _fail(where, key, "must be a table")
    unknown = sorted(set(entry) - {"dir", "weight", "count", "checkpoint_sha256", "recipe_sha256"})
    if unknown:
        _fail(where, f"{key}.{unknown[0]}", "unknown key")
    rel = entry.get("dir")
    if not isinstance(rel, str) or not rel:
        _fail(where, f"{key}.dir", "must be a folder name under members/")
    parts = PurePosixPath(rel).parts
    if rel.startswith(("/", "\\")) or "\\" in rel or len(parts) != 2 or parts[0] != MEMBERS_DIR or parts[1] in (".", ".."):
        _fail(where, f"{key}.dir", f"{rel!r} is not a folder inside {MEMBERS_DIR}/ (an ensemble names only its own members)")
    path = base / MEMBERS_DIR / parts[1]
    if path.is_symlink() or not path.is_dir():
        _fail(where, f"{key}.dir", f"{rel!r} is not a run directory (no such folder)")
    status = RunDir(path).status()
    if status is None:
        _fail(where, f"{key}.dir", f"{rel!r} is not a run directory (no {STATUS_FILE})")
    if status.get("state") != "completed":
        _fail(where, f"{key}.dir", f"{rel!r} is not a completed run (status: {status.get('state')})")
    weight = entry.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        _fail(where, f"{key}.weight", f"must be a number >= 0 (got {weight!r})")
    count = entry.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        _fail(where, f"{key}.count", f"must be an integer >= 0 (got {count!r})")
    sums = {}
    for name in ("checkpoint_sha256", "recipe_sha256"):
        value = entry.get(name)
        if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            _fail(where, f"{key}.{name}", "must be a sha256 (64 hex digits)")
        sums[name] = value
    return Member(dir=rel, path=path, weight=float(weight), count=count, **sums)


def read_ensemble(path, *, verify=True):
    """The ensemble directory at ``path``, checked (see the module docstring); ``verify`` hashes
    each scoring member's recipe and best checkpoint against the record."""
    path = Path(path)
    where = path / ENSEMBLE_FILE
    raw = read_regular_file(where, ENSEMBLE_RULES, error=RunError)
    try:
        record = json.loads(raw)
    except ValueError as exc:
        raise RunError(f"{where}: not JSON ({exc})") from None
    if not isinstance(record, dict):
        _fail(where, "(top level)", "must be a JSON object")
    if record.get("kind") != KIND:
        _fail(where, "kind", f"must be {KIND!r} (got {record.get('kind')!r})")
    if record.get("format") != FORMAT:
        _fail(where, "format", f"this mmcore reads format {FORMAT} (got {record.get('format')!r}); upgrade mmcore")
    if record.get("source") not in SOURCES:
        _fail(where, "source", f"must be one of {', '.join(SOURCES)} (got {record.get('source')!r})")
    entries = record.get("members")
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_MEMBERS:
        _fail(where, "members", f"must be a list of 1 to {MAX_MEMBERS} members")
    members = tuple(_member(path, where, i, entry) for i, entry in enumerate(entries))
    if len({m.dir for m in members}) != len(members):
        _fail(where, "members", "names one folder twice")
    total = sum(m.weight for m in members)
    if abs(total - 1.0) > WEIGHT_SUM_TOL:
        _fail(where, "members[*].weight", f"must sum to 1 (got {total:.9g})")
    if verify:
        for i, member in enumerate(members):
            if member.weight == 0:
                continue
            recorded = (("recipe_sha256", RECIPE_FILE, member.recipe_sha256),
                        ("checkpoint_sha256", BEST, member.checkpoint_sha256))
            for name, file, expected in recorded:
                try:
                    digest = sha256_of(member.path / file)
                except OSError as exc:
                    _fail(where, f"members[{i}].{name}", f"cannot read {member.dir}/{file} ({exc.strerror or exc})")
                if digest != expected:
                    _fail(where, f"members[{i}].{name}", f"{member.dir}/{file} changed since the ensemble was made")
    for key in ("selection", "data"):
        if not isinstance(record.get(key, {}), dict):
            _fail(where, key, "must be a table")
    return Ensemble(path=path, source=record["source"], members=members, selection=record.get("selection") or {},
                    data=record.get("data") or {}, decision=read_decision(path))


def read_decision(path):
    """``decision.json`` of the ensemble (threshold and temperature of the combined logit), checked."""
    from mmcore.export.schema import Decision, structure_file

    where = Path(path) / DECISION_FILE
    raw = read_regular_file(where, DECISION_RULES, error=RunError)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise RunError(f"{where}: not JSON ({exc})") from None
    structure_file(data, Decision, path=where)  # the same checks as a bundle's decision
    return data


def member_entry(path, rel, weight, count=None):
    """The ``ensemble.json`` record of the member run directory at ``path`` (hashes its recipe and checkpoint)."""
    return {"dir": rel, "weight": float(weight), "count": count,
            "checkpoint_sha256": sha256_of(Path(path) / BEST), "recipe_sha256": sha256_of(Path(path) / RECIPE_FILE)}


def write_ensemble(path, *, source, members, selection, data):
    """``ensemble.json`` (``members``: entries from :func:`member_entry`)."""
    write_json(Path(path) / ENSEMBLE_FILE, {
        "kind": KIND, "format": FORMAT, "source": source, "combine": COMBINE,
        "members": members, "selection": selection, "data": data,
    })


def link_member(run_dir, dest):
    """Bring a finished run's files into ``dest`` (a new member folder): hard links, a copy across
    file systems. Only :data:`MEMBER_FILES` come (no optimizer state, no reports)."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    for name in MEMBER_FILES:
        src = Path(run_dir) / name
        try:
            os.link(src, dest / name)
        except OSError:
            shutil.copy2(src, dest / name)
    return dest
