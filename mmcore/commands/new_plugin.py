"""``mmcore new-plugin``: write a complete, working plugin package to start from.

```
mmcore new-plugin mynet --kind vision                 # -> plugins/vision-mynet/
mmcore new-plugin my_words --kind text --dir ../text-my-words
```

The package (distribution ``mmcore-<kind>-<name>``, module ``mmcore_<kind>_<name>``) holds a
pyproject with the ``mmcore`` entry point, one module (a frozen attrs params class, a tiny
encoder that works as it is, one ``@hookimpl``), a README and tests calling
:mod:`mmcore.testing`. The files come from ``mmcore/templates/plugin/``; ``{{key}}`` marks
what is filled in.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import attrs

from mmcore import __version__
from mmcore.errors import MmcoreError

KINDS = ("vision", "text")
#: stricter than component names in general: the name also becomes a distribution name
PLUGIN_NAME_RE = re.compile(r"^[a-z0-9]+(_[a-z0-9]+)*$")


class ScaffoldError(MmcoreError):
    """A bad plugin name or an existing target folder."""

    exit_code = 2


@attrs.frozen
class PluginNames:
    """Every name a generated plugin uses, derived from the component name and kind."""

    name: str
    kind: str

    @property
    def slug(self):
        return self.name.replace("_", "-")

    @property
    def dist(self):
        """Distribution and entry-point name: ``mmcore-vision-my-net``."""
        return f"mmcore-{self.kind}-{self.slug}"

    @property
    def module(self):
        """Import name: ``mmcore_vision_my_net``."""
        return f"mmcore_{self.kind}_{self.name}"

    @property
    def folder(self):
        """Default folder under ``plugins/``: ``vision-my-net`` (like the shipped plugins)."""
        return f"{self.kind}-{self.slug}"

    @property
    def class_prefix(self):
        """CamelCase prefix for the module's classes: ``MyNet`` (``Vision3d`` for ``3d``)."""
        camel = "".join(part.capitalize() for part in self.name.split("_"))
        return camel if camel[0].isalpha() else self.kind.capitalize() + camel


def plugin_names(name, kind):
    """Validated :class:`PluginNames`; a bad name raises :class:`ScaffoldError` (one line)."""
    if kind not in KINDS:
        raise ScaffoldError(f"new-plugin: --kind must be one of {', '.join(KINDS)} (got {kind!r})")
    if not PLUGIN_NAME_RE.match(name):
        raise ScaffoldError(
            f"new-plugin: name {name!r} must be lowercase letters and digits, words joined by "
            f"single underscores (like my_encoder): it becomes the component name in recipes"
        )
    return PluginNames(name, kind)


def _template(path):
    """The text of ``mmcore/templates/plugin/<path>`` (package data: works from a wheel too)."""
    resource = resources.files("mmcore") / "templates" / "plugin"
    for part in path.split("/"):
        resource = resource / part
    return resource.read_text(encoding="utf-8")


def render(text, names):
    """Fill ``{{key}}`` placeholders; an unknown key is a bug in the template."""
    values = {
        "name": names.name,
        "kind": names.kind,
        "dist": names.dist,
        "module": names.module,
        "Class": names.class_prefix,
        "mmcore_version": __version__,
    }

    def fill(match):
        return values[match.group(1)]

    return re.sub(r"\{\{(\w+)\}\}", fill, text)


def plugin_files(names):
    """``{relative path: text}`` of the package to write."""
    templates = {
        "pyproject.toml": "pyproject.toml.tmpl",
        ".gitignore": "gitignore.tmpl",
        "README.md": f"{names.kind}/README.md.tmpl",
        f"src/{names.module}/__init__.py": f"{names.kind}/module.py.tmpl",
        f"tests/test_{names.kind}_{names.name}.py": f"{names.kind}/test.py.tmpl",
    }
    return {target: render(_template(source), names) for target, source in templates.items()}


def write_plugin(name, kind, directory=None):
    """Write the plugin package into ``directory`` (default ``plugins/<kind>-<name>`` in the
    current directory) and return its path. Refuses a folder that exists and is not empty."""
    names = plugin_names(name, kind)
    target = Path(directory) if directory is not None else Path("plugins") / names.folder
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ScaffoldError(f"new-plugin: {target} already exists; remove it or choose another --dir")
    files = plugin_files(names)
    for relative, text in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return target


def _already_registered(names):
    """The package that already registers this name, if any (installing both would fail)."""
    try:
        from mmcore.plugins.manager import get_registry

        for registration in get_registry().all():
            if registration.kind == names.kind and registration.name == names.name:
                return registration.package
    except Exception:  # a broken installed plugin must not stop scaffolding
        return None
    return None
