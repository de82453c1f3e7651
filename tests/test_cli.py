"""The mmcore command line, run as a real subprocess."""

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_help_on_every_command(cli):
    out = cli("--help").stdout
    for command in ("plugins", "show", "run", "eval"):
        assert command in out
        assert "Usage: mmcore " + command in cli(command, "--help").stdout


def test_plugins_lists_builtins_and_the_installed_fake_plugin(cli):
    out = cli("plugins", env={"MMCORE_LOAD_PLUGINS": "mmcore-fake-encoders"}).stdout
    lines = out.splitlines()
    assert lines[0] == "mmcore 0.1.0"
    assert "  poolings         attention, cls, mean" in lines
    assert "  losses           bce, focal" in lines
    at = lines.index("mmcore-fake-encoders 0.0.1")
    assert lines[at + 1] == "  vision encoders  fake_cnn, fake_vit"
    assert lines[at + 2] == "  text encoders    fake_text"


def test_show_prints_the_resolved_recipe_with_overrides(cli):
    out = cli("show", REPO / "recipes/siglip_labse_gmu.toml", "--set", "train.batch_size=32",
              "--set", "train.epochs=3").stdout
    data = tomllib.loads(out)
    assert data["train"]["batch_size"] == 32 and data["train"]["epochs"] == 3
    assert data["vision"]["name"] == "siglip2_so400m" and data["pooling"]["name"] == "attention"
    assert data["fusion"]["params"]["dim"] == 512  # component params resolved with their defaults
    assert data["train"]["lora"] == {"enabled": False, "rank": 16, "alpha": 8, "dropout": 0.0,
                                     "target_layers": 6, "target_modules": []}


def test_bad_recipes_exit_non_zero_with_one_line_each(cli, recipe_file):
    base = '[vision]\nname = "fake_cnn"\n[text]\nname = "fake_text"\n[pooling]\nname = "mean"\n'
    cases = {
        "[train]\nlerning_rate = 0.1\n": "train.lerning_rate: unknown key (did you mean learning_rate?)",
        "[train]\nepochs = \"ten\"\n": "train.epochs: must be an integer (got a string 'ten')",
        "[fusion]\nname = \"gmu\"\n": "fusion.name: unknown fusion 'gmu' installed: concat, gated, late.",
        "[loss]\nname = \"focal\"\nparams = { gamma = -1.0 }\n": "loss.params.gamma: must be >= 0 (got -1.0)",
    }
    for i, (extra, expected) in enumerate(cases.items()):
        path = recipe_file(base + extra, f"r{i}.toml")
        result = cli("show", path, check=False, env={"MMCORE_LOAD_PLUGINS": "mmcore-fake-encoders"})
        assert result.returncode == 2
        assert result.stderr.splitlines() == [f"{path}: {expected}"]
        assert "Traceback" not in result.stderr


def test_show_without_data_dir_keeps_the_placeholder(cli):
    out = cli("show", REPO / "recipes/siglip_labse_gmu.toml", env={"DATA_DIR": ""}).stdout
    assert tomllib.loads(out)["data"]["base_dir"] == ""
