"""``mmcore cache info``, ``clear`` and ``verify [--repair]``: look at, empty and check the feature cache."""

from __future__ import annotations

import click

DIR_HELP = "Cache directory (default: $MMCORE_CACHE_DIR or ~/.cache/mmcore)."


def human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@click.group("cache")
def cache_group():
    """The on-disk cache of frozen-encoder features (shared by every run)."""


@cache_group.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="", help=DIR_HELP)
def info(directory):
    """Feature spaces (one per encoder identity and stored form), entries and sizes."""
    from mmcore.engine.cache import cache_info, cache_root

    root = cache_root(directory)
    spaces = cache_info(root)
    click.echo(f"cache directory {root}")
    if not spaces:
        click.echo("empty")
        return
    total = 0
    for space in spaces:
        total += space["bytes"]
        click.echo(
            f"{space['encoder']:<20} {space['stored']:<6} {space['dtype']:<8} "
            f"{space['entries']:>9} entries {human_bytes(space['bytes']):>10}  {space['key']}"
        )
        click.echo(f"  identity {space['identity']}")
    click.echo(f"total {len(spaces)} feature spaces, {human_bytes(total)}")


@cache_group.command()
@click.option("--all", "everything", is_flag=True, help="Remove every entry.")
@click.option("--encoder", help="Remove only the entries of this encoder (e.g. resnet50).")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="", help=DIR_HELP)
def clear(everything, encoder, directory):
    """Remove cached features: --all, or --encoder NAME."""
    from mmcore.engine.cache import cache_root, clear_cache

    if everything == bool(encoder):
        raise click.UsageError("give exactly one of --all or --encoder NAME")
    root = cache_root(directory)
    removed = clear_cache(root, encoder=encoder)
    what = f"of encoder {encoder!r} " if encoder else ""
    click.echo(f"removed {removed} feature spaces {what}from {root}")


@cache_group.command()
@click.option("--repair", is_flag=True, help="Remove what is damaged or left over (runs recompute those entries).")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="", help=DIR_HELP)
def verify(repair, directory):
    """Check every chunk against its index and every file-hash record; exit 1 if problems remain.

    \b
    mmcore cache verify            # list damaged chunks, records and leftover files
    mmcore cache verify --repair   # and remove them
    """
    import sys

    from mmcore.engine.cache import cache_root, verify_cache

    root = cache_root(directory)
    report = verify_cache(root, repair=repair)
    for line in report["problems"]:
        click.echo(line)
    click.echo(
        f"checked {root}: {report['spaces']} feature spaces, {report['chunks']} sound chunks "
        f"({report['entries']} entries), {report['records']} file-hash records; "
        f"{len(report['problems'])} problems" + (f", {report['repaired']} files removed" if repair else "")
    )
    if report["remaining"]:
        sys.exit(1)
