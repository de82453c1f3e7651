"""Fault injection: ``mmcore run`` is SIGKILLed at seeded random moments (during the feature-cache
fill, an epoch, a checkpoint write, the final evaluation) and resumed each time; it must end with
exactly the predictions of an uninterrupted run. And a full disk (an injected ENOSPC) on the cache
and on the output directory.

The kills are real SIGKILLs of a real ``python -m mmcore run``. A small harness around the CLI
only announces each phase on stderr and, for the phase about to be killed, widens it (a short
sleep inside it) so that the kill lands inside that phase rather than next to it.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: announces phases ("@@cache", "@@checkpoint", "@@epoch", "@@eval") and widens $MMCORE_FAULT_PHASE
HARNESS = r"""
import os, sys, time
phase = os.environ.get("MMCORE_FAULT_PHASE")
def mark(name):
    print(f"@@{name}", file=sys.stderr, flush=True)
    if name == phase:
        time.sleep(0.4)
real_replace = os.replace
def replace(src, dst, *args, **kwargs):  # between a temporary file's write and its rename
    name = os.path.basename(str(dst))
    if name in ("last.ckpt", "checkpoint_best.ckpt"):
        mark("checkpoint")
    elif os.sep + "features" + os.sep in str(dst):
        mark("cache")
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from mmcore.engine.loop import Trainer
from mmcore.engine.training import TrainingRun
train_epoch, score_test = Trainer.train_epoch, TrainingRun.score_test
def epoch(self, *args, **kwargs):
    mark("epoch")
    return train_epoch(self, *args, **kwargs)
def evaluate(self, *args, **kwargs):
    mark("eval")
    return score_test(self, *args, **kwargs)
Trainer.train_epoch, TrainingRun.score_test = epoch, evaluate
from mmcore.cli.main import main
sys.argv = ["mmcore", *sys.argv[1:]]
main()
"""

PHASES = ("cache", "epoch", "checkpoint", "eval")


def fault_recipe(tiny_recipe, cache):
    """Cached frozen features, 3 epochs of 4 steps, a checkpoint every 2 steps."""
    return tiny_recipe(
        "faults.toml",
        seed=11,
        train={"epochs": 3, "checkpoint_every_steps": 2, "early_stopping": {"patience": 0}},
        cache={"dir": str(cache)},
    )


def _scores(run_dir):
    return [(p["path"], p["score"]) for p in json.loads((run_dir / "test_predictions.json").read_text())]


def _kill_during(args, phase, delay, timeout=240):
    """Start the harness with ``args``; SIGKILL it ``delay`` s after it announces ``phase``.

    Returns True if it was killed, False if it finished first (the phase did not come).
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MMCORE_FAULT_PHASE": phase}
    proc = subprocess.Popen(
        [sys.executable, "-c", HARNESS, *map(str, args)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.time() + timeout
    try:
        for line in proc.stderr:
            if line.strip() == f"@@{phase}":
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            if time.time() > deadline:
                break
        proc.wait(timeout=60)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(cli, tiny_recipe, tmp_path):
    straight = tmp_path / "straight"
    cli("run", fault_recipe(tiny_recipe, tmp_path / "cache-straight"), "--out", straight, "--quiet")

    cache = tmp_path / "cache"
    recipe = fault_recipe(tiny_recipe, cache)
    out = tmp_path / "faulted"
    rng = random.Random(14)  # seeded: the same moments on every run of the test
    killed = []
    for phase in PHASES:
        if (out / "last.ckpt").is_file():
            args = ["run", "--resume", out, "--quiet"]
        else:  # killed before its first checkpoint: what the refusal says to do, start it again
            shutil.rmtree(out, ignore_errors=True)
            args = ["run", recipe, "--out", out, "--quiet"]
        if _kill_during(args, phase, delay=rng.uniform(0.0, 0.35)):
            killed.append(phase)
        if (out / "status.json").is_file() and json.loads((out / "status.json").read_text())["state"] == "completed":
            break
    assert killed == list(PHASES)  # every phase was hit once

    if (out / "last.ckpt").is_file():
        cli("run", "--resume", out, "--quiet")
    else:
        shutil.rmtree(out, ignore_errors=True)
        cli("run", recipe, "--out", out, "--quiet")
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    assert _scores(out) == _scores(straight)  # exactly, not approximately
    assert not list(cache.rglob("*.tmp"))  # the cache swept the temporary files of the killed fill
    leftovers = sorted(p.name for p in out.rglob("*.tmp"))
    if leftovers:
        pytest.xfail(
            f"temporary files of killed checkpoint writes are left in the run directory ({leftovers}): "
            "sweeping them when a run directory is reopened is mmcore/rundir.py's work (another branch)"
        )


def _enospc():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_on_the_cache_degrades_and_on_the_output_fails_with_one_line(registry, tiny_recipe, tmp_path, monkeypatch, capsys):
    from mmcore.commands.run import run_training
    from mmcore.engine import outputs
    from mmcore.errors import RunError
    from mmcore.recipe import load_recipe

    monkeypatch.setattr(outputs, "write_plots", lambda *a, **k: {})  # not what this is about, and slow
    monkeypatch.setattr(outputs, "write_html_report", lambda *a, **k: None)
    cache = tmp_path / "cache"
    path = fault_recipe(tiny_recipe, cache)
    recipe = load_recipe(path, registry=registry)
    real_replace = os.replace

    def full(kind):
        def replace(src, dst, *args, **kwargs):
            if (kind == "cache" and str(cache) in str(dst)) or (kind == "out" and Path(dst).name == "results.json"):
                _enospc()
            return real_replace(src, dst, *args, **kwargs)

        return replace

    # the cache disk is full: one warning naming it, the run completes without the cache
    monkeypatch.setattr(os, "replace", full("cache"))
    run_training(recipe, recipe_path=path, out=tmp_path / "a", registry=registry, progress=False, echo=lambda *a: None)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {cache}: feature cache: no space left on device; free some space or choose another disk; "
        "image checks are not remembered",
        f"warning: {cache}: feature cache: no space left on device; free some space or choose another disk; "
        "continuing without the feature cache (cache.required = true would stop here)",
    ]
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["feature_cache"] == {"vision": False, "text": False, "vision_storage": None}
    assert not list(cache.rglob("*.npy")) and not list(cache.rglob("*.tmp"))

    # the output disk is full when results.json is written: one line, status failed, checkpoints kept
    monkeypatch.setattr(os, "replace", full("out"))
    out = tmp_path / "b"
    with pytest.raises(RunError) as info:
        run_training(recipe, recipe_path=path, out=out, registry=registry, progress=False, echo=lambda *a: None)
    monkeypatch.setattr(os, "replace", real_replace)
    line = f"{out / 'results.json'}: could not write (No space left on device); nothing was written"
    assert str(info.value) == line
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "failed" and status["error"] == line
    assert (out / "checkpoint_best.ckpt").is_file() and not list(out.glob("*.tmp"))
