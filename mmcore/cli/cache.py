"""``mmcore cache info``, ``clear`` and ``verify [--repair]``: look at, empty and check the cache, every tenant."""

from __future__ import annotations

import sys

import click

from mmcore.commands.cache import TENANT_NAMES, UnknownTenant, cache_clear, cache_info, cache_verify

DIR_HELP = "Cache directory (default: $MMCORE_CACHE_DIR or ~/.cache/mmcore)."


@click.group("cache")
def cache_group():
    """The on-disk cache shared by every run: frozen-encoder features, file facts, OCR texts, shard indexes."""


@cache_group.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="", help=DIR_HELP)
def info(directory):
    """Feature spaces (one per encoder identity and stored form): entries, size, size per entry; the other tenants; free space."""
    cache_info(directory, echo=click.echo)


@cache_group.command()
@click.option("--all", "everything", is_flag=True, help="Remove every entry of every tenant.")
@click.option("--encoder", help="Remove only the feature spaces of this encoder (e.g. resnet50).")
@click.option("--tenant", "tenants", multiple=True, metavar="NAME",
              help=f"Empty only this tenant (repeatable): {', '.join(TENANT_NAMES)}.")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="", help=DIR_HELP)
def clear(everything, encoder, tenants, directory):
    """Remove cached entries: --all, --encoder NAME, or --tenant NAME.

    \b
    mmcore cache clear --all              # every tenant
    mmcore cache clear --encoder resnet50 # the feature spaces of one encoder
    mmcore cache clear --tenant ocr       # only the OCR texts
    """
    if everything + bool(encoder) + bool(tenants) != 1:
        raise click.UsageError("give exactly one of --all, --encoder NAME or --tenant NAME")
    try:
        cache_clear(directory, encoder=encoder, tenants=tenants, echo=click.echo)
    except UnknownTenant as exc:
        raise click.UsageError(str(exc)) from None


@cache_group.command()
@click.option("--repair", is_flag=True, help="Remove what is damaged or left over (runs recompute those entries).")
@click.option("--dir", "directory", type=click.Path(file_okay=False), default="", help=DIR_HELP)
def verify(repair, directory):
    """Check every tenant's entries (each chunk against its index, every record, every OCR text); exit 1 if problems remain.

    \b
    mmcore cache verify            # list damaged entries and leftover files
    mmcore cache verify --repair   # and remove them
    """
    if cache_verify(directory, repair=repair, echo=click.echo):
        sys.exit(1)
