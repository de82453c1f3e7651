"""Collects what plugins register and knows which package gave each name."""

import difflib
import re

import attrs

from mmcore.errors import MmcoreError
from mmcore.plugins.kinds import KINDS
from mmcore.plugins.known import install_hint

#: the kinds third parties publish packages for (the unknown-name message says how to find them)
PUBLISHED_KINDS = ("vision", "text", "ocr")


def find_plugins_hint(kind):
    """How to get a ``kind`` component nobody installed: where plugins come from, not a repository path."""
    return (
        f"More: pip install the package that provides it (plugins are named mmcore-{kind}-<name>); "
        f"`mmcore plugins` lists what is installed"
    )

NAME_RE = re.compile(r"^[a-z0-9_]+\Z")  # \Z: "$" also matches before a final newline


class UnknownComponentError(MmcoreError):
    """A recipe names a component nobody registered."""


class DuplicateComponentError(MmcoreError):
    """Two packages registered the same name for the same kind."""


@attrs.frozen
class Registration:
    """One registered component."""

    kind: str
    name: str
    factory: object
    params_cls: type
    package: str
    #: ``weights(params) -> list[WeightRef | PartRef]``: what ``factory(params)`` loads (see
    #: :mod:`mmcore.kit.weights`); None: not declared, so not checked before the build
    weights: object = attrs.field(default=None, kw_only=True)


class Registry:
    """Components by kind and name, each with the package that provided it."""

    def __init__(self, packages=None, broken=None):
        self._by_kind = {kind: {} for kind in KINDS}
        #: plugin name -> (distribution, version)
        self.packages = dict(packages or {})
        #: distribution -> why it failed to load (skipped plugins)
        self.broken = dict(broken or {})

    def register_function(self, kind, package):
        """The ``register(name, factory, params_cls, *, weights=None)`` callable handed to one plugin's hook."""

        def register(name, factory, params_cls, *, weights=None):
            self.add(kind, name, factory, params_cls, package, weights=weights)

        return register

    def add(self, kind, name, factory, params_cls, package, *, weights=None):
        """Add one component; a name registered twice for a kind is an error naming both packages.

        ``weights``: the function that says which pretrained weights the factory loads (optional).
        """
        if not NAME_RE.match(name):
            raise MmcoreError(f"{package}: {KINDS[kind].human} name {name!r} must match [a-z0-9_]+")
        if not attrs.has(params_cls):
            raise MmcoreError(
                f"{package}: {KINDS[kind].human} {name!r}: params_cls must be an attrs class"
            )
        existing = self._by_kind[kind].get(name)
        if existing is not None:
            raise DuplicateComponentError(
                f"{KINDS[kind].human} {name!r} is registered by both {existing.package} and "
                f"{package}; uninstall one of them"
            )
        if weights is not None and not callable(weights):
            raise MmcoreError(f"{package}: {KINDS[kind].human} {name!r}: weights must be a function of the params")
        self._by_kind[kind][name] = Registration(kind, name, factory, params_cls, package, weights=weights)

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
