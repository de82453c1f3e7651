"""``mmcore audit``."""

from __future__ import annotations

from pathlib import Path

import click

from mmcore.commands.audit import FIXES, audit
from mmcore.progress import progress_for


@click.command("audit")
@click.argument("source", metavar="RECIPE|RUN_DIR|BAG_DIR", type=click.Path(path_type=Path))
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="k of the k-fold heads.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds.")
@click.option("--group-column", default=None, metavar="COLUMN",
              help="A CSV column whose equal values keep rows in one fold (a campaign, an advertiser).")
@click.option("--duplicates", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.95, show_default=True,
              help="Cosine similarity from which two images count as copies of one ad.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the audit is written [default: RUN_DIR/audit, or audit/<recipe name>/].")
@click.option("--fix", type=click.Choice(FIXES), default=None,
              help="Write cleaned train and val CSVs: drop the flagged rows, or relabel them.")
@click.option("--out", "fix_out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the cleaned CSVs of --fix (the inputs are never changed).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def audit_command(source, folds, seed, group_column, duplicates, out_dir, fix, fix_out, quiet):
    """Find suspect labels, near-duplicate ads and label noise per slice, from out-of-fold scores.

    \b
    mmcore audit recipes/demo.toml
    mmcore audit runs/demo/20261128-101500 --fix relabel --out cleaned/

    Writes label_issues.csv (worst first), near_duplicates.csv, label_noise.json, summary.json and
    report.html. Flagged labels are findings: the exit code is 0.
    """
    audit(source, folds=folds, seed=seed, duplicates=duplicates, out_dir=out_dir, fix=fix, fix_out=fix_out,
          group_column=group_column, progress=progress_for(quiet), echo=click.echo)
