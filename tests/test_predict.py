"""`mmcore predict`: unlabeled CSVs scored exactly as the run scored its test split."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmcore.cli.predict import predict_command

PREDICT = "from mmcore.cli.predict import predict_command; predict_command()"


def _python(*args, code=PREDICT):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, timeout=600
    )


def _write_recipe(tmp, demo_data, modality, on_bad_image, cache_enabled):
    import tomli_w
    from tiny import tiny_recipe_data

    recipe = tmp / f"{modality}.toml"
    data = tiny_recipe_data(
        demo_data,
        experiment=f"predict_{modality}",
        seed=5,
        data={"on_bad_image": on_bad_image},
        cache={"enabled": cache_enabled, "dir": str(tmp / "cache")},
        text={"name": "none" if modality == "vision_only" else "fake_text"},
        pooling={"name": "attention"},
        train={"modality": modality},
        logging={"tensorboard": False},
    )
    recipe.write_text(tomli_w.dumps(data))
    return recipe


def _multimodal_run(tmp, demo_data):
    """A finished multimodal run (cached features) that skips unreadable images: real `mmcore run`."""
    recipe = _write_recipe(tmp, demo_data, "multimodal", "skip", True)
    out = tmp / "run-multimodal"
    result = _python("run", recipe, "--out", out, "--quiet", code="from mmcore.cli.main import main; main()")
    assert result.returncode == 0, result.stderr
    return out


def _vision_only_run(tmp, demo_data, registry):
    """A finished vision_only run (images decoded in the loader) that stops at an unreadable image."""
    from mmcore.commands.run import run_training
    from mmcore.recipe import load_recipe

    recipe = _write_recipe(tmp, demo_data, "vision_only", "error", False)
    loaded = load_recipe(recipe, registry=registry)
    return run_training(loaded, recipe_path=recipe, out=tmp / "run-vision_only", registry=registry,
                        progress=False, echo=lambda line: None)


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_rows(path, rows, columns):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _check_against_run(run_dir, out_csv, input_rows):
    """Every output row carries its input columns and the run's own test scores for that image."""
    expected = {p["path"]: p for p in json.loads((run_dir / "test_predictions.json").read_text())}
    decision = json.loads((run_dir / "results.json").read_text())["decision"]
    rows = _rows(out_csv)
    assert [r["local_image_path"] for r in rows] == [r["local_image_path"] for r in input_rows]
    for row, given in zip(rows, input_rows):
        assert {k: row[k] for k in given} == given
        want = expected[row["local_image_path"]]
        assert float(row["score"]) == pytest.approx(want["score"], abs=1e-6)
        assert float(row["calibrated_score"]) == pytest.approx(want["calibrated_score"], abs=1e-6)
        assert row["prediction"] == str(float(row["calibrated_score"]) >= decision["threshold"])
        assert row["prediction"] == str(want["prediction"])
    return rows


