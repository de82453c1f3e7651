"""``mmcore ensemble``."""

from __future__ import annotations

from pathlib import Path

import click

from mmcore.cli.options import device_option
from mmcore.progress import progress_for


@click.command("ensemble")
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The ensemble directory to write (must not exist).")
@click.option("--metric", type=click.Choice(["auroc", "log_loss"]), default="auroc", show_default=True,
              help="What the greedy selection maximises on the validation split.")
@click.option("--iterations", type=click.IntRange(min=1), default=25, show_default=True,
              help="Picks of the greedy selection (with replacement).")
@click.option("--initial-best", type=click.IntRange(min=0), default=0, show_default=True,
              help="Start from the N best members, each once.")
@click.option("--weights", "weighting", type=click.Choice(["greedy", "equal"]), default="greedy", show_default=True,
              help="greedy: forward selection with replacement on validation; equal: every member once (no selection).")
@click.option("--threshold", default=None, metavar="RULE",
              help="Threshold rule for the combined score (default: the first member's eval.threshold).")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def ensemble_command(run_dirs, out, metric, iterations, initial_best, weighting, threshold, device, quiet):
    """Combine finished runs into one ensemble directory: greedy selection of weights on validation,
    the combined score's temperature and threshold fitted there; eval, predict, compare, export and
    serve take the directory like a run.

    \b
    mmcore ensemble runs/x/seed1 runs/x/seed2 runs/x/seed3 --out runs/x-ensemble
    """
    from mmcore.commands.ensemble import build_ensemble

    if initial_best > iterations:
        raise click.BadParameter(f"must be at most --iterations ({iterations})", param_hint="--initial-best")
    build_ensemble(run_dirs, out, metric=metric, iterations=iterations, initial_best=initial_best, threshold=threshold,
                   weighting=weighting, device=device, progress=progress_for(quiet), echo=click.echo)
