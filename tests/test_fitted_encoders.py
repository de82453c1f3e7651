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
    """Two finished runs through the real CLI: text_only ngrams, and multimodal with concat(fake_text, ngrams)."""
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
    mmcore_cli("eval", run, "--out", tmp_path / "eval", "--quiet")
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
