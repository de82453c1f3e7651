"""The docs list every recipe key, so a new key cannot ship undocumented."""

from pathlib import Path

import attrs

from mmcore.recipe import Recipe

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _keys(cls, prefix=""):
    for field in attrs.fields(cls):
        if isinstance(field.type, type) and attrs.has(field.type) and field.type.__name__ != "Component":
            yield from _keys(field.type, prefix + field.name + ".")
        else:
            yield prefix + field.name


def test_every_recipe_key_is_in_docs_recipes_md():
    text = (DOCS / "recipes.md").read_text()
    missing = []
    for key in _keys(Recipe):
        table, _, leaf = key.partition(".")
        if leaf and f"`[{table}]`" not in text and f"`{table}.`" not in text:
            missing.append(key)
        elif f"`{leaf or table}`" not in text and f"`{leaf.rsplit('.', 1)[-1]}`" not in text:
            missing.append(key)
    assert not missing, f"undocumented recipe keys: {missing}"


def test_every_serve_flag_and_metric_is_in_docs_serving_md():
    from mmcore.cli.serve import serve_command
    from mmcore.serve.metrics import ServeMetrics

    text = (DOCS / "serving.md").read_text()
    flags = [opt for param in serve_command.params for opt in param.opts if opt.startswith("--")]
    assert [flag for flag in flags if f"`{flag}" not in text] == []
    names = [family.name for family in ServeMetrics().registry.collect()]  # counters without their _total
    assert names and [name for name in names if f"`{name}" not in text] == []
