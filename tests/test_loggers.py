"""Weights & Biases as an optional logger, offline."""

import glob

import pytest


def test_wandb_offline_logs_metrics_and_config_into_the_run_dir(cli, tiny_recipe, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    recipe = tiny_recipe(experiment="wb", logging={"wandb": True, "wandb_project": "mmcore-tests"})
    cli("run", recipe, "--out", out, "--quiet",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    (log,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = open(log, "rb").read()
    for key in (b"train/loss", b"val/auroc", b"lr/head", b"fake_cnn", b"mmcore-tests"):
        assert key in data, key
    assert (out / "tensorboard").is_dir()  # TensorBoard stays on alongside


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _hparams(log_dir):
    """The hparams session's values, from the event file ``add_hparams`` writes."""
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = _events(log_dir)
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = HParamsPluginData.FromString(content).session_start_info
    return {key: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind")) for key, value in start.hparams.items()}


def test_tensorboard_logs_every_scalar_on_the_global_step(cli, tiny_recipe, tmp_path, demo_data):
    import csv
    import json
    import math

    out = tmp_path / "run"
    batch, epochs = 16, 2
    cli("run", tiny_recipe(train={"epochs": epochs, "batch_size": batch}), "--out", out, "--quiet")
    with open(demo_data / "train.csv", newline="", encoding="utf-8") as handle:
        rows = sum(1 for _ in csv.DictReader(handle))
    per_epoch = math.ceil(rows / batch)
    ends = [per_epoch * e for e in range(1, epochs + 1)]
    events = _events(out / "tensorboard")
    steps = lambda tag: [e.step for e in events.Scalars(tag)]  # noqa: E731

    assert steps("val/auroc") == ends  # the same axis as train/*: the curves overlay
    assert steps("train/epoch_loss") == ends
    assert [(e.step, e.value) for e in events.Scalars("epoch")] == [(s, float(i + 1)) for i, s in enumerate(ends)]
    every_step = list(range(1, epochs * per_epoch + 1))
    assert steps("train/loss") == every_step  # one point per optimizer step, not a running mean
    assert steps("train/grad_norm") == every_step and all(e.value > 0 for e in events.Scalars("train/grad_norm"))
    assert steps("lr/head") == every_step
    assert steps("train/samples_per_s")[-1] == ends[-1] and all(e.value > 0 for e in events.Scalars("train/samples_per_s"))

    # the per-step losses are the steps' own: weighted by their batch sizes they give the epoch's mean loss
    sizes = [batch] * (per_epoch - 1) + [rows - batch * (per_epoch - 1)]
    history = json.loads((out / "results.json").read_text())["history"]
    losses = [e.value for e in events.Scalars("train/loss")]
    for epoch, row in enumerate(history):
        part = losses[epoch * per_epoch : (epoch + 1) * per_epoch]
        assert sum(loss * n for loss, n in zip(part, sizes)) / rows == pytest.approx(row["train_loss"], rel=1e-4)

    hparams = _hparams(out / "tensorboard")
    assert hparams["seed"] == 3 and hparams["train.batch_size"] == batch
    assert hparams["train.finetune_layers"] is not None and "train.lora.enabled" in hparams
    assert hparams["train.lora.enabled"] == 0  # torch's add_hparams stores a bool as a number
    assert hparams["eval.threshold"] and isinstance(hparams["eval.threshold"], str)
    assert hparams["vision.name"] == "fake_cnn" and hparams["vision.params.width"] == 8
    final = json.loads((out / "results.json").read_text())["test"]["at_threshold"]
    assert events.Scalars("hparam/test_auroc")[0].value == pytest.approx(final["auroc"])  # with the final test metrics
