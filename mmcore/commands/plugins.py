"""``mmcore plugins``: the installed plugin packages and the components each registers."""

from __future__ import annotations

from mmcore.plugins.kinds import KINDS
from mmcore.plugins.manager import get_registry


def list_plugins(*, registry=None, echo=print):
    """One line per package (``mmcore`` first), then its components by kind; a package that failed to load says why."""
    registry = registry or get_registry()
    by_package = {}
    for reg in registry.all():
        by_package.setdefault(reg.package, {}).setdefault(reg.kind, []).append(reg.name)
    versions = {dist: version for dist, version in registry.packages.values()}
    for dist, reason in sorted(registry.broken.items()):
        echo(f"{dist}  FAILED TO LOAD: {reason}")
    for package in sorted(by_package, key=lambda p: (p != "mmcore", p)):
        echo(f"{package} {versions.get(package, '')}".rstrip())
        for kind in KINDS:
            names = by_package[package].get(kind)
            if names:
                echo(f"  {plural(KINDS[kind].human):<16} {', '.join(sorted(names))}")


def plural(noun):
    return noun + "es" if noun.endswith("s") else noun + "s"
