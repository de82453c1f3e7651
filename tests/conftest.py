"""Shared fixtures: a fresh registry with tiny fake encoders, and a small generated dataset."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # test helpers: `from tiny import ...`
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def registry():
    """Built-ins + the fake encoders, registered explicitly (no installed plugins)."""
    import mmcore_fake_encoders

    from mmcore.plugins.manager import make_registry

    return make_registry(load_entrypoints=False, extra_plugins=[("fake", mmcore_fake_encoders)])


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small generated ad-vs-not dataset (train 64 / val 32 / test 32)."""
    from mmcore.commands.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_train=64, n_val=32, n_test=32, size=(48, 48))


def write_recipe(path, text):
    path = Path(path)
    path.write_text(text, encoding="utf-8")
    return path


def mmcore_cli(*args, cwd=None, env=None, check=True, timeout=600):
    """Run the real ``mmcore`` console script in a subprocess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "mmcore", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"mmcore {' '.join(map(str, args))} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def scores_by_image(path):
    """``{image file name: score}`` of a run's ``test_predictions.json`` or a ``mmcore predict`` CSV."""
    import csv
    import json

    path = Path(path)
    if path.suffix == ".json":
        return {row["path"].rsplit("/", 1)[-1]: row["score"] for row in json.loads(path.read_text())}
    with open(path, newline="") as f:
        return {row["local_image_path"].rsplit("/", 1)[-1]: float(row["score"]) for row in csv.DictReader(f)}


@pytest.fixture
def cli():
    """``cli("run", recipe, ...)`` runs the mmcore CLI in a subprocess."""
    return mmcore_cli


@pytest.fixture
def recipe_file(tmp_path):
    """``recipe_file(text, name="r.toml")`` writes a recipe into tmp_path and returns its path."""

    def make(text, name="r.toml"):
        return write_recipe(tmp_path / name, text)

    return make


@pytest.fixture
def tiny_recipe(tmp_path, demo_data):
    """``tiny_recipe(name, train={"epochs": 2}, ...)``: tiny.TINY_RECIPE on ``demo_data`` with these tables merged in."""
    import tomli_w
    from tiny import tiny_recipe_data

    def make(name="tiny.toml", **tables):
        path = tmp_path / name
        path.write_text(tomli_w.dumps(tiny_recipe_data(demo_data, **tables)), encoding="utf-8")
        return path

    return make


@pytest.fixture(scope="session")
def exportable_run(tmp_path_factory, demo_data):
    """One finished run every export/serve test shares: fake_cnn + a tiny MiniLM (real tokenizer), 1 epoch."""
    import tomli_w
    from tiny import tiny_recipe_data

    from mmcore.commands.run import run_training
    from mmcore.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("exportable")
    recipe = tmp / "exportable.toml"
    recipe.write_text(tomli_w.dumps(tiny_recipe_data(
        demo_data, experiment="exportable", text={"name": "minilm", "params": {"tiny": True}},
        pooling={"name": "attention"}, cache={"dir": str(tmp / "cache")}, logging={"tensorboard": False},
    )), encoding="utf-8")
    return run_training(load_recipe(recipe), recipe_path=recipe, out=tmp / "run", progress=False, echo=lambda line: None)


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory, exportable_run):
    """``mmcore export`` of ``exportable_run`` (ONNX, parity on its validation split)."""
    from mmcore.commands.export import export_run

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    export_run(exportable_run, out, progress=False, echo=lambda line: None)
    return out


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium per test process for the HTML pages' tests (tests/chromium.py);
    without Chromium or selenium the test is skipped with the reason."""
    from chromium import MISSING, start_chromium

    if MISSING:
        pytest.skip(MISSING)
    driver = start_chromium()
    yield driver
    driver.quit()
