"""``mmcore tune``."""

from __future__ import annotations

import click

from mmcore.cli.options import set_option
from mmcore.progress import progress_for


@click.command("tune")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--space", "space", required=True, type=click.Path(dir_okay=False),
              help='Search space TOML keyed by recipe paths, e.g. "train.learning_rate" = { log_uniform = [1e-5, 1e-2] }.')
@click.option("--trials", type=int, default=None, help="Trials in the study (all processes together; grid: its size).")
@click.option("--sampler", default="tpe", show_default=True, metavar="tpe|random|grid[:k=v,...]",
              help="Optuna sampler, with its keyword arguments after a colon.")
@click.option("--pruner", default="median", show_default=True, metavar="median|hyperband|none[:k=v,...]",
              help="Prune from the per-epoch validation metric, e.g. median:n_startup_trials=1.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Trials at once on this machine (processes; one GPU each when there are several).")
@click.option("--storage", default=None, metavar="URL",
              help="SQLAlchemy URL of the Optuna storage (default: SQLite in the study directory).")
@click.option("--study", default=None, help="Study name (default: the space file's name).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Study directory (default <output_dir>/<experiment>/tune-<study>).")
@click.option("--nproc", type=click.IntRange(min=1), default=None, help="Each trial is a torchrun DDP run of N processes.")
@click.option("--seed", type=int, default=None, help="Sampler seed (each --jobs worker adds its number).")
@click.option("--heartbeat", type=click.IntRange(min=1), default=None,
              help="Seconds between a trial's liveness records; a trial silent for 5 of them is retried.")
@set_option
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
def tune_command(recipe, space, trials, sampler, pruner, jobs, storage, study, out, nproc, seed, heartbeat, overrides, quiet):
    """Search hyperparameters of RECIPE with Optuna; each trial is a run directory.

    \b
    mmcore tune recipes/demo.toml --space space.toml --trials 20
    mmcore tune recipes/demo.toml --space space.toml --trials 20 --jobs 2 --pruner hyperband
    mmcore tune recipes/demo.toml --space space.toml --sampler grid
    mmcore tune recipes/demo.toml --space space.toml --trials 50 --storage postgresql://host/db   # on each machine

    Run the same command again to continue a stopped study.
    """
    import sys

    from mmcore.commands.tune import run_tune

    record = run_tune(
        recipe, space, trials=trials, overrides=overrides, sampler=sampler, pruner=pruner, jobs=jobs, storage=storage,
        study=study, out=out, nproc=nproc, seed=seed, heartbeat=heartbeat, progress=progress_for(quiet),
        echo=click.echo,
    )
    if any(entry["state"] == "fail" for entry in record["trials"]):
        sys.exit(1)  # which ones failed, and why, was said above
