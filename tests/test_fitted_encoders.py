"""Encoders fitted on the training split (``fits_on_train``): the n-gram encoder end to end.

``mmcore run`` fits it on train before any feature is cached; its fitted state lives in the
checkpoint as plain tensors; ``eval`` and ``predict`` restore it and reproduce the run's scores.
"""

import csv
import json

import pytest
import torch

pytest.importorskip("mmcore_text_ngrams")


def _scores(path):
    return {row["path"]: row["score"] for row in json.loads(path.read_text())}


@pytest.fixture(scope="module")
def ngram_runs(tmp_path_factory, demo_data):
    """Three finished runs through the real CLI: text_only ngrams, multimodal with concat(fake_text, ngrams), and
    the exportable multimodal concat(minilm tiny, ngrams) (the shipped real-data recipes' text, at test size)."""
    import tomli_w
    from tiny import tiny_recipe_data

    from conftest import mmcore_cli

    tmp = tmp_path_factory.mktemp("ngrams")
    runs = {}
    for name, tables in {
        "text_only": dict(text={"name": "ngrams", "params": {"n_features": 256}}, train={"modality": "text_only", "epochs": 2}),
        "multimodal": dict(
            text={"name": "concat", "params": {"encoders": [{"name": "fake_text"}, {"name": "ngrams", "params": {"n_features": 128}}]}},
            train={"epochs": 2},
        ),
        "concat_minilm": dict(
            text={"name": "concat", "params": {"encoders": [
                {"name": "minilm", "params": {"tiny": True}}, {"name": "ngrams", "params": {"n_features": 128}}]}},
            train={"epochs": 2},
        ),
    }.items():
        recipe = tmp / f"{name}.toml"
        data = tiny_recipe_data(demo_data, cache={"dir": str(tmp / "cache")}, logging={"tensorboard": False}, **tables)
        recipe.write_text(tomli_w.dumps(data))
        mmcore_cli("run", recipe, "--out", tmp / name, "--quiet")
        runs[name] = tmp / name
    return runs


@pytest.mark.parametrize("name", ["text_only", "multimodal"])
def test_fitted_state_is_in_the_checkpoint_as_plain_tensors(ngram_runs, name):
    ckpt = torch.load(ngram_runs[name] / "checkpoint_best.ckpt", weights_only=True)
    prefix = "text." if name == "text_only" else "text.parts.1."
    idf = ckpt["model"][prefix + "idf_char"]
    assert int(ckpt["model"][prefix + "fitted"]) == 1
    assert idf.shape == ((256,) if name == "text_only" else (128,)) and float(idf.max()) > 1.0  # fitted, not the initial ones


