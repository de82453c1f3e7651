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
