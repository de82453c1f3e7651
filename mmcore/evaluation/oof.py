"""Out-of-fold scores: every labelled row scored by the one member of a k-fold bag that did not
train on it, checked by construction, and kept in the run directory as ``oof_scores.csv``.

Member ``f`` of a bag trains on every row outside fold ``f`` and scores the rows of fold ``f``
(:func:`mmcore.data.folds.fold_splits`), so a row's fold is the member that scored it.
:class:`OutOfFoldBuilder` takes each member's held-out logits and refuses anything else: rows of
another fold, a training position among its held-out rows, a row scored twice, a row never scored.

``oof_scores.csv`` has one line per labelled row (train + val, in that order), columns:

- ``row``: the row's position in the bag (0, 1, ... in file order);
- ``csv``: the CSV the row came from, as the recipe names it; ``csv_row``: its row there
  (counted from 1, the header not included, as mmcore's messages count rows);
- ``image``: the image path as written in that CSV;
- ``label``: the given label (0/1); ``fold``: the fold the row was held out in, which is the
  member that scored it;
- ``logit``: that member's logit; ``score``: ``sigmoid(logit)``, the raw probability (the bag's
  temperature, in ``decision.json``, applies to ``logit``).

Other tools (``mmcore audit``) read it back with :func:`read_oof_scores`, which checks every line.
"""

from __future__ import annotations

import csv
import io
import math
import os
import stat

import attrs
import numpy as np

from mmcore.errors import RunError, os_error_reason
from mmcore.evaluation.calibration import apply_temperature
from mmcore.io import write_text

OOF_FILE = "oof_scores.csv"
OOF_COLUMNS = ("row", "csv", "csv_row", "image", "label", "fold", "logit", "score")
#: the most a reader takes in: ~200 bytes a line, so millions of rows
MAX_OOF_BYTES = 1 << 30
#: how far a stored score may be from sigmoid(logit) (both written with 17 significant digits)
_SCORE_TOLERANCE = 1e-9


@attrs.frozen(eq=False)
class OutOfFoldScores:
    """Each row's fold (= the member that scored it), given label and out-of-fold logit: int64 / int64 / float64 [N]."""

    folds: np.ndarray
    labels: np.ndarray
    logits: np.ndarray

    @property
    def scores(self):
        """``sigmoid(logits)``: the raw out-of-fold probabilities."""
        return apply_temperature(self.logits, 1.0)


@attrs.frozen(eq=False)
class OutOfFoldTable:
    """``oof_scores.csv`` read back: the scores and, per row, where it came from."""

    oof: OutOfFoldScores
    csv: tuple[str, ...]
    csv_row: np.ndarray
    image: tuple[str, ...]


def _positions(values, n, what):
    positions = np.asarray(values, dtype=np.int64).reshape(-1)
    if positions.size and (positions.min() < 0 or positions.max() >= n):
        raise ValueError(f"{what} must lie in [0, {n}) (got {int(positions.min())}..{int(positions.max())})")
    return positions


def _first(rows):
    return ", ".join(str(int(r)) for r in rows[:5]) + (", ..." if rows.size > 5 else "")


class OutOfFoldBuilder:
    """Collects the members' held-out logits into one out-of-fold array, refusing any leak."""

    def __init__(self, folds, labels):
        self.folds = np.asarray(folds, dtype=np.int64).reshape(-1)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if self.folds.size != self.labels.size:
            raise ValueError(f"folds and labels differ in length ({self.folds.size} vs {self.labels.size})")
        self.k = int(self.folds.max()) + 1 if self.folds.size else 0
        self.logits = np.full(self.folds.size, np.nan)
        self.scored_by = np.full(self.folds.size, -1, dtype=np.int64)
        self.train_positions = {}

    def add(self, member, train_positions, held_out_positions, logits):
        """Member ``member``'s logits on ``held_out_positions``, having trained on ``train_positions``.

        ValueError unless the held-out positions are exactly fold ``member``'s rows, none of them
        is a training position, none was scored before, and the logits are finite, one per row.
        """
        n = self.folds.size
        if not 0 <= member < self.k:
            raise ValueError(f"member {member}: there are folds 0..{self.k - 1}")
        train = _positions(train_positions, n, f"member {member}'s training positions")
        held = _positions(held_out_positions, n, f"member {member}'s held-out positions")
        logits = np.asarray(logits, dtype=np.float64).reshape(-1)
        if logits.size != held.size:
            raise ValueError(f"member {member}: {logits.size} logits for {held.size} held-out rows")
        if not np.isfinite(logits).all():
            raise ValueError(f"member {member}: its logits contain NaN or infinite values")
        own = np.flatnonzero(self.folds == member)
        if not np.array_equal(np.unique(held), own) or np.unique(held).size != held.size:
            raise ValueError(f"member {member} must score exactly the rows of fold {member}")
        trained_on_own = np.intersect1d(train, own)
        if trained_on_own.size:
            raise ValueError(f"member {member} trained on rows it scores: {_first(trained_on_own)}")
        again = held[self.scored_by[held] >= 0]
        if again.size:
            raise ValueError(f"member {member}: rows already scored by another member: {_first(again)}")
        self.logits[held] = logits
        self.scored_by[held] = member
        self.train_positions[member] = train

    def finish(self):
        """The :class:`OutOfFoldScores`, after :func:`verify_out_of_fold` on everything added."""
        missing = np.flatnonzero(self.scored_by < 0)
        if missing.size:
            raise ValueError(f"{missing.size} rows have no out-of-fold score: {_first(missing)}")
        verify_out_of_fold(self.folds, self.scored_by, self.train_positions)
        return OutOfFoldScores(folds=self.folds.copy(), labels=self.labels.copy(), logits=self.logits.copy())


