"""Collects what plugins register and knows which package gave each name.

Besides its factory and params class, a component may declare its *data classes*
(``register(name, factory, params_cls, data_classes=(MyPreprocessing,))``): the attrs classes of
objects an export bundle stores as data (an image preprocessing, a text encoder's host
featurizer) and rebuilds from their fields. A bundle names such a class by its registry name
(:meth:`Registry.data_class_name`), never by module path, so loading a bundle imports nothing
that no registered component declared. The core declares its own (:func:`core_data_classes`).
"""

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

NAME_RE = re.compile(r"^[a-z0-9_]+\Z")  # \Z: "$" also matches before a final newline
#: the prefix of the data classes the core itself declares (``mmcore/Preprocessing``)
CORE = "mmcore"


def core_data_classes():
    """The data classes the core declares: the preprocessing classes every encoder may use."""
    from mmcore.interfaces import Preprocessing
    from mmcore.kit.vision import ResizeCropPreprocessing

    return (Preprocessing, ResizeCropPreprocessing)


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
    #: ``weights(params) -> list[WeightRef | PartRef]``: what ``factory(params)`` loads (see
    #: :mod:`mmcore.kit.weights`); None: not declared, so not checked before the build
    weights: object = attrs.field(default=None, kw_only=True)
    #: attrs classes whose objects a bundle stores as data (see the module docstring)
    data_classes: tuple = attrs.field(default=(), kw_only=True)

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


class UnknownDataClassError(MmcoreError):
    """A bundle names a data class that no registered component declares."""


class Registry:
    """Components by kind and name, each with the package that provided it."""

    def __init__(self, packages=None, broken=None):
        self._by_kind = {kind: {} for kind in KINDS}
        #: plugin name -> (distribution, version)
        self.packages = dict(packages or {})
        #: distribution -> why it failed to load (skipped plugins)
        self.broken = dict(broken or {})

    def register_function(self, kind, package):
        """The ``register(name, factory, params_cls, *, traits=None, weights=None, data_classes=())`` callable
        handed to one plugin's hook."""

        def register(name, factory, params_cls, *, traits=None, weights=None, data_classes=()):
            self.add(kind, name, factory, params_cls, package, traits=traits, weights=weights,
                     data_classes=data_classes)

        return register

    def add(self, kind, name, factory, params_cls, package, *, traits=None, weights=None, data_classes=()):
        """Add one component; a name registered twice for a kind is an error naming both packages.

        ``traits``: the kind's traits class (:mod:`mmcore.plugins.traits`) or a function of the
        params returning one; a vision encoder that passes none gets its params class's old
        attributes, read here once (deprecated). ``weights``: the function that says which
        pretrained weights the factory loads (optional). ``data_classes``: the attrs classes of
        this component a bundle may store as data.
        """
        human = KINDS[kind].human
        if not NAME_RE.match(name):
            raise MmcoreError(f"{package}: {human} name {name!r} must match [a-z0-9_]+")
        if not attrs.has(params_cls):
            raise MmcoreError(
                f"{package}: {human} {name!r}: params_cls must be an attrs class"
            )
        data_classes = tuple(data_classes)
        for cls in data_classes:
            if not (isinstance(cls, type) and attrs.has(cls)):
                raise MmcoreError(f"{package}: {human} {name!r}: data_classes must be attrs classes "
                                  f"(got {cls!r})")
        if len({cls.__name__ for cls in data_classes}) != len(data_classes):
            raise MmcoreError(f"{package}: {human} {name!r}: two data_classes share a class name")
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
        if weights is not None and not callable(weights):
            raise MmcoreError(f"{package}: {human} {name!r}: weights must be a function of the params")
        self._by_kind[kind][name] = Registration(kind, name, factory, params_cls, package, traits,
                                                 weights=weights, data_classes=data_classes)

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

    def data_class_name(self, cls, *, kind, name):
        """The registry name of data class ``cls`` for component ``name`` of ``kind``, or None when
        neither that component nor the core declares it: ``vision/siglip2_naflex_base/NaflexPreprocessing``
        (the component's own declaration) or ``mmcore/Preprocessing`` (the core's)."""
        registration = self._by_kind[kind].get(name)
        if registration is not None and cls in registration.data_classes:
            return f"{kind}/{name}/{cls.__name__}"
        if cls in core_data_classes():
            return f"{CORE}/{cls.__name__}"
        return None

    def data_class(self, data_name):
        """The class a registry name from :meth:`data_class_name` stands for, or
        :class:`UnknownDataClassError` saying what is declared. Imports nothing: the class was
        declared by the core or by a component some installed plugin registered."""
        if not isinstance(data_name, str):
            raise UnknownDataClassError(f"must be a data class name (a string), got {type(data_name).__name__}")
        parts = data_name.split("/")
        if len(parts) == 2 and parts[0] == CORE:
            declared = core_data_classes()
            where = "the mmcore core"
        elif len(parts) == 3 and parts[0] in self._by_kind:
            kind, name, _ = parts
            if name not in self._by_kind[kind]:
                raise UnknownDataClassError(f"{data_name!r}: {self.unknown_message(kind, name)}")
            declared = self._by_kind[kind][name].data_classes
            where = f"{KINDS[kind].human} {name!r}"
        else:
            raise UnknownDataClassError(
                f"{data_name!r} is not a data class name ({CORE}/<Class> or <kind>/<component>/<Class>)")
        for cls in declared:
            if cls.__name__ == parts[-1]:
                return cls
        names = ", ".join(cls.__name__ for cls in declared) or "none"
        raise UnknownDataClassError(f"{data_name!r}: {where} declares no data class {parts[-1]!r} (it declares: {names})")

    def data_class_by_path(self, module, qualname):
        """The declared data class whose module and qualified name are these, else None: how the
        bundles of formats 1 and 2, which named a class by module path, are read. The strings are
        compared with the declared classes; nothing is imported."""
        declared = [*core_data_classes(), *(cls for reg in self.all() for cls in reg.data_classes)]
        for cls in declared:
            if (cls.__module__, cls.__qualname__) == (module, qualname):
                return cls
        return None

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
