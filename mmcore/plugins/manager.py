"""The plugin manager: hookspecs, built-ins, entry points (group ``mmcore``), and the registry."""

import functools
import importlib
import importlib.metadata
import os
import sys

import pluggy

import mmcore.plugins.hookspecs as hookspecs
from mmcore.errors import MmcoreError
from mmcore.plugins.kinds import KIND_TABLE
from mmcore.plugins.registry import CORE, Registry, exception_line

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
    Returns ``(pm, packages, broken)``: ``packages`` maps plugin name -> (distribution, version)
    (installed plugins' from ``pm.list_plugin_distinfo()``), ``broken`` maps distribution -> why
    it failed to load (such plugins are skipped with a warning).
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
        for name, (dist_name, _, _) in sorted(_entry_points().items()):
            if allowed is not None and name not in allowed and dist_name not in allowed:
                continue
            try:
                # pluggy loads, registers and records the distribution of this one entry point
                pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
            except pluggy.PluginValidationError:
                raise  # a misspelled hook is the plugin author's bug: say so, do not skip
            except Exception as exc:  # a broken plugin must not take the others down with it
                broken[dist_name] = reason = exception_line(exc)
                print(
                    f"warning: plugin {dist_name} failed to load ({reason}); skipped. Reinstall it, "
                    f"or leave it out with MMCORE_LOAD_PLUGINS",
                    file=sys.stderr,
                )
        for plugin, dist in pm.list_plugin_distinfo():
            packages[pm.get_name(plugin)] = (dist.metadata["Name"], dist.version)
    for name, plugin in extra_plugins:
        pm.register(plugin, name=name)
        packages[name] = (name, "")
    pm.check_pending()
    return pm, packages, broken


def collect(pm, packages, broken=None, *, arguments=None):
    """A :class:`Registry` of what every plugin registers, each name credited to its package.

    Hooks are called by keyword through pluggy, one plugin at a time (``subset_hook_caller``)
    so that its ``register`` knows the package. ``arguments`` are further keyword arguments
    for hooks that take them: pluggy hands each implementation only those it names, so a hook
    can gain a parameter without breaking the plugins written before it.
    """
    registry = Registry(packages, broken)
    plugins = pm.get_plugins()
    for kind in KIND_TABLE:
        hook = getattr(pm.hook, kind.hook, None)
        if hook is None:
            continue
        for impl in hook.get_hookimpls():
            package = packages.get(impl.plugin_name, (impl.plugin_name, ""))[0]
            others = [plugin for plugin in plugins if plugin is not impl.plugin]
            caller = pm.subset_hook_caller(kind.hook, remove_plugins=others)
            caller(register=registry.register_function(kind.name, package), **(arguments or {}))
    return registry


def make_registry(load_entrypoints=True, extra_plugins=()):
    """A fresh :class:`Registry` (tests pass ``load_entrypoints=False`` and their fakes)."""
    return collect(*make_plugin_manager(load_entrypoints, extra_plugins))


@functools.lru_cache(maxsize=1)
def get_registry():
    """The process-wide registry of built-ins and installed plugins."""
    return make_registry()


class InstalledDataClasses:
    """The data classes a bundle may name (:meth:`Registry.data_class`, :meth:`Registry.data_class_by_path`)
    among the core's and the installed plugins', the plugins loaded only for a name the core does
    not declare: a bundle of core classes (``mmcore/Preprocessing``) opens without importing a plugin.
    """

    #: no plugins: the core's own data classes, with the registry's lookups and messages
    _core = Registry()

    def data_class(self, data_name):
        """The class registry name ``data_name`` stands for (see :meth:`Registry.data_class`)."""
        if isinstance(data_name, str) and data_name.startswith(f"{CORE}/"):
            return self._core.data_class(data_name)
        return get_registry().data_class(data_name)

    def data_class_by_path(self, module, qualname):
        """A format 1 or 2 bundle's class by module path (see :meth:`Registry.data_class_by_path`)."""
        return self._core.data_class_by_path(module, qualname) or get_registry().data_class_by_path(module, qualname)
