"""Recipes: TOML -> strict attrs classes; every problem one line naming the file and key path."""

import pytest
import tomllib

from mmcore.errors import RecipeError
from mmcore.recipe import load_recipe, recipe_to_toml

BASE = """
experiment = "t"
[data]
base_dir = "/data"
[vision]
name = "fake_cnn"
params = { width = 8 }
[text]
name = "fake_text"
[pooling]
name = "mean"
"""


def problems(path, registry, overrides=()):
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides, registry=registry)
    return info.value.problems


def test_defaults_are_the_original_systems(recipe_file, registry):
    recipe = load_recipe(recipe_file(BASE), registry=registry)
    train = recipe.train
    assert (train.modality, train.freeze_backbone, train.finetune_layers) == ("multimodal", True, 0)
    assert (train.lora.enabled, train.lora.rank, train.lora.alpha, train.lora.target_layers) == (False, 16, 8, 6)
    assert (recipe.scheduler.name, recipe.loss.name) == ("cosine_warmup", "focal")
    assert (train.early_stopping.patience, train.early_stopping.metric) == (3, "val_auroc")
    assert recipe.vision.params.width == 8  # structured against the plugin's params class
    assert type(recipe.vision.params).__name__ == "FakeVisionParams"


def test_misspelled_key_suggests_the_right_one(recipe_file, registry):
    path = recipe_file(BASE + "[train]\nlr = 0.1\n")
    assert problems(path, registry) == [f"{path}: train.lr: unknown key (did you mean learning_rate?)"]


def test_wrong_types_are_not_coerced(recipe_file, registry):
    path = recipe_file(BASE + '[train]\nbatch_size = "32"\nepochs = 2.5\nfreeze_backbone = "no"\n')
    assert problems(path, registry) == [
        f"{path}: train.batch_size: must be an integer (got a string '32')",
        f"{path}: train.epochs: must be an integer (got a number 2.5)",
        f"{path}: train.freeze_backbone: must be a boolean (got a string 'no')",
    ]


def test_unknown_component(recipe_file, registry):
    path = recipe_file(BASE.replace('"fake_cnn"', '"fake_cnm"'))
    assert problems(path, registry) == [
        f"{path}: vision.name: unknown vision encoder 'fake_cnm'; did you mean 'fake_cnn'? "
        "installed: fake_cnn, fake_vit. More: pip install the package that provides it "
        "(plugins are named mmcore-vision-<name>); `mmcore plugins` lists what is installed"
    ]


def test_bad_param_value_and_unknown_param(recipe_file, registry):
    path = recipe_file(BASE + '[head]\nname = "mlp"\nparams = { activation = "swish", dropuot = 0.1 }\n')
    assert problems(path, registry) == [f"{path}: head.params.dropuot: unknown key (did you mean dropout?)"]
    path = recipe_file(BASE + '[head]\nname = "mlp"\nparams = { activation = "swish" }\n', "r2.toml")
    assert problems(path, registry) == [
        f"{path}: head.params.activation: must be one of gelu, relu, silu, tanh (got 'swish')"
    ]


def test_all_problems_at_once_in_file_order(recipe_file, registry):
    path = recipe_file(BASE.replace('width = 8', 'width = "x"') + "[train]\nlr = 1\n[train.lora]\nrank = 0\n")
    assert problems(path, registry) == [
        f"{path}: vision.params.width: must be an integer (got a string 'x')",
        f"{path}: train.lr: unknown key (did you mean learning_rate?)",
        f"{path}: train.lora.rank: must be > 0 (got 0)",
    ]


def test_set_overrides_are_typed_and_validated_like_the_file(recipe_file, registry):
    path = recipe_file(BASE)
    recipe = load_recipe(path, ["train.batch_size=32", "train.lora.enabled=true", "eval.threshold={recall=0.9}"], registry=registry)
    assert recipe.train.batch_size == 32 and recipe.train.lora.enabled is True
    assert recipe.eval.threshold == {"recall": 0.9}
    assert problems(path, registry, ["train.batch_size=big"]) == [
        f"{path} (--set train.batch_size): train.batch_size: must be an integer (got a string 'big')"
    ]
    assert problems(path, registry, ["train.bs=3"]) == [
        f"{path} (--set train.bs): train.bs: unknown key (did you mean batch_size?)"
    ]


def test_changing_a_component_name_drops_the_old_params(recipe_file, registry):
    recipe = load_recipe(recipe_file(BASE), ["vision.name=fake_vit", "pooling.name=cls"], registry=registry)
    assert recipe.vision.name == "fake_vit" and recipe.vision.params.width == 16


def test_extends_deep_merges_relative_to_the_file(tmp_path, registry):
    (tmp_path / "presets").mkdir()
    (tmp_path / "base.toml").write_text(BASE + "[train]\nepochs = 7\nbatch_size = 8\n")
    child = tmp_path / "presets" / "child.toml"
    child.write_text('extends = "../base.toml"\nexperiment = "child"\n[train]\nbatch_size = 4\n')
    recipe = load_recipe(child, registry=registry)
    assert (recipe.experiment, recipe.train.epochs, recipe.train.batch_size) == ("child", 7, 4)
    assert recipe.vision.params.width == 8


