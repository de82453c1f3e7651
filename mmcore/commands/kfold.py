"""k-fold training of a recipe: one member run per fold and every labelled row's out-of-fold score.

The labelled rows are the recipe's train + val splits, in that order. They are folded by
:func:`mmcore.data.folds.assign_folds`: stratified by label and grouped, so rows sharing an
image's content (its sha1, the key the feature cache uses), a ``group_column`` value or an
``extra_groups`` key (``mmcore audit``'s near-duplicate pairs) always share a fold. Member ``i``
is a normal ``mmcore run`` of the recipe (:func:`mmcore.commands.run.run_training`, the same
code) with its data pointed at two CSVs written under ``out/folds/fold-<i>/``: ``train.csv``
(every other fold) and ``val.csv`` (fold ``i``: selection, calibration and threshold are fitted
on it); the recipe's test split stays its test split. Its finished run directory is
``out/members/fold-<i>/`` and its ``recipe.toml`` names the fold CSVs, so any member can be
rerun alone.

Each member then scores its own held-out fold through the scoring path (the run's model in
float32 from raw rows, as ``mmcore eval`` scores), and
:class:`mmcore.evaluation.oof.OutOfFoldBuilder` collects the logits, refusing a row scored by a
member that trained on it; ``out/oof_scores.csv`` keeps them (:func:`write_oof_scores`).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import attrs
import numpy as np

from mmcore.data.csvs import load_splits, read_table, resolve_csv
from mmcore.data.folds import assign_folds, fold_splits, fold_summary, group_rows
from mmcore.data.memo import ImageHashes
from mmcore.data.split import Split
from mmcore.errors import DataError, RecipeError, RunError
from mmcore.evaluation.oof import OOF_FILE, OutOfFoldBuilder, write_oof_scores
from mmcore.io import write_json, write_text
from mmcore.ocr.fill import ocr_stage
from mmcore.rundir import make_directory

MEMBERS_DIR = "members"
FOLDS_DIR = "folds"
FOLDS_FILE = "folds.json"
LABELLED_SPLITS = ("train", "val")


@attrs.frozen(eq=False)
class FoldRuns:
    """What :func:`train_folds` made.

    ``members``: one finished run directory per fold (``out/members/fold-<i>/``), member ``i``
    held out fold ``i``; ``folds``: each labelled row's fold (int64 [N], train rows then val rows,
    in file order); ``oof``: the :class:`~mmcore.evaluation.oof.OutOfFoldScores`;
    ``oof_csv``: ``out/oof_scores.csv``.
    """

    members: tuple[Path, ...]
    folds: np.ndarray
    oof: object
    oof_csv: Path


@attrs.frozen(eq=False)
class LabelledRows:
    """The recipe's train + val rows as one :class:`Split`, and where each row came from."""

    split: Split
    csv_names: tuple[str, ...]

    @property
    def labels(self):
        return self.split.label_array()


def labelled_rows(recipe):
    """The recipe's train and val splits read (every problem one line) and joined, train first."""
    if recipe.data.format != "csv":
        raise RecipeError(f"data.format: k-fold training reads CSV splits, not {recipe.data.format!r}")
    splits = load_splits(recipe.data, names=LABELLED_SPLITS, cache=recipe.cache)
    parts = [splits[name] for name in LABELLED_SPLITS]
    joined = attrs.evolve(
        parts[0],
        paths=sum((p.paths for p in parts), ()),
        texts=sum((p.texts for p in parts), ()),
        labels=sum((p.labels for p in parts), ()),
        rows=sum((p.rows for p in parts), ()),
        raw_paths=sum((p.raw_paths for p in parts), ()),
        stats=None,
    )
    names = tuple(getattr(recipe.data, name) for name, part in zip(LABELLED_SPLITS, parts) for _ in range(len(part)))
    return LabelledRows(split=joined, csv_names=names)


def group_column_values(recipe, column):
    """The ``column`` of the train and val CSVs, train first (a missing column is one line naming the CSV)."""
    values = []
    for name in LABELLED_SPLITS:
        csv_path = resolve_csv(getattr(recipe.data, name), recipe.data.base_dir)
        frame = read_table(csv_path)
        if column not in frame.columns:
            raise DataError(f"{csv_path}: no column {column!r} to group by (found: {', '.join(frame.columns)})")
        values.extend(frame[column].tolist())
    return values


def fold_rows(recipe, rows, *, k, seed, group_column=None, extra_groups=(), hashes=None):
    """Each labelled row's fold: stratified by label, grouped by image content, ``group_column`` and ``extra_groups``."""
    hashes = hashes if hashes is not None else ImageHashes.for_recipe(recipe)
    keys = [hashes([str(path) for path in rows.split.paths])]
    if group_column is not None:
        keys.append(group_column_values(recipe, group_column))
    keys.extend(extra_groups)
    groups = group_rows(*keys)
    return assign_folds(rows.labels, groups, k, seed, what=f"{recipe.data.train} + {recipe.data.val}")


