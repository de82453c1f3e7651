"""Where the core meets a plugin's code: calling a factory, checking what it built, and naming the
component whose forward raised.

A plugin's bug is the plugin's, not the user's: whatever its factory or first forward raises
becomes one line naming the component, its kind and its package (:class:`ComponentError`), never
a traceback. A factory's ``ValueError`` is the documented way to say that the params do not fit
the model around the component (``cls`` pooling on an encoder without a CLS token): a recipe
error naming ``<kind>.name``.
"""

from __future__ import annotations

import contextlib

from mmcore.errors import MmcoreError, RecipeError
from mmcore.interfaces import Fusion, VisionEncoder
from mmcore.plugins.registry import ComponentError, exception_line
from mmcore.plugins.traits import AugmentationTraits, deprecated, legacy_augmentation_traits


def build(registration, params, *args, source="recipe", **kwargs):
    """``registration.factory(params, *args, **kwargs)``, checked against what it declared.

    Returns ``(component, traits)`` (traits None for kinds without). Raises a one-line
    :class:`ComponentError` when the factory raises or builds something other than it declared,
    and a :class:`RecipeError` naming ``<kind>.name`` for a factory's ``ValueError``.
    """
    try:
        component = registration.factory(params, *args, **kwargs)
    except MmcoreError:
        raise
    except ValueError as exc:
        raise RecipeError(f"{source}: {registration.kind}.name: {exc}") from None
    except Exception as exc:  # a plugin's bug, whatever it is: one line naming the plugin
        raise ComponentError(f"{registration.label} failed to build: {exception_line(exc)}") from exc
    return component, built_traits(registration, params, component)


def built_traits(registration, params, component):
    """The traits of a just-built component: what it declared, checked against it.

    A vision encoder that disagrees with its declared traits is a :class:`ComponentError`. An
    augmentation that declared none gets its class's old ``keeps_size`` (deprecated); a fusion
    that is not an :class:`~mmcore.interfaces.Fusion` is read as returning the fused tensor
    (deprecated).
    """
    kind = registration.kind
    if kind == "vision":
        traits = registration.traits_for(params)
        problem = vision_traits_problem(traits, component)
        if problem:
            raise ComponentError(f"{registration.label}: {problem}")
        return traits
    if kind == "augmentation" and registration.traits is None:
        if component is None:
            return AugmentationTraits()
        return legacy_augmentation_traits(component, f"augmentation {registration.name!r}", registration.package)
    if kind == "fusion" and not isinstance(component, Fusion):
        deprecated(
            registration.package, f"fusion {registration.name!r} returning a tensor (not an mmcore.Fusion)",
            "subclass mmcore.Fusion and return mmcore.FusionOutput(fused) (see docs/plugins.md, register_fusions)",
        )
    return registration.traits_for(params)


def vision_traits_problem(traits, encoder):
    """What is wrong between a built vision encoder and its declared :class:`VisionTraits`, or None."""
    if not isinstance(encoder, VisionEncoder):
        return f"the factory must return an mmcore.VisionEncoder (got {type(encoder).__name__})"
    pairs = (("has_cls_token", traits.has_cls_token, encoder.has_cls_token), ("trainable", traits.trainable, encoder.trainable))
    for name, declared, built in pairs:
        if declared is not None and built != declared:
            return (
                f"registered with traits {name}={declared}, but the built encoder has {name} = {built}; "
                f"make the two agree"
            )
    return None


@contextlib.contextmanager
def reported_failures(parts, doing):
    """Inside: an exception that escapes the forward of one of ``parts`` ({module: label}) becomes
    one :class:`ComponentError` line, ``<label> failed <doing>: <Error>: <message>``.

    The innermost part still running when the exception passed is named (forward hooks mark
    them); an exception outside every part keeps its traceback: it is not a plugin's.
    """
    running = []

    def started(module, _args):
        running.append(parts[module])  # hooks return nothing: a return value would replace args or output

    def finished(_module, _args, _output):
        running.pop()

    handles = []
    for module in parts:
        handles += [module.register_forward_pre_hook(started), module.register_forward_hook(finished)]
    try:
        yield
    except MmcoreError:
        raise
    except Exception as exc:  # a plugin's bug, whatever it is: one line naming the plugin
        if not running:
            raise
        raise ComponentError(f"{running[-1]} failed {doing}: {exception_line(exc)}") from exc
    finally:
        for handle in handles:
            handle.remove()
