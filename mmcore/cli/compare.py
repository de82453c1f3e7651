"""``mmcore compare``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mmcore.commands.compare import compare
from mmcore.errors import MmcoreError


def _fail(exc):
    """Print an MmcoreError's lines and exit with its code (also when run outside the group)."""
    for line in str(exc).splitlines() or [type(exc).__name__]:
        click.echo(line, err=True)
    sys.exit(exc.exit_code)


@click.command("compare")
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True,
                type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write comparison.md and comparison.csv into this folder.")
@click.option("--format", "fmt", type=click.Choice(["md", "csv"]), default="md", show_default=True,
              help="What to print.")
def compare_command(run_dirs, out, fmt):
    """Tabulate the test metrics of several runs and the recipe keys that differ between them.

    \b
    mmcore compare runs/demo/20261128-101500 runs/demo/20261128-113000
    mmcore compare runs/demo/sweep-20261128-120000 --out reports/

    A folder of runs (a sweep, an experiment) stands for every run in it.
    """
    try:
        compare(run_dirs, out=out, fmt=fmt, echo=lambda text: click.echo(text, nl=False),
                note=lambda line: click.echo(line, err=True))
    except MmcoreError as exc:
        _fail(exc)
