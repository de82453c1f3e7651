"""Training options end to end: NaN policy, balanced sampler, modality dropout, TensorBoard extras."""

import json

import pytest
import torch


def nan_recipe(tiny_recipe, **train):
    # 64 train rows / batch 16 = 4 steps per epoch: NaN from the 5th step, in epoch 2
    return tiny_recipe(
        vision={"params": {"nan_after": 4}},
        train={"epochs": 2, "finetune_layers": -1, "early_stopping": {"patience": 0}, **train},
    )


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(cli, tiny_recipe, tmp_path):
    path = nan_recipe(tiny_recipe)
    out = tmp_path / "run"
    result = cli("run", path, "--out", out, "--quiet", check=False)
    assert result.returncode == 4
    assert result.stderr.strip() == (
        "non-finite loss (nan) at step 5 (epoch 2, batch 1); stopped, the last good checkpoint is kept "
        '(set train.on_nan = "skip" to skip such batches)'
    )
    assert json.loads((out / "status.json").read_text())["state"] == "failed"
    assert torch.load(out / "checkpoint_best.ckpt", weights_only=True)["epoch"] == 1
    assert torch.load(out / "last.ckpt", weights_only=True)["epoch"] == 1


def test_nan_loss_skip_policy_completes_and_counts(cli, tiny_recipe, tmp_path):
    path = nan_recipe(tiny_recipe, on_nan="skip")
    out = tmp_path / "run"
    cli("run", path, "--out", out, "--quiet")
    results = json.loads((out / "results.json").read_text())
    assert results["skipped_nan_steps"] == 4  # every batch of epoch 2


def test_balanced_sampler_draws_both_classes_equally():
    from mmcore.engine.sampling import EpochBatchSampler, balanced_weights

    labels = [1] * 10 + [0] * 90
    sampler = EpochBatchSampler(100, 100, seed=3, weights=balanced_weights(labels))
    drawn = [i for batch in sampler for i in batch]
    positives = sum(labels[i] for i in drawn)
    assert len(drawn) == 100 and 35 <= positives <= 65  # ~50 of 100, not ~10
    sampler.set_epoch(2)
    assert [i for batch in sampler for i in batch] != drawn  # a new draw each epoch


def test_modality_dropout_zeroes_one_modality_per_dropped_sample():
    from mmcore.model.classifier import _drop_modality

    torch.manual_seed(0)
    vision, text = torch.ones(1000, 4), torch.ones(1000, 3)
    v, t = _drop_modality(vision, text, 0.3)
    v_dropped, t_dropped = v.sum(1) == 0, t.sum(1) == 0
    assert not (v_dropped & t_dropped).any()  # never both
    assert 0.25 < (v_dropped | t_dropped).float().mean() < 0.35
    assert 0.4 < v_dropped.float().sum() / (v_dropped | t_dropped).float().sum() < 0.6


def test_modality_dropout_trains_end_to_end(cli, tiny_recipe, tmp_path):
    path = tiny_recipe(train={"modality_dropout": 0.5, "balanced_sampler": True})
    out = tmp_path / "run"
    cli("run", path, "--out", out, "--quiet")
    recipe = (out / "recipe.toml").read_text()
    assert "modality_dropout = 0.5" in recipe and "balanced_sampler = true" in recipe
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert "test/pr_curve" in events.Tags()["tensors"]  # PR curve in TensorBoard
    pr = events.Tensors("test/pr_curve")[-1]
    assert pr.tensor_proto.tensor_shape.dim[0].size == 6  # TP, FP, TN, FN, precision, recall


def _late_classifier(aux_weight, detach=False):
    from mmcore.builtin.fusion import LateFusion
    from mmcore.builtin.heads import MlpHead
    from mmcore.model.classifier import Classifier

    torch.manual_seed(0)
    return Classifier(
        modality="multimodal", vision=None, pooling=None, text=None, projection=None,
        fusion=LateFusion(5, 3, aux_weight=aux_weight, detach=detach), head=MlpHead(2, hidden=()),
    )


def _late_step(model):
    """(TrainStep over ``model`` with BCE, the BCE, a batch of cached features for it)."""
    from mmcore.engine.step import TrainStep

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    bce = torch.nn.BCEWithLogitsLoss()
    step = TrainStep(model, optimizer, scheduler, bce, device=torch.device("cpu"), dtype=None)
    batch = {"vision_feature": torch.randn(8, 5), "text_feature": torch.randn(8, 3),
             "label": torch.tensor([0.0, 1.0] * 4)}
    return step, bce, batch


