"""``mmcore tune RECIPE --space SPACE.toml --trials N``: hyperparameter search on Optuna.

Each trial is an ordinary run directory inside one study directory
(``<output_dir>/<experiment>/tune-<study>/`` by default, the study named after the space file);
the objective is the recipe's ``train.early_stopping.metric`` (its direction from the metric),
reported every epoch so the pruner can stop bad trials early. Running the same command again
continues the study; ``--jobs K`` runs K trials at once; ``--storage URL`` shares the study with
other ``mmcore tune`` processes or machines. The study machinery is :mod:`mmcore.tune.study`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from mmcore.errors import RecipeError, RunError
from mmcore.io import check_output_path
from mmcore.tune.study import (
    CONFIG_FILE,
    DB_FILE,
    ENV_CONFIG,
    HEARTBEAT,
    TuneConfig,
    die_with_parent,
    gpu_slots,
    logical_trials,
    make_pruner,
    make_sampler,
    make_storage,
    masked,
    storage_errors,
    study_lock,
    summarize,
    visible_gpus,
    work,
)


def run_tune(
    recipe_path,
    space_path,
    *,
    trials=None,
    overrides=(),
    sampler="tpe",
    pruner="median",
    jobs=1,
    storage=None,
    study=None,
    out=None,
    nproc=None,
    seed=None,
    heartbeat=None,
    registry=None,
    progress=True,
    echo=print,
):
    """Run (or continue) a study; returns its record (``study.json``: trials, values, the best).

    The space is checked against the recipe before anything runs; ``--sampler``/``--pruner``
    take Optuna's keyword arguments after a colon (``median:n_startup_trials=1``). ``heartbeat``:
    seconds between a trial's liveness records (default :data:`~mmcore.tune.study.HEARTBEAT`).
    """
    from mmcore.engine.selection import metric_mode
    from mmcore.kit.deps import require_extra
    from mmcore.recipe import recipe_to_dict
    from mmcore.tune.space import check_space, load_space

    require_extra("tune", "mmcore tune")
    if registry is None:
        from mmcore.plugins.manager import get_registry

        registry = get_registry()
    if jobs < 1:
        raise RecipeError(f"--jobs {jobs}: must be at least 1")
    space = load_space(space_path)
    base = check_space(space, recipe_path, overrides, registry=registry)
    metric = base.train.early_stopping.metric
    direction = "maximize" if metric_mode(metric) == "max" else "minimize"
    if sampler.partition(":")[0].strip().lower() == "grid":
        size = space.grid_size()
        if trials is not None and trials > size:
            echo(f"--trials {trials}: the grid has {size} points; running {size}")
        trials = min(trials or size, size)
    elif trials is None:
        raise RecipeError("--trials: give the number of trials (only --sampler grid knows its own)")
    if trials < 1:
        raise RecipeError(f"--trials {trials}: must be at least 1")
    make_sampler(sampler, space, seed)  # bad sampler/pruner options: one line, before anything is written
    make_pruner(pruner, base.train.epochs)
    name = study or Path(space_path).stem
    study_dir = Path(out) if out else Path(base.output_dir) / base.experiment / f"tune-{name}"
    study_dir = check_output_path(study_dir, "study directory", folder=True).resolve()
    url = storage or f"sqlite:///{study_dir / DB_FILE}"
    config = TuneConfig(
        recipe=str(Path(recipe_path).resolve()), space=str(Path(space_path).resolve()), study_dir=str(study_dir),
        study_name=name, storage=url, trials=trials, metric=metric, direction=direction, epochs=base.train.epochs,
        overrides=tuple(overrides), sampler=sampler, pruner=pruner, nproc=nproc, seed=seed, heartbeat=heartbeat or HEARTBEAT,
        progress=progress and jobs == 1,
    )
    identity = {"recipe": recipe_to_dict(base), "space": space.to_dict(), "metric": metric, "direction": direction}
    identity = json.loads(json.dumps(identity))  # as tune.json holds it (tuples are lists there)
    done = _open_study(config, identity)
    echo(f"tune {recipe_path}: study {name!r}, {trials} trials ({sampler} sampler, {pruner} pruner, {jobs} at a time), "
         f"{direction} {metric} -> {study_dir}")
    if done:
        echo(f"continuing the study: {done} trials already finished")
    if jobs == 1:
        work(config, train_trial=train_trial, registry=registry, echo=echo)
    else:
        run_workers(config, jobs, echo=echo)
    return summarize(config, echo=echo)


def _open_study(config, identity):
    """Create the study (or check that an existing one searches the same thing); returns its finished trials."""
    import optuna
    from optuna.trial import TrialState

    from mmcore.io import write_json
    from mmcore.rundir import require_same_recipe

    study_dir = Path(config.study_dir)
    with study_lock(study_dir):  # two processes starting at once create the storage once
        record_path = study_dir / CONFIG_FILE
        if record_path.is_file():
            saved = json.loads(record_path.read_text(encoding="utf-8"))
            require_same_recipe(
                {"space": saved.get("space"), **(saved.get("recipe") or {})},
                {"space": identity["space"], **identity["recipe"]},
                where=study_dir, said="this study was started with another recipe or space",
                then="; give --study NAME for a new study",
            )
        write_json(record_path, {**identity, "study": config.study_name, "storage": masked(config.storage),
                                 "recipe_path": config.recipe, "space_path": config.space, "overrides": list(config.overrides)})
        storage = make_storage(config.storage)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with storage_errors(config.storage):  # a read-only SQLite file: one line, not Optuna's traceback
            study = optuna.create_study(study_name=config.study_name, storage=storage, direction=config.direction,
                                        load_if_exists=True)
        if study.direction.name.lower() != config.direction:
            raise RunError(f"{masked(config.storage)}: study {config.study_name!r} exists and is to "
                           f"{study.direction.name.lower()}, not {config.direction} {config.metric}")
        finished = (TrialState.COMPLETE, TrialState.PRUNED)
        return sum(1 for group in logical_trials(study.get_trials(deepcopy=False)).values() if group[-1].state in finished)


def run_workers(config, jobs, *, echo=print):
    """``jobs`` worker processes on this study (one GPU group each when there are several GPUs)."""
    env = {**os.environ, ENV_CONFIG: config.to_json()}
    processes = []
    for index, devices in enumerate(gpu_slots(jobs, config.nproc, visible_gpus())):
        worker_env = dict(env)
        if devices is not None:
            worker_env["CUDA_VISIBLE_DEVICES"] = devices
        echo(f"job {index}: started" + (f" on CUDA_VISIBLE_DEVICES={devices}" if devices else ""))
        processes.append(subprocess.Popen([sys.executable, "-m", "mmcore.tune", "worker", str(index)],
                                          env=worker_env, preexec_fn=die_with_parent))
    try:
        codes = [p.wait() for p in processes]
    except KeyboardInterrupt:
        for p in processes:  # they got the same Ctrl-C: let them write last.ckpt and requeue their trials
            p.wait()
        echo("tune interrupted; run the same command again to continue the study")
        raise
    failed = [f"job {i} exited with status {code}" for i, code in enumerate(codes) if code]
    if failed:
        echo("; ".join(failed) + " (its lines are above); the finished trials are kept")


def train_trial(config, trial, trial_dir, overrides, *, resume, registry=None, echo=print):
    """Train one trial's run in ``trial_dir`` (on every rank under torchrun; ``trial`` on rank 0 only).

    After each epoch rank 0 reports the objective metric to Optuna and asks the pruner; the
    answer goes to every rank. A pruned run finishes with its best epoch so far and its
    ``status.json`` says ``pruned``.
    """
    from mmcore.commands.run import run_training
    from mmcore.dist import broadcast_object, is_main
    from mmcore.recipe import load_recipe
    from mmcore.rundir import RECIPE_FILE, read_status, write_status

    pruned = []

    def on_epoch_end(epoch, metrics):
        prune = False
        if trial is not None:
            value = metrics.get(config.metric)
            if value is not None and math.isfinite(value):
                trial.report(float(value), epoch)
                # the last epoch is a finished trial: nothing left to save by stopping it
                prune = epoch < config.epochs and trial.should_prune()
        prune = broadcast_object(prune)
        if prune:
            pruned.append(epoch)
        return prune

    progress = config.progress
    if resume:
        recipe = load_recipe(trial_dir / RECIPE_FILE, registry=registry)
        run_training(recipe, recipe_path=trial_dir / RECIPE_FILE, resume=trial_dir, registry=registry,
                     progress=progress, echo=echo, on_epoch_end=on_epoch_end)
    else:
        recipe = load_recipe(config.recipe, [*config.overrides, *overrides], registry=registry)
        run_training(recipe, recipe_path=config.recipe, out=trial_dir, registry=registry,
                     progress=progress, echo=echo, on_epoch_end=on_epoch_end)
    if pruned and is_main():
        status = read_status(trial_dir) or {}
        write_status(trial_dir, "pruned", pruned_at_epoch=pruned[0], seconds=status.get("seconds"))
