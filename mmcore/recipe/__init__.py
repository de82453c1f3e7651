"""Recipes: the schema (:mod:`.schema`), the strict converter (:mod:`.convert`), loading (:mod:`.load`)."""

from mmcore.recipe.load import (
    apply_overrides,
    deep_merge,
    load_recipe,
    parse_override,
    recipe_diff,
    recipe_from_dict,
    recipe_from_source,
    recipe_to_dict,
    recipe_to_toml,
    resolve_components,
)
from mmcore.recipe.schema import COMPONENT_KINDS, MODALITIES, DataConfig, Recipe

__all__ = [
    "COMPONENT_KINDS",
    "DataConfig",
    "MODALITIES",
    "Recipe",
    "apply_overrides",
    "deep_merge",
    "load_recipe",
    "parse_override",
    "recipe_diff",
    "recipe_from_dict",
    "recipe_from_source",
    "recipe_to_dict",
    "recipe_to_toml",
    "resolve_components",
]
