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
from mmcore.data.frames import require_split_file
from mmcore.devices import parse_device
from mmcore.engine.outputs import write_evaluation
from mmcore.errors import DataError
from mmcore.export.bundle import is_bundle
from mmcore.io import check_output_path
from mmcore.rundir import EVAL_DIR
from mmcore.scoring.ensemble_dir import is_ensemble
from mmcore.scoring.rows import collect, score_rows

#: the key of results.json that names the model evaluated, per kind of scorer (others: the kind itself)
SOURCE_KEYS = {"run": "run_dir"}


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
    if not data:
        require_split_file(recipe.data.test, "test", hint="give the rows to evaluate with --data CSV")
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
    split, csv = eval_split(scorer.run_model.recipe, data)
    return evaluate_rows(scorer, split, csv, out=out, cache=cache, registry=registry, progress=progress, echo=echo).out


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
    return evaluate_rows(scorer, split, csv, out=out, registry=registry, progress=progress, echo=echo).out


@attrs.frozen
class Evaluation:
    """What an evaluation wrote (``out``: the folder) and its ``results.json`` as a dict."""

    out: Path
    results: dict

    @property
    def metrics(self):
        """The test metrics at the run's threshold (``auroc``, ``f1``, ``accuracy``, ...; intervals: ``results["test"]["intervals"]``)."""
        return self.results["test"]["at_threshold"]


def evaluate_rows(scorer, split, csv, *, out=None, cache=False, registry=None, progress=True, echo=print):
    """Score the labelled rows of ``split`` (read from ``csv``, or a DataFrame) with an open scorer and write
    the evaluation folder (``out``; default beside the model: ``RUN/eval/<csv>-<time>``, or
    ``MODEL-eval/<csv>-<time>`` beside a bundle, whose folder is never written to) -> :class:`Evaluation`.

    ``mmcore eval`` and the Python API's ``Model.evaluate`` both end here. A run's PyTorch model also
    explains its decisions in the reports; ``cache=True`` (runs) scores through the feature cache.
    """
    from mmcore.scoring.run import RunScorer

    csv = Path(csv)
    if split.labels is None:
        raise DataError(f"{csv}: eval needs labels in every row (use mmcore predict for unlabeled data)")
    if out:
        out_dir = Path(out)
    elif scorer.kind in ("run", "ensemble"):  # a folder of its own: the evaluation beside the model's files
        out_dir = scorer.source / EVAL_DIR / _eval_name(csv)
    else:
        out_dir = scorer.source.parent / f"{scorer.source.name}-eval" / _eval_name(csv)
    # the reports' explanations run the model once more over the rows: from the raw rows unless --cache
    pipeline = scoring_pipeline(scorer, cache=cache, progress=progress) if isinstance(scorer, RunScorer) else None
    if cache and pipeline is not None:
        split, indices, logits, labels, bad_images = score_through_cache(pipeline, split, "eval", progress=progress)
        skipped = bad_images.counts()
    else:
        scored = collect(score_rows(scorer, split, registry=registry, progress=progress, desc="eval"))
        split, indices, logits = scored_split(split, scored), scored.positions, scored.logits
        labels = split.label_array()[indices]
        skipped = {"eval": scored.skipped} if scored.skipped else {}
    experiment = scorer.recipe_data.get("experiment")
    summary = {
        "experiment": experiment,
        SOURCE_KEYS.get(scorer.kind, scorer.kind): str(scorer.source),
        "evaluated_csv": str(csv),
        "selected_epoch": scorer.selected_epoch,
        "data": {"eval": len(indices)},
        "skipped_images": skipped,
    }
    kind = "" if scorer.kind == "run" else f" ({scorer.kind})"
    results, _ = write_evaluation(
        out_dir, split=split, indices=indices, logits=logits, labels=labels,
        decision_info=scorer.decision, summary=summary, title=f"mmcore eval — {experiment}{kind} on {csv.name}",
        pipeline=pipeline,
    )
    _echo_result(echo, results, split, csv, scorer.decision, out_dir)
    return Evaluation(out=out_dir, results=results)


def _eval_name(csv):
    stem = re.sub(r"[^\w.-]+", "_", Path(csv).stem)  # a shard pattern's braces stay out of the name
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def _echo_result(echo, results, split, csv, decision, out_dir):
    test = results["test"]["at_threshold"]
    echo(f"evaluated {test['n']} rows of {csv}: AUROC {test['auroc']}, F1 {test['f1']:.4f} at threshold "
         f"{decision['threshold']:.4f}")
    echo(f"wrote {out_dir}")
