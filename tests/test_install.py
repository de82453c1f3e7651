"""A plain install works outside the checkout, and the recipe errors a newcomer meets say what to do.

The wheel test builds real wheels of mmcore and the two plugins the demo uses (``pip wheel``,
not editable), installs them into a fresh folder and runs the installed ``mmcore demo`` from a
directory with no ``recipes/``; the checkout's ``mmcore`` is not importable there.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmcore.errors import RecipeError
from mmcore.plugins.known import KNOWN, providing_package
from mmcore.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
DEMO_PLUGINS = ("vision-resnet", "text-sentence-transformers")


def pip(*args, cwd=None):
    result = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                            capture_output=True, text=True, cwd=cwd, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_a_wheel_installed_outside_the_checkout_runs_the_demo(tmp_path):
    wheels, target, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "work"
    work.mkdir()
    sources = [REPO, *(REPO / "plugins" / name for name in DEMO_PLUGINS)]
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), *map(str, sources))
    built = sorted(wheels.glob("*.whl"))
    assert len(built) == 3
    pip("install", "--no-deps", "--target", str(target), *map(str, built))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MMCORE_LOAD_PLUGINS")}
    env.update(PYTHONPATH=str(target), MMCORE_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")

    where = subprocess.run([sys.executable, "-c", "import mmcore, mmcore_vision_resnet; print(mmcore.__file__)"],
                           cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(target)  # the wheel's mmcore, not the checkout's
    assert (target / "mmcore" / "recipes" / "demo.toml").is_file() and (target / "mmcore" / "py.typed").is_file()

    demo = subprocess.run([str(target / "bin" / "mmcore"), "demo", "--quiet", "--set", "train.epochs=1"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert not (work / "recipes").exists()
    (run_dir,) = (work / "runs" / "demo").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["data"]["test"] == 80 and results["epochs_trained"] == 1
    assert f"test AUROC     {results['test']['at_threshold']['auroc']:.4f}" in demo.stdout
    assert "at 0.5" not in demo.stdout and "on the calibrated score" in demo.stdout


def test_demo_checks_the_recipe_before_making_the_dataset(cli, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('experiment = "demo"\n[train]\nepochs = "many"\n')
    result = cli("demo", "--recipe", bad, "--data", tmp_path / "data", cwd=tmp_path, check=False)
    assert result.returncode == 2 and "train.epochs" in result.stderr
    assert not (tmp_path / "data").exists()


def test_unknown_name_hint_names_the_package_that_provides_it(registry):
    from mmcore.plugins.registry import UnknownComponentError

    with pytest.raises(UnknownComponentError) as info:
        registry.get("text", "minilm")
    message = str(info.value)
    assert "'minilm' is provided by mmcore-text-sentence-transformers: pip install mmcore-text-sentence-transformers" in message
    assert "./plugins/text-<name>" not in message
    assert providing_package("vision", "resnet18") == "mmcore-vision-resnet"


def test_known_names_match_the_plugins_in_the_repository():
    import tomllib

    for package, names in ((p, n) for kind in KNOWN.values() for p, n in kind.items()):
        folder = REPO / "plugins" / package.removeprefix("mmcore-")
        assert tomllib.loads((folder / "pyproject.toml").read_text())["project"]["name"] == package
        source = "\n".join(p.read_text() for p in (folder / "src").rglob("*.py"))
        for name in names:
            assert f'"{name}"' in source, (package, name)


def test_a_param_of_a_defaulted_component_can_be_set():
    recipe = load_recipe(REPO / "recipes" / "demo.toml", ["scheduler.params.warmup_ratio=0.5"])
    assert recipe.scheduler.name == "cosine_warmup" and recipe.scheduler.params.warmup_ratio == 0.5


@pytest.mark.parametrize("key, new", [("train.loss_type", "loss.name"), ("train.scheduler_type", "scheduler.name")])
def test_the_original_systems_keys_point_to_mmcores(tmp_path, key, new):
    section, name = key.split(".")
    path = tmp_path / "old.toml"
    path.write_text(f'[{section}]\n{name} = "focal"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["data.base_dir='data'"])
    assert f"{key}: unknown key (the original system's key; in mmcore: {new})" in str(info.value)


def _dry_run(*flags, env=None):
    result = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), *flags, "--dry-run"], capture_output=True,
                            text=True, timeout=60, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr
    (line,) = [line for line in result.stdout.splitlines() if " install " in line and " -e ." in line]
    extras = line.split(" -e .[", 1)[1].split("]", 1)[0].split(",")
    return extras, result.stdout


def _extra_packages(extras):
    """The package names (no version floors) the pyproject's ``extras`` pull in."""
    import re
    import tomllib

    table = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {re.split(r"[<>=\[; ]", requirement, maxsplit=1)[0] for extra in extras for requirement in table[extra]}


