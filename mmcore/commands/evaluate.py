"""``mmcore eval`` and what ``predict`` shares with it: rebuild a finished run, score a CSV."""

from __future__ import annotations

import re
import time
from pathlib import Path

import attrs
import numpy as np

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


def load_run(run_dir, *, registry=None, progress=True, echo=print, use_cache=True, device=None, fp32=False):
    """Rebuild a run's model from its recipe and best checkpoint -> (pipeline, ckpt).

    ``run_dir``: a path (checked here) or a :class:`RunDir` already checked with :func:`open_run`.
    ``use_cache=False``: score without the feature cache (see :class:`~mmcore.engine.pipeline.Pipeline`).
    ``device`` (``auto``/``cpu``/``cuda[:N]``) replaces the recipe's ``train.device`` for this scoring,
    ``fp32=True`` scores in float32 as a bundle computes: ``train.precision = "fp32"`` and no TF32 (both
    after the checkpoint's recipe check, which compares the recipe as trained).
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
    train = recipe.train
    if device is not None:
        from mmcore.export.devices import torch_device

        train = attrs.evolve(train, device=str(torch_device(device)))  # CUDA asked for and missing: one line naming --device
    if fp32:  # no autocast, and no TF32 matmuls on a GPU either
        train = attrs.evolve(train, precision="fp32", tf32=False)
    recipe = attrs.evolve(recipe, train=train)
    pipeline = Pipeline(recipe, registry, source=str(run_dir.recipe_file), progress=progress, one_pass=True,
                        use_cache=use_cache)
    load_model_state(pipeline.model, ckpt, path=str(run_dir.best))
    return pipeline, ckpt


def score_with_run(pipeline, split, name, *, progress=True, desc=None, dtype=None):
    """Logits for every usable row of ``split`` with a loaded run's model (eval, predict, export).

    Returns ``(split, indices, logits, labels, bad_images)``; ``split`` may have lost rows
    whose images could not be read (with ``data.on_bad_image = "skip"``). ``dtype``: an autocast
    dtype other than the pipeline's (export measures the run's training precision with it).
    """
    bad_images = BadImages(pipeline.recipe.data.on_bad_image)
    split = ocr_stage({name: split}, pipeline.recipe, registry=pipeline.registry, progress=progress)[name]
    dataset, split, errors = pipeline.dataset(split)
    if errors:
        bad_images.check({"errors": errors}, name)
    indices, logits, labels = predict(
        pipeline.model, pipeline.loader(dataset), device=pipeline.device, dtype=dtype or pipeline.dtype,
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


def evaluate_run(run_dir, *, data=None, out=None, device="auto", cache=False, registry=None, progress=True,
                 echo=print):
    """Re-score a CSV (default: the run's test split) with a finished (or live) run's model, in float32
    from the raw rows (``cache=True``: through the feature cache, as training scored)."""
    from mmcore.export.devices import parse_device

    device = parse_device(device)
    run_dir = open_run(run_dir, echo=echo)
    pipeline, ckpt = load_run(run_dir, registry=registry, progress=progress, use_cache=cache, device=device,
                              fp32=True)
    recipe = pipeline.recipe
    split, csv = eval_split(recipe, data)
    if split.labels is None:
        raise DataError(f"{csv}: eval needs labels in every row (use mmcore predict for unlabeled data)")
    out_dir = Path(out) if out else run_dir.path / EVAL_DIR / _eval_name(csv)
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
    _echo_result(echo, results, split, csv, decision, out_dir)
    return out_dir


def evaluate_bundle(bundle_dir, *, data=None, out=None, device="auto", verify=None, progress=True, echo=print):
    """``mmcore eval BUNDLE``: score a labelled CSV (default: the recipe's test split) with an export
    bundle and write what ``eval RUN`` writes (results.json, test_predictions.json, reports, plots).

    The metrics are the run's to within the parity tolerance; what needs the PyTorch model (each
    row's score without its text or image, saliency) is left out. Default ``out``:
    ``BUNDLE-eval/<csv>-<time>`` beside the bundle (a bundle folder is never written to).
    """
    from mmcore.export.predict import batch_size_of, fill_text_by_ocr, score_bundle_rows
    from mmcore.export.scoring import BundleScorer

    bundle_dir = Path(bundle_dir)
    scorer = BundleScorer(bundle_dir, device=device, verify=verify)
    if scorer.recipe.data.format != "csv" and not (data and str(data).lower().endswith(".csv")):
        raise DataError(f"{bundle_dir}: the run read WebDataset shards; give a labelled CSV with --data")
    split, csv = eval_split(scorer.recipe, data)
    if split.labels is None:
        raise DataError(f"{csv}: eval needs labels in every row (use mmcore predict for unlabeled data)")
    out_dir = Path(out) if out else bundle_dir.parent / f"{bundle_dir.name}-eval" / _eval_name(csv)
    split = fill_text_by_ocr(scorer, split, progress=progress)
    positions, logits, skipped = score_bundle_rows(scorer, split, batch_size=batch_size_of(scorer))
    labels = np.asarray(split.labels, dtype=np.int64)[positions]
    summary = {
        "experiment": scorer.recipe.experiment,
        "bundle": str(bundle_dir),
        "evaluated_csv": str(csv),
        "selected_epoch": scorer.manifest.selected_epoch,
        "data": {"eval": len(split) - skipped},
        "skipped_images": {"eval": skipped} if skipped else {},
    }
    results, _ = write_evaluation(
        out_dir, split=split, indices=positions, logits=logits, labels=labels, decision_info=scorer.decision,
        summary=summary, title=f"mmcore eval — {scorer.recipe.experiment} (bundle) on {csv.name}",
    )
    _echo_result(echo, results, split, csv, scorer.decision, out_dir)
    return out_dir


def _eval_name(csv):
    stem = re.sub(r"[^\w.-]+", "_", Path(csv).stem)  # a shard pattern's braces stay out of the name
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _echo_result(echo, results, split, csv, decision, out_dir):
    test = results["test"]["at_threshold"]
    echo(f"evaluated {test['n']} rows of {csv}: AUROC {test['auroc']}, F1 {test['f1']:.4f} at threshold "
         f"{decision['threshold']:.4f}")
    echo(f"wrote {out_dir}")
