"""``mmcore predict``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mmcore.cli.options import cache_option, device_option, verify_option
from mmcore.commands.predict import predict_csv
from mmcore.commands.predict_ranks import DEFAULT_CHUNK_ROWS, launched_by_torchrun, predict_in_ranks
from mmcore.errors import MmcoreError
from mmcore.progress import progress_for


def _fail(exc):
    """Print an MmcoreError's lines and exit with its code (also when run outside the group)."""
    for line in str(exc).splitlines() or [type(exc).__name__]:
        click.echo(line, err=True)
    sys.exit(exc.exit_code)


@click.command("predict")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("input_csv", metavar="INPUT.csv", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="CSV (or .parquet) to write: the input columns + score, calibrated_score, prediction.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Rows per forward pass [default: the run's eval.batch_size or train.batch_size].")
@click.option("--base-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder that relative image paths start from [default: the CSV's folder].")
@device_option
@cache_option
@verify_option
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Score with N processes on this machine (launches torchrun; each on its local rank's GPU, or the "
                   "CPU), by chunks kept in OUTPUT.parts/ until OUTPUT is written: after a kill, the same command resumes.")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=DEFAULT_CHUNK_ROWS, show_default=True,
              help="With --nproc or under torchrun: rows per chunk (what a kill can cost).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def predict_command(run_dir, input_csv, output, batch_size, base_dir, device, cache, verify, nproc, chunk_rows, quiet):
    """Score INPUT.csv (local_image_path[,label][,text_info]) with the finished run (or export bundle) in RUN_DIR.

    \b
    mmcore predict runs/demo/20261128-101500 new_ads.csv -o scored.csv
    mmcore predict bundles/demo new_ads.csv -o scored.csv --device cuda
    mmcore predict bundles/demo new_ads.parquet -o scored.parquet --nproc 4

    prediction is calibrated_score >= the threshold the run tuned on validation.
    text_info may be left out for vision_only runs.
    """
    try:
        if nproc or launched_by_torchrun():  # docs/distributed.md, "Scoring at scale"
            predict_in_ranks(run_dir, input_csv, output, nproc=nproc, chunk_rows=chunk_rows, batch_size=batch_size,
                             base_dir=base_dir, device=device, cache=cache, verify=verify or None,
                             progress=progress_for(quiet), echo=click.echo)
            return
        predict_csv(
            run_dir, input_csv, output, batch_size=batch_size, base_dir=base_dir, device=device, cache=cache,
            verify=verify or None, progress=progress_for(quiet), echo=click.echo,
        )
    except MmcoreError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        click.echo(f"interrupted; {output} was not written", err=True)
        sys.exit(130)

