"""Components built from a recipe's tables through the registry: the encoders, and the parts after
them (pooling, fusion or projection, head) in the order random initialisation draws them.

A factory that raises is one line naming the plugin (:func:`mmcore.plugins.build.build`); a
composite component (the text ``concat``) takes ``build_part`` and builds its parts by name.
"""

from __future__ import annotations

import inspect

from mmcore.builtin.projection import UnimodalProjection
from mmcore.interfaces import Fusion
from mmcore.plugins.build import build
from mmcore.recipe.convert import structure


def build_component(registry, kind, component, *args, source="recipe", **kwargs):
    """Build the recipe's ``component`` table of ``kind`` (see :func:`build_with_traits`)."""
    return build_with_traits(registry, kind, component, *args, source=source, **kwargs)[0]


def build_with_traits(registry, kind, component, *args, source="recipe", **kwargs):
    """``(component, its traits)`` from the registered factory and the table's structured params.

    A factory that raises is one line naming the plugin (:func:`mmcore.plugins.build.build`).
    """
    registration = registry.get(kind, component.name)
    if _takes(registration.factory, "build_part"):
        kwargs["build_part"] = part_builder(registry, source)  # composite components build their parts through it
    return build(registration, component.params, *args, source=source, **kwargs)


def part_builder(registry, source="recipe"):
    """``build_part(kind, name, params, *, path)`` for a composite component's factory: its part
    ``name`` of ``kind`` built from plain ``params`` (the recipe's table under ``path``, checked by
    the strict converter, each problem one line naming ``path``) -> the built component."""

    def build_part(kind, name, params, *, path):
        registration = registry.get(kind, name)
        structured = structure(dict(params), registration.params_cls, source=source, path=f"{path}.params")
        return build(registration, structured, source=source)[0]

    return build_part


def _takes(factory, name):
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def build_encoders(recipe, registry, *, source="recipe"):
    """(vision encoder or None, text encoder or None) for the recipe's modality."""
    modality = recipe.train.modality
    vision = build_component(registry, "vision", recipe.vision, source=source) if modality != "text_only" else None
    text = build_component(registry, "text", recipe.text, source=source) if modality != "vision_only" else None
    return vision, text  # the engine's Pipeline freezes the text encoder


def build_top(recipe, registry, *, vision_dim, text_dim, has_cls_token, source="recipe"):
    """The parts after encoders of these widths, built in the order random init draws them:
    ``{"pooling", "fusion", "projection", "head"}`` (None where the modality has none)."""
    modality = recipe.train.modality
    top = {"pooling": None, "fusion": None, "projection": None, "head": None}
    if vision_dim is not None:
        top["pooling"] = build_component(registry, "pooling", recipe.pooling, vision_dim, has_cls_token, source=source)
    if modality == "multimodal":
        top["fusion"] = build_component(registry, "fusion", recipe.fusion, vision_dim, text_dim, source=source)
        head_in = top["fusion"].out_dim
    else:
        in_dim = vision_dim if modality == "vision_only" else text_dim
        top["projection"] = UnimodalProjection(in_dim, recipe.train.projection_dim or None)
        head_in = top["projection"].out_dim
    top["head"] = build_component(registry, "head", recipe.head, head_in, source=source)
    if isinstance(top["fusion"], Fusion):
        top["fusion"].init_head(top["head"])
    return top