@pytest.mark.parametrize("name", ["text_only", "multimodal"])
def test_eval_and_predict_reproduce_the_run_scores(ngram_runs, name, tmp_path, demo_data):
    from conftest import mmcore_cli

    run = ngram_runs[name]
    expected = _scores(run / "test_predictions.json")
    mmcore_cli("eval", run, "--out", tmp_path / "eval", "--quiet")  # the scoring path, as the run scored
    again = _scores(tmp_path / "eval" / "test_predictions.json")
    assert again.keys() == expected.keys()
    assert max(abs(again[k] - expected[k]) for k in expected) < 1e-6

    mmcore_cli("predict", run, demo_data / "test.csv", "-o", tmp_path / "scored.csv", "--quiet")
    with open(tmp_path / "scored.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_name = {k.rsplit("/", 1)[-1]: v for k, v in expected.items()}
    predicted = {row["local_image_path"].rsplit("/", 1)[-1]: float(row["score"]) for row in rows}
    assert predicted.keys() == by_name.keys()
    assert max(abs(predicted[k] - by_name[k]) for k in by_name) < 1e-6


def test_the_fit_sees_only_the_training_split(ngram_runs, demo_data):
    """The idf in the checkpoint is what a fit on train.csv's texts gives (not val's or test's)."""
    import pandas as pd

    from mmcore.testing import build

    texts = pd.read_csv(demo_data / "train.csv", keep_default_na=False)["text_info"].astype(str).tolist()
    encoder = build("text", "ngrams", {"n_features": 256})
    encoder.fit([" ".join(t.split()) for t in texts])
    ckpt = torch.load(ngram_runs["text_only"] / "checkpoint_best.ckpt", weights_only=True)
    torch.testing.assert_close(ckpt["model"]["text.idf_word"], encoder.idf_word)
    torch.testing.assert_close(ckpt["model"]["text.idf_char"], encoder.idf_char)


def test_concat_params_errors_name_their_key(recipe_file, cli):
    bad = recipe_file('[text]\nname = "concat"\nparams = { encoders = [{ name = "fake_text" }] }\n')
    result = cli("show", bad, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "text.params.encoders: must list at least two text encoders ({ name = ..., params = {...} })"
    )


@pytest.fixture(scope="module")
def ngram_bundles(ngram_runs, tmp_path_factory):
    """``mmcore export`` (the real CLI, ONNX, the parity gate on the validation split) of the exportable runs."""
    from conftest import mmcore_cli

    tmp = tmp_path_factory.mktemp("ngram-bundles")
    bundles = {}
    for name in ("text_only", "concat_minilm"):
        mmcore_cli("export", ngram_runs[name], "--out", tmp / name, "--quiet", "--safetensors")
        bundles[name] = tmp / name
    return bundles


@pytest.mark.parametrize("name", ["text_only", "concat_minilm"])
def test_export_passes_parity_and_the_bundle_predicts_the_run_scores(ngram_runs, ngram_bundles, name, tmp_path, demo_data):
    """The featurizer in inputs.json (no pickle), the fitted IDF in the weights, and the run's test scores through onnxruntime."""
    from safetensors.torch import load_file

    from conftest import mmcore_cli, scores_by_image

    run, bundle = ngram_runs[name], ngram_bundles[name]
    parity = json.loads((bundle / "parity.json").read_text())
    assert parity["passed"] is True and parity["rows_compared"] == 32
    assert parity["max_abs_score_diff"] <= 1e-4 and parity["decision_agreement"] == 1.0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["bundle_format"] == 5
    text = json.loads((bundle / "inputs.json").read_text())["text"]
    if name == "text_only":
        assert manifest["graph"]["inputs"] == ["word_tf", "char_tf"]
        featurizer = text["featurizer"]
        assert not (bundle / "tokenizer").exists()
        idf_key = "text.idf_char"
    else:
        assert manifest["graph"]["text_inputs"] == ["text0.input_ids", "text0.token_type_ids", "text0.attention_mask",
                                                    "text1.word_tf", "text1.char_tf"]
        assert [p.name for p in (bundle / "tokenizers" / "text0").iterdir()] == ["tokenizer.json"]  # format 5
        assert text["parts"][0]["fast_tokenizer"]["pad_token"] == "[PAD]"
        featurizer = text["parts"][1]["featurizer"]
        idf_key = "text.parts.1.idf_char"
    assert featurizer["class"] == "text/ngrams/NgramFeaturizer" and "module" not in featurizer  # by registry name
    assert "idf" not in json.dumps(featurizer)  # the fitted state is in the graph's weights, not on the host side
    ckpt = torch.load(run / "checkpoint_best.ckpt", weights_only=True)
    assert torch.equal(load_file(str(bundle / "model.safetensors"))[idf_key], ckpt["model"][idf_key].cpu())

    mmcore_cli("predict", bundle, demo_data / "test.csv", "-o", tmp_path / "scored.csv", "--quiet")
    expected = scores_by_image(run / "test_predictions.json")
    predicted = scores_by_image(tmp_path / "scored.csv")
    assert predicted.keys() == expected.keys()
    assert max(abs(predicted[k] - expected[k]) for k in expected) < 1e-4


def test_serve_scores_a_concat_bundle_as_predict_does(ngram_bundles, tmp_path, demo_data):
    """One request to ``mmcore serve BUNDLE`` (tokenizer + featurizer on the host): predict's score for that row."""
    import httpx
    from serving import Server

    from conftest import mmcore_cli

    bundle = ngram_bundles["concat_minilm"]
    mmcore_cli("predict", bundle, demo_data / "test.csv", "-o", tmp_path / "scored.csv", "--quiet")
    with open(tmp_path / "scored.csv", newline="") as f:
        row = next(r for r in csv.DictReader(f) if r["text_info"].strip())
    server = Server(bundle, "--text", "required")
    try:
        response = httpx.post(f"{server.url}/predict", timeout=60, data={"text": row["text_info"]},
                              files={"image": ("ad.jpg", (demo_data / row["local_image_path"]).read_bytes(), "image/jpeg")})
    finally:
        assert server.stop() == 0
    assert response.status_code == 200, response.text
    assert response.json()["score"] == pytest.approx(float(row["score"]), abs=1e-6)


def test_a_concat_with_a_part_that_cannot_be_exported_is_refused_in_one_line(ngram_runs, tmp_path, cli):
    """concat(fake_text, ngrams): fake_text has no tokenizer and no host featurizer; the line names the concat entry."""
    out = tmp_path / "never"
    result = cli("export", ngram_runs["multimodal"], "--out", out, "--quiet", check=False)
    assert result.returncode != 0
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert line.startswith("text.params.encoders[0] ('fake_text'): cannot be exported: "), line
    assert not out.exists() and list(tmp_path.iterdir()) == []
