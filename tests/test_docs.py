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
