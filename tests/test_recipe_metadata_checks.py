"""Checks that need only the plugins' metadata run when the recipe is loaded: ``mmcore show``
reports them, and ``mmcore run`` stops before it writes anything."""

import pytest

CLS_ON_RESNET = """
experiment = "cls"
[vision]
name = "resnet18"
[pooling]
name = "cls"
"""


@pytest.fixture
def resnet():
    return pytest.importorskip("mmcore_vision_resnet")


def test_show_refuses_cls_pooling_on_an_encoder_without_cls_token(cli, recipe_file, resnet):
    path = recipe_file(CLS_ON_RESNET)
    result = cli("show", path, check=False)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{path}: pooling.name: pooling 'cls' needs an encoder with a CLS token; "
        "vision encoder 'resnet18' has none — use mean or attention"
    ]
    assert "Traceback" not in result.stderr


def test_run_stops_before_the_run_directory_exists(cli, recipe_file, resnet, tmp_path, demo_data):
    # real data, so that the pooling is the only problem: before, the run directory was made first
    path = recipe_file(CLS_ON_RESNET + f"[data]\nbase_dir = {str(demo_data)!r}\nnum_workers = 0\n")
    out = tmp_path / "run"
    result = cli("run", path, "--out", out, check=False, cwd=tmp_path)
    assert result.returncode == 2 and "pooling.name: pooling 'cls' needs" in result.stderr
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_the_check_follows_the_declaration_only(cli, recipe_file, resnet):
    # an encoder that declares nothing is checked when built; one that has a CLS token passes
    assert cli("show", recipe_file(CLS_ON_RESNET), "--set", "vision.name='fake_vit'").returncode == 0
    # mean pooling on the same encoder is fine
    assert cli("show", recipe_file(CLS_ON_RESNET), "--set", "pooling.name='mean'").returncode == 0


def test_the_check_reads_the_traits_the_plugin_registered(resnet):
    from mmcore.plugins.manager import get_registry

    assert get_registry().get("vision", "resnet18").traits.has_cls_token is False