def test_extends_missing_file_and_cycle(tmp_path, registry):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('extends = "nope.toml"\n')
    assert problems(a, registry) == [f"{a.resolve()}: extends: recipe file not found: {tmp_path / 'nope.toml'}"]
    a.write_text('extends = "b.toml"\n')
    b.write_text('extends = "a.toml"\n')
    (message,) = problems(a, registry)
    assert message.startswith(f"{b.resolve()}: extends: cycle (") and message.count("->") == 2


def test_env_expansion_and_unset_variable(recipe_file, registry, monkeypatch):
    path = recipe_file(BASE.replace('"/data"', '"${MY_DATA}/ads"'))
    monkeypatch.setenv("MY_DATA", "/mnt/x")
    assert load_recipe(path, registry=registry).data.base_dir == "/mnt/x/ads"
    monkeypatch.delenv("MY_DATA")
    assert problems(path, registry) == [
        f"{path}: data.base_dir: environment variable MY_DATA is not set (export MY_DATA=... or --set data.base_dir=...)"
    ]


def test_data_dir_is_the_default_base_dir(recipe_file, registry, monkeypatch):
    monkeypatch.setenv("DATA_DIR", "/srv/ads")
    recipe = load_recipe(recipe_file(BASE.replace('base_dir = "/data"\n', "")), registry=registry)
    assert recipe.data.base_dir == "/srv/ads"


def test_cls_pooling_needs_a_cls_token_is_a_recipe_error(recipe_file, registry):
    import attrs

    from mmcore.engine.pipeline import Pipeline

    path = recipe_file(BASE.replace('name = "mean"', 'name = "cls"'))
    with pytest.raises(RecipeError) as info:  # fake_cnn declares has_cls_token=False: refused at load
        load_recipe(path, registry=registry)
    assert str(info.value) == (
        f"{path}: pooling.name: pooling 'cls' needs an encoder with a CLS token; "
        "vision encoder 'fake_cnn' has none — use mean or attention"
    )
    # where the load check cannot tell (traits that leave it to the built encoder), the build refuses it
    mean = load_recipe(recipe_file(BASE), registry=registry)
    recipe = attrs.evolve(mean, pooling=attrs.evolve(mean.pooling, name="cls", params=registry.get("pooling", "cls").params_cls()))
    with pytest.raises(RecipeError) as info:
        Pipeline(recipe, registry, source=str(path), progress=False)
    assert str(info.value) == (
        f"{path}: pooling.name: pooling 'cls' needs an encoder with a CLS token; "
        "this encoder has none — use mean or attention"
    )


def test_modality_and_text_none(recipe_file, registry):
    path = recipe_file(BASE.replace('name = "fake_text"', 'name = "none"'))
    assert problems(path, registry) == [
        f'{path}: text.name: \'none\' needs train.modality = "vision_only" (got "multimodal")'
    ]
    recipe = load_recipe(path, ["train.modality=vision_only"], registry=registry)
    assert recipe.text.name == "none"


def test_resolved_recipe_round_trips_through_toml(recipe_file, registry, tmp_path):
    recipe = load_recipe(recipe_file(BASE), ["eval.threshold={precision=0.95}"], registry=registry)
    text = recipe_to_toml(recipe)
    again_path = tmp_path / "again.toml"
    again_path.write_text(text)
    assert load_recipe(again_path, registry=registry) == recipe
    assert tomllib.loads(text)["vision"]["params"]["width"] == 8


def test_recipes_are_data_not_code(recipe_file, registry):
    """A dotted import path is just an unknown name, never imported."""
    path = recipe_file(BASE.replace('"fake_cnn"', '"os.system"'))
    (message,) = problems(path, registry)
    assert message.startswith(f"{path}: vision.name: unknown vision encoder 'os.system'")


def test_logging_mlflow_is_a_strict_table_off_by_default(recipe_file, registry, tmp_path):
    assert load_recipe(recipe_file(BASE), registry=registry).logging.mlflow is None
    recipe = load_recipe(recipe_file(BASE + '[logging.mlflow]\ntracking_uri = "file:./mlruns"\n'), registry=registry)
    mlflow = recipe.logging.mlflow
    assert (mlflow.tracking_uri, mlflow.experiment, mlflow.run_name) == ("file:./mlruns", None, None)
    assert tomllib.loads(recipe_to_toml(recipe))["logging"]["mlflow"] == {"tracking_uri": "file:./mlruns"}

    path = recipe_file(BASE + '[logging.mlflow]\nexperimnt = "x"\nrun_name = 3\n', "bad.toml")
    assert problems(path, registry) == [
        f"{path}: logging.mlflow.tracking_uri: missing required key",
        f"{path}: logging.mlflow.experimnt: unknown key (did you mean experiment?)",
        f"{path}: logging.mlflow.run_name: must be a string (got an integer 3)",
    ]
    path = recipe_file(BASE + '[logging]\nmlflow = { tracking_uri = " ", experiment = "" }\n', "blank.toml")
    assert problems(path, registry) == [f"{path}: logging.mlflow.tracking_uri: must not be empty"]
    assert problems(recipe_file(BASE, "t.toml"), registry, ["logging.mlflow=true"]) == [
        f"{tmp_path / 't.toml'} (--set logging.mlflow): logging.mlflow: must be a table (got a boolean True)"]
