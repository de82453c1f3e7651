"""The Python API driven as a user would: train from DataFrames and CSVs, load a run or a bundle,
predict, predict_one from threads, evaluate, export; mistakes raise mmcore.errors kinds whose
message is the CLI's line."""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tiny import tiny_recipe_data

import mmcore
from mmcore.errors import DataError, RecipeError
from mmcore.textsource import MissingTextError

SPLITS = ("train", "val", "test")


def frames_of(demo_data):
    """The demo splits as DataFrames whose image column holds absolute paths (strings)."""
    frames = {}
    for name in SPLITS:
        frame = pd.read_csv(Path(demo_data) / f"{name}.csv", keep_default_na=False)
        frame["local_image_path"] = [str(Path(demo_data) / p) for p in frame["local_image_path"]]
        frames[name] = frame
    return frames


def test_predictions(run):
    return [row["score"] for row in json.loads((Path(run.dir) / "test_predictions.json").read_text())]


test_predictions.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def api_runs(tmp_path_factory, demo_data, registry):
    """The tiny recipe trained through the API five ways on the same data: the splits as CSV paths,
    as DataFrames of paths, of the files' bytes, of PIL images (the same files opened), and of paths
    and bytes mixed in one column."""
    tmp = tmp_path_factory.mktemp("api")
    recipe = tiny_recipe_data(demo_data, cache={"dir": str(tmp / "cache")}, logging={"tensorboard": False})
    frames = frames_of(demo_data)
    inputs = {
        "csv": {name: Path(demo_data) / f"{name}.csv" for name in SPLITS},
        "paths": frames,
        "bytes": {n: f.assign(local_image_path=[Path(p).read_bytes() for p in f.local_image_path]) for n, f in frames.items()},
        "pil": {n: f.assign(local_image_path=[Image.open(p) for p in f.local_image_path]) for n, f in frames.items()},
        "mixed": {n: f.assign(local_image_path=[Path(p).read_bytes() if k % 2 else p for k, p in enumerate(f.local_image_path)])
                  for n, f in frames.items()},  # paths and bytes in one column
    }
    return {kind: mmcore.train(recipe, out=tmp / kind, registry=registry, quiet=True, **splits)
            for kind, splits in inputs.items()}


def test_training_from_dataframes_equals_training_from_csvs(api_runs):
    by_csv = api_runs["csv"]
    reference = test_predictions(by_csv)
    assert len(reference) == 32
    for kind in ("paths", "bytes", "mixed"):  # the same files: the same bytes, hashes, pixels, batches -> identical
        assert test_predictions(api_runs[kind]) == reference, kind
        assert api_runs[kind].results["test"]["at_threshold"] == by_csv.results["test"]["at_threshold"]
    # PIL images are taken in as the decoder gives them; the demo's 48x48 JPEGs are below the size at which a
    # file is draft-decoded, so here they match exactly too (docs/python-api.md states the general tolerance)
    assert np.max(np.abs(np.asarray(test_predictions(api_runs["pil"])) - reference)) <= 1e-6
    # a split given as a DataFrame is named as such in the run's recipe
    assert api_runs["bytes"].recipe["data"]["train"] == "<train DataFrame>"
    assert api_runs["csv"].recipe["data"]["train"].endswith("train.csv")
    assert api_runs["csv"].report_path.is_file()


def test_in_memory_images_reach_the_feature_cache_by_content(api_runs, demo_data):
    """Bytes are keyed by their sha1 as their files are: the bytes and mixed runs added no feature to the
    cache the paths runs filled; PIL images are kept as PNG bytes, other content, so they have entries of their own."""
    from mmcore.data.csvs import read_split
    from mmcore.store.spaces import feature_spaces

    cache = Path(api_runs["csv"].recipe["cache"]["dir"])
    vision = [space for space in feature_spaces(cache) if space["encoder"] == "fake_cnn"]
    images = {p for name in ("train", "val") for p in read_split(Path(demo_data) / f"{name}.csv", demo_data).paths}
    assert [space["entries"] for space in vision] == [2 * len(images)]


