"""Resume after SIGKILL gives exactly the uninterrupted run's predictions; SIGTERM stops cleanly."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch


def resume_recipe(tiny_recipe, name="r.toml", **changes):
    """A run with everything that consumes randomness: workers, augmentation, dropout, modality dropout."""
    from mmcore.recipe import deep_merge

    tables = {
        "experiment": "resume",
        "seed": 7,
        "data": {"num_workers": 1},
        "pooling": {"name": "attention"},
        "head": {"params": {"dropout": 0.2}},
        "augmentation": {"name": "weak"},
        "train": {"epochs": 4, "batch_size": 8, "modality_dropout": 0.2, "checkpoint_every_steps": 2,
                  "early_stopping": {"patience": 0}},
    }
    return tiny_recipe(name, **deep_merge(tables, changes))


def _start(recipe, out):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "mmcore", "run", str(recipe), "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _wait_for_checkpoint(proc, last, condition, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before the checkpoint we wait for: {proc.communicate()}")
        if last.exists():
            try:
                state = torch.load(last, weights_only=True)
            except Exception:  # being replaced right now: atomic, so retry
                continue
            if condition(state):
                return state
        time.sleep(0.02)
    raise AssertionError("timed out waiting for last.ckpt")


def _scores(run_dir):
    return [(p["path"], p["score"]) for p in json.loads((run_dir / "test_predictions.json").read_text())]


@pytest.mark.slow
def test_sigkill_during_epoch_2_then_resume_equals_uninterrupted(cli, tiny_recipe, tmp_path):
    recipe = resume_recipe(tiny_recipe)
    cli("run", recipe, "--out", tmp_path / "straight", "--quiet")

    killed = tmp_path / "killed"
    proc = _start(recipe, killed)
    state = _wait_for_checkpoint(
        proc, killed / "last.ckpt", lambda s: s["epoch"] == 2 and not s["epoch_complete"] and s["batches_done"] > 0
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((killed / "status.json").read_text())["state"] == "running"  # killed: no chance to say more
    assert not (killed / "test_predictions.json").exists()
    assert state["global_step"] > 0

    result = cli("run", "--resume", killed, "--quiet")
    assert "resuming" in result.stdout and "from epoch 2" in result.stdout
    assert json.loads((killed / "status.json").read_text())["state"] == "completed"
    assert _scores(killed) == _scores(tmp_path / "straight")  # exactly, not approximately
    straight = json.loads((tmp_path / "straight" / "results.json").read_text())
    resumed = json.loads((killed / "results.json").read_text())
    assert [h["val_auroc"] for h in resumed["history"]] == [h["val_auroc"] for h in straight["history"]]


@pytest.mark.slow
def test_sigterm_finishes_the_step_writes_last_and_says_how_to_resume(cli, tiny_recipe, tmp_path):
    recipe = resume_recipe(tiny_recipe)
    out = tmp_path / "run"
    proc = _start(recipe, out)
    _wait_for_checkpoint(proc, out / "last.ckpt", lambda s: s["global_step"] >= 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert f"Resume with: mmcore run --resume {out}" in stderr
    assert json.loads((out / "status.json").read_text())["state"] == "interrupted"
    state = torch.load(out / "last.ckpt", weights_only=True)
    assert state["kind"] == "last" and set(state["rng"]) >= {"python", "numpy", "torch"}
    cli("run", "--resume", out, "--quiet")
    assert json.loads((out / "status.json").read_text())["state"] == "completed"


def test_resume_refuses_missing_finished_and_foreign_runs(cli, tiny_recipe, tmp_path):
    result = cli("run", "--resume", tmp_path / "nope", check=False)
    assert result.returncode == 4 and result.stderr.strip() == f"{tmp_path / 'nope'}: run directory not found"

    recipe = resume_recipe(tiny_recipe, train={"epochs": 1})
    done = tmp_path / "done"
    cli("run", recipe, "--out", done, "--quiet")
    result = cli("run", "--resume", done, check=False)
    assert result.stderr.strip() == f"{done}: run already completed; nothing to resume (start a new run instead)"

    (done / "status.json").write_text('{"state": "interrupted"}')
    other = resume_recipe(tiny_recipe, "other.toml", seed=8, train={"epochs": 1})
    result = cli("run", str(other), "--resume", done, check=False)
    assert result.stderr.strip() == (
        f"{done}: this run was started with another recipe (differs at seed); "
        f"resume it without a recipe: mmcore run --resume {done}"
    )
