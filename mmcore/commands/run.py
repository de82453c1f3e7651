"""``mmcore run``: a run directory is the unit of everything.

``runs/<experiment>/<timestamp>/`` holds the resolved recipe, ``checkpoint_best.ckpt``,
``last.ckpt``, ``results.json``, ``test_predictions.json``, ``test_report.md``,
``report.html``, plots, TensorBoard logs and ``status.json``. Training itself is
:class:`mmcore.engine.training.TrainingRun`; evaluation of a finished run is
:mod:`mmcore.commands.evaluate`.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from mmcore.data.bulk import paused_gc
from mmcore.data.csvs import load_splits
from mmcore.data.memo import ImageHashes
from mmcore.dist import broadcast_object, init_distributed, is_main, world_size
from mmcore.engine.checkpoint import read_checkpoint
from mmcore.engine.loggers import require_logger_packages
from mmcore.engine.training import Interrupted, TrainingRun
from mmcore.errors import DataError
from mmcore.model.weights import require_weights
from mmcore.ocr.fill import ocr_stage
from mmcore.rundir import LAST, RunDir
from mmcore.scoring.run import score_split
from mmcore.scoring.teacher import open_teacher


def resume_training(run_dir, recipe=None, *, registry=None, progress=True, echo=print):
    """Continue a stopped run in its directory; ``recipe`` (optional: a loaded recipe or its file) must be
    the one it was started with.

    The lock comes first, so a second ``--resume`` of a live run is refused as such, whatever
    the live run has written so far.
    """
    if isinstance(recipe, (str, Path)):
        from mmcore.recipe import load_recipe

        recipe = load_recipe(recipe)
    run_dir = RunDir(run_dir)
    run_dir.require_exists()
    with run_dir.lock(echo=echo):
        run_dir.check_resumable(recipe)
        loaded = run_dir.load_recipe(registry)
        return run_training(
            loaded, recipe_path=run_dir.recipe_file, registry=registry, progress=progress, echo=echo, resume=run_dir
        )


def train_recipe(recipe_path, overrides=(), *, out=None, registry=None, progress=True, echo=print):
    """``mmcore run RECIPE --set ...``: load the recipe (every problem one line) and train it; returns the run directory."""
    from mmcore.recipe import load_recipe

    loaded = load_recipe(recipe_path, overrides)
    return run_training(loaded, recipe_path=recipe_path, out=out, registry=registry, progress=progress, echo=echo)


def run_training(recipe, *, recipe_path, out=None, registry=None, progress=True, echo=print, resume=None, on_epoch_end=None):
    """Train, select, calibrate and evaluate; returns the run directory.

    ``on_epoch_end(epoch, metrics)``: see :class:`TrainingRun`; returning True ends training early.

    ``resume``: a run directory whose ``last.ckpt`` holds the full training state; the run
    continues there and ends with the same predictions an uninterrupted run would give.
    The run directory is locked while this process writes it (rank 0 only under torchrun).
    """
    if registry is None:
        from mmcore.plugins.manager import get_registry

        registry = get_registry()
    started = time.perf_counter()
    init_distributed(recipe.train.dist_timeout_s)  # under torchrun: gloo on CPU, NCCL on GPU, explicit timeout
    main = is_main()
    if not main:  # rank 0 alone talks and writes
        echo, progress = (lambda *args, **kwargs: None), False
    require_weights(recipe, registry, source=str(recipe_path))  # every missing model in one message, before any data
    require_logger_packages(recipe)  # a missing mlflow or wandb is one line, before any data
    splits = load_splits(recipe.data, cache=recipe.cache)  # all data problems before anything heavy
    hashes = ImageHashes.for_recipe(recipe)  # each image hashed once: checks, OCR, feature cache
    duplicates = _check_images(recipe, splits, echo, hashes)
    splits = ocr_stage(splits, recipe, registry=registry, hashes=hashes, progress=progress)
    with contextlib.ExitStack() as held:
        if resume is not None:
            run_dir = resume if isinstance(resume, RunDir) else RunDir(resume)
            held.enter_context(run_dir.lock(echo=echo))
            if main:
                run_dir.sweep_temp_files()  # what a killed atomic write left, now that nobody else writes here
            state = read_checkpoint(run_dir.last)
            echo(f"resuming {run_dir} from epoch {state['epoch']}, batch {state['batches_done']}")
        else:
            state = None
            if main:
                run_dir = RunDir.create(recipe, out)
                held.enter_context(run_dir.lock(echo=echo))
                run_dir.write_recipe(recipe)
            run_dir = broadcast_object(run_dir if main else None)
        return _train(recipe, registry, splits, run_dir, recipe_path, state, progress, echo, duplicates, started, on_epoch_end)


def _train(recipe, registry, splits, run_dir, recipe_path, state, progress, echo, duplicates, started, on_epoch_end=None):
    """The training run in its (locked) run directory, its status kept in ``status.json``."""
    main = is_main()
    if world_size() > 1:
        echo(f"distributed: {world_size()} processes, global batch {recipe.train.batch_size}")
    if not main:
        return _run_worker(recipe, registry, splits, run_dir.path, recipe_path, state, on_epoch_end)
    write_status = run_dir.write_status
    write_status("running")
    try:
        training = TrainingRun(
            recipe, registry, splits, run_dir.path, recipe_path, progress, echo, duplicates=duplicates.counts(),
            on_epoch_end=on_epoch_end, score_split=score_split, open_teacher=open_teacher,
        )
        with _stop_on_signals(training, echo):
            if state is not None:
                training.load_state(state)
            result = training.fit()
    except Interrupted:
        write_status("interrupted")
        raise
    except KeyboardInterrupt:
        write_status("interrupted")
        raise
    except BaseException as exc:
        write_status("failed", error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    result["seconds"] = round(time.perf_counter() - started, 2)
    write_status("completed", seconds=result["seconds"])
    echo(summary_screen(result, run_dir.path))
    return run_dir.path


@paused_gc()  # per-row facts, digests and messages: no reference cycles among them
def _check_images(recipe, splits, echo, hashes):
    """Before a run directory exists: images that cannot be used (header scan) and leakage.

    Both come from ``hashes.facts`` (one read per file ever, remembered by stat key: a warm
    start stats each file and reads none), fetched in one pass for every split.
    """
    from mmcore.data.checks import find_duplicates, scan_images

    paths = [path for split in splits.values() for path in split.paths]
    stats = [st for split in splits.values() for st in (split.stats or [None] * len(split))]
    hashes.facts(paths, stats)  # with the stats the CSV read took: a warm start stats each file once
    if recipe.data.on_bad_image == "error" and recipe.train.modality != "text_only":
        bad = [
            line
            for name in ("train", "val", "test")
            for line in scan_images(
                splits[name], max_pixels=recipe.data.max_image_pixels, formats=recipe.data.image_formats, facts=hashes.facts
            )
        ]
        if bad:
            raise DataError(bad + ['set data.on_bad_image = "skip" to leave such images out (counted in results.json)'])
    duplicates = find_duplicates(splits, hashes)
    for line in duplicates.warnings():
        echo(line)
    return duplicates


def _run_worker(recipe, registry, splits, run_dir, recipe_path, state, on_epoch_end=None):
    """Ranks > 0: the same training in lock-step, writing nothing."""
    quiet = lambda *args, **kwargs: None  # noqa: E731
    training = TrainingRun(recipe, registry, splits, run_dir, recipe_path, False, quiet, on_epoch_end=on_epoch_end,
                           score_split=score_split, open_teacher=open_teacher)
    with _stop_on_signals(training, quiet):
        if state is not None:
            training.load_state(state)
        training.fit()
    return run_dir


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
    """The one-screen summary printed at the end of a run: the run's decisions, not the raw model at 0.5."""
    test = (results.get("test") or {}).get("at_threshold") or {}
    intervals = (results.get("test") or {}).get("intervals") or {}
    decision = results.get("decision", {})
    threshold = decision.get("threshold", 0.5)

    def fmt(value):
        return "n/a" if value is None else f"{value:.4f}"

    def interval(name):
        bounds = intervals.get(name)
        return f" (95% CI {bounds[0]:.3f}-{bounds[1]:.3f})" if bounds else ""

    calibration = f"temperature {decision.get('temperature', 1.0):.3g}"
    if results.get("test"):
        calibration += f", test ECE {fmt(results['test'].get('ece_raw'))} raw -> {fmt(results['test'].get('ece_calibrated'))}"
    lines = [
        "",
        f"== {results['experiment']} ==  ({results.get('seconds', 0):.1f} s)",
        f"run dir        {run_dir}",
        f"selected epoch {results['selected_epoch']} of {results['epochs_trained']} "
        f"({results['selection_metric']} = {fmt(results['val'].get(results['selection_metric']))})",
        f"threshold      {threshold:.4f}  ({decision.get('description', '')})",
        f"test AUROC     {fmt(test.get('auroc'))}{interval('auroc')}   AUPRC {fmt(test.get('auprc'))}",
        f"test F1        {fmt(test.get('f1'))}{interval('f1')} at threshold {threshold:.4f} on the calibrated score",
        f"test accuracy  {fmt(test.get('accuracy'))}   precision {fmt(test.get('precision'))}   recall {fmt(test.get('recall'))}",
        f"calibration    {calibration}",
        f"reports        {Path(run_dir) / 'report.html'}  {Path(run_dir) / 'test_report.md'}",
    ]
    skipped = results.get("skipped_images") or {}
    if skipped:
        lines.append(f"skipped images {skipped}")
    return "\n".join(lines)


# ---------------------------------------------------------------- eval
