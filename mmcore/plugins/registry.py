"""Collects what plugins register and knows which package gave each name."""

import difflib
import re

import attrs

from mmcore.errors import MmcoreError
from mmcore.plugins.known import install_hint

#: kind -> (hook name, human name, plugin folder prefix for the install hint)
KINDS = {
    "vision": ("register_vision_encoders", "vision encoder", "vision"),
    "text": ("register_text_encoders", "text encoder", "text"),
    "pooling": ("register_poolings", "pooling", None),
    "fusion": ("register_fusions", "fusion", None),
    "head": ("register_heads", "head", None),
    "loss": ("register_losses", "loss", None),
    "scheduler": ("register_schedulers", "scheduler", None),
    "augmentation": ("register_augmentations", "augmentation", None),
    "ocr": ("register_ocr_engines", "OCR engine", "ocr"),
}

NAME_RE = re.compile(r"^[a-z0-9_]+$")


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


class Registry:
    """Components by kind and name, each with the package that provided it."""

    def __init__(self):
        self._by_kind = {kind: {} for kind in KINDS}
        self.packages = {}
        #: distribution -> why it failed to load (skipped plugins)
        self.broken = {}

    def register_function(self, kind, package):
        """The ``register(name, factory, params_cls)`` callable handed to one plugin's hook."""

        def register(name, factory, params_cls):
            self.add(kind, name, factory, params_cls, package)

        return register

    def add(self, kind, name, factory, params_cls, package):
        """Add one component; a name registered twice for a kind is an error naming both packages."""
        if not NAME_RE.match(name):
            raise MmcoreError(f"{package}: {KINDS[kind][1]} name {name!r} must match [a-z0-9_]+")
        if not attrs.has(params_cls):
            raise MmcoreError(
                f"{package}: {KINDS[kind][1]} {name!r}: params_cls must be an attrs class"
            )
        existing = self._by_kind[kind].get(name)
        if existing is not None:
            raise DuplicateComponentError(
                f"{KINDS[kind][1]} {name!r} is registered by both {existing.package} and "
                f"{package}; uninstall one of them"
            )
        self._by_kind[kind][name] = Registration(kind, name, factory, params_cls, package)

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
        return name in self._by_kind[kind]

    def unknown_message(self, kind, name):
        """``unknown vision encoder 'resnet5'; did you mean 'resnet50'? installed: ...``"""
        _, human, folder = KINDS[kind]
        names = self.names(kind)
        message = f"unknown {human} {name!r}"
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean {close[0]!r}?"
        message += f" installed: {', '.join(names)}." if names else f" No {human} plugin is installed."
        hint = install_hint(kind, name)
        if hint:
            message += f" {hint}"
        elif folder:
            message += f" More: pip install ./plugins/{folder}-<name>"
        for dist, reason in sorted(self.broken.items()):
            message += f" (not loaded: {dist}, {reason})"
        return message
