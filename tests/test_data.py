"""CSV validation: every problem reported at once, one line each, naming the file and the row."""

from pathlib import Path

import pytest
from PIL import Image

from mmcore.data.csvs import load_splits, parse_label, read_split
from mmcore.errors import DataError


def write(path, text):
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def images(tmp_path):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / name)
    return tmp_path


def problems(*args, **kwargs):
    with pytest.raises(DataError) as info:
        read_split(*args, **kwargs)
    return info.value.problems


@pytest.mark.parametrize("value,expected", [("True", 1), ("false", 0), ("1", 1), ("0", 0), (" TRUE ", 1), ("yes", None), ("", None)])
def test_labels(value, expected):
    assert parse_label(value) == expected


def test_reads_rows_resolving_relative_paths_and_empty_text(images):
    csv = write(images / "s.csv", "local_image_path,label,text_info\na.jpg,True,50% off\nb.jpg,0,\n")
    split = read_split(csv, images)
    assert split.paths == (images / "a.jpg", images / "b.jpg")
    assert split.labels == (1, 0) and split.texts == ("50% off", "") and split.rows == (1, 2)


def test_missing_file_and_missing_columns(tmp_path):
    assert problems(tmp_path / "nope.csv") == [f"{tmp_path / 'nope.csv'}: file not found"]
    csv = write(tmp_path / "c.csv", "path,label\nx.jpg,True\n")
    assert problems(csv) == [
        f"{csv}: missing column 'local_image_path' (found: path, label)",
        f"{csv}: missing column 'text_info' (found: path, label)",
    ]


def test_bad_labels_and_missing_images_all_at_once(images):
    csv = write(images / "s.csv", "local_image_path,label,text_info\na.jpg,maybe,x\ngone.jpg,True,y\nb.jpg,False,\n")
    assert problems(csv, images) == [
        f"{csv}: row 1: bad label 'maybe' (expected True/False, 1/0 or true/false)",
        f"{csv}: row 2: image not found: {images / 'gone.jpg'}",
    ]


def test_first_ten_and_a_count(images):
    rows = "".join(f"missing{i}.jpg,True,\n" for i in range(25))
    csv = write(images / "s.csv", "local_image_path,label,text_info\n" + rows)
    found = problems(csv, images)
    assert len(found) == 11
    assert found[0] == f"{csv}: row 1: image not found: {images / 'missing0.jpg'}"
    assert found[-1] == f"{csv}: ... and 15 more missing images"


def test_all_splits_are_validated_together(images):
    from mmcore.recipe import DataConfig

    write(images / "train.csv", "local_image_path,label,text_info\na.jpg,True,\nb.jpg,nope,\n")
    write(images / "val.csv", "local_image_path,label\na.jpg,True\n")
    write(images / "test.csv", "local_image_path,label,text_info\na.jpg,True,\nb.jpg,False,\n")
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(base_dir=str(images)))
    assert info.value.problems == [
        f"{images / 'train.csv'}: row 2: bad label 'nope' (expected True/False, 1/0 or true/false)",
        f"{images / 'val.csv'}: missing column 'text_info' (found: local_image_path, label)",
    ]


def test_one_class_in_train_is_refused(images):
    from mmcore.recipe import DataConfig

    for split in ("train", "val", "test"):
        write(images / f"{split}.csv", "local_image_path,label,text_info\na.jpg,True,\nb.jpg,True,\n")
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(base_dir=str(images)))
    assert str(info.value) == f"{images / 'train.csv'}: train split has only one class (True); AUROC and training need both"


def test_run_reports_data_problems_before_training(cli, recipe_file, images):
    write(images / "train.csv", "local_image_path,label,text_info\na.jpg,True,\nb.jpg,perhaps,\n")
    write(images / "val.csv", "local_image_path,label,text_info\na.jpg,True,\nb.jpg,False,\n")
    write(images / "test.csv", "local_image_path,label,text_info\na.jpg,True,\nmissing.jpg,False,\n")
    recipe = recipe_file(
        f'[data]\nbase_dir = "{images}"\n[vision]\nname = "fake_cnn"\n[text]\nname = "fake_text"\n'
        '[pooling]\nname = "mean"\n'
    )
    result = cli("run", recipe, "--out", images / "run", check=False)
    assert result.returncode == 3
    assert result.stderr.splitlines() == [
        f"{images / 'train.csv'}: row 2: bad label 'perhaps' (expected True/False, 1/0 or true/false)",
        f"{images / 'test.csv'}: row 2: image not found: {images / 'missing.jpg'}",
    ]
    assert not (images / "run").exists()  # nothing started, nothing half-written