def _write_fold_csv(path, split, positions):
    """The rows at ``positions`` as a split CSV: absolute image paths, 1/0 labels, the texts as read."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["local_image_path", "label", "text_info"])
    for i in positions:
        writer.writerow([str(Path(split.paths[i]).resolve()), int(split.labels[i]), split.texts[i]])
    return write_text(path, buffer.getvalue())


def _member_recipe(recipe, train_csv, val_csv):
    """The recipe reading its training and validation rows from the fold's CSVs; the test split unchanged."""
    test = resolve_csv(recipe.data.test, recipe.data.base_dir)
    data = attrs.evolve(recipe.data, train=str(train_csv.resolve()), val=str(val_csv.resolve()), test=str(test))
    return attrs.evolve(recipe, data=data)


def _start_out(out):
    """``out`` as a new or empty folder (a bag is never trained over another)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{out}: exists and is not an empty folder; give k-fold training a new --out")
    make_directory(out, "k-fold output folder")
    return out


def score_held_out(member, split, *, registry=None, progress=False, desc=None):
    """Member run ``member``'s raw logits on every row of ``split`` (its held-out fold), through the scoring path."""
    from mmcore.scoring.rows import collect, score_rows
    from mmcore.scoring.run import RunScorer

    scorer = RunScorer(member, registry=registry)
    scored = collect(score_rows(scorer, split, fill_text=False, on_bad_image="skip", progress=progress, desc=desc))
    if scored.bad:
        raise DataError([*scored.bad, f"{member}: out-of-fold scores need every labelled row's image; fix or remove these rows"])
    return scored.logits[np.argsort(scored.positions, kind="stable")]


def train_folds(recipe, *, k=5, out, seed=0, group_column=None, registry=None, progress=True, echo=print,
                recipe_path=None, extra_groups=()):
    """Train ``recipe`` (a loaded recipe or its file) once per fold -> :class:`FoldRuns` (see the module docstring).

    ``k`` folds (at least 2) of train + val, folded with ``seed``; ``group_column``: a CSV column
    whose equal values keep rows in one fold; ``extra_groups``: more key columns (one key per
    labelled row) that group rows the same way. ``out`` must be a new or empty folder.
    """
    from mmcore.commands.run import run_training

    if isinstance(recipe, (str, Path)):
        from mmcore.recipe import load_recipe

        recipe_path = recipe_path or recipe
        recipe = load_recipe(recipe, registry=registry)
    recipe_path = recipe_path or "<recipe>"
    if k < 2:
        raise RecipeError(f"--folds: k-fold training needs at least 2 folds (got {k})")
    rows = labelled_rows(recipe)
    hashes = ImageHashes.for_recipe(recipe)
    folds = fold_rows(recipe, rows, k=k, seed=seed, group_column=group_column, extra_groups=extra_groups, hashes=hashes)
    out = _start_out(out)
    write_json(out / FOLDS_FILE, {"k": k, "seed": seed, "group_column": group_column,
                                  "folds": fold_summary(folds, rows.labels)})
    # the held-out rows are scored with the texts the members train on (OCR fills empty ones, cached)
    scored_split = ocr_stage({"labelled": rows.split}, recipe, registry=registry, hashes=hashes, progress=progress)["labelled"]
    builder = OutOfFoldBuilder(folds, rows.labels)
    members = []
    for member, (train_positions, held_out) in enumerate(fold_splits(folds)):
        fold_dir = out / FOLDS_DIR / f"fold-{member}"
        make_directory(fold_dir, "fold folder")
        train_csv = _write_fold_csv(fold_dir / "train.csv", rows.split, train_positions)
        val_csv = _write_fold_csv(fold_dir / "val.csv", rows.split, held_out)
        echo(f"fold {member + 1} of {k}: training on {train_positions.size} rows, holding out {held_out.size}")
        run_dir = run_training(_member_recipe(recipe, train_csv, val_csv), recipe_path=recipe_path,
                               out=out / MEMBERS_DIR / f"fold-{member}", registry=registry, progress=progress,
                               echo=echo)
        logits = score_held_out(run_dir, scored_split.subset(held_out), registry=registry, progress=progress,
                                desc=f"fold {member + 1} held out")
        builder.add(member, train_positions, held_out, logits)
        members.append(Path(run_dir))
    oof = builder.finish()
    oof_csv = write_oof_scores(out / OOF_FILE, oof, csv_names=rows.csv_names, csv_rows=rows.split.rows,
                               images=rows.split.raw_paths)
    echo(f"out-of-fold scores of {len(folds)} rows: {oof_csv}")
    return FoldRuns(members=tuple(members), folds=folds, oof=oof, oof_csv=Path(oof_csv))

