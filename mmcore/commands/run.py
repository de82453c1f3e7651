"""``mmcore run``: a run directory is the unit of everything.

``runs/<experiment>/<timestamp>/`` holds the resolved recipe, ``checkpoint_best.ckpt``,
``last.ckpt``, ``results.json``, ``test_predictions.json``, ``test_report.md``,
``report.html``, plots, TensorBoard logs and ``status.json``. Training itself is
:class:`mmcore.engine.training.TrainingRun`; evaluation of a finished run is
:mod:`mmcore.commands.evaluate`.
"""

from __future__ import annotations

import time
from pathlib import Path

import tomllib

from mmcore.data.csvs import load_splits
from mmcore.engine.checkpoint import read_checkpoint
from mmcore.engine.outputs import LAST, RECIPE_FILE, write_status
from mmcore.engine.runtime import broadcast_object, init_distributed, is_main, world_size
from mmcore.engine.training import Interrupted, TrainingRun
from mmcore.errors import DataError, RunError
from mmcore.io import write_text
from mmcore.recipe import recipe_diff, recipe_to_dict, recipe_to_toml


def make_run_dir(recipe, out=None):
    """``<output_dir>/<experiment>/<timestamp>`` (or ``out``), created empty."""
    if out is not None:
        run_dir = Path(out)
        if run_dir.exists() and any(run_dir.iterdir()):
            raise RunError(f"{run_dir}: output directory exists and is not empty")
    else:
        base = Path(recipe.output_dir) / recipe.experiment
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = base / stamp
        n = 1
        while run_dir.exists():
            n += 1
            run_dir = base / f"{stamp}-{n}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_training(recipe, *, recipe_path, out=None, registry=None, progress=True, echo=print, resume=None, on_epoch_end=None):
    """Train, select, calibrate and evaluate; returns the run directory.

    ``on_epoch_end(epoch, metrics)``: see :class:`TrainingRun`; returning True ends training early.

    ``resume``: a run directory whose ``last.ckpt`` holds the full training state; the run
    continues there and ends with the same predictions an uninterrupted run would give.
    """
    if registry is None:
        from mmcore.plugins.manager import get_registry

        registry = get_registry()
    started = time.perf_counter()
    init_distributed()  # under torchrun: join the process group (gloo on CPU, NCCL on GPU)
    main = is_main()
    if not main:  # rank 0 alone talks and writes
        echo, progress = (lambda *args, **kwargs: None), False
    splits = load_splits(recipe.data)  # all data problems before anything heavy
    duplicates = _check_images(recipe, splits, echo)
    if resume is not None:
        run_dir, state = Path(resume), read_checkpoint(Path(resume) / LAST)
        echo(f"resuming {run_dir} from epoch {state['epoch']}, batch {state['batches_done']}")
    else:
        run_dir, state = broadcast_object(make_run_dir(recipe, out) if main else None), None
        if main:
            write_text(run_dir / RECIPE_FILE, recipe_to_toml(recipe))
    if world_size() > 1:
        echo(f"distributed: {world_size()} processes, global batch {recipe.train.batch_size}")
    if not main:
        return _run_worker(recipe, registry, splits, run_dir, recipe_path, state, on_epoch_end)
    write_status(run_dir, "running")
    try:
        training = TrainingRun(
            recipe, registry, splits, run_dir, recipe_path, progress, echo, duplicates=duplicates.counts(),
            on_epoch_end=on_epoch_end,
        )
        with _stop_on_signals(training, echo):
            if state is not None:
                training.load_state(state)
            result = training.fit()
    except Interrupted:
        write_status(run_dir, "interrupted")
        raise
    except KeyboardInterrupt:
        write_status(run_dir, "interrupted")
        raise
    except BaseException as exc:
        write_status(run_dir, "failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    result["seconds"] = round(time.perf_counter() - started, 2)
    write_status(run_dir, "completed", seconds=result["seconds"])
    echo(summary_screen(result, run_dir))
    return run_dir


def _check_images(recipe, splits, echo):
    """Before a run directory exists: images that cannot be used (header scan) and leakage."""
    from mmcore.data.checks import find_duplicates, scan_images

    if recipe.data.on_bad_image == "error" and recipe.train.modality != "text_only":
        bad = [
            line
            for name in ("train", "val", "test")
            for line in scan_images(splits[name], max_pixels=recipe.data.max_image_pixels)
        ]
        if bad:
            raise DataError(bad + ['set data.on_bad_image = "skip" to leave such images out (counted in results.json)'])
    duplicates = find_duplicates(splits)
    for line in duplicates.warnings():
        echo(line)
    return duplicates


def _run_worker(recipe, registry, splits, run_dir, recipe_path, state, on_epoch_end=None):
    """Ranks > 0: the same training in lock-step, writing nothing."""
    quiet = lambda *args, **kwargs: None  # noqa: E731
    training = TrainingRun(recipe, registry, splits, run_dir, recipe_path, False, quiet, on_epoch_end=on_epoch_end)
    with _stop_on_signals(training, quiet):
        if state is not None:
            training.load_state(state)
        training.fit()
    return run_dir


def check_resumable(run_dir, recipe=None):
    """The recipe of a run that can be resumed; refuses missing, finished or foreign runs."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run directory not found")
    from mmcore.engine.outputs import read_status

    status = read_status(run_dir)
    if status is None or not (run_dir / RECIPE_FILE).is_file():
        raise RunError(f"{run_dir}: not an mmcore run directory (no status.json / {RECIPE_FILE})")
    if status.get("state") == "completed":
        raise RunError(f"{run_dir}: run already completed; nothing to resume (start a new run instead)")
    if not (run_dir / LAST).is_file():
        raise RunError(f"{run_dir}: no {LAST} to resume from (the run stopped before its first checkpoint); start it again")
    saved = tomllib.loads((run_dir / RECIPE_FILE).read_text(encoding="utf-8"))
    if recipe is not None and recipe_to_dict(recipe) != saved:
        differing = recipe_diff(saved, recipe_to_dict(recipe))
        raise RunError(
            f"{run_dir}: this run was started with another recipe (differs at {', '.join(differing[:5])}); "
            f"resume it without a recipe: mmcore run --resume {run_dir}"
        )
    return saved


class _stop_on_signals:
    """SIGINT/SIGTERM ask the trainer to stop after the current step (a second SIGINT aborts)."""

    def __init__(self, training, echo):
        self.training = training
        self.echo = echo
        self.previous = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal

        trainer = self.training.trainer
        if trainer is None or trainer.stop_requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        trainer.stop_requested = True
        self.training.stop_signal = signum
        self.echo(f"\n{signal.Signals(signum).name}: stopping after the current step, writing {LAST} ...")

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def summary_screen(results, run_dir):
    """The one-screen summary printed at the end of a run."""
    test = (results.get("test") or {}).get("at_threshold") or {}
    half = (results.get("test") or {}).get("at_0.5") or {}
    decision = results.get("decision", {})

    def fmt(value):
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        "",
        f"== {results['experiment']} ==  ({results.get('seconds', 0):.1f} s)",
        f"run dir        {run_dir}",
        f"selected epoch {results['selected_epoch']} of {results['epochs_trained']} "
        f"({results['selection_metric']} = {fmt(results['val'].get(results['selection_metric']))})",
        f"threshold      {decision.get('threshold', 0.5):.4f}  ({decision.get('description', '')})",
        f"test AUROC     {fmt(test.get('auroc'))}   AUPRC {fmt(test.get('auprc'))}",
        f"test F1        {fmt(test.get('f1'))} at threshold, {fmt(half.get('f1'))} at 0.5",
        f"test accuracy  {fmt(test.get('accuracy'))}   precision {fmt(test.get('precision'))}   recall {fmt(test.get('recall'))}",
        f"reports        {Path(run_dir) / 'report.html'}  {Path(run_dir) / 'test_report.md'}",
    ]
    skipped = results.get("skipped_images") or {}
    if skipped:
        lines.append(f"skipped images {skipped}")
    return "\n".join(lines)


# ---------------------------------------------------------------- eval
