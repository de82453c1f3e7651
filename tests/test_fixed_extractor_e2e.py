"""A fixed feature extractor (``imagestats``, ``trainable = False``) through the real CLI.

``mmcore run`` caches its output (nothing of it trains) and trains the head on the cache;
``eval`` and ``predict`` reproduce the run's scores from raw images; ``mmcore export`` passes
the parity gate and the bundle scores as the run did; a recipe that asks it to train is one
line naming the file and the key.
"""

import json

import pytest

from conftest import scores_by_image

pytest.importorskip("mmcore_vision_imagestats")


@pytest.fixture(scope="module")
def stats_run(tmp_path_factory, demo_data):
    import tomli_w
    from tiny import tiny_recipe_data

    from conftest import mmcore_cli

    tmp = tmp_path_factory.mktemp("imagestats")
    data = tiny_recipe_data(
        demo_data,
        vision={"name": "imagestats", "params": {"size": 32}},
        train={"modality": "vision_only", "epochs": 3, "learning_rate": 0.1, "freeze_backbone": True, "finetune_layers": 0},
        cache={"dir": str(tmp / "cache")}, logging={"tensorboard": False},
    )
    data["vision"]["params"] = {"size": 32}  # replace the fake encoder's params, not merge into them
    recipe = tmp / "stats.toml"
    recipe.write_text(tomli_w.dumps(data))
    mmcore_cli("run", recipe, "--out", tmp / "run", "--quiet")
    return recipe, tmp / "run"


def test_the_run_caches_the_extractor_and_trains_only_the_head(stats_run):
    import torch

    _, run = stats_run
    results = json.loads((run / "results.json").read_text())
    assert results["feature_cache"]["vision"] is True
    assert results["test"]["at_threshold"]["auroc"] > 0.8  # the demo's rendered offers vs pictures: histograms tell them apart
    ckpt = torch.load(run / "checkpoint_best.ckpt", weights_only=True)
    assert not [key for key in ckpt["model"] if key.startswith("vision.")]  # nothing of the extractor to save
    assert results["trainable_parameters"]["vision"] == {"trainable": 0, "total": 0}
    assert results["trainable_parameters"]["head"]["trainable"] > 0


def test_eval_and_predict_reproduce_the_run_from_raw_images(stats_run, tmp_path, demo_data):
    from conftest import mmcore_cli

    _, run = stats_run
    expected = scores_by_image(run / "test_predictions.json")
    mmcore_cli("eval", run, "--out", tmp_path / "eval", "--quiet")  # the scoring path, as the run scored
    again = scores_by_image(tmp_path / "eval" / "test_predictions.json")
    assert again.keys() == expected.keys() and max(abs(again[k] - expected[k]) for k in expected) < 1e-6
    mmcore_cli("predict", run, demo_data / "test.csv", "-o", tmp_path / "scored.csv", "--quiet")
    predicted = scores_by_image(tmp_path / "scored.csv")
    assert predicted.keys() == expected.keys() and max(abs(predicted[k] - expected[k]) for k in expected) < 1e-5


def test_export_passes_parity_and_the_bundle_scores_as_the_run(stats_run, tmp_path, demo_data):
    from conftest import mmcore_cli

    _, run = stats_run
    bundle = tmp_path / "bundle"
    mmcore_cli("export", run, "--out", bundle, "--quiet")
    parity = json.loads((bundle / "parity.json").read_text())
    assert parity["passed"] is True and parity["max_abs_score_diff"] <= 1e-4
    mmcore_cli("predict", bundle, demo_data / "test.csv", "-o", tmp_path / "scored.csv", "--quiet")
    expected = scores_by_image(run / "test_predictions.json")
    predicted = scores_by_image(tmp_path / "scored.csv")
    assert predicted.keys() == expected.keys() and max(abs(predicted[k] - expected[k]) for k in expected) < 1e-4


def test_asking_it_to_train_is_one_line_naming_the_file_and_key(stats_run, tmp_path):
    from conftest import mmcore_cli

    recipe, _ = stats_run
    result = mmcore_cli("run", recipe, "--out", tmp_path / "never", "--set", "train.finetune_layers=-1", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (  # found at load, from the params class: no run directory is made
        f"{recipe} (--set train.finetune_layers): train.finetune_layers: vision encoder 'imagestats' is a fixed feature extractor with nothing "
        "to train (got -1); use freeze_backbone = true, finetune_layers = 0 and no LoRA"
    )
    assert not (tmp_path / "never").exists()
