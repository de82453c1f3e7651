"""Optional third-party packages of the kit: one line saying what to install when one is missing.

mmcore itself needs neither transformers nor timm; the plugins that build on them depend on them,
and mmcore declares them as the extras ``text`` (transformers, sentence-transformers) and
``timm``, so ``pip install 'mmcore[text]'`` gets them too.
"""

from __future__ import annotations

import importlib

from mmcore.errors import MmcoreError

EXTRAS = {
    "transformers": ("transformers", "text"),
    "sentence_transformers": ("sentence-transformers", "text"),
    "timm": ("timm", "timm"),
    "captum": ("captum", "explain"),
}


class MissingDependency(MmcoreError):
    """An optional package a component needs is not installed."""


def require(module, what):
    """Import ``module`` or raise :class:`MissingDependency`, one line naming what needs it and the pip command."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package, extra = EXTRAS.get(module, (module, None))
        hint = f"pip install '{package}'" + (f" (or 'mmcore[{extra}]')" if extra else "")
        raise MissingDependency(f"{what} needs the {package} package, which is not installed: {hint}") from None