def test_the_install_script_installs_what_the_readme_uses():
    """`bash scripts/install.sh` (the README's first command): export, serve, tune, explain and mlflow, so `mmcore export`,
    `serve`, `tune`, saliency and `logging.mlflow` work; each extra has every module its missing-package line names it for."""
    from mmcore.kit.deps import EXTRA_MODULES, EXTRAS, INSTALL_SCRIPT_EXTRAS

    extras, commands = _dry_run()
    assert extras == list(INSTALL_SCRIPT_EXTRAS) == ["export", "serve", "tune", "explain", "mlflow", "quality"]
    assert {"onnx", "onnxruntime", "fastapi", "uvicorn", "optuna", "captum", "mlflow-skinny"} <= _extra_packages(extras)
    assert "onnxruntime-gpu" not in _extra_packages(extras)
    assert "uninstall --disable-pip-version-check -q -y onnxruntime-gpu" in commands  # never both builds
    for extra, modules in EXTRA_MODULES.items():
        packages = _extra_packages([extra])
        for module in modules:
            assert EXTRAS[module][0] in packages, (extra, module)


@pytest.mark.parametrize("how", ["--gpu", "MMCORE_GPU=1"])
def test_the_gpu_install_swaps_onnxruntime_for_onnxruntime_gpu(how):
    extras, commands = _dry_run(*([how] if how.startswith("--") else []), env=None if how.startswith("--") else {"MMCORE_GPU": "1"})
    assert extras == ["serve-gpu", "tune", "explain", "mlflow", "quality"]
    packages = _extra_packages(extras)
    assert "onnxruntime-gpu" in packages and "onnxruntime" not in packages
    assert {"onnx", "fastapi", "uvicorn", "optuna", "captum"} <= packages
    assert "uninstall --disable-pip-version-check -q -y onnxruntime\n" in commands
    extras, _ = _dry_run("--gpu", "--test")
    assert extras == ["test", "serve-gpu", "tune", "explain", "mlflow", "quality"] and "onnxruntime" not in _extra_packages(extras)


def test_a_missing_optional_package_is_one_line_naming_the_extra():
    from mmcore.kit.deps import MissingDependency, require, require_extra

    with pytest.raises(MissingDependency) as failure:
        require("mmcore_no_such_module", "this thing")
    assert str(failure.value) == ("this thing needs the mmcore_no_such_module package, which is not installed: "
                                  "pip install 'mmcore_no_such_module'")
    assert failure.value.exit_code == 1
    import sys

    saved = sys.modules.get("optuna")
    sys.modules["optuna"] = None  # what an uninstalled package looks like to an import
    try:
        with pytest.raises(MissingDependency) as failure:
            require_extra("tune", "mmcore tune")
    finally:
        if saved is None:
            del sys.modules["optuna"]
        else:
            sys.modules["optuna"] = saved
    assert str(failure.value) == ("mmcore tune needs the optuna package, which is not installed: "
                                  "pip install 'mmcore[tune]' (or bash scripts/install.sh)")
