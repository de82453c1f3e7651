"""k-fold training (mmcore.commands.kfold): members are real runs, out-of-fold scores come from the
member that never saw the row (asserted by construction), folds keep groups and copies together."""

import csv
import json
import shutil

import numpy as np
import pytest
import tomli_w
from tiny import tiny_recipe_data

from mmcore.commands.kfold import train_folds
from mmcore.errors import DataError, RecipeError, RunError
from mmcore.evaluation.oof import read_oof_scores
from mmcore.rundir import RunDir


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def grouped_data(tmp_path_factory, demo_data):
    """The demo splits with a ``campaign`` column (groups of 4 rows, one spanning train and val) and
    one val image a byte copy, under another name, of a train image."""
    root = tmp_path_factory.mktemp("grouped")
    for name in ("train", "val", "test"):
        rows = _rows(demo_data / f"{name}.csv")
        for i, row in enumerate(rows):
            row["local_image_path"] = str((demo_data / row["local_image_path"]).resolve())
            row["campaign"] = f"{name}-{i // 4}"
        if name == "val":
            rows[0]["campaign"] = "train-0"  # joins train rows 0-3 to val row 0
            copy = (root / "copy-of-train-5.jpg").resolve()
            shutil.copyfile(demo_data / _rows(demo_data / "train.csv")[5]["local_image_path"], copy)
            rows[1]["local_image_path"] = str(copy)
        with open(root / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def bag(tmp_path_factory, grouped_data, registry):
    tmp = tmp_path_factory.mktemp("bag")
    recipe = tmp / "tiny.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe_data(
        grouped_data, cache={"dir": str(tmp / "cache")}, logging={"tensorboard": False, "progress": False},
    )), encoding="utf-8")
    lines = []
    runs = train_folds(recipe, k=3, out=tmp / "bag", seed=1, group_column="campaign", registry=registry,
                       progress=False, echo=lines.append)
    return runs, recipe, lines


def _images(csv_path):
    return [row["local_image_path"] for row in _rows(csv_path)]


def test_each_rows_score_comes_from_the_member_that_held_it_out(bag, grouped_data):
    runs, _, lines = bag
    labelled = [str(p) for p in _images(grouped_data / "train.csv") + _images(grouped_data / "val.csv")]
    assert len(runs.members) == 3 and runs.folds.shape == (len(labelled),)
    assert lines[0] == f"fold 1 of 3: training on {int((runs.folds != 0).sum())} rows, holding out {int((runs.folds == 0).sum())}"
    for member, run_dir in enumerate(runs.members):
        assert run_dir.name == f"fold-{member}" and run_dir.parent.name == "members"
        assert RunDir(run_dir).status()["state"] == "completed"
        recipe = RunDir(run_dir).recipe_data()
        trained_on = set(_images(recipe["data"]["train"]))
        held_out = _images(recipe["data"]["val"])
        mine = [labelled[i] for i in np.flatnonzero(runs.folds == member)]
        # by construction: the member validated on exactly its fold and trained on none of it
        assert held_out == mine
        assert trained_on.isdisjoint(held_out)
        assert len(trained_on) + len(held_out) == len(labelled)
        # its out-of-fold logits are its own validation: the AUROC it selected its epoch on
        ours = runs.oof.logits[runs.folds == member]
        labels = runs.oof.labels[runs.folds == member]
        from mmcore.evaluation.metrics import rank_auroc

        assert rank_auroc(ours, labels) == pytest.approx(RunDir(run_dir).results()["val"]["val_auroc"], abs=1e-6)


def test_oof_scores_csv_reads_back_as_the_bag(bag, grouped_data):
    runs, recipe, _ = bag
    table = read_oof_scores(runs.oof_csv)
    assert runs.oof_csv.name == "oof_scores.csv"
    np.testing.assert_array_equal(table.oof.folds, runs.folds)
    np.testing.assert_array_equal(table.oof.logits, runs.oof.logits)
    train, val = _rows(grouped_data / "train.csv"), _rows(grouped_data / "val.csv")
    assert table.csv == ("train.csv",) * len(train) + ("val.csv",) * len(val)
    assert table.csv_row.tolist() == list(range(1, len(train) + 1)) + list(range(1, len(val) + 1))
    assert table.image[len(train) + 1] == val[1]["local_image_path"]
    assert table.oof.labels.tolist() == [int(r["label"] == "True") for r in train + val]


def test_groups_and_copies_never_straddle_folds(bag, grouped_data):
    runs, _, _ = bag
    rows = _rows(grouped_data / "train.csv") + _rows(grouped_data / "val.csv")
    for campaign in {row["campaign"] for row in rows}:
        assert len({int(runs.folds[i]) for i, row in enumerate(rows) if row["campaign"] == campaign}) == 1
    n_train = len(_rows(grouped_data / "train.csv"))
    assert runs.folds[n_train] == runs.folds[0]  # val row 0 shares campaign train-0
    assert runs.folds[n_train + 1] == runs.folds[5]  # val row 1 is a byte copy of train row 5
    summary = json.loads((runs.oof_csv.parent / "folds.json").read_text())
    assert [f["rows"] for f in summary["folds"]] == np.bincount(runs.folds).tolist()


def test_user_mistakes_are_one_line_before_any_training(tmp_path, grouped_data, registry):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe_data(grouped_data)), encoding="utf-8")
    with pytest.raises(RecipeError, match=r"^--folds: k-fold training needs at least 2 folds \(got 1\)$"):
        train_folds(recipe, k=1, out=tmp_path / "a", registry=registry)
    with pytest.raises(DataError) as missing:
        train_folds(recipe, k=2, out=tmp_path / "b", group_column="shop", registry=registry)
    assert missing.value.problems == [
        f"{grouped_data / 'train.csv'}: no column 'shop' to group by (found: local_image_path, label, text_info, campaign)"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(RunError, match=r"full: exists and is not an empty folder; give k-fold training a new --out$"):
        train_folds(recipe, k=2, out=tmp_path / "full", registry=registry)
    with pytest.raises(DataError, match=r"^train.csv \+ val.csv: 40 folds need at least 40 groups of rows, there are 23 \(rows"
                                        r" sharing an image, a text or a group value are one group\); use at most 23 folds$"):
        train_folds(recipe, k=40, out=tmp_path / "c", group_column="campaign", registry=registry)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
