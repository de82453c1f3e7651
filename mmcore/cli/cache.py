"""``mmcore cache info``, ``clear`` and ``verify [--repair]``: look at, empty and check the feature cache."""

from __future__ import annotations

import click

DIR_HELP = "Cache directory (default: $MMCORE_CACHE_DIR or ~/.cache/mmcore)."


@click.group("cache")
def cache_group():
    """The on-disk cache of frozen-encoder features (shared by every run)."""


@cache_group.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="", help=DIR_HELP)
def info(directory):
    """Feature spaces (one per encoder identity and stored form): entries, size, size per entry; free space."""
    from mmcore.engine.cache import cache_info, cache_root, human_bytes, records_info

    root = cache_root(directory)
    spaces = cache_info(root)
    click.echo(f"cache directory {root}")
    if not spaces:
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
    extra = records_info(root)
    click.echo(
        f"total {len(spaces)} feature spaces, {human_bytes(total)}; file hashes {human_bytes(extra['files'])}, "
        f"image checks {human_bytes(extra['checks'])}, shard indexes {human_bytes(extra['shards'])}, "
        f"copied shards {human_bytes(extra['spool'])}"
    )
    _free_line(root)


def _free_line(root):
    """``12.3 GiB free on that disk``: what a feature pass is compared with (nothing when unknown)."""
    from mmcore.engine.cache import free_bytes, human_bytes

    try:
        click.echo(f"{human_bytes(free_bytes(root))} free on that disk")
    except OSError:
        pass


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