def test_predict_on_a_dataframe_equals_mmcore_predict_on_the_csv(api_runs, demo_data, registry, tmp_path, cli):
    run = api_runs["csv"]
    model = mmcore.load(run.dir, registry=registry, quiet=True)
    test_csv = Path(demo_data) / "test.csv"
    cli("predict", run.dir, test_csv, "-o", tmp_path / "scored.csv", "--quiet")
    by_cli = pd.read_csv(tmp_path / "scored.csv")
    frame = frames_of(demo_data)["test"]
    for scored in (model.predict(frame), model.predict(test_csv)):
        assert list(scored.columns[-5:]) == ["score", "calibrated_score", "prediction", "text", "text_source"]
        assert scored["score"].tolist() == by_cli["score"].tolist()  # the same numbers, not only close
        assert scored["calibrated_score"].tolist() == by_cli["calibrated_score"].tolist()
        assert scored["prediction"].tolist() == by_cli["prediction"].tolist()
        has_text = frame.text_info.str.strip() != ""
        assert scored["text_source"].tolist() == ["client" if given else "none-optional" for given in has_text]
    # and they are the run's own scores of its test split (results.json = predict, the one scoring path)
    own = {Path(p["path"]).name: p["score"] for p in json.loads((run.dir / "test_predictions.json").read_text())}
    mine = dict(zip(frame.local_image_path.map(lambda p: Path(p).name), model.predict(frame)["score"]))
    assert max(abs(own[name] - mine[name]) for name in own) <= 1e-6


def test_evaluate_gives_what_mmcore_eval_writes(api_runs, demo_data, registry, tmp_path):
    run = api_runs["csv"]
    model = mmcore.load(run.dir, registry=registry, quiet=True)
    by_frame = model.evaluate(frames_of(demo_data)["test"], out=tmp_path / "frame")
    by_default = model.evaluate(out=tmp_path / "default")  # the run's test split, as `mmcore eval RUN`
    assert by_frame.metrics == by_default.metrics
    assert model.evaluate(Path(demo_data) / "test.csv", out=tmp_path / "csv").metrics == by_default.metrics
    assert by_frame.metrics["auroc"] == run.results["test"]["at_threshold"]["auroc"]
    assert by_frame.results["test"]["intervals"] == by_default.results["test"]["intervals"]
    assert json.loads((tmp_path / "frame" / "results.json").read_text())["test"] == by_frame.results["test"]


def test_predict_one_from_eight_threads_equals_serial(api_runs, demo_data, registry):
    model = mmcore.load(api_runs["csv"].dir, registry=registry, quiet=True, text="optional")  # some rows have no text
    frame = frames_of(demo_data)["test"].iloc[:16]
    items = [(Path(p).read_bytes() if k % 2 else p, text)
             for k, (p, text) in enumerate(zip(frame.local_image_path, frame.text_info))]
    serial = [model.predict_one(image, text=text) for image, text in items]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda item: model.predict_one(item[0], text=item[1]), items * 3))
    assert max(abs(a.score - b.score) for a, b in zip(serial * 3, threaded)) <= 1e-6
    assert [a.prediction for a in serial * 3] == [b.prediction for b in threaded]
    # one item scores as its row of a DataFrame does
    batch = model.predict(frame)["score"].to_numpy()
    assert np.max(np.abs(np.asarray([s.score for s in serial]) - batch)) <= 1e-6
    assert [s.text_source for s in serial] == ["client" if t.strip() else "none-optional" for t in frame.text_info]


def test_a_run_and_its_bundle_load_as_the_same_model(exportable_run, demo_data, tmp_path):
    run_model = mmcore.load(exportable_run, quiet=True)
    frame = frames_of(demo_data)["test"]
    summary = run_model.export(tmp_path / "bundle", data=frame, rows=8)  # parity rows from a DataFrame
    assert (summary.parity["rows_compared"], summary.parity["data"]) == (8, "DataFrame")
    with pytest.raises(mmcore.MmcoreError, match=r"^--out .*bundle: already exists; remove it or choose another folder$"):
        run_model.export(tmp_path / "bundle")  # the CLI's line, before any work
    bundle = mmcore.load(tmp_path / "bundle", quiet=True)
    assert (run_model.kind, bundle.kind) == ("run", "bundle")
    assert bundle.threshold == run_model.threshold
    gap = np.abs(bundle.predict(frame)["score"].to_numpy() - run_model.predict(frame)["score"].to_numpy())
    assert gap.max() <= 1e-5
    one = frame.iloc[0]
    assert abs(bundle.predict_one(Image.open(one.local_image_path), one.text_info).score
               - run_model.predict_one(Image.open(one.local_image_path), one.text_info).score) <= 1e-5


