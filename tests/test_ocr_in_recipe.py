"""`data.ocr`: empty text_info is filled by an OCR engine during run (and eval), cached by image content."""

import csv
import json


def _blank(src, dst):
    dst.mkdir()
    for split in ("train", "val", "test"):
        rows = list(csv.DictReader(open(src / f"{split}.csv", encoding="utf-8")))
        with open(dst / f"{split}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["local_image_path", "label", "text_info"])
            writer.writeheader()
            for row in rows:
                writer.writerow({**row, "local_image_path": str(src / row["local_image_path"]), "text_info": ""})


def ocr_recipe(tiny_recipe, data, cache, engine="fake_ocr"):
    return tiny_recipe(
        data={"base_dir": str(data), "ocr": {"engine": engine, "lang": "eng"}}, cache={"dir": str(cache)}
    )


def test_run_fills_empty_text_by_ocr_once_per_image(cli, tiny_recipe, demo_data, tmp_path):
    data = tmp_path / "blank"
    _blank(demo_data, data)
    log = tmp_path / "ocr.log"
    recipe = ocr_recipe(tiny_recipe, data, tmp_path / "cache")
    cli("run", recipe, "--out", tmp_path / "one", "--quiet", env={"MMCORE_FAKE_OCR_LOG": str(log)})
    predictions = json.loads((tmp_path / "one" / "test_predictions.json").read_text())
    assert all(p["text"].startswith("tone ") for p in predictions)  # OCR text reached the model
    reads = len(log.read_text().splitlines())
    assert reads == 64 + 32 + 32  # every image read once

    cli("run", recipe, "--out", tmp_path / "two", "--quiet", env={"MMCORE_FAKE_OCR_LOG": str(log)})
    assert len(log.read_text().splitlines()) == reads  # second run: all from the OCR cache


def test_unknown_ocr_engine_is_a_recipe_error(cli, tiny_recipe, demo_data, tmp_path):
    recipe = ocr_recipe(tiny_recipe, demo_data, tmp_path, engine="tesseract5")
    result = cli("show", recipe, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{recipe}: data.ocr.engine: unknown OCR engine 'tesseract5'; did you mean")


class CountingHashlib:
    """Stands in for ``hashlib`` inside mmcore.io: counts the files ``file_sha1`` hashes."""

    def __init__(self):
        self.calls = 0

    def sha1(self, *args, **kwargs):
        import hashlib

        self.calls += 1
        return hashlib.sha1(*args, **kwargs)


def test_a_run_hashes_each_image_once_for_checks_ocr_and_feature_cache(
    tiny_recipe, demo_data, registry, tmp_path, monkeypatch
):
    import mmcore.io
    from mmcore.commands.evaluate import evaluate_run
    from mmcore.commands.run import run_training
    from mmcore.data.csvs import load_splits
    from mmcore.data.memo import ImageHashes
    from mmcore.recipe import load_recipe

    data = tmp_path / "blank"
    _blank(demo_data, data)
    log = tmp_path / "ocr.log"
    monkeypatch.setenv("MMCORE_FAKE_OCR_LOG", str(log))
    path = ocr_recipe(tiny_recipe, data, tmp_path / "cache")
    recipe = load_recipe(path, registry=registry)
    images = {str(p) for split in load_splits(recipe.data).values() for p in split.paths}
    hashlib = CountingHashlib()
    monkeypatch.setattr(mmcore.io, "hashlib", hashlib)
    quiet = lambda *args, **kwargs: None  # noqa: E731

    run_dir = run_training(recipe, recipe_path=path, out=tmp_path / "one", registry=registry, progress=False, echo=quiet)

    assert hashlib.calls == len(images) == 128  # duplicate check, OCR fill, vision cache: one hash each
    assert len(log.read_text().splitlines()) == 128  # the OCR stage did read every image
    assert list((tmp_path / "cache").glob("v1/features/*/*.index.npy"))  # and the feature cache was filled
    predictions = json.loads((run_dir / "test_predictions.json").read_text())
    assert all(p["text"].startswith("tone ") for p in predictions)

    hashlib.calls = 0
    assert None not in ImageHashes.for_recipe(recipe)(sorted(images))
    assert hashlib.calls == 0  # the next run knows every image from the cache's file records

    evaluate_run(run_dir, out=tmp_path / "eval", registry=registry, progress=False, echo=quiet)
    evaluated = json.loads((tmp_path / "eval" / "test_predictions.json").read_text())
    assert [p["text"] for p in evaluated] == [p["text"] for p in predictions]  # eval has the OCR stage too
    assert len(log.read_text().splitlines()) == 128  # ... served from the OCR cache
