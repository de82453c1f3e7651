"""``mmcore drift``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mmcore.cli.options import device_option
from mmcore.commands.drift import drift
from mmcore.progress import progress_for


@click.command("drift")
@click.argument("source", metavar="RUN_DIR|BUNDLE_DIR", type=click.Path(file_okay=False, path_type=Path))
@click.argument("new_csv", metavar="NEW.csv", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for drift.json and drift.html [default: SOURCE/drift].")
@click.option("--max-domain-auroc", type=click.FloatRange(0.5, 1.0), default=0.75, show_default=True,
              help="Drift when any modality's domain AUROC reaches this.")
@click.option("--max-psi", type=click.FloatRange(min=0.0, min_open=True), default=0.25, show_default=True,
              help="Drift when the score distribution's PSI reaches this.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the domain classifier's folds and samples.")
@click.option("--base-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder that relative image paths start from [default: the CSV's folder].")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def drift_command(source, new_csv, out, max_domain_auroc, max_psi, seed, base_dir, device, quiet):
    """How far the ads in NEW.csv are from the rows the run (or its bundle) was checked on.

    \b
    mmcore drift runs/demo/20261128-101500 this_week.csv
    mmcore drift bundles/demo this_week.csv --out drift/; echo $?

    Exits 10 when the rows drift (a domain AUROC or the score PSI over its limit), 0 when they do not;
    drift.json says why. A bundle gives scores only: its domain AUROC needs the run directory.
    """
    report = drift(source, new_csv, out=out, max_domain_auroc=max_domain_auroc, max_psi=max_psi, seed=seed,
                   base_dir=base_dir, device=device, progress=progress_for(quiet), echo=click.echo)
    sys.exit(report.exit_code)
