"""``mmcore eval`` and what ``predict`` shares with it: rebuild a finished run, score a CSV."""

from __future__ import annotations

import time
from pathlib import Path

import tomllib

from mmcore.data.csvs import read_split, resolve_csv
from mmcore.engine.checkpoint import load_model_state, read_checkpoint
from mmcore.engine.inference import predict
from mmcore.engine.outputs import BEST, RECIPE_FILE, require_completed, write_evaluation
from mmcore.engine.pipeline import Pipeline
from mmcore.engine.policies import BadImages
from mmcore.errors import DataError, RunError
from mmcore.recipe import recipe_diff, recipe_from_dict, recipe_to_dict


def load_run(run_dir, *, registry=None, progress=True):
    """Rebuild a finished run's model from its recipe and best checkpoint -> (pipeline, ckpt)."""
    if registry is None:
        from mmcore.plugins.manager import get_registry

        registry = get_registry()
    run_dir = Path(run_dir)
    require_completed(run_dir)
    recipe_path = run_dir / RECIPE_FILE
    try:
        data = tomllib.loads(recipe_path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RunError(f"{recipe_path}: cannot read the run's recipe ({exc})") from None
    recipe = recipe_from_dict(data, source=str(recipe_path), registry=registry)
    ckpt = read_checkpoint(run_dir / BEST)
    if ckpt.get("recipe") != recipe_to_dict(recipe):
        differing = recipe_diff(ckpt.get("recipe") or {}, recipe_to_dict(recipe))
        raise RunError(
            f"{run_dir / BEST}: checkpoint was trained with another recipe "
            f"(differs at {', '.join(differing[:5])})"
        )
    pipeline = Pipeline(recipe, registry, source=str(recipe_path), progress=progress)
    load_model_state(pipeline.model, ckpt, path=str(run_dir / BEST))
    return pipeline, ckpt


def score_with_run(pipeline, split, name, *, progress=True, desc=None):
    """Logits for every usable row of ``split`` with a loaded run's model (eval and predict).

    Returns ``(split, indices, logits, labels, bad_images)``; ``split`` may have lost rows
    whose images could not be read (with ``data.on_bad_image = "skip"``).
    """
    bad_images = BadImages(pipeline.recipe.data.on_bad_image)
    dataset, split, errors = pipeline.dataset(split)
    if errors:
        bad_images.check({"errors": errors}, name)
    indices, logits, labels = predict(
        pipeline.model, pipeline.loader(dataset), device=pipeline.device, dtype=pipeline.dtype,
        bad_images=bad_images, split_name=name, desc=desc, progress=progress, channels_last=pipeline.channels_last,
    )
    return split, indices, logits, labels, bad_images


def evaluate_run(run_dir, *, data=None, out=None, registry=None, progress=True, echo=print):
    """Re-score a CSV (default: the run's test split) with a finished run's model."""
    run_dir = Path(run_dir)
    pipeline, ckpt = load_run(run_dir, registry=registry, progress=progress)
    recipe = pipeline.recipe
    csv = Path(data) if data else resolve_csv(recipe.data.test, recipe.data.base_dir)
    split = read_split(csv, recipe.data.base_dir if not data else None)
    if split.labels is None:
        raise DataError(f"{csv}: eval needs labels in every row (use mmcore predict for unlabeled data)")
    out_dir = Path(out) if out else run_dir / "eval" / f"{csv.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    split, indices, logits, labels, bad_images = score_with_run(pipeline, split, "eval", progress=progress)
    decision = ckpt.get("decision") or {"threshold": 0.5, "temperature": 1.0, "description": "0.5 (no decision saved)"}
    summary = {
        "experiment": recipe.experiment,
        "run_dir": str(run_dir),
        "evaluated_csv": str(csv),
        "selected_epoch": ckpt.get("epoch"),
        "data": {"eval": len(split)},
        "skipped_images": bad_images.counts(),
    }
    results, _ = write_evaluation(
        out_dir, split=split, indices=indices, logits=logits, labels=labels,
        decision_info=decision, summary=summary, title=f"mmcore eval — {recipe.experiment} on {csv.name}",
    )
    test = results["test"]["at_threshold"]
    echo(f"evaluated {len(split)} rows of {csv}: AUROC {test['auroc']}, F1 {test['f1']:.4f} at threshold {decision['threshold']:.4f}")
    echo(f"wrote {out_dir}")
    return out_dir
