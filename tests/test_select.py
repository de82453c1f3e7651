"""``mmcore select``: never an already-labelled or already-chosen row, rounds that exclude earlier picks,
deterministic for a seed, uncertainty in margin order, and one-line mistakes."""

import csv
import shutil

import numpy as np
import pytest

from mmcore.commands.select import SELECTED_COLUMNS, joint_embeddings, select
from mmcore.errors import DataError, MmcoreError

QUIET = {"progress": False, "echo": lambda line: None}


@pytest.fixture(scope="module")
def pool(tmp_path_factory, demo_data):
    """40 fresh demo rows plus, as rows 41 and 42, byte copies of two of the run's training images."""
    from mmcore.commands.demo import make_demo_dataset

    root = tmp_path_factory.mktemp("pool")
    fresh = make_demo_dataset(root / "fresh", n_train=4, n_val=4, n_test=40, size=(48, 48), seed=7)
    with open(fresh / "test.csv", newline="") as handle:
        rows = [[str(fresh / r["local_image_path"]), r["text_info"]] for r in csv.DictReader(handle)]
    with open(demo_data / "train.csv", newline="") as handle:
        train = list(csv.DictReader(handle))
    for k in (0, 1):
        copy = root / f"copy-{k}.jpg"
        shutil.copyfile(demo_data / train[k]["local_image_path"], copy)
        rows.append([copy.name, train[k]["text_info"]])
    with open(root / "pool.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["local_image_path", "text_info"])
        writer.writerows(rows)
    return root / "pool.csv"


def _read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_rounds_never_return_labelled_or_chosen_rows_and_repeat_for_a_seed(exportable_run, pool, tmp_path):
    first = select(exportable_run, pool, budget=10, out=tmp_path / "round1.csv", **QUIET)
    rows = _read(tmp_path / "round1.csv")
    assert tuple(rows[0]) == SELECTED_COLUMNS and [int(r["order"]) for r in rows] == list(range(1, 11))
    assert [int(r["pool_row"]) for r in rows] == list(first.pool_rows)
    assert first.excluded == 2 and not {41, 42} & set(first.pool_rows)  # the copies of labelled rows
    assert all("most uncertain" in r["reason"] and "distance" in r["reason"] for r in rows)
    again = select(exportable_run, pool, budget=10, out=tmp_path / "again.csv", **QUIET)
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "round1.csv").read_bytes()

    second = select(exportable_run, pool, budget=10, exclude=[tmp_path / "round1.csv"], out=tmp_path / "round2.csv",
                    seed=1, **QUIET)
    assert second.excluded == 12 and not set(second.pool_rows) & (set(first.pool_rows) | {41, 42})
    rest = select(exportable_run, pool, budget=100, strategy="diversity",
                  exclude=[tmp_path / "round1.csv", tmp_path / "round2.csv"], out=tmp_path / "rest.csv", **QUIET)
    assert sorted(rest.pool_rows) == sorted(set(range(1, 41)) - set(first.pool_rows) - set(second.pool_rows))
    assert again.pool_rows == first.pool_rows


def test_uncertainty_is_the_margin_order(exportable_run, pool, tmp_path):
    select(exportable_run, pool, budget=5, strategy="uncertainty", out=tmp_path / "u.csv", **QUIET)
    rows = _read(tmp_path / "u.csv")
    margins = [float(r["margin"]) for r in rows]
    assert margins == sorted(margins) and all(r["distance"] == "" for r in rows)
    assert rows[0]["reason"] == f"margin {margins[0]:.3f} to the threshold"


def test_joint_embeddings_weigh_each_modality_alike():
    joined = joint_embeddings({"text": np.array([[3.0, 4.0]]), "image": np.array([[0.0, 0.0, 10.0]])})
    np.testing.assert_allclose(joined, [[0.0, 0.0, 1.0, 0.6, 0.8]])


def test_user_mistakes_are_one_line(exportable_run, exported_bundle, pool, tmp_path):
    with pytest.raises(MmcoreError, match=rf"^--out {pool}: is the pool CSV; write the selection to another file$"):
        select(exportable_run, pool, budget=3, out=pool, **QUIET)
    with pytest.raises(MmcoreError, match=rf"^--exclude {pool}: is the pool itself; give an earlier round's selected.csv$"):
        select(exportable_run, pool, budget=3, exclude=[pool], out=tmp_path / "x.csv", **QUIET)
    with pytest.raises(MmcoreError, match=r"a bundle; select needs the run directory \(its labelled rows and embeddings\)$"):
        select(exported_bundle, pool, budget=3, out=tmp_path / "x.csv", **QUIET)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,text_info\na.jpg,x\n")
    with pytest.raises(DataError) as missing:
        select(exportable_run, bad, budget=3, out=tmp_path / "x.csv", **QUIET)
    assert len(missing.value.problems) == 1 and missing.value.problems[0].startswith(f"{bad}: missing column 'local_image_path'")
    assert not (tmp_path / "x.csv").exists()
