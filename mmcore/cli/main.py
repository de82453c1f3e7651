"""The ``mmcore`` command line."""

from __future__ import annotations

import sys

import click

from mmcore import __version__
from mmcore.cli.options import cache_option, device_option, set_option, verify_option
from mmcore.errors import MmcoreError
from mmcore.progress import progress_for


class MmcoreGroup(click.Group):
    """Turns MmcoreError into its one-line messages and an exit code, not a traceback; Ctrl-C into 130."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MmcoreError as exc:
            for line in str(exc).splitlines() or [type(exc).__name__]:
                click.echo(line, err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:  # every command (eval, export, ...) exits 130 on Ctrl-C, like run
            click.echo("interrupted", err=True)
            sys.exit(130)
        finally:
            _leave_process_group()


def _leave_process_group():
    """Under torchrun, leave the process group before the interpreter exits (see
    :func:`~mmcore.dist.shutdown_distributed`); a command that never imported torch has none."""
    if "torch" in sys.modules:
        from mmcore.dist import shutdown_distributed

        shutdown_distributed()


@click.group(cls=MmcoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mmcore")
def cli():
    """Train binary classifiers of ad images from the image and its OCR text.

    \b
    mmcore run recipes/demo.toml          train, evaluate, write a run directory
    mmcore show recipes/x.toml --set ...  print the fully resolved recipe
    mmcore plugins                        what is installed
    """


@cli.command()
def plugins():
    """List installed plugin packages and the components each registers."""
    from mmcore.commands.plugins import list_plugins

    list_plugins(echo=click.echo)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@set_option
@click.option("--weights", "check_weights", is_flag=True,
              help="Also find the pretrained weights it needs (as # comments); exit 2 naming every missing one.")
def show(recipe, overrides, check_weights):
    """Print the fully resolved RECIPE as TOML (nothing is trained)."""
    from mmcore.commands.show import show_recipe

    show_recipe(recipe, overrides, check_weights=check_weights, echo=click.echo)


@cli.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@set_option
@click.option("--out", type=click.Path(file_okay=False), help="Run directory (default runs/<experiment>/<timestamp>).")
@click.option("--resume", "resume", type=click.Path(file_okay=False), help="Continue a stopped run in its directory.")
@click.option("--nproc", type=click.IntRange(min=1), default=None,
              help="Train with N processes on this machine (launches torchrun; DDP, gloo on CPU, NCCL on GPU).")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2",
              help="Run the grid of these values (repeatable: the cartesian product), one run each, then compare.")
@click.option("--dry-run", is_flag=True, help="With --sweep: list the grid, train nothing.")
@click.option("--seeds", type=click.IntRange(min=1, max=64), default=None,
              help="Train N runs (seeds seed..seed+N-1) into OUT/members/ and combine them as an ensemble in OUT.")
@click.option("--folds", type=click.IntRange(min=2, max=64), default=None,
              help="k-fold bag: one run per fold of train+val into OUT/members/, combined as an ensemble in OUT "
                   "whose threshold and temperature come from the out-of-fold scores (OUT/oof_scores.csv).")
@click.option("--group-column", default=None, metavar="COLUMN",
              help="With --folds: rows with the same value in this CSV column stay in one fold.")
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
def run(recipe, overrides, out, resume, nproc, sweeps, dry_run, seeds, folds, group_column, quiet):
    """Train and evaluate RECIPE; writes a run directory.

    \b
    mmcore run recipes/x.toml --set train.epochs=5
    mmcore run --resume runs/x/20261128-101500     # after a crash, kill or Ctrl-C
    mmcore run recipes/x.toml --sweep vision.name=resnet50,vit_base --sweep pooling.name=mean,attention
    mmcore run recipes/x.toml --nproc 2            # DDP through torchrun
    mmcore run recipes/x.toml --seeds 3 --out runs/x-seeds   # 3 seeds, one ensemble directory
    mmcore run recipes/x.toml --folds 5 --out runs/x-bag     # a 5-fold bag, one ensemble directory
    """
    from mmcore.commands.run import resume_training, train_recipe

    if (seeds or folds) and (nproc or resume or sweeps):
        raise click.UsageError("--seeds and --folds train their runs one after another: no --nproc, --resume or --sweep")
    if seeds and folds:
        raise click.UsageError("--seeds or --folds, not both")
    if group_column and not folds:
        raise click.UsageError("--group-column groups the rows of --folds")
    if nproc:
        _exec_torchrun(nproc)

    if resume:
        if overrides or out:
            raise click.UsageError("--resume continues a run as it was: no --set or --out")
        resume_training(resume, recipe, progress=progress_for(quiet), echo=click.echo)
        return
    if not recipe:
        raise click.UsageError("missing RECIPE (or --resume RUN_DIR)")
    if sweeps:
        from mmcore.commands.sweep import run_sweep, sweep_completed

        sweep_dir = run_sweep(recipe, overrides, sweeps, out=out, dry_run=dry_run, progress=progress_for(quiet), echo=click.echo)
        if not dry_run and not sweep_completed(sweep_dir):
            sys.exit(1)  # which ones failed, and why, was said above
        return
    if dry_run:
        raise click.UsageError("--dry-run lists a --sweep grid; to see a recipe use: mmcore show RECIPE")
    if seeds:
        from mmcore.commands.ensemble import train_seed_ensemble

        train_seed_ensemble(recipe, overrides, seeds=seeds, out=out, progress=progress_for(quiet), echo=click.echo)
        return
    if folds:
        from mmcore.commands.ensemble import train_fold_bag

        train_fold_bag(recipe, overrides, folds=folds, out=out, group_column=group_column, progress=progress_for(quiet),
                       echo=click.echo)
        return
    train_recipe(recipe, overrides, out=out, progress=progress_for(quiet), echo=click.echo)


def _exec_torchrun(nproc):
    """Replace this process with ``torchrun --standalone --nproc_per_node=N -m mmcore run ...``."""
    import os

    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--nproc":
            del args[i : i + 2]
            break
        if arg.startswith("--nproc="):
            del args[i]
            break
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "mmcore", *args]
    click.echo("launching: torchrun " + " ".join(command[3:]), err=True)
    sys.stdout.flush()
    os.execv(sys.executable, command)


@cli.command("eval")
@click.argument("run_dir", metavar="RUN_DIR|BUNDLE_DIR", type=click.Path(file_okay=False))
@click.option("--data", type=click.Path(dir_okay=False),
              help="CSV to score, or shard URLs for a shard-trained run (default: the run's test split).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Where to write (default RUN_DIR/eval/<csv>-<time>; for a bundle BUNDLE_DIR-eval/<csv>-<time>).")
@device_option
@cache_option
@verify_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def eval_(run_dir, data, out, device, cache, verify, quiet):
    """Re-score a labelled CSV with a finished run's model or its export bundle (results.json,
    test_predictions.json, test_report.md, report.html)."""
    from mmcore.commands.evaluate import evaluate

    evaluate(run_dir, data=data, out=out, device=device, cache=cache, verify=verify or None, progress=progress_for(quiet),
             echo=click.echo)


@cli.command()
@click.option("--data", "data_dir", default="demo_data", show_default=True, type=click.Path(file_okay=False),
              help="Where the generated dataset lives (made when missing).")
@click.option("--recipe", default=None, type=click.Path(dir_okay=False),
              help="Recipe (default: recipes/demo.toml here, else the one shipped with mmcore).")
@set_option
@click.option("--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
def demo(data_dir, recipe, overrides, quiet):
    """Make a small ad-vs-not dataset and train the demo recipe on it (about 2 minutes of CPU time on 2 cores)."""
    from mmcore.commands.demo import run_demo

    run_demo(data_dir, recipe=recipe, overrides=overrides, progress=progress_for(quiet), echo=click.echo)


def _add_commands():
    from mmcore.cli.audit import audit_command
    from mmcore.cli.cache import cache_group
    from mmcore.cli.compare import compare_command
    from mmcore.cli.drift import drift_command
    from mmcore.cli.ensemble import ensemble_command
    from mmcore.cli.export import export_command
    from mmcore.cli.new_plugin import new_plugin_command
    from mmcore.cli.ocr import ocr_command
    from mmcore.cli.predict import predict_command
    from mmcore.cli.select import select_command
    from mmcore.cli.serve import serve_command
    from mmcore.cli.shard import shard_command
    from mmcore.cli.tune import tune_command

    commands = (predict_command, compare_command, ocr_command, cache_group, new_plugin_command, export_command, serve_command,
                tune_command, shard_command, ensemble_command)
    for command in commands:
        cli.add_command(command)
    cli.add_command(drift_command)
    cli.add_command(audit_command)
    cli.add_command(select_command)


_add_commands()


def main():
    cli(prog_name="mmcore")