def test_export_quantizes_as_mmcore_export_does(exportable_run, demo_data, tmp_path):
    """Model.export(quantize=...) is export --quantize int8: the int8 bundle loads and scores as a model."""
    from mmcore.export.int8 import Int8Options

    run_model = mmcore.load(exportable_run, quiet=True)
    frame = frames_of(demo_data)["test"]
    with pytest.raises(ValueError, match=r"^quantize: 'int4'; give 'int8' or an Int8Options$"):
        run_model.export(tmp_path / "int4", data=frame, rows=8, quantize="int4")
    assert not (tmp_path / "int4").exists()
    run_model.export(tmp_path / "int8", data=frame, rows=8,  # a gate 8 rows of a tiny model can pass
                     quantize=Int8Options(min_agreement=0.5, max_auroc_drop=0.5))
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    gap = np.abs(mmcore.load(tmp_path / "int8", quiet=True).predict(frame)["score"].to_numpy()
                 - run_model.predict(frame)["score"].to_numpy())
    assert 0 < gap.max() < 0.2  # quantized: close to the float32 run, not equal to it


def test_a_bad_recipe_key_raises_the_clis_line(tiny_recipe, cli):
    recipe = tiny_recipe()
    by_cli = cli("run", recipe, "--set", "train.lr=0.1", check=False)
    assert by_cli.returncode == 2
    with pytest.raises(RecipeError) as raised:
        mmcore.train(recipe, overrides={"train.lr": 0.1}, quiet=True)
    assert str(raised.value) == by_cli.stderr.strip()
    assert str(raised.value) == f"{recipe} (--set train.lr): train.lr: unknown key (did you mean learning_rate?)"
    with pytest.raises(RecipeError, match=r"^<recipe>: train\.lr: unknown key \(did you mean learning_rate\?\)$"):
        mmcore.train({"data": {"base_dir": "."}, "train": {"lr": 0.1}}, quiet=True)
    with pytest.raises(RecipeError, match=r"^<recipe>: train\.lr: unknown key"):
        mmcore.train('[data]\nbase_dir = "."\n[train]\nlr = 0.1\n', quiet=True)


def test_dataframe_rows_are_validated_like_csv_rows(api_runs, demo_data, registry):
    model = mmcore.load(api_runs["csv"].dir, registry=registry, quiet=True)
    frame = frames_of(demo_data)["test"].iloc[:4].astype(object)
    frame.index = [10, 11, 12, 13]
    wrong = frame.copy()
    wrong.loc[11, "local_image_path"] = 7
    wrong.loc[12, "local_image_path"] = b"x" * (50_000_000 + 1)
    wrong.loc[13, "label"] = "maybe"
    with pytest.raises(DataError) as raised:
        model.evaluate(wrong)
    assert str(raised.value).splitlines() == [  # every problem at once, rows named by the frame's index
        "DataFrame: row 11: local_image_path: expected a path, the image's bytes or a PIL image (got int)",
        "DataFrame: row 12: local_image_path: image file too large (50000001 bytes > data.max_image_bytes = 50000000)",
        "DataFrame: row 13: bad label 'maybe' (expected True/False, 1/0 or true/false)",
    ]
    with pytest.raises(DataError, match=r"^DataFrame: missing column 'text_info' \(found: local_image_path, label\)$"):
        model.predict(frame[["local_image_path", "label"]])
    renamed = frame.rename(columns={"local_image_path": "image", "text_info": "caption"})
    scored = model.predict(renamed, columns={"image": "image", "text": "caption"})
    assert scored["score"].tolist() == model.predict(frame)["score"].tolist()


