"""``mmcore show RECIPE``: the fully resolved recipe as TOML (nothing is trained)."""

from __future__ import annotations

from mmcore.recipe import load_recipe, recipe_to_toml


def show_recipe(recipe, overrides=(), *, check_weights=False, registry=None, echo=print):
    """Print ``recipe`` with ``overrides`` applied, resolved; ``check_weights`` also finds the pretrained
    weights it needs (as ``# weights:`` comments), refusing in one message when some are missing."""
    loaded = load_recipe(recipe, overrides, strict_env=False)
    echo(recipe_to_toml(loaded).rstrip("\n"))
    if check_weights:
        from mmcore.model.weights import require_weights
        from mmcore.plugins.manager import get_registry

        report = require_weights(loaded, registry or get_registry(), source=recipe)
        for line in report.lines():
            echo(f"# weights: {line}")
    return loaded
