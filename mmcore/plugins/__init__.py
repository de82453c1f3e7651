"""The plugin system: hookspecs, the plugin manager (entry points, built-ins), the registry."""

from mmcore.plugins.manager import get_registry, make_plugin_manager, make_registry

__all__ = ["get_registry", "make_plugin_manager", "make_registry"]
