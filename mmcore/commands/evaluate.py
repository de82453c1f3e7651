"""``mmcore eval`` and what ``predict`` shares with it: rebuild a finished run, score a CSV."""

from __future__ import annotations

import re
import time
from pathlib import Path

import attrs

from mmcore.data.csvs import load_splits, read_split, resolve_csv
from mmcore.engine.checkpoint import load_model_state, read_checkpoint
from mmcore.engine.inference import predict
from mmcore.engine.outputs import write_evaluation
from mmcore.engine.pipeline import Pipeline
from mmcore.engine.policies import BadImages
from mmcore.errors import DataError
from mmcore.model.weights import require_weights
from mmcore.ocr.fill import ocr_stage
from mmcore.recipe import recipe_to_dict
from mmcore.rundir import EVAL_DIR, RunDir, require_same_recipe


def open_run(run_dir, *, echo=print):
    """A run directory that can be scored: finished, or live (then its last completed checkpoint, said in one line)."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    note = run_dir.require_scorable()
    if note:
        echo(note)
    return run_dir


def load_run(run_dir, *, registry=None, progress=True, echo=print, use_cache=True, device=None):
    """Rebuild a run's model from its recipe and best checkpoint -> (pipeline, ckpt).

    ``run_dir``: a path (checked here) or a :class:`RunDir` already checked with :func:`open_run`.
    ``use_cache=False``: score without the feature cache (see :class:`~mmcore.engine.pipeline.Pipeline`).
    ``device``: where to build the model instead of the recipe's ``train.device`` ("cpu", "cuda:1").
    """
    if registry is None:
        from mmcore.plugins.manager import get_registry

        registry = get_registry()
    if not isinstance(run_dir, RunDir):
        run_dir = open_run(run_dir, echo=echo)
    recipe = run_dir.load_recipe(registry)
    ckpt = read_checkpoint(run_dir.best)
    require_same_recipe(
        ckpt.get("recipe"), recipe_to_dict(recipe), where=run_dir.best, said="checkpoint was trained with another recipe",
        added_ok=True,
    )
    require_weights(recipe, registry, source=str(run_dir.recipe_file))  # frozen pretrained encoders reload from their ids
    if device is not None:  # after the drift check: where it runs is not what it is
        recipe = attrs.evolve(recipe, train=attrs.evolve(recipe.train, device=device))
    pipeline = Pipeline(recipe, registry, source=str(run_dir.recipe_file), progress=progress, one_pass=True,
                        use_cache=use_cache)
    load_model_state(pipeline.model, ckpt, path=str(run_dir.best))
    return pipeline, ckpt


def score_with_run(pipeline, split, name, *, progress=True, desc=None):
    """Logits for every usable row of ``split`` with a loaded run's model (eval and predict).

    Returns ``(split, indices, logits, labels, bad_images)``; ``split`` may have lost rows
    whose images could not be read (with ``data.on_bad_image = "skip"``).
    """
    bad_images = BadImages(pipeline.recipe.data.on_bad_image)
    split = ocr_stage({name: split}, pipeline.recipe, registry=pipeline.registry, progress=progress)[name]
    dataset, split, errors = pipeline.dataset(split)
    if errors:
        bad_images.check({"errors": errors}, name)
    indices, logits, labels = predict(
        pipeline.model, pipeline.loader(dataset), device=pipeline.device, dtype=pipeline.dtype,
        bad_images=bad_images, split_name=name, desc=desc, progress=progress, channels_last=pipeline.channels_last,
    )
    return split, indices, logits, labels, bad_images


def eval_split(recipe, data=None):
    """``(split, where)`` to evaluate: ``data`` (a CSV; or shard URLs when the run reads
    WebDataset shards) or, by default, the run's own test split, from where it trained."""
    if getattr(recipe.data, "format", "csv") == "webdataset" and not (data and str(data).lower().endswith(".csv")):
        data_config = attrs.evolve(recipe.data, test=str(data)) if data else recipe.data
        return load_splits(data_config, names=("test",), cache=recipe.cache)["test"], Path(str(data_config.test))
    csv = Path(data) if data else resolve_csv(recipe.data.test, recipe.data.base_dir)
    return read_split(csv, recipe.data.base_dir if not data else None, max_image_bytes=recipe.data.max_image_bytes), csv


def evaluate_run(run_dir, *, data=None, out=None, registry=None, progress=True, echo=print):
    """Re-score a CSV (default: the run's test split) with a finished (or live) run's model."""
    run_dir = open_run(run_dir, echo=echo)
    pipeline, ckpt = load_run(run_dir, registry=registry, progress=progress)
    recipe = pipeline.recipe
    split, csv = eval_split(recipe, data)
    if split.labels is None:
        raise DataError(f"{csv}: eval needs labels in every row (use mmcore predict for unlabeled data)")
    stem = re.sub(r"[^\w.-]+", "_", csv.stem)  # a shard pattern's braces stay out of the name
    out_dir = Path(out) if out else run_dir.path / EVAL_DIR / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    split, indices, logits, labels, bad_images = score_with_run(pipeline, split, "eval", progress=progress)
    decision = ckpt.get("decision") or {"threshold": 0.5, "temperature": 1.0, "description": "0.5 (no decision saved)"}
    summary = {
        "experiment": recipe.experiment,
        "run_dir": str(run_dir.path),
        "evaluated_csv": str(csv),
        "selected_epoch": ckpt.get("epoch"),
        "data": {"eval": len(split)},
        "skipped_images": bad_images.counts(),
    }
    results, _ = write_evaluation(
        out_dir, split=split, indices=indices, logits=logits, labels=labels,
        decision_info=decision, summary=summary, title=f"mmcore eval — {recipe.experiment} on {csv.name}",
        pipeline=pipeline,
    )
    test = results["test"]["at_threshold"]
    echo(f"evaluated {len(split)} rows of {csv}: AUROC {test['auroc']}, F1 {test['f1']:.4f} at threshold {decision['threshold']:.4f}")
    echo(f"wrote {out_dir}")
    return out_dir
