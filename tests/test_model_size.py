"""A model whose parameters cannot fit in memory is one line naming the recipe key, measured on the
meta device before anything is allocated (issue 26: ``--set fusion.params.dim=1000000000`` was a
56-line allocator traceback)."""

import re

import pytest

#: far beyond any machine: the lower bound alone (encoders one value wide) is ~85,700 GiB
HUGE = 10**12


def test_show_and_run_refuse_parameters_that_cannot_fit_in_one_line_naming_the_key(cli, tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    # gated fusion behind 1-wide encoders: Linear(1, D) twice and Linear(2, D) (7D); the head's Linear(D, 16) (16D)
    gib = ((7 + 16) * HUGE + 16 + 17) * 4 / 2**30
    line = re.compile(
        rf"{re.escape(str(recipe))} \(--set fusion\.params\.dim\): fusion\.params\.dim: the model needs at least "
        rf"{gib:.1f} GiB of parameters, \d+\.\d GiB of memory available; make it smaller"
    )
    for command in (["show"], ["run", "--out", tmp_path / "run"]):
        result = cli(*command[:1], recipe, *command[1:], "--set", f"fusion.params.dim={HUGE}", check=False, cwd=tmp_path)
        assert result.returncode == 2 and result.stdout == ""
        (only,) = result.stderr.splitlines()
        assert line.fullmatch(only), only
    assert not (tmp_path / "run").exists()  # refused before the run directory


def test_building_measures_again_with_the_encoders_real_widths(registry, tiny_recipe, monkeypatch):
    """Behind 1-wide encoders it fits; behind fake_cnn (8) and fake_text (32) it does not: the build refuses."""
    from mmcore.errors import RecipeError
    from mmcore.model import size
    from mmcore.model.classifier import build_classifier
    from mmcore.recipe import load_recipe

    monkeypatch.setattr(size, "available_memory", lambda: 2**30)
    dim = 5 * 10**6
    recipe = load_recipe(tiny_recipe(fusion={"name": "gated", "params": {"dim": dim}}), registry=registry)  # the lower bound fits
    with pytest.raises(RecipeError) as info:
        build_classifier(recipe, registry, source="r.toml")
    # Linear(8, D) + Linear(32, D) + Linear(40, D) = 83D, the head's Linear(D, 16) + Linear(16, 1) = 16D + 33
    gib = ((83 + 16) * dim + 33) * 4 / 2**30
    assert str(info.value) == (
        f"r.toml: fusion.params.dim: the model needs {gib:.1f} GiB of parameters, 1.0 GiB of memory available; make it smaller"
    )


def test_the_blame_goes_to_the_key_whose_default_shrinks_the_model_most(registry, tiny_recipe):
    from mmcore.model.size import size_problem
    from mmcore.recipe import load_recipe

    recipe = load_recipe(tiny_recipe(head={"name": "mlp", "params": {"hidden": [10**6, 16]}}), registry=registry)
    dims = {"vision_dim": 8, "text_dim": 32, "has_cls_token": False}
    problem = size_problem(recipe, registry, source="r.toml", available=2**20, **dims)
    assert problem.startswith("r.toml: head.params.hidden: the model needs 0.1 GiB of parameters, 0.0 GiB of memory available")
    assert size_problem(recipe, registry, source="r.toml", available=2**30, **dims) is None
