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
