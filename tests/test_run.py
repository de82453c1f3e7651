"""`mmcore run` and `mmcore eval` end to end, as subprocesses, checking every output by content."""

import json
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

MODALITIES = ["multimodal", "vision_only", "text_only"]



def _run(cli, tiny_recipe, tmp_path, modality):
    path = tiny_recipe(
        f"{modality}.toml",
        experiment=f"tiny_{modality}",
        text={"name": "none" if modality == "vision_only" else "fake_text"},
        pooling={"name": "attention"},
        train={"modality": modality, "epochs": 2},
    )
    out = tmp_path / f"run-{modality}"
    return out, cli("run", path, "--out", out, "--quiet")


@pytest.mark.parametrize("modality", MODALITIES)
def test_run_writes_every_output_and_eval_reproduces_it(cli, tiny_recipe, demo_data, tmp_path, modality):
    out, result = _run(cli, tiny_recipe, tmp_path, modality)
    assert f"== tiny_{modality} ==" in result.stdout and "test AUROC" in result.stdout

    # status + resolved recipe
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    recipe = tomllib.loads((out / "recipe.toml").read_text())
    assert recipe["train"]["modality"] == modality and recipe["train"]["epochs"] == 2

    # predictions: one per test row, scores consistent with the metrics in results.json
    predictions = json.loads((out / "test_predictions.json").read_text())
    assert len(predictions) == 32
    assert set(predictions[0]) == {"row", "path", "text", "label", "score", "calibrated_score", "prediction"}
    results = json.loads((out / "results.json").read_text())
    from sklearn.metrics import roc_auc_score

    labels = [p["label"] for p in predictions]
    scores = [p["calibrated_score"] for p in predictions]
    assert results["test"]["at_threshold"]["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    threshold = results["decision"]["threshold"]
    assert all(p["prediction"] == (p["calibrated_score"] >= threshold) for p in predictions)
    assert results["selected_epoch"] in (1, 2) and len(results["history"]) == 2
    assert results["val"]["val_auroc"] == max(h["val_auroc"] for h in results["history"])

    # test_report.md: errors first, most confident error on top
    report = (out / "test_report.md").read_text()
    assert report.startswith("# Test report")

    # checkpoint: plain data, loadable with weights_only=True
    ckpt = torch.load(out / "checkpoint_best.ckpt", weights_only=True)
    assert ckpt["format"] == "mmcore.checkpoint" and ckpt["epoch"] == results["selected_epoch"]
    assert any(k.startswith("head.") for k in ckpt["model"])
    assert ckpt["decision"]["threshold"] == threshold

    # TensorBoard events read back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "val/auroc", "val/loss"} <= set(scalars)
    val_auroc = [e.value for e in events.Scalars("val/auroc")]
    assert val_auroc == pytest.approx([h["val_auroc"] for h in results["history"]], abs=1e-6)
    assert any(tag.startswith("lr/") for tag in scalars)

    # eval rebuilds the model from recipe + checkpoint and reproduces the scores
    eval_out = tmp_path / f"eval-{modality}"
    cli("eval", out, "--data", Path(demo_data) / "test.csv", "--out", eval_out, "--quiet")
    again = json.loads((eval_out / "test_predictions.json").read_text())
    assert [p["path"] for p in again] == [p["path"] for p in predictions]
    np.testing.assert_allclose([p["score"] for p in again], [p["score"] for p in predictions], atol=1e-5)
    assert (eval_out / "results.json").is_file() and (eval_out / "test_report.md").is_file()
