"""Weights & Biases as an optional logger, offline."""

import glob

import pytest

TINY = """
experiment = "wb"
[data]
base_dir = "{data}"
num_workers = 0
[vision]
name = "fake_cnn"
params = {{ width = 8 }}
[text]
name = "fake_text"
[pooling]
name = "mean"
[train]
epochs = 1
batch_size = 16
[logging]
wandb = true
wandb_project = "mmcore-tests"
progress = false
"""


def test_wandb_offline_logs_metrics_and_config_into_the_run_dir(cli, recipe_file, demo_data, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    cli("run", recipe_file(TINY.format(data=demo_data)), "--out", out, "--quiet",
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    (log,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = open(log, "rb").read()
    for key in (b"train/loss", b"val/auroc", b"lr/head", b"fake_cnn", b"mmcore-tests"):
        assert key in data, key
    assert (out / "tensorboard").is_dir()  # TensorBoard stays on alongside
