"""``mmcore eval RUN_DIR|BUNDLE_DIR``: re-score a labelled CSV (default: the run's test split) and write
what a run writes about its test split (results.json, test_predictions.json, reports, plots).

A run and a bundle score through the one scoring path (:func:`mmcore.scoring.rows.score_rows`),
in float32 from the raw rows; ``--cache`` (runs) scores through the feature cache instead, as the
run's validation did (:func:`score_through_cache`).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import attrs

from mmcore.data.csvs import load_splits, read_split, resolve_csv
from mmcore.devices import parse_device
from mmcore.engine.outputs import write_evaluation
from mmcore.errors import DataError
from mmcore.export.bundle import is_bundle
from mmcore.io import check_output_path
from mmcore.rundir import EVAL_DIR
from mmcore.scoring.ensemble_dir import is_ensemble
from mmcore.scoring.rows import collect, score_rows


def scoring_pipeline(scorer, *, cache, batch_size=None, progress=True):
    """A :class:`~mmcore.engine.pipeline.Pipeline` over a :class:`~mmcore.scoring.run.RunScorer`'s model,
    each row scored once: through the feature cache (``cache``), or from the raw rows (what the
    reports' explanations run on)."""
    from mmcore.engine.pipeline import Pipeline

    recipe = scorer.run_model.recipe
    if batch_size:
        recipe = attrs.evolve(recipe, eval=attrs.evolve(recipe.eval, batch_size=int(batch_size)))
    return Pipeline(recipe, scorer.run_model.registry, progress=progress, one_pass=True, use_cache=cache,
                    built=scorer.run_model)


def score_through_cache(pipeline, split, name, *, progress=True, desc=None):
    """``split`` scored through ``pipeline``'s feature cache (read and filled as training did: float16
    features), empty texts read first by the recipe's OCR engine: ``(split, indices, logits, labels,
    bad_images)`` (:func:`~mmcore.engine.inference.predict_through_pipeline`)."""
    from mmcore.engine.inference import predict_through_pipeline
    from mmcore.ocr.fill import ocr_stage

    split = ocr_stage({name: split}, pipeline.recipe, registry=pipeline.registry, progress=progress)[name]
    return predict_through_pipeline(pipeline, split, name, progress=progress, desc=desc)


def scored_split(split, scored):
    """``split`` with the texts its rows were scored with (a row read by OCR has its text)."""
    texts = list(split.texts)
    for position, text in zip(scored.positions, scored.texts):
        texts[int(position)] = text
    return attrs.evolve(split, texts=tuple(texts))


def eval_split(recipe, data=None):
    """``(split, where)`` to evaluate: ``data`` (a CSV; or shard URLs when the run reads
    WebDataset shards) or, by default, the run's own test split, from where it trained."""
    if getattr(recipe.data, "format", "csv") == "webdataset" and not (data and str(data).lower().endswith(".csv")):
        data_config = attrs.evolve(recipe.data, test=str(data)) if data else recipe.data
        return load_splits(data_config, names=("test",), cache=recipe.cache)["test"], Path(str(data_config.test))
    csv = Path(data) if data else resolve_csv(recipe.data.test, recipe.data.base_dir)
    return read_split(csv, recipe.data.base_dir if not data else None, max_image_bytes=recipe.data.max_image_bytes), csv


def evaluate(source, *, data=None, out=None, device="auto", cache=False, verify=None, registry=None, progress=True,
             echo=print):
    """``mmcore eval RUN_DIR|BUNDLE_DIR|ENSEMBLE_DIR``: :func:`evaluate_bundle` for a bundle or an ensemble,
    else :func:`evaluate_run`;
    ``--out`` is checked before anything is scored. Returns the evaluation folder."""
    check_output_path(out, "evaluation folder", folder=True)
    if is_bundle(source) or is_ensemble(source):
        return evaluate_bundle(source, data=data, out=out, device=device, verify=verify, registry=registry,
                               progress=progress, echo=echo)
    return evaluate_run(source, data=data, out=out, device=device, cache=cache, registry=registry, progress=progress,
                        echo=echo)


def evaluate_run(run_dir, *, data=None, out=None, device="auto", cache=False, registry=None, progress=True,
                 echo=print):
    """Re-score a CSV (default: the run's test split) with a finished (or live) run's model, in float32
    from the raw rows (``cache=True``: through the feature cache, as training's validation scored)."""
    from mmcore.engine.restore import open_run
    from mmcore.scoring.run import RunScorer

    device = parse_device(device)
    run_dir = open_run(run_dir, echo=echo)
    scorer = RunScorer(run_dir, device=device, registry=registry, progress=progress)
    recipe = scorer.run_model.recipe
    split, csv = eval_split(recipe, data)
    if split.labels is None:
        raise DataError(f"{csv}: eval needs labels in every row (use mmcore predict for unlabeled data)")
    out_dir = Path(out) if out else run_dir.path / EVAL_DIR / _eval_name(csv)
    # the reports' explanations run the model once more over the rows: from the raw rows unless --cache
    pipeline = scoring_pipeline(scorer, cache=cache, progress=progress)
    if cache:
        split, indices, logits, labels, bad_images = score_through_cache(pipeline, split, "eval", progress=progress)
        skipped = bad_images.counts()
    else:
        scored = collect(score_rows(scorer, split, registry=registry, progress=progress, desc="eval"))
        split, indices, logits = scored_split(split, scored), scored.positions, scored.logits
        labels = split.label_array()[indices]
        skipped = {"eval": scored.skipped} if scored.skipped else {}
    summary = {
        "experiment": recipe.experiment,
        "run_dir": str(run_dir.path),
        "evaluated_csv": str(csv),
        "selected_epoch": scorer.selected_epoch,
        "data": {"eval": len(indices)},
        "skipped_images": skipped,
    }
    results, _ = write_evaluation(
        out_dir, split=split, indices=indices, logits=logits, labels=labels,
        decision_info=scorer.decision, summary=summary, title=f"mmcore eval — {recipe.experiment} on {csv.name}",
        pipeline=pipeline,
    )
    _echo_result(echo, results, split, csv, scorer.decision, out_dir)
    return out_dir


def evaluate_bundle(bundle_dir, *, data=None, out=None, device="auto", verify=None, registry=None, progress=True,
                    echo=print):
    """``mmcore eval BUNDLE``: score a labelled CSV (default: the recipe's test split) with an export
    bundle and write what ``eval RUN`` writes (results.json, test_predictions.json, reports, plots).

    The metrics are the run's to within the parity tolerance; what needs the PyTorch model (each
    row's score without its text or image, saliency) is left out. Default ``out``:
    ``BUNDLE-eval/<csv>-<time>`` beside the bundle (a bundle folder is never written to). An ensemble
    directory is scored alike by its :class:`~mmcore.scoring.ensemble.EnsembleScorer` (default ``out``:
    ``DIR/eval/<csv>-<time>``, as a run's).
    """
    from mmcore.scoring.scorers import open_scorer

    bundle_dir = Path(bundle_dir)
    scorer = open_scorer(bundle_dir, device=parse_device(device), verify=verify, registry=registry, progress=progress)
    if scorer.recipe.data.format != "csv" and not (data and str(data).lower().endswith(".csv")):
        raise DataError(f"{bundle_dir}: the run read WebDataset shards; give a labelled CSV with --data")
    split, csv = eval_split(scorer.recipe, data)
    if split.labels is None:
        raise DataError(f"{csv}: eval needs labels in every row (use mmcore predict for unlabeled data)")
    default = bundle_dir / EVAL_DIR if scorer.kind == "ensemble" else bundle_dir.parent / f"{bundle_dir.name}-eval"
    out_dir = Path(out) if out else default / _eval_name(csv)
    scored = collect(score_rows(scorer, split, registry=registry, progress=progress, desc="eval"))
    split = scored_split(split, scored)
    summary = {
        "experiment": scorer.recipe.experiment,
        scorer.kind: str(bundle_dir),
        "evaluated_csv": str(csv),
        "selected_epoch": scorer.selected_epoch,
        "data": {"eval": len(scored.positions)},
        "skipped_images": {"eval": scored.skipped} if scored.skipped else {},
    }
    results, _ = write_evaluation(
        out_dir, split=split, indices=scored.positions, logits=scored.logits, labels=split.label_array()[scored.positions],
        decision_info=scorer.decision, summary=summary,
        title=f"mmcore eval — {scorer.recipe.experiment} ({scorer.kind}) on {csv.name}",
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