def test_predict_one_follows_the_text_rule(api_runs, demo_data, registry):
    image = frames_of(demo_data)["test"].local_image_path.iloc[0]
    strict = mmcore.load(api_runs["csv"].dir, registry=registry, quiet=True)
    with pytest.raises(MissingTextError, match=r"^text: missing \(this model reads text: send it with each image\)$"):
        strict.predict_one(image)
    lenient = mmcore.load(api_runs["csv"].dir, text="optional", registry=registry, quiet=True)
    empty = lenient.predict_one(image)
    assert (empty.text, empty.text_source) == ("", "none-optional")
    with pytest.raises(DataError, match=r"^item: row 0: local_image_path: image too large \(4000x4000 = 16000000 "
                                        r"pixels > data.max_image_pixels = 1000000\)$"):
        model = mmcore.load(api_runs["csv"].dir, registry=registry, quiet=True)
        model.scorer.recipe_data["data"]["max_image_pixels"] = 1_000_000
        model.predict_one(Image.new("RGB", (4000, 4000)), text="x")


def test_a_row_left_out_keeps_its_place_with_empty_scores(api_runs, demo_data, registry):
    """Under data.on_bad_image = "skip" an unreadable image's row is left out: NaN scores, NA prediction."""
    model = mmcore.load(api_runs["csv"].dir, registry=registry, quiet=True)
    model.scorer.recipe_data["data"]["on_bad_image"] = "skip"  # as a run trained with it
    frame = frames_of(demo_data)["test"].iloc[:5].astype(object)
    whole = model.predict(frame)
    frame.iloc[2, frame.columns.get_loc("local_image_path")] = b"not an image"
    scored = model.predict(frame)
    assert scored["score"].isna().tolist() == [False, False, True, False, False]
    assert scored["prediction"].isna().tolist() == [False, False, True, False, False]
    assert pd.isna(scored["text"].iloc[2]) and pd.isna(scored["text_source"].iloc[2])
    kept = [0, 1, 3, 4]
    assert scored["score"].iloc[kept].tolist() == whole["score"].iloc[kept].tolist()
    assert scored["prediction"].iloc[kept].tolist() == whole["prediction"].iloc[kept].tolist()


def test_a_run_trained_on_dataframes_asks_for_its_rows_again(api_runs, registry, tmp_path):
    """The run keeps no copy of a DataFrame's rows: re-reading its splits is one line saying so."""
    model = mmcore.load(api_runs["bytes"].dir, registry=registry, quiet=True)
    with pytest.raises(DataError, match=r"^<test DataFrame>: the run's test split was a DataFrame \(mmcore\.train\), "
                                        r"which the run keeps no copy of; give the rows to evaluate with --data CSV$"):
        model.evaluate(out=tmp_path / "eval")
    assert not (tmp_path / "eval").exists()
    from mmcore.commands.export import parity_rows  # export's default rows (fake_text itself cannot be exported)
    from mmcore.rundir import RunDir

    with pytest.raises(DataError, match=r"^<val DataFrame>: the run's val split was a DataFrame .*; choose parity rows "
                                        r"with --data CSV$"):
        parity_rows(RunDir(api_runs["bytes"].dir).load_recipe(registry), None, 8)


def test_the_api_sits_beside_the_plugin_face_and_import_stays_cheap():
    import subprocess
    import sys

    assert {"train", "load", "Model", "Run", "Prediction", "Evaluation", "make_demo_data", "DataError", "RunError",
            "RecipeError", "MmcoreError", "hookimpl", "VisionEncoder", "EncoderParams"} <= set(dir(mmcore))
    assert mmcore.load is mmcore.api.load and mmcore.Model is mmcore.api.Model
    probe = "import sys, mmcore; print(sorted(m for m in ('torch', 'pandas', 'mmcore.api') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_load_silences_library_bars_when_stderr_is_no_terminal(exportable_run, monkeypatch):
    """A script whose stderr goes to a log gets no "Loading weights" bars, as the CLI's commands don't."""
    import io
    import sys

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log: no terminal
    mmcore.load(exportable_run, device="cpu")
    assert os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1"