def verify_out_of_fold(folds, scored_by, train_positions):
    """ValueError unless every row was scored by its own fold's member and that member did not train on it.

    ``folds[i]``: the fold row i is held out in; ``scored_by[i]``: the member whose logit it has;
    ``train_positions[m]``: the rows member m trained on.
    """
    folds = np.asarray(folds).reshape(-1)
    scored_by = np.asarray(scored_by).reshape(-1)
    wrong = np.flatnonzero(folds != scored_by)
    if wrong.size:
        i = int(wrong[0])
        raise ValueError(f"row {i} of fold {int(folds[i])} was scored by member {int(scored_by[i])}")
    for member in np.unique(scored_by):
        if int(member) not in train_positions:
            raise ValueError(f"member {int(member)} scored rows but its training positions are unknown")
        leaked = np.intersect1d(np.asarray(train_positions[int(member)]), np.flatnonzero(scored_by == member))
        if leaked.size:
            raise ValueError(f"member {int(member)} trained on rows it scored: {_first(leaked)}")


def write_oof_scores(path, oof, *, csv_names, csv_rows, images):
    """Write ``oof`` as ``oof_scores.csv`` at ``path`` (atomically), with each row's CSV, CSV row and image."""
    n = oof.logits.size
    if not len(csv_names) == len(csv_rows) == len(images) == n:
        raise ValueError(f"{n} scores but {len(csv_names)} CSV names, {len(csv_rows)} CSV rows, {len(images)} images")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(OOF_COLUMNS)
    scores = oof.scores
    for i in range(n):
        writer.writerow([
            i, csv_names[i], int(csv_rows[i]), images[i], int(oof.labels[i]), int(oof.folds[i]),
            repr(float(oof.logits[i])), repr(float(scores[i])),
        ])
    return write_text(path, buffer.getvalue())


def _read_bounded(path):
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise RunError(f"{path}: not a regular file; out-of-fold scores are {OOF_FILE}")
        if st.st_size > MAX_OOF_BYTES:
            raise RunError(f"{path}: {st.st_size} bytes, more than the {MAX_OOF_BYTES} an {OOF_FILE} may have")
        with open(path, "rb") as handle:
            data = handle.read(MAX_OOF_BYTES + 1)
    except OSError as exc:
        reason, advice = os_error_reason(exc)
        raise RunError(f"{path}: cannot read ({reason}); {advice}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RunError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _parse_line(path, line_number, values, expected_row):
    """One checked line -> (csv, csv_row, image, label, fold, logit, score); RunError naming the line otherwise."""
    where = f"{path}: line {line_number}"
    if len(values) != len(OOF_COLUMNS):
        raise RunError(f"{where}: {len(values)} fields, expected {len(OOF_COLUMNS)}")
    row, csv_name, csv_row, image, label, fold, logit, score = values
    try:
        row, csv_row, label, fold = int(row), int(csv_row), int(label), int(fold)
        logit, score = float(logit), float(score)
    except ValueError:
        raise RunError(f"{where}: row, csv_row, label and fold must be integers, logit and score numbers") from None
    if row != expected_row:
        raise RunError(f"{where}: row {row}, expected {expected_row} (rows are numbered in order from 0)")
    if label not in (0, 1):
        raise RunError(f"{where}: label must be 0 or 1 (got {label})")
    if fold < 0 or csv_row < 1:
        raise RunError(f"{where}: fold must be >= 0 and csv_row >= 1")
    if not math.isfinite(logit):
        raise RunError(f"{where}: logit must be a finite number (got {logit})")
    return csv_name, csv_row, image, label, fold, logit, score


def read_oof_scores(path):
    """``oof_scores.csv`` -> :class:`OutOfFoldTable`; RunError (one line, naming the file and line) for any bad line.

    Checks the header, row numbering, labels, finite logits, ``score = sigmoid(logit)``, and that
    every fold from 0 to the largest holds rows of both classes.
    """
    text = _read_bounded(path)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or tuple(header) != OOF_COLUMNS:
        raise RunError(f"{path}: line 1: the header must be {','.join(OOF_COLUMNS)}")
    parsed, line_numbers = [], []
    for values in reader:
        parsed.append(_parse_line(path, reader.line_num, values, len(parsed)))
        line_numbers.append(reader.line_num)
    if not parsed:
        raise RunError(f"{path}: no rows")
    csv_names, csv_rows, images, labels, folds, logits, scores = zip(*parsed)
    logits = np.array(logits, dtype=np.float64)
    off = np.flatnonzero(~(np.abs(np.array(scores) - apply_temperature(logits, 1.0)) <= _SCORE_TOLERANCE))
    if off.size:
        i = int(off[0])
        raise RunError(f"{path}: line {line_numbers[i]}: score {scores[i]} is not sigmoid(logit {logits[i]})")
    folds, labels = np.array(folds, dtype=np.int64), np.array(labels, dtype=np.int64)
    for fold in range(int(folds.max()) + 1):
        held = labels[folds == fold]
        if held.size == 0 or held.min() == held.max():
            raise RunError(f"{path}: fold {fold} holds {'no rows' if held.size == 0 else 'one class only'}; not a bag's out-of-fold scores")
    oof = OutOfFoldScores(folds=folds, labels=labels, logits=logits)
    return OutOfFoldTable(oof=oof, csv=tuple(csv_names), csv_row=np.array(csv_rows, dtype=np.int64), image=tuple(images))
