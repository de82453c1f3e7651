"""Traits: what the core must know about a component that its code cannot be asked for in time.

A plugin declares them once, when it registers the component::

    register("resnet50", build_resnet50, ResNetParams, traits=VisionTraits(has_cls_token=False))

- :class:`VisionTraits` — read before anything is built (the recipe checks of ``mmcore show``
  and ``mmcore run``), and checked against the built encoder when it is built and by
  :func:`mmcore.testing.check_vision_encoder`;
- :class:`AugmentationTraits` — an augmentation is any picklable callable, with no base class
  to declare anything on.

Everything else the core reads from a built component is a typed attribute or method of its
base class (``VisionEncoder.channels_last``, ``TextEncoder.fits_on_train``,
``VisionEncoder.enable_gradient_checkpointing``), and a pooling trains when it has parameters.
A trait that depends on the params is declared by a function ``params -> traits``.

Plugins written before traits existed declared ``has_cls_token`` / ``trainable`` as attributes
of their params class and ``keeps_size`` on their augmentation's class. Such a plugin, if it
passes no ``traits``, keeps working: those attributes are read once — at registration, or for
an augmentation when it is built — with a :class:`DeprecationWarning` naming the package.
"""

from __future__ import annotations

import warnings

import attrs

_optional_bool = attrs.validators.optional(attrs.validators.instance_of(bool))
_bool = attrs.validators.instance_of(bool)


@attrs.frozen(kw_only=True)
class VisionTraits:
    """What the core must know about a vision encoder before building it.

    ``has_cls_token``: token 0 is a CLS token, never masked (``cls`` pooling needs one); ``None``
    when only the built encoder knows (timm: it depends on the model). ``trainable``: False for a
    fixed feature extractor (no parameters, always frozen and cached; a recipe that asks it to
    train is refused at load); ``None`` when only the built encoder knows. The built encoder's
    ``has_cls_token`` and ``trainable`` must agree with what is declared.
    """

    has_cls_token: bool | None = attrs.field(default=None, validator=_optional_bool)
    trainable: bool | None = attrs.field(default=True, validator=_optional_bool)


@attrs.frozen(kw_only=True)
class AugmentationTraits:
    """``keeps_size``: the output has the input's size, so the augmentation may run on the
    decoded-image cache's resized pixels (``cache.decoded_images``)."""

    keeps_size: bool = attrs.field(default=False, validator=_bool)


#: the vision traits a params class could declare as class attributes before traits existed
LEGACY_PARAMS_TRAITS = ("has_cls_token", "trainable")
#: the traits of a vision encoder registered without any: the built encoder says everything
UNDECLARED = VisionTraits(has_cls_token=None, trainable=None)


def deprecated(package, what, instead):
    """The one warning of the old declarations: names the package, what it relies on, what to write."""
    warnings.warn(
        f"{package}: {what} is deprecated and will stop being read; {instead}", DeprecationWarning, stacklevel=4
    )


def legacy_vision_traits(params_cls, label, package):
    """:class:`VisionTraits` from a params class's old class attributes (or properties), read once.

    Returns traits, or a function ``params -> VisionTraits`` when a property declares them. What
    it does not say is left to the built encoder (None), as before traits existed.
    """
    found = {name: vars_of(params_cls, name) for name in LEGACY_PARAMS_TRAITS}
    found = {name: value for name, value in found.items() if value is not None}
    if not found:
        return UNDECLARED
    deprecated(
        package, f"{label} declaring {', '.join(sorted(found))} on its params class",
        "pass register(..., traits=VisionTraits(...)) (see docs/plugins.md, Traits)",
    )
    if not any(isinstance(value, property) for value in found.values()):
        return attrs.evolve(UNDECLARED, **{name: value for name, value in found.items() if isinstance(value, bool)})

    def from_params(params):
        values = {name: value.__get__(params) if isinstance(value, property) else value for name, value in found.items()}
        return attrs.evolve(UNDECLARED, **{name: value for name, value in values.items() if isinstance(value, bool)})

    return from_params


def legacy_augmentation_traits(augmentation, label, package):
    """:class:`AugmentationTraits` from a built augmentation's old ``keeps_size`` class attribute."""
    keeps_size = vars_of(type(augmentation), "keeps_size")
    if keeps_size is None:
        return AugmentationTraits()
    deprecated(
        package, f"{label} declaring keeps_size on its class",
        "pass register(..., traits=AugmentationTraits(keeps_size=True)) (see docs/plugins.md, Traits)",
    )
    return AugmentationTraits(keeps_size=keeps_size is True)


def vars_of(cls, name):
    """The attribute ``name`` as a class (or a base) defines it, or None; nothing is called."""
    for klass in getattr(cls, "__mro__", ()):
        if name in vars(klass):
            return vars(klass)[name]
    return None
