"""Collects what plugins register and knows which package gave each name."""

import difflib
import re

import attrs

from mmcore.errors import MmcoreError
from mmcore.plugins.kinds import KINDS
from mmcore.plugins.known import install_hint
from mmcore.plugins.traits import VisionTraits, legacy_vision_traits

#: the kinds third parties publish packages for (the unknown-name message says how to find them)
PUBLISHED_KINDS = ("vision", "text", "ocr")


def find_plugins_hint(kind):
    """How to get a ``kind`` component nobody installed: where plugins come from, not a repository path."""
    return (
        f"More: pip install the package that provides it (plugins are named mmcore-{kind}-<name>); "
        f"`mmcore plugins` lists what is installed"
    )

NAME_RE = re.compile(r"^[a-z0-9_]+$")


def exception_line(exc):
    """``RuntimeError: mat1 and mat2 must have the same dtype``: an exception in one line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class UnknownComponentError(MmcoreError):
    """A recipe names a component nobody registered."""


class DuplicateComponentError(MmcoreError):
    """Two packages registered the same name for the same kind."""


class ComponentError(MmcoreError):
    """A plugin's component failed (its factory or forward raised, or it is not what it declared):
    one line naming the component, its kind and its package."""


@attrs.frozen
class Registration:
    """One registered component."""

    kind: str
    name: str
    factory: object
    params_cls: type
    package: str
    #: its declared traits (:mod:`mmcore.plugins.traits`), a function of the params giving them,
    #: or None (a kind without traits; an augmentation that declared none: read when built)
    traits: object = None

    @property
    def label(self):
        """``pooling 'gated_max' (package mmcore-pooling-gated)``: how messages name it."""
        return f"{KINDS[self.kind].human} {self.name!r} (package {self.package})"

    def traits_for(self, params):
        """The traits of this component built with ``params`` (None when it has none declared)."""
        if self.traits is None or isinstance(self.traits, KINDS[self.kind].traits):
            return self.traits
        traits = self.traits(params)
        if not isinstance(traits, KINDS[self.kind].traits):
            raise ComponentError(
                f"{self.label}: its traits function must return a {KINDS[self.kind].traits.__name__} "
                f"(got {type(traits).__name__})"
            )
        return traits


class Registry:
    """Components by kind and name, each with the package that provided it."""

    def __init__(self, packages=None, broken=None):
        self._by_kind = {kind: {} for kind in KINDS}
        #: plugin name -> (distribution, version)
        self.packages = dict(packages or {})
        #: distribution -> why it failed to load (skipped plugins)
        self.broken = dict(broken or {})

    def register_function(self, kind, package):
        """The ``register(name, factory, params_cls, *, traits=None)`` callable handed to one plugin's hook."""

        def register(name, factory, params_cls, *, traits=None):
            self.add(kind, name, factory, params_cls, package, traits=traits)

        return register

    def add(self, kind, name, factory, params_cls, package, *, traits=None):
        """Add one component; a name registered twice for a kind is an error naming both packages.

        ``traits``: the kind's traits class (:mod:`mmcore.plugins.traits`) or a function of the
        params returning one; a vision encoder that passes none gets its params class's old
        attributes, read here once (deprecated).
        """
        human = KINDS[kind].human
        if not NAME_RE.match(name):
            raise MmcoreError(f"{package}: {human} name {name!r} must match [a-z0-9_]+")
        if not attrs.has(params_cls):
            raise MmcoreError(
                f"{package}: {human} {name!r}: params_cls must be an attrs class"
            )
        existing = self._by_kind[kind].get(name)
        if existing is not None:
            raise DuplicateComponentError(
                f"{human} {name!r} is registered by both {existing.package} and "
                f"{package}; uninstall one of them"
            )
        traits_cls = KINDS[kind].traits
        if traits is not None and traits_cls is None:
            raise MmcoreError(f"{package}: {human} {name!r}: {human}s declare no traits (got traits={traits!r})")
        if traits is not None and not (isinstance(traits, traits_cls) or _is_function(traits)):
            raise MmcoreError(
                f"{package}: {human} {name!r}: traits must be a {traits_cls.__name__} or a function of the "
                f"params returning one (got {type(traits).__name__})"
            )
        if traits is None and traits_cls is VisionTraits:
            traits = legacy_vision_traits(params_cls, f"{human} {name!r}", package)
        self._by_kind[kind][name] = Registration(kind, name, factory, params_cls, package, traits)

    def names(self, kind):
        """Sorted names registered for ``kind``."""
        return sorted(self._by_kind[kind])

    def all(self):
        """Every registration, by kind then name."""
        return [reg for kind in KINDS for _, reg in sorted(self._by_kind[kind].items())]

    def get(self, kind, name):
        """The registration for ``name``, or an :class:`UnknownComponentError` saying what exists."""
        try:
            return self._by_kind[kind][name]
        except KeyError:
            raise UnknownComponentError(self.unknown_message(kind, name)) from None

    def has(self, kind, name):
        """True when some package registered ``name`` for ``kind``."""
        return name in self._by_kind[kind]

    def unknown_message(self, kind, name):
        """``unknown vision encoder 'resnet5'; did you mean 'resnet50'? installed: ...``"""
        human = KINDS[kind].human
        names = self.names(kind)
        message = f"unknown {human} {name!r}"
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean {close[0]!r}?"
        message += f" installed: {', '.join(names)}." if names else f" No {human} plugin is installed."
        hint = install_hint(kind, name)
        if hint:
            message += f" {hint}"
        elif kind in PUBLISHED_KINDS:
            message += " " + find_plugins_hint(kind)
        for dist, reason in sorted(self.broken.items()):
            message += f" (not loaded: {dist}, {reason})"
        return message


def _is_function(value):
    """A traits function: callable, and not a class (``traits=VisionTraits`` forgets the parentheses)."""
    return callable(value) and not isinstance(value, type)
