"""Out-of-fold bookkeeping (mmcore.evaluation.oof): each row's score comes from the member that did
not train on it, by construction; oof_scores.csv round-trips and refuses a bad line in one line."""

import math

import numpy as np
import pytest

from mmcore.data.folds import assign_folds, fold_splits
from mmcore.errors import RunError
from mmcore.evaluation import oof as oof_module
from mmcore.evaluation.oof import OOF_COLUMNS, OutOfFoldBuilder, read_oof_scores, verify_out_of_fold, write_oof_scores

MEMORISED = 1000.0


def _bag(n=40, k=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    groups = rng.integers(0, n // 2, n)
    return labels, assign_folds(labels, groups, k, seed)


def _member(fold, train):
    """A member that memorises its training rows (a logit of 1000) and otherwise says who it is:
    ``fold * 100 + row``; an out-of-fold logit of 1000 would be a leak."""
    seen = set(train.tolist())
    return lambda rows: np.array([MEMORISED if r in seen else fold * 100.0 + r for r in rows])


def test_every_out_of_fold_score_comes_from_the_member_that_did_not_train_on_the_row():
    labels, folds = _bag()
    builder = OutOfFoldBuilder(folds, labels)
    for fold, (train, held) in enumerate(fold_splits(folds)):
        builder.add(fold, train, held, _member(fold, train)(held))
    oof = builder.finish()
    rows = np.arange(folds.size)
    assert np.array_equal(oof.logits, folds * 100.0 + rows)  # row i's logit is member folds[i]'s
    assert not (oof.logits == MEMORISED).any()
    assert np.array_equal(oof.labels, labels)
    assert oof.scores[0] == pytest.approx(1 / (1 + math.exp(-oof.logits[0])))


def test_a_member_that_saw_a_row_it_scores_is_refused():
    labels, folds = _bag()
    splits = fold_splits(folds)
    train, held = splits[1]
    leaky_train = np.union1d(train, held[:2])
    builder = OutOfFoldBuilder(folds, labels)
    with pytest.raises(ValueError) as error:
        builder.add(1, leaky_train, held, _member(1, leaky_train)(held))
    assert str(error.value) == f"member 1 trained on rows it scores: {held[0]}, {held[1]}"


def test_a_member_must_score_exactly_its_own_fold():
    labels, folds = _bag()
    splits = fold_splits(folds)
    builder = OutOfFoldBuilder(folds, labels)
    train, held = splits[0]
    with pytest.raises(ValueError, match=r"^member 0 must score exactly the rows of fold 0$"):
        builder.add(0, train, np.append(held, splits[1][1][0]), np.zeros(held.size + 1))
    with pytest.raises(ValueError, match=r"^member 0 must score exactly the rows of fold 0$"):
        builder.add(0, train, held[1:], np.zeros(held.size - 1))
    with pytest.raises(ValueError, match=r"^member 0: 3 logits for \d+ held-out rows$"):
        builder.add(0, train, held, np.zeros(3))
    builder.add(0, train, held, np.zeros(held.size))
    with pytest.raises(ValueError) as error:
        builder.add(0, train, held, np.zeros(held.size))
    assert str(error.value).startswith(f"member 0: rows already scored by another member: {held[0]}, ")
    missing = int((folds != 0).sum())
    with pytest.raises(ValueError) as error:
        builder.finish()
    assert str(error.value).startswith(f"{missing} rows have no out-of-fold score: ")


def test_verify_out_of_fold_checks_the_member_and_its_training_rows():
    folds = np.array([0, 1, 0, 1])
    verify_out_of_fold(folds, folds, {0: [1, 3], 1: [0, 2]})
    with pytest.raises(ValueError, match=r"^row 2 of fold 0 was scored by member 1$"):
        verify_out_of_fold(folds, [0, 1, 1, 1], {0: [1, 3], 1: [0, 2]})
    with pytest.raises(ValueError, match=r"^member 1 trained on rows it scored: 3$"):
        verify_out_of_fold(folds, folds, {0: [1, 3], 1: [0, 2, 3]})


def _written(tmp_path):
    labels, folds = _bag(n=12, k=2)
    builder = OutOfFoldBuilder(folds, labels)
    for fold, (train, held) in enumerate(fold_splits(folds)):
        builder.add(fold, train, held, np.linspace(-3.1, 2.7, held.size) / 7)  # logits with many digits
    oof = builder.finish()
    names = ["train.csv"] * 8 + ["val.csv"] * 4
    csv_rows = [*range(1, 9), *range(1, 5)]
    images = [f"img/{i}, a \"quoted\" name.png" for i in range(12)]
    path = write_oof_scores(tmp_path / "run" / "oof_scores.csv", oof, csv_names=names, csv_rows=csv_rows, images=images)
    return path, oof, names, csv_rows, images


def test_oof_scores_csv_round_trips_exactly(tmp_path):
    path, oof, names, csv_rows, images = _written(tmp_path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "row,csv,csv_row,image,label,fold,logit,score"
    assert tuple(lines[0].split(",")) == OOF_COLUMNS
    assert lines[1].startswith('0,train.csv,1,"img/0, a ""quoted"" name.png",')
    table = read_oof_scores(path)
    assert np.array_equal(table.oof.logits, oof.logits)  # repr: every bit comes back
    assert np.array_equal(table.oof.folds, oof.folds) and np.array_equal(table.oof.labels, oof.labels)
    assert table.csv == tuple(names) and table.csv_row.tolist() == csv_rows and table.image == tuple(images)
    assert [p.name for p in path.parent.iterdir()] == ["oof_scores.csv"]  # no temporary file left


def _rewrite(path, line, column, value):
    import csv
    import io

    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"))))
    rows[line - 1][OOF_COLUMNS.index(column)] = value
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


@pytest.mark.parametrize(
    ("line", "column", "value", "message"),
    [
        (1, "fold", "member", "line 1: the header must be row,csv,csv_row,image,label,fold,logit,score"),
        (3, "label", "2", "line 3: label must be 0 or 1 (got 2)"),
        (4, "row", "7", "line 4: row 7, expected 2 (rows are numbered in order from 0)"),
        (5, "logit", "nan", "line 5: logit must be a finite number (got nan)"),
        (6, "fold", "x", "line 6: row, csv_row, label and fold must be integers, logit and score numbers"),
        (7, "score", "0.5", "line 7: score 0.5 is not sigmoid(logit "),
    ],
)
def test_a_bad_line_is_one_line_naming_the_file_and_line(tmp_path, line, column, value, message):
    path, *_ = _written(tmp_path)
    _rewrite(path, line, column, value)
    with pytest.raises(RunError) as error:
        read_oof_scores(path)
    assert str(error.value).startswith(f"{path}: {message}")
    assert "\n" not in str(error.value)


def test_a_fold_of_one_class_and_oversized_or_odd_files_are_refused(tmp_path, monkeypatch):
    path, oof, *_ = _written(tmp_path)
    # move every row of fold 1 into one class: its member's held-out AUROC would be undefined
    for i in np.flatnonzero(oof.folds == 1):
        _rewrite(path, int(i) + 2, "label", "1")
    with pytest.raises(RunError, match=r": fold 1 holds one class only; not a bag's out-of-fold scores$"):
        read_oof_scores(path)
    with pytest.raises(RunError, match=r": not a regular file; out-of-fold scores are oof_scores.csv$"):
        read_oof_scores(tmp_path)
    monkeypatch.setattr(oof_module, "MAX_OOF_BYTES", 100)
    with pytest.raises(RunError, match=rf": {path.stat().st_size} bytes, more than the 100 an oof_scores.csv may have$"):
        read_oof_scores(path)