def test_predict_with_a_multimodal_run(demo_data, tmp_path):
    """One real run; predict as a program, with labels and bad images, without text, unfinished."""
    multimodal_run = _multimodal_run(tmp_path, demo_data)

    # as a program: an unlabeled CSV (columns reordered) gets the run's own test scores (both score raw rows
    # in float32 through the one scoring path)
    test_rows = _rows(Path(demo_data) / "test.csv")
    unlabeled = _write_rows(tmp_path / "unlabeled.csv", test_rows, ["text_info", "local_image_path"])
    out = tmp_path / "scored.csv"
    result = _python(multimodal_run, unlabeled, "-o", out, "--base-dir", demo_data, "--batch-size", "5", "--quiet")
    assert result.returncode == 0, result.stderr
    rows = _check_against_run(multimodal_run, out, [{k: r[k] for k in ("text_info", "local_image_path")} for r in test_rows])
    assert list(rows[0]) == ["text_info", "local_image_path", "score", "calibrated_score", "prediction"]
    positives = sum(r["prediction"] == "True" for r in rows)
    assert f"scored 32 of 32 rows of {unlabeled} on cpu: {positives} predicted positive" in result.stdout
    assert f"wrote {out}" in result.stdout

    # new data scored: nothing goes into the feature cache (float32 from the raw rows) unless --cache asks
    fresh = _fresh_rows(tmp_path, demo_data, test_rows[:6])
    before = _cache_files(tmp_path / "cache")
    result = CliRunner().invoke(predict_command, [str(multimodal_run), str(fresh), "-o", str(tmp_path / "fresh.csv"), "--quiet"])
    assert result.exit_code == 0, result.output
    assert _cache_files(tmp_path / "cache") == before
    plain = [float(r["calibrated_score"]) for r in _rows(tmp_path / "fresh.csv")]
    result = CliRunner().invoke(predict_command, [str(multimodal_run), str(fresh), "-o", str(tmp_path / "cached.csv"),
                                                  "--quiet", "--cache"])
    assert result.exit_code == 0, result.output
    assert len(_cache_files(tmp_path / "cache")) > len(before)  # the control: --cache does write
    cached = [float(r["calibrated_score"]) for r in _rows(tmp_path / "cached.csv")]
    assert plain == pytest.approx(cached, abs=1e-3) and plain != cached  # float16 features round; float32 does not

    # a label column is kept; an unreadable image (on_bad_image = skip) leaves its row empty
    test_rows = _rows(Path(demo_data) / "test.csv")[:6]
    for row in test_rows:
        row["local_image_path"] = str(Path(demo_data) / row["local_image_path"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    rows_in = test_rows[:2] + [{"local_image_path": str(broken), "label": "", "text_info": "SALE"}] + test_rows[2:]
    source = _write_rows(tmp_path / "mixed.csv", rows_in, ["local_image_path", "label", "text_info"])
    out = tmp_path / "out" / "scored.csv"
    result = CliRunner().invoke(predict_command, [str(multimodal_run), str(source), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert len(rows) == 7
    assert rows[2]["local_image_path"] == str(broken)
    assert rows[2]["score"] == rows[2]["calibrated_score"] == rows[2]["prediction"] == ""
    expected = {p["path"]: p for p in json.loads((multimodal_run / "test_predictions.json").read_text())}
    for row in rows[:2] + rows[3:]:
        want = expected[os.path.relpath(row["local_image_path"], demo_data)]
        assert float(row["score"]) == pytest.approx(want["score"], abs=1e-6)
        assert row["label"] == str(want["label"])
    assert "scored 6 of 7 rows" in result.output
    assert '1 row skipped (unreadable images; score left empty, data.on_bad_image = "skip")' in result.output

    # a multimodal run needs text_info: one line naming the file, nothing written
    paths_only = _write_rows(tmp_path / "paths.csv", _rows(Path(demo_data) / "test.csv"), ["local_image_path", "label"])
    out = tmp_path / "never.csv"
    result = CliRunner().invoke(predict_command, [str(multimodal_run), str(paths_only), "-o", str(out)])
    assert result.exit_code == 3
    assert result.output.strip() == f"{paths_only}: missing column 'text_info' (found: local_image_path, label)"
    assert not out.exists()

    # an unfinished run is refused
    unfinished = tmp_path / "unfinished"
    shutil.copytree(multimodal_run, unfinished)
    (unfinished / "status.json").write_text(json.dumps({"state": "running"}))
    result = CliRunner().invoke(
        predict_command, [str(unfinished), str(Path(demo_data) / "test.csv"), "-o", str(tmp_path / "x.csv")]
    )
    assert result.exit_code == 4
    assert result.output.strip() == (
        f"{unfinished}: run is not complete (status: running); resume it with: mmcore run --resume {unfinished}"
    )
    assert not (tmp_path / "x.csv").exists()


def _cache_files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


def _fresh_rows(tmp_path, demo_data, rows):
    """Images and texts no run has seen (new content, new texts): a CSV of them."""
    from PIL import Image

    images = tmp_path / "fresh"
    images.mkdir()
    fresh = []
    for i, row in enumerate(rows):
        with Image.open(Path(demo_data) / row["local_image_path"]) as image:
            image.convert("RGB").resize((40, 44)).save(images / f"fresh_{i}.png")
        fresh.append({"local_image_path": str(images / f"fresh_{i}.png"), "text_info": f"never seen text number {i}"})
    return _write_rows(tmp_path / "fresh.csv.in", fresh, ["local_image_path", "text_info"])


@pytest.mark.parametrize("kind", ["run", "bundle"])
def test_device_cuda_where_there_is_none_is_one_line(kind, exportable_run, exported_bundle, demo_data, tmp_path):
    """--device cuda on a machine (or an onnxruntime) without CUDA: one line, exit 1, never a CPU fallback."""
    import onnxruntime
    import torch

    if torch.cuda.is_available() or "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    source = exportable_run if kind == "run" else exported_bundle
    out = tmp_path / "never.csv"
    result = _python(source, Path(demo_data) / "test.csv", "-o", out, "--device", "cuda", "--quiet")
    assert result.returncode == 1
    if kind == "run":
        assert result.stderr.strip() == (f"--device cuda: CUDA is not available to torch here (torch {torch.__version__}, "
                                         "torch.cuda.is_available() is False); use --device cpu or auto")
    else:
        providers = ", ".join(onnxruntime.get_available_providers())
        assert result.stderr.strip() == (
            f"--device cuda: this onnxruntime has no CUDAExecutionProvider (it has {providers}); install the GPU build: "
            "bash scripts/install.sh --gpu (or pip uninstall onnxruntime && pip install 'mmcore[serve-gpu]')")
    assert not out.exists()
    result = _python(source, Path(demo_data) / "test.csv", "-o", out, "--device", "gpu")
    assert result.returncode == 2 and "Invalid value for '--device': expected auto, cpu, cuda or cuda:N" in result.stderr


def test_predict_vision_only_needs_no_text_and_stops_at_a_bad_image(demo_data, tmp_path, registry):
    vision_only_run = _vision_only_run(tmp_path, demo_data, registry)
    test_rows = _rows(Path(demo_data) / "test.csv")
    images_only = _write_rows(tmp_path / "images.csv", test_rows, ["local_image_path"])
    out = tmp_path / "scored.csv"
    result = CliRunner().invoke(
        predict_command, [str(vision_only_run), str(images_only), "-o", str(out), "--base-dir", str(demo_data), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    rows = _check_against_run(vision_only_run, out, [{"local_image_path": r["local_image_path"]} for r in test_rows])
    assert list(rows[0]) == ["local_image_path", "score", "calibrated_score", "prediction"]

    # data.on_bad_image = "error": the unreadable row stops prediction and nothing is written
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    with_bad = _write_rows(
        tmp_path / "with_bad.csv",
        [{"local_image_path": str(Path(demo_data) / test_rows[0]["local_image_path"])}, {"local_image_path": str(broken)}],
        ["local_image_path"],
    )
    bad_out = tmp_path / "bad.csv"
    result = CliRunner().invoke(predict_command, [str(vision_only_run), str(with_bad), "-o", str(bad_out), "--quiet"])
    assert result.exit_code == 3
    first = result.output.splitlines()[0]
    assert first.startswith(f"{with_bad}: row 2: {broken}: ")
    assert not bad_out.exists()
