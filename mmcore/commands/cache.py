"""``mmcore cache info``, ``clear`` and ``verify [--repair]``: look at, empty and check the cache
directory, every tenant (:mod:`mmcore.store.tenants`)."""

from __future__ import annotations

from mmcore.errors import MmcoreError, did_you_mean
from mmcore.store.root import cache_root
from mmcore.store.space import free_bytes, human_bytes
from mmcore.store.spaces import feature_spaces
from mmcore.store.tenants import TENANTS, clear_cache, tenants_info, verify_cache

#: every tenant's name, as ``--tenant`` takes it
TENANT_NAMES = tuple(t.name for t in TENANTS)


def cache_info(directory="", *, echo=print):
    """Feature spaces (one per encoder identity and stored form): entries, size, size per entry; the other
    tenants; the free space on the cache's disk."""
    root = cache_root(directory)
    spaces = feature_spaces(root)
    others = [t for t in tenants_info(root) if t["name"] != "features"]
    echo(f"cache directory {root}")
    if not spaces and not any(t["bytes"] for t in others):
        echo("empty")
        _free_line(root, echo)
        return
    total = 0
    for space in spaces:
        total += space["bytes"]
        stored = space["stored"] + (f" {space['token_storage']}" if space.get("token_storage") else "")
        echo(
            f"{space['encoder']:<20} {stored:<13} {space['dtype']:<8} "
            f"{space['entries']:>9} entries {human_bytes(space['bytes']):>10} "
            f"({human_bytes(space['bytes_per_entry'])}/entry)  {space['key']}"
        )
        echo(f"  identity {space['identity']}")
    echo(f"total {len(spaces)} feature spaces, {human_bytes(total)}; " + "; ".join(map(_size_line, others)))
    _free_line(root, echo)


def cache_clear(directory="", *, encoder=None, tenants=(), echo=print):
    """Remove cached entries: the feature spaces of ``encoder``, the ``tenants`` named, or (neither given)
    every entry of every tenant. An unknown tenant is one line naming the ones there are."""
    for name in tenants:
        if name not in TENANT_NAMES:
            raise UnknownTenant(f"--tenant {name}: no such tenant{did_you_mean(name, TENANT_NAMES)}; "
                                f"tenants: {', '.join(TENANT_NAMES)}")
    root = cache_root(directory)
    emptied = clear_cache(root, encoder=encoder, tenants=set(tenants) or None)
    spaces = [t for t in emptied if t["name"] == "features"]
    others = [t for t in emptied if t["name"] != "features"]
    if spaces:
        what = f"of encoder {encoder!r} " if encoder else ""
        echo(f"removed {spaces[0]['entries']} feature spaces {what}from {root}")
    if others:
        echo("emptied " + ", ".join(f"{t['title']} ({human_bytes(t['bytes'])})" for t in others) + f" in {root}")


def cache_verify(directory="", *, repair=False, echo=print):
    """Check every tenant's entries (each chunk against its index, every record, every OCR text) and the
    temporary files killed writes left; ``repair`` removes what is damaged or left over. Returns whether
    problems remain."""
    root = cache_root(directory)
    report = verify_cache(root, repair=repair)
    for line in report["problems"]:
        echo(line)
    echo(
        f"checked {root}: {report['summary']}; "
        f"{len(report['problems'])} problems" + (f", {report['repaired']} files removed" if repair else "")
    )
    return bool(report["remaining"])


class UnknownTenant(MmcoreError):
    """``--tenant`` names no tenant (a usage mistake: exit 2)."""

    exit_code = 2


def _size_line(tenant):
    """``OCR texts 3 entries, 1.1 KiB``: one tenant in a few words."""
    count = "" if tenant["entries"] is None else f"{tenant['entries']} entries, "
    return f"{tenant['title']} {count}{human_bytes(tenant['bytes'])}"


def _free_line(root, echo):
    """``12.3 GiB free on that disk``: what a feature pass is compared with (nothing when unknown)."""
    try:
        echo(f"{human_bytes(free_bytes(root))} free on that disk")
    except OSError:
        pass