@pytest.mark.parametrize("aux_weight", [0.0, 0.7])
def test_late_fusion_adds_each_modalitys_own_loss_in_training_only(aux_weight):
    model = _late_classifier(aux_weight)
    step, bce, batch = _late_step(model)
    model.train()
    loss = step.loss(dict(batch))
    with torch.no_grad():
        branches = model.fuse(batch["vision_feature"], batch["text_feature"]).fused
        fused = bce(model.head(branches), batch["label"])
        expected = fused + aux_weight * (bce(branches[:, 0], batch["label"]) + bce(branches[:, 1], batch["label"]))
        out = model(dict(batch))
    torch.testing.assert_close(loss, expected)
    assert (out.aux is None) == (aux_weight == 0)  # the output carries them: nothing is kept on the module
    model.eval()
    torch.testing.assert_close(step.loss(dict(batch)), fused)  # validation loss: the fused logit's alone


@pytest.mark.parametrize("detach", [True, False])
def test_late_fusion_detach_leaves_the_branches_to_their_own_losses(detach):
    model = _late_classifier(0.5, detach=detach).train()
    with torch.no_grad():
        model.head.layers[0].weight.copy_(torch.tensor([[0.8, -0.6]]))  # a combining weight that starts negative
    step, bce, batch = _late_step(model)
    step.loss(dict(batch)).backward()
    text_weight = model.fusion.text.layers[0].weight
    got, head_grad = text_weight.grad.clone(), model.head.layers[0].weight.grad.clone()
    model.zero_grad()
    branch = model.fusion.text(torch.nn.functional.normalize(batch["text_feature"], dim=-1))
    (0.5 * bce(branch, batch["label"])).backward()
    own = text_weight.grad
    assert torch.allclose(got, own) == detach  # detached: the text head learns from its own loss alone
    assert head_grad.abs().sum() > 0  # the combination still learns from the fused loss


def test_late_fusion_detach_needs_an_aux_weight(registry):
    from mmcore.validators import FieldError

    with pytest.raises(FieldError, match=r"must be > 0 with detach = true"):
        registry.get("fusion", "late").params_cls(aux_weight=0.0)
    assert registry.get("fusion", "late").params_cls(aux_weight=0.0, detach=False).aux_weight == 0.0


def test_late_fusion_trains_end_to_end_and_predict_reproduces_its_scores(cli, tiny_recipe, tmp_path, demo_data):
    import csv
    from pathlib import Path

    import tomli_w
    import tomllib

    path = tiny_recipe(head={"params": {"hidden": []}}, train={"epochs": 2, "modality_dropout": 0.2})
    recipe = tomllib.loads(path.read_text())
    recipe["fusion"] = {"name": "late", "params": {"aux_weight": 1.0}}  # the GMU's dim would be an unknown key
    path.write_text(tomli_w.dumps(recipe))
    out = tmp_path / "run"
    cli("run", path, "--out", out, "--quiet")
    assert 'name = "late"' in (out / "recipe.toml").read_text()
    expected = {Path(p["path"]).name: p["score"] for p in json.loads((out / "test_predictions.json").read_text())}
    cli("predict", out, Path(demo_data) / "test.csv", "-o", tmp_path / "scored.csv", "--quiet")
    with open(tmp_path / "scored.csv", newline="") as f:
        predicted = {Path(row["local_image_path"]).name: float(row["score"]) for row in csv.DictReader(f)}
    assert predicted.keys() == expected.keys()
    assert max(abs(predicted[k] - expected[k]) for k in expected) < 1e-6


@pytest.mark.parametrize("pos_weight,expected", [("auto", 48 / 16), (2.5, 2.5)])
def test_pos_weight_auto_comes_from_the_train_label_ratio(pos_weight, expected, registry):
    from mmcore.recipe.convert import structure

    reg = registry.get("loss", "bce")
    loss = reg.factory(structure({"pos_weight": pos_weight}, reg.params_cls, source="t"), (48, 16))
    logits, targets = torch.tensor([0.3, -1.2]), torch.tensor([1.0, 0.0])
    expected_loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, targets, pos_weight=torch.tensor(expected)
    )
    assert torch.allclose(loss(logits, targets), expected_loss)


def test_a_failure_while_setting_up_marks_the_run_failed(cli, tiny_recipe, tmp_path):
    """An error while the model is built (after the run directory exists) leaves status = failed."""
    path = tiny_recipe(train={"finetune_layers": 5})  # fake_cnn has 3 blocks
    out = tmp_path / "run"
    result = cli("run", path, "--out", out, "--quiet", check=False)
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"{path}: train.finetune_layers: 5 is more than the 3 blocks of vision encoder")
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == line
