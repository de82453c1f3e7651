"""The plugin manager: hookspecs, built-ins, entry points (group ``mmcore``), and the registry."""

import functools
import importlib
import importlib.metadata
import os
import sys

import pluggy

from mmcore.errors import MmcoreError
from mmcore.plugins import hookspecs
from mmcore.plugins.registry import KINDS, Registry

ENTRY_POINT_GROUP = "mmcore"

BUILTIN_MODULES = (
    "mmcore.builtin.pooling",
    "mmcore.builtin.fusion",
    "mmcore.builtin.heads",
    "mmcore.builtin.losses",
    "mmcore.builtin.schedulers",
    "mmcore.builtin.augmentations",
    "mmcore.builtin.text_none",
    "mmcore.builtin.text_concat",
)


def _allowed_plugins():
    """Names from ``MMCORE_LOAD_PLUGINS`` (comma separated), or None for "all"."""
    value = os.environ.get("MMCORE_LOAD_PLUGINS")
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _entry_points():
    """The ``mmcore`` entry points, refusing two distributions that expose the same name.

    pluggy would silently keep only one of them.
    """
    seen = {}
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            dist_name = dist.metadata["Name"]
            if ep.name in seen and seen[ep.name][0] != dist_name:
                raise MmcoreError(
                    f"entry point {ep.name!r} (group {ENTRY_POINT_GROUP!r}) is exposed by both "
                    f"{seen[ep.name][0]} and {dist_name}; uninstall one of them"
                )
            seen[ep.name] = (dist_name, dist.version, ep)
    return seen


def make_plugin_manager(load_entrypoints=True, extra_plugins=()):
    """A plugin manager with the hookspecs, the built-ins and (optionally) installed plugins.

    ``extra_plugins`` are ``(name, module_or_object)`` pairs registered explicitly (tests).
    Returns ``(pm, packages, broken)``: ``packages`` maps plugin name -> (distribution, version),
    ``broken`` maps distribution -> why it failed to load (such plugins are skipped with a warning).
    """
    pm = pluggy.PluginManager("mmcore")
    pm.add_hookspecs(hookspecs)
    from mmcore import __version__

    packages, broken = {}, {}
    for module_name in BUILTIN_MODULES:
        pm.register(importlib.import_module(module_name), name=module_name)
        packages[module_name] = ("mmcore", __version__)
    if load_entrypoints:
        allowed = _allowed_plugins()
        for name, (dist_name, version, ep) in sorted(_entry_points().items()):
            if allowed is not None and name not in allowed and dist_name not in allowed:
                continue
            if pm.get_plugin(name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not take the others down with it
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                broken[dist_name] = reason
                print(
                    f"warning: plugin {dist_name} failed to load ({reason}); skipped. Reinstall it, "
                    f"or leave it out with MMCORE_LOAD_PLUGINS",
                    file=sys.stderr,
                )
                continue
            pm.register(plugin, name=name)
            packages[name] = (dist_name, version)
    for name, plugin in extra_plugins:
        pm.register(plugin, name=name)
        packages[name] = (name, "")
    pm.check_pending()
    return pm, packages, broken


def collect(pm, packages, broken=None):
    """Call every plugin's hooks with a ``register`` bound to that plugin's package."""
    registry = Registry()
    for kind, (hook_name, _, _) in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            package = packages.get(impl.plugin_name, (impl.plugin_name, ""))[0]
            register = registry.register_function(kind, package)
            impl.function(*[register for _ in impl.argnames])
    registry.packages = packages
    registry.broken = dict(broken or {})
    return registry


def make_registry(load_entrypoints=True, extra_plugins=()):
    """A fresh :class:`Registry` (tests pass ``load_entrypoints=False`` and their fakes)."""
    return collect(*make_plugin_manager(load_entrypoints, extra_plugins))


@functools.lru_cache(maxsize=1)
def get_registry():
    """The process-wide registry of built-ins and installed plugins."""
    return make_registry()
