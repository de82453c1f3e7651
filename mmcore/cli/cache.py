"""``mmcore cache info``, ``clear`` and ``verify [--repair]``: look at, empty and check the cache, every tenant."""

from __future__ import annotations

import click

DIR_HELP = "Cache directory (default: $MMCORE_CACHE_DIR or ~/.cache/mmcore)."


@click.group("cache")
def cache_group():
    """The on-disk cache shared by every run: frozen-encoder features, file facts, OCR texts, shard indexes."""


def _size_line(tenant):
    """``OCR texts 3 entries, 1.1 KiB``: one tenant in a few words."""
    from mmcore.store.space import human_bytes

    count = "" if tenant["entries"] is None else f"{tenant['entries']} entries, "
    return f"{tenant['title']} {count}{human_bytes(tenant['bytes'])}"


@cache_group.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="", help=DIR_HELP)
def info(directory):
    """Feature spaces (one per encoder identity and stored form): entries, size, size per entry; the other tenants; free space."""
    from mmcore.store.spaces import feature_spaces
    from mmcore.store.root import cache_root
    from mmcore.store.space import human_bytes
    from mmcore.store.tenants import tenants_info

    root = cache_root(directory)
    spaces = feature_spaces(root)
    others = [t for t in tenants_info(root) if t["name"] != "features"]
    click.echo(f"cache directory {root}")
    if not spaces and not any(t["bytes"] for t in others):
        click.echo("empty")
        _free_line(root)
        return
    total = 0
    for space in spaces:
        total += space["bytes"]
        stored = space["stored"] + (f" {space['token_storage']}" if space.get("token_storage") else "")
        click.echo(
            f"{space['encoder']:<20} {stored:<13} {space['dtype']:<8} "
            f"{space['entries']:>9} entries {human_bytes(space['bytes']):>10} "
            f"({human_bytes(space['bytes_per_entry'])}/entry)  {space['key']}"
        )
        click.echo(f"  identity {space['identity']}")
    click.echo(f"total {len(spaces)} feature spaces, {human_bytes(total)}; " + "; ".join(map(_size_line, others)))
    _free_line(root)


def _free_line(root):
    """``12.3 GiB free on that disk``: what a feature pass is compared with (nothing when unknown)."""
    from mmcore.store.space import free_bytes, human_bytes

    try:
        click.echo(f"{human_bytes(free_bytes(root))} free on that disk")
    except OSError:
        pass


@cache_group.command()
@click.option("--all", "everything", is_flag=True, help="Remove every entry of every tenant.")
@click.option("--encoder", help="Remove only the feature spaces of this encoder (e.g. resnet50).")
@click.option("--tenant", "tenants", multiple=True, metavar="NAME",
              help="Empty only this tenant (repeatable): features, file-facts, ocr, shard-indexes, copied-shards.")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="", help=DIR_HELP)
def clear(everything, encoder, tenants, directory):
    """Remove cached entries: --all, --encoder NAME, or --tenant NAME.

    \b
    mmcore cache clear --all              # every tenant
    mmcore cache clear --encoder resnet50 # the feature spaces of one encoder
    mmcore cache clear --tenant ocr       # only the OCR texts
    """
    from mmcore.store.root import cache_root
    from mmcore.store.space import human_bytes
    from mmcore.errors import did_you_mean
    from mmcore.store.tenants import TENANTS, clear_cache

    if everything + bool(encoder) + bool(tenants) != 1:
        raise click.UsageError("give exactly one of --all, --encoder NAME or --tenant NAME")
    names = [t.name for t in TENANTS]
    for name in tenants:
        if name not in names:
            raise click.UsageError(f"--tenant {name}: no such tenant{did_you_mean(name, names)}; tenants: {', '.join(names)}")
    root = cache_root(directory)
    emptied = clear_cache(root, encoder=encoder, tenants=set(tenants) or None)
    spaces = [t for t in emptied if t["name"] == "features"]
    others = [t for t in emptied if t["name"] != "features"]
    if spaces:
        what = f"of encoder {encoder!r} " if encoder else ""
        click.echo(f"removed {spaces[0]['entries']} feature spaces {what}from {root}")
    if others:
        click.echo("emptied " + ", ".join(f"{t['title']} ({human_bytes(t['bytes'])})" for t in others) + f" in {root}")


@cache_group.command()
@click.option("--repair", is_flag=True, help="Remove what is damaged or left over (runs recompute those entries).")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="", help=DIR_HELP)
def verify(repair, directory):
    """Check every tenant's entries (each chunk against its index, every record, every OCR text); exit 1 if problems remain.

    \b
    mmcore cache verify            # list damaged entries and leftover files
    mmcore cache verify --repair   # and remove them
    """
    import sys

    from mmcore.store.root import cache_root
    from mmcore.store.tenants import verify_cache

    root = cache_root(directory)
    report = verify_cache(root, repair=repair)
    for line in report["problems"]:
        click.echo(line)
    click.echo(
        f"checked {root}: {report['summary']}; "
        f"{len(report['problems'])} problems" + (f", {report['repaired']} files removed" if repair else "")
    )
    if report["remaining"]:
        sys.exit(1)
